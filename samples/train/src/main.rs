//! Trains a logistic-regression classifier by full-batch gradient descent on the GPU, on a
//! synthetic, seeded data set, and reports the loss as it falls.
//!
//! Input (optional text): `epochs=200 lr=0.5 samples=1024 features=8 seed=7`, any subset.
//! Output (text): `epoch E loss L` every 10 epochs, then `final loss L accuracy A`, then
//! `weights w0 w1 ... bias`.
//!
//! Each epoch is two dispatches (forward pass with per-sample loss; gradient and update per
//! parameter); ten epochs go in one submission.
//!
//! Build: `cargo build --release --target wasm32-wasip1 -p train`;
//! run: `wasmgrid run target/wasm32-wasip1/release/train.wasm`.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

use wasmgrid::{Buffer, Error, Pipeline, Result, Submission};

const TRAIN_WGSL: &str = r#"
struct Config { samples: u32, features: u32, lr: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> cfg: Config;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // samples x features
@group(0) @binding(2) var<storage, read> y: array<f32>;        // samples, 0 or 1
@group(0) @binding(3) var<storage, read_write> params: array<f32>; // features weights, then bias
@group(0) @binding(4) var<storage, read_write> err: array<f32>;    // p - y per sample
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;   // per-sample loss

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= cfg.samples) { return; }
    var z = params[cfg.features];
    for (var j = 0u; j < cfg.features; j = j + 1u) {
        z = z + x[i * cfg.features + j] * params[j];
    }
    let p = 1.0 / (1.0 + exp(-z));
    err[i] = p - y[i];
    let q = clamp(p, 1e-7, 1.0 - 1e-7);
    loss[i] = -(y[i] * log(q) + (1.0 - y[i]) * log(1.0 - q));
}

@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j > cfg.features) { return; }
    var g = 0.0;
    for (var i = 0u; i < cfg.samples; i = i + 1u) {
        var xij = 1.0;
        if (j < cfg.features) { xij = x[i * cfg.features + j]; }
        g = g + err[i] * xij;
    }
    params[j] = params[j] - cfg.lr * g / f32(cfg.samples);
}
"#;

struct Config {
    epochs: u32,
    lr: f32,
    samples: u32,
    features: u32,
    seed: u32,
}

fn parse(input: &[u8]) -> Result<Config> {
    let mut c = Config { epochs: 200, lr: 0.5, samples: 1024, features: 8, seed: 7 };
    let text = std::str::from_utf8(input).map_err(|_| Error::bad_input("the input is not UTF-8 text"))?;
    for item in text.split_whitespace() {
        let (key, value) =
            item.split_once('=').ok_or_else(|| Error::bad_input(format!("{item:?} is not key=value")))?;
        let bad = || Error::bad_input(format!("{item:?}: bad value"));
        match key {
            "epochs" => c.epochs = value.parse().map_err(|_| bad())?,
            "lr" => c.lr = value.parse().map_err(|_| bad())?,
            "samples" => c.samples = value.parse().map_err(|_| bad())?,
            "features" => c.features = value.parse().map_err(|_| bad())?,
            "seed" => c.seed = value.parse().map_err(|_| bad())?,
            other => return Err(Error::bad_input(format!("unknown setting {other:?}"))),
        }
    }
    // Shader loops run `samples` and `features` times; keep them well inside what every driver
    // runs to completion.
    if !(1..=60_000).contains(&c.samples) || !(1..=256).contains(&c.features) || c.epochs > 100_000 {
        return Err(Error::bad_input("samples must be 1..=60000, features 1..=256, epochs at most 100000"));
    }
    Ok(c)
}

/// xorshift32, uniform in [-1, 1).
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
}

/// Points uniform in [-1, 1)^features, labelled by a seeded true hyperplane.
fn dataset(c: &Config) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng(c.seed.max(1));
    let truth: Vec<f32> = (0..=c.features).map(|_| rng.next() * 2.0).collect();
    let mut x = Vec::with_capacity((c.samples * c.features) as usize);
    let mut y = Vec::with_capacity(c.samples as usize);
    for _ in 0..c.samples {
        let row: Vec<f32> = (0..c.features).map(|_| rng.next()).collect();
        let z: f32 = row.iter().zip(&truth).map(|(a, b)| a * b).sum::<f32>() + truth[c.features as usize];
        y.push(if z > 0.0 { 1.0 } else { 0.0 });
        x.extend(row);
    }
    (x, y)
}

fn main() -> Result<()> {
    let c = parse(&wasmgrid::input()?)?;
    let (x, y) = dataset(&c);
    let n = c.samples;

    let cfg_words = [n, c.features, c.lr.to_bits(), 0];
    let cfg = Buffer::uniform_from(&cfg_words)?;
    let xb = Buffer::storage_from(&x)?;
    let yb = Buffer::storage_from(&y)?;
    let params = Buffer::storage(u64::from(c.features + 1) * 4)?;
    let err = Buffer::storage(u64::from(n) * 4)?;
    let loss = Buffer::storage(u64::from(n) * 4)?;
    let forward = Pipeline::new(TRAIN_WGSL, "forward")?;
    let update = Pipeline::new(TRAIN_WGSL, "update")?;
    let bind = [(0, &cfg), (1, &xb), (2, &yb), (3, &params), (4, &err), (5, &loss)];

    let mut report = String::new();
    let mut epoch = 0;
    let mean_loss = |loss: &Buffer| -> Result<f32> {
        let l = loss.read_f32()?;
        Ok(l.iter().sum::<f32>() / l.len() as f32)
    };
    while epoch < c.epochs {
        let chunk = (c.epochs - epoch).min(10);
        let mut s = Submission::new();
        for _ in 0..chunk {
            s.dispatch(&forward, &bind, [n.div_ceil(64), 1, 1]);
            s.dispatch(&update, &bind, [(c.features + 1).div_ceil(64), 1, 1]);
        }
        s.run()?;
        // `loss` holds the loss before the last update of the chunk.
        let line = format!("epoch {} loss {:.6}", epoch + chunk - 1, mean_loss(&loss)?);
        // Progress goes to the job log too, which the host streams while the job runs.
        wasmgrid::log(wasmgrid::Level::Info, &line);
        report.push_str(&line);
        report.push('\n');
        epoch += chunk;
    }
    // One more forward pass scores the final parameters.
    forward.dispatch(&bind, [n.div_ceil(64), 1, 1])?;
    let final_loss = mean_loss(&loss)?;
    let errors = err.read_f32()?;
    let correct = errors.iter().filter(|e| e.abs() < 0.5).count();
    let w = params.read_f32()?;
    report.push_str(&format!("final loss {:.6} accuracy {:.4}\n", final_loss, correct as f32 / n as f32));
    let words: Vec<String> = w.iter().map(|v| v.to_string()).collect();
    report.push_str(&format!("weights {}\n", words.join(" ")));
    wasmgrid::output(report.as_bytes())
}
