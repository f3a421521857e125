//! Measurements the benchmarks need from inside the host, where wasmtime lives. Not a stable
//! API: only `benches/` uses it.

use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, Linker, Module, Store};

use crate::limits::Limits;
use crate::sandbox::{Host, JobModule};

/// Median of `samples`.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Time to set up a job's store (WASI context, GPU state, limits) and instantiate `module` in
/// it from the pooling allocator, per instance, over `iters` instances.
pub fn instantiate_job(host: &Host, module: &JobModule, iters: u32) -> Duration {
    let limits = Limits::default();
    let start = Instant::now();
    for _ in 0..iters {
        let mut store = host.new_store(module, Vec::new(), &limits);
        let _ = std::hint::black_box(host.instantiate(module, &mut store));
    }
    start.elapsed() / iters.max(1)
}

/// Time to instantiate `wasm` (which must import nothing) in a bare store, per instance: with
/// the pooling allocator and precompiled code (`pooling = true`), and with the default on-demand
/// allocator as the baseline.
pub fn instantiate_bare(wasm: &[u8], pooling: bool, iters: u32) -> Result<Duration, String> {
    let mut config = Config::new();
    if pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(16).total_memories(16).total_tables(16).max_memory_size(64 << 20);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    let engine = Engine::new(&config).map_err(|e| e.to_string())?;
    let module = Module::new(&engine, wasm).map_err(|e| e.to_string())?;
    let pre = Linker::<()>::new(&engine).instantiate_pre(&module).map_err(|e| e.to_string())?;
    let start = Instant::now();
    for _ in 0..iters {
        let mut store = Store::new(&engine, ());
        let _ = std::hint::black_box(pre.instantiate(&mut store));
    }
    Ok(start.elapsed() / iters.max(1))
}

/// Runs a batch job and returns its wall time, store set-up included.
pub fn run_batch_time(host: &Host, module: &JobModule, input: Vec<u8>) -> Result<Duration, String> {
    let start = Instant::now();
    let report = host.run_batch(module, input, &Limits::default()).map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    report.outcome.map_err(|f| f.to_string())?;
    Ok(elapsed)
}

/// Time to compile `wasm` from scratch, and to load it from a precompiled file as the disk cache
/// does.
pub fn compile_and_deserialize(
    host: &Host,
    wasm: &[u8],
    dir: &std::path::Path,
) -> Result<(Duration, Duration), String> {
    let engine = host.engine();
    let start = Instant::now();
    let module = Module::new(engine, wasm).map_err(|e| e.to_string())?;
    let compile = start.elapsed();
    let path = dir.join("bench.cwasm");
    std::fs::write(&path, module.serialize().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let start = Instant::now();
    // SAFETY: the file was written just above by `Module::serialize` on this engine.
    #[allow(unsafe_code)]
    let loaded = unsafe { Module::deserialize_file(engine, &path) };
    let deserialize = start.elapsed();
    loaded.map_err(|e| e.to_string())?;
    Ok((compile, deserialize))
}

/// Loses the host's GPU device as a driver fault or reset would, for the tests of device
/// loss: jobs running on it, and every later one, fail with `Failure::Host`.
pub fn lose_device(host: &Host) {
    host.gpu_handle().destroy_device();
}
