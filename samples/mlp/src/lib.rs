//! An MLP inference service: a two-layer perceptron (ReLU hidden layer, linear output) whose
//! weights go to the GPU once in `init`; each request is one forward pass, two dispatches in one
//! submission.
//!
//! Init input: `inputs, hidden, outputs` as little-endian `u32`s, then W1 (inputs x hidden),
//! b1 (hidden), W2 (hidden x outputs), b2 (outputs) as row-major little-endian `f32`s. An empty
//! init input loads seeded weights for a 16-64-4 network.
//! Request: `inputs` numbers separated by commas or whitespace, as text.
//! Response: `outputs` numbers separated by commas, as text.
//!
//! Build: `cargo build --release --target wasm32-wasip1 -p mlp`;
//! run: `echo 1,2,3,...,16 | wasmgrid infer target/wasm32-wasip1/release/mlp.wasm`.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

use wasmgrid::{Buffer, Error, InferenceService, Pipeline, Result, Submission};

/// One dense layer: out[j] = act(sum_i x[i] * w[i * outputs + j] + bias[j]), one invocation per
/// output.
const LAYER_WGSL: &str = r#"
struct Layer { inputs: u32, outputs: u32, relu: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> layer: Layer;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn dense(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= layer.outputs) { return; }
    var acc = bias[j];
    for (var i = 0u; i < layer.inputs; i = i + 1u) {
        acc = acc + x[i] * w[i * layer.outputs + j];
    }
    if (layer.relu != 0u) { acc = max(acc, 0.0); }
    y[j] = acc;
}
"#;

struct Mlp {
    dims: [u32; 3],
    pipeline: Pipeline,
    layer1: Buffer,
    layer2: Buffer,
    w1: Buffer,
    b1: Buffer,
    w2: Buffer,
    b2: Buffer,
    x: Buffer,
    h: Buffer,
    y: Buffer,
}

fn seeded(len: usize, mut state: u32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            ((state % 2001) as f32 / 1000.0 - 1.0) * 0.25
        })
        .collect()
}

/// Parses the init input into dimensions and the four weight arrays.
fn parse_weights(input: &[u8]) -> Result<([u32; 3], [Vec<f32>; 4])> {
    if input.is_empty() {
        let (i, h, o) = (16u32, 64u32, 4u32);
        let w =
            [seeded((i * h) as usize, 1), seeded(h as usize, 2), seeded((h * o) as usize, 3), seeded(o as usize, 4)];
        return Ok(([i, h, o], w));
    }
    let header: Vec<u32> = wasmgrid::from_bytes(
        input.get(..12).ok_or_else(|| Error::bad_input("weights shorter than their 12-byte header"))?,
    );
    let (i, h, o) = (header[0] as usize, header[1] as usize, header[2] as usize);
    if i == 0 || h == 0 || o == 0 || i > 1 << 16 || h > 1 << 16 || o > 1 << 16 {
        return Err(Error::bad_input(format!("layer sizes {i}, {h}, {o} must be in 1..=65536")));
    }
    let sizes = [i * h, h, h * o, o];
    let want = 12 + 4 * sizes.iter().sum::<usize>();
    if input.len() != want {
        return Err(Error::bad_input(format!(
            "a {i}-{h}-{o} network needs {want} bytes of weights, got {}",
            input.len()
        )));
    }
    let all: Vec<f32> = wasmgrid::from_bytes(&input[12..]);
    let mut rest = all.as_slice();
    let mut parts: [Vec<f32>; 4] = Default::default();
    for (part, n) in parts.iter_mut().zip(sizes) {
        let (head, tail) = rest.split_at(n);
        *part = head.to_vec();
        rest = tail;
    }
    Ok(([header[0], header[1], header[2]], parts))
}

impl InferenceService for Mlp {
    fn init(input: &[u8]) -> Result<Self> {
        let (dims, [w1, b1, w2, b2]) = parse_weights(input)?;
        let [i, h, o] = dims;
        wasmgrid::log(wasmgrid::Level::Info, &format!("mlp {i}-{h}-{o} loaded"));
        Ok(Mlp {
            dims,
            pipeline: Pipeline::new(LAYER_WGSL, "dense")?,
            layer1: Buffer::uniform_from(&[i, h, 1, 0])?,
            layer2: Buffer::uniform_from(&[h, o, 0, 0])?,
            w1: Buffer::storage_from(&w1)?,
            b1: Buffer::storage_from(&b1)?,
            w2: Buffer::storage_from(&w2)?,
            b2: Buffer::storage_from(&b2)?,
            x: Buffer::storage(u64::from(i) * 4)?,
            h: Buffer::storage(u64::from(h) * 4)?,
            y: Buffer::storage(u64::from(o) * 4)?,
        })
    }

    fn infer(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        let text = std::str::from_utf8(request).map_err(|_| Error::bad_input("the request is not UTF-8 text"))?;
        let x = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<f32>().map_err(|_| Error::bad_input(format!("{t:?} is not a number"))))
            .collect::<Result<Vec<f32>>>()?;
        let [i, h, o] = self.dims;
        if x.len() != i as usize {
            return Err(Error::bad_input(format!("expected {i} numbers, got {}", x.len())));
        }
        self.x.write(0, &x)?;
        let mut s = Submission::new();
        s.dispatch(
            &self.pipeline,
            &[(0, &self.layer1), (1, &self.x), (2, &self.w1), (3, &self.b1), (4, &self.h)],
            [h.div_ceil(64), 1, 1],
        );
        s.dispatch(
            &self.pipeline,
            &[(0, &self.layer2), (1, &self.h), (2, &self.w2), (3, &self.b2), (4, &self.y)],
            [o.div_ceil(64), 1, 1],
        );
        s.run()?;
        let y = self.y.read_f32()?;
        let text: Vec<String> = y.iter().map(|v| v.to_string()).collect();
        Ok(text.join(",").into_bytes())
    }
}

wasmgrid::inference_service!(Mlp);
