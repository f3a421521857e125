//! Measures all-reduce between the members of a cluster job: a GPU buffer of `bytes` f32
//! averaged over every member `iters` times after `warmup` untimed rounds, then checked.
//!
//! Input (optional text): `bytes=16777216 iters=5 warmup=1 compress=none|f16|int8`.
//! Output (text, rank 0's is the job's): `members N bytes B iters K seconds S`, `algbw_gbps A`
//! (bytes / time per all-reduce), `busbw_gbps X` (2 (N - 1) / N x bytes / time, as NCCL
//! defines it: what each member's link carried), `max_error E` (against the exact mean).
//!
//! Run: `wasmgrid submit target/wasm32-wasip1/release/allreduce.wasm --gpus 2`.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

use std::time::Instant;

use wasmgrid::collective::{self, Compression, Op};
use wasmgrid::{Buffer, Error, Result};

fn main() -> Result<()> {
    let input = wasmgrid::input()?;
    let text = std::str::from_utf8(&input).map_err(|_| Error::bad_input("the input is not UTF-8 text"))?;
    let (mut bytes, mut iters, mut warmup, mut compress) = (16u64 << 20, 5u32, 1u32, Compression::None);
    for item in text.split_whitespace() {
        let (key, value) =
            item.split_once('=').ok_or_else(|| Error::bad_input(format!("{item:?} is not key=value")))?;
        let bad = || Error::bad_input(format!("{item:?}: bad value"));
        match key {
            "bytes" => bytes = value.parse().map_err(|_| bad())?,
            "iters" => iters = value.parse().map_err(|_| bad())?,
            "warmup" => warmup = value.parse().map_err(|_| bad())?,
            "compress" => {
                compress = match value {
                    "none" => Compression::None,
                    "f16" => Compression::F16,
                    "int8" => Compression::Int8,
                    _ => return Err(bad()),
                }
            }
            other => return Err(Error::bad_input(format!("unknown setting {other:?}"))),
        }
    }
    if bytes == 0 || bytes % 4 != 0 || bytes > 1 << 30 || iters == 0 {
        return Err(Error::bad_input("bytes must be a multiple of 4 up to 1 GiB, iters at least 1"));
    }
    let (rank, world) = (collective::rank(), collective::world_size());
    let n = (bytes / 4) as usize;
    let mine: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + rank as f32).collect();
    let buffer = Buffer::storage_from(&mine)?;
    drop(mine);
    for _ in 0..warmup {
        collective::all_reduce(&buffer, Op::Mean, compress)?;
    }
    collective::barrier()?;
    let started = Instant::now();
    for _ in 0..iters {
        collective::all_reduce(&buffer, Op::Mean, compress)?;
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(iters);
    // The mean of (i % 97) + rank over every rank, and every round after the first leaves it.
    let offset = (world - 1) as f32 / 2.0;
    let got = buffer.read_f32()?;
    let max_error = got.iter().enumerate().map(|(i, v)| (v - ((i % 97) as f32 + offset)).abs()).fold(0f32, f32::max);
    let algbw = bytes as f64 / seconds / 1e9;
    let busbw = algbw * 2.0 * f64::from(world - 1) / f64::from(world);
    let report = format!(
        "members {world} bytes {bytes} iters {iters} seconds {seconds:.6}\nalgbw_gbps {algbw:.4}\nbusbw_gbps {busbw:.4}\nmax_error {max_error}\n"
    );
    wasmgrid::output(report.as_bytes())
}
