//! A tiled f32 matrix multiply on the GPU: C = A x B.
//!
//! Input: `m, k, n` as little-endian `u32`s, then A (m x k) and B (k x n) as row-major
//! little-endian `f32`s. Output: C (m x n), row-major little-endian `f32`s.
//! With an empty input it multiplies two seeded 256 x 256 matrices, checks the result against
//! a CPU reference and prints a summary instead.
//!
//! Build: `cargo build --release --target wasm32-wasip1 -p matmul`;
//! run: `wasmgrid run target/wasm32-wasip1/release/matmul.wasm`.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

use wasmgrid::{Buffer, BufferKind, Error, Pipeline, Result};

/// Each workgroup computes a 16 x 16 tile of C, walking K in 16-wide steps through workgroup
/// memory so that each element of A and B is read from the buffer once per tile.
const MATMUL_WGSL: &str = include_str!("matmul.wgsl");

/// C = A x B on the GPU, A being m x k and B k x n, all as little-endian `f32` bytes: the
/// matrices go from the input to the GPU and back to the output without a conversion.
fn matmul_gpu(m: u32, k: u32, n: u32, a: &[u8], b: &[u8]) -> Result<Vec<u8>> {
    let dims = Buffer::uniform_from(&[m, k, n, 0u32])?;
    let a = Buffer::from_bytes(BufferKind::Storage, a)?;
    let b = Buffer::from_bytes(BufferKind::Storage, b)?;
    let c_len = m as usize * n as usize * 4;
    let c = Buffer::storage(c_len as u64)?;
    let pipeline = Pipeline::new(MATMUL_WGSL, "matmul")?;
    pipeline.dispatch(&[(0, &dims), (1, &a), (2, &b), (3, &c)], [n.div_ceil(16), m.div_ceil(16), 1])?;
    c.read_bytes(0, c_len)
}

/// A parsed job input; `a` and `b` borrow the input bytes.
struct Problem<'a> {
    m: u32,
    k: u32,
    n: u32,
    a: &'a [u8],
    b: &'a [u8],
}

fn parse(input: &[u8]) -> Result<Problem<'_>> {
    let words: Vec<u32> =
        wasmgrid::from_bytes(input.get(..12).ok_or_else(|| Error::bad_input("input shorter than its 12-byte header"))?);
    let (m, k, n) = (words[0], words[1], words[2]);
    if m == 0 || k == 0 || n == 0 {
        return Err(Error::bad_input(format!("dimensions {m} x {k} x {n} must be positive")));
    }
    let (ak, bk) = (u64::from(m) * u64::from(k), u64::from(k) * u64::from(n));
    let want = 12 + 4 * (ak + bk);
    if input.len() as u64 != want {
        return Err(Error::bad_input(format!("{m} x {k} x {n} needs {want} bytes of input, got {}", input.len())));
    }
    let (a, b) = input[12..].split_at(ak as usize * 4);
    Ok(Problem { m, k, n, a, b })
}

/// A small deterministic generator, so the demo needs no input.
fn seeded(len: usize, mut state: u32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn demo() -> Result<()> {
    let s = 256u32;
    let a = seeded((s * s) as usize, 0x9e37_79b9);
    let b = seeded((s * s) as usize, 0x85eb_ca6b);
    let c: Vec<f32> = wasmgrid::from_bytes(&matmul_gpu(s, s, s, &wasmgrid::to_bytes(&a), &wasmgrid::to_bytes(&b))?);
    let mut max_err = 0f32;
    for i in 0..s as usize {
        for j in 0..s as usize {
            let mut acc = 0f32;
            for p in 0..s as usize {
                acc += a[i * s as usize + p] * b[p * s as usize + j];
            }
            max_err = max_err.max((acc - c[i * s as usize + j]).abs());
        }
    }
    let checksum: f64 = c.iter().map(|&v| f64::from(v)).sum();
    let summary = format!(
        "matmul {s}x{s}x{s} on the GPU: checksum {checksum:.4}, max |gpu - cpu| = {max_err:.2e} ({})\n",
        if max_err < 1e-3 { "matches the CPU reference" } else { "DOES NOT match the CPU reference" }
    );
    wasmgrid::output(summary.as_bytes())?;
    if max_err >= 1e-3 {
        return Err(Error::kernel("GPU result differs from the CPU reference"));
    }
    Ok(())
}

fn main() -> Result<()> {
    let input = wasmgrid::input()?;
    if input.is_empty() {
        return demo();
    }
    let Problem { m, k, n, a, b } = parse(&input)?;
    eprintln!("matmul {m}x{k}x{n}");
    let c = matmul_gpu(m, k, n, a, b)?;
    wasmgrid::output(&c)
}
