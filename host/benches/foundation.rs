//! The foundation's benchmarks, each printed beside its baseline from the same run:
//! instantiation (pooling, precompiled) against the on-demand allocator; a guest-to-host ABI
//! call against the same loop without the call; the matmul sample sandboxed against the same
//! WGSL through native wgpu at 256, 1024 and 2048; compiling a module against loading it
//! precompiled and taking it from the in-memory cache; the tensor layer's matmul at
//! all-MiniLM-L6-v2's shapes, sandboxed against the same WGSL through native wgpu, with its
//! GFLOP/s.
//!
//! Run: `cargo bench -p host --bench foundation` (targets are in BENCHMARKS.md);
//! `WASMGRID_BENCH_SECTIONS=tensor` runs the tensor section alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use host::bench::{self, median};
use host::{Host, HostConfig};

const MATMUL_WGSL: &str = include_str!("../../samples/matmul/src/matmul.wgsl");

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A guest whose `_start` loops `n` times, calling `input_len` when `call` is set.
fn call_loop(n: u32, call: bool) -> Vec<u8> {
    let body = if call { "call $input_len drop" } else { "local.get $i i64.extend_i32_u drop" };
    wat::parse_str(format!(
        r#"(module
            (import "wasmgrid_v1" "input_len" (func $input_len (result i64)))
            (memory (export "memory") 1)
            (func (export "_start") (local $i i32)
                (loop $l
                    {body}
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))))"#
    ))
    .unwrap()
}

/// `wgsl`'s entry point `matmul`, as a native program builds it.
fn compute_pipeline(device: &wgpu::Device, wgsl: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("matmul"),
        compilation_options: Default::default(),
        cache: None,
    })
}

/// `buffers` bound at bindings 0, 1, 2, ... of group 0.
fn bind_in_order(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
        .iter()
        .zip(0..)
        .map(|(b, binding)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// The matmul sample's work through plain wgpu: upload A, B and the sizes, dispatch the
/// pipeline (built once), read C back. The baseline for the sandboxed run.
struct Native {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Built once, as a native program would (the host caches pipelines the same way).
    pipeline: wgpu::ComputePipeline,
}

impl Native {
    fn new() -> Native {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .unwrap();
        let (device, queue) = pollster::block_on(
            adapter.request_device(&wgpu::DeviceDescriptor { required_limits: adapter.limits(), ..Default::default() }),
        )
        .unwrap();
        let pipeline = compute_pipeline(&device, MATMUL_WGSL);
        Native { device, queue, pipeline }
    }

    fn matmul(&self, s: u32, a: &[u8], b: &[u8]) -> Vec<u8> {
        use wgpu::util::DeviceExt;
        let d = &self.device;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let dims: Vec<u8> = [s, s, s, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
        let dims = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &dims,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });
        let a = d.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: a, usage: storage });
        let b = d.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: b, usage: storage });
        let len = u64::from(s) * u64::from(s) * 4;
        let c = d.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: len,
            usage: storage,
            mapped_at_creation: false,
        });
        let staging = d.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: len,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let pipeline = &self.pipeline;
        let group = bind_in_order(d, pipeline, &[&dims, &a, &b, &c]);
        let mut encoder = d.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(s.div_ceil(16), s.div_ceil(16), 1);
        }
        encoder.copy_buffer_to_buffer(&c, 0, &staging, 0, len);
        self.queue.submit([encoder.finish()]);
        staging.slice(..).map_async(wgpu::MapMode::Read, |r| r.unwrap());
        d.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let out = staging.slice(..).get_mapped_range().unwrap().to_vec();
        staging.unmap();
        out
    }
}

/// The tensor layer's matmul variant through plain wgpu: buffers made once, then `repeats`
/// dispatches in one submission, timed to the end of the GPU's work.
fn native_tensor_matmul(native: &Native, m: u32, k: u32, n: u32, gelu: bool, repeats: u32) -> Duration {
    use wgpu::util::DeviceExt;
    let d = &native.device;
    let spec = wasmgrid::tensor::Matmul { trans_b: true, gelu, ..Default::default() };
    let pipeline = compute_pipeline(d, &wasmgrid::tensor::matmul_wgsl(spec, true));
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let init = |bytes: &[u8], usage| {
        d.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytes, usage })
    };
    let params: Vec<u8> =
        wasmgrid::tensor::matmul_params(m, k, n, 1.0).unwrap().iter().flat_map(|w| w.to_le_bytes()).collect();
    let params = init(&params, wgpu::BufferUsages::UNIFORM);
    let a = init(&matrix_bytes((m * k) as usize, 1), storage);
    let b = init(&matrix_bytes((n * k) as usize, 2), storage);
    let bias = init(&matrix_bytes(n as usize, 3), storage);
    let c = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: u64::from(m * n) * 4,
        usage: storage,
        mapped_at_creation: false,
    });
    let group = bind_in_order(d, &pipeline, &[&params, &a, &b, &c, &bias]);
    d.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let start = Instant::now();
    let mut encoder = d.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        for _ in 0..repeats {
            pass.dispatch_workgroups(n.div_ceil(64), m.div_ceil(64), 1);
        }
    }
    native.queue.submit([encoder.finish()]);
    d.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    start.elapsed()
}

/// The tensor layer's four matmuls of a MiniLM layer for 4,096 tokens (32 sentences of 128):
/// sandboxed (the `tensor-check` sample's bench mode) against the same WGSL natively. Each
/// side is timed with one dispatch and with `1 + repeats`; the difference over `repeats` is
/// one matmul's own time, set-up and upload left out on both sides alike.
fn tensor_matmuls(host: &Host, native: &Native) {
    let repeats: u32 = std::env::var("WASMGRID_BENCH_TENSOR_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let tokens = 4096u32;
    let module = host.load(&sample_artifacts::read(sample_artifacts::TENSOR_CHECK)).unwrap();
    let sandboxed = |kernel: &str, r: u32| {
        let input = format!("bench {kernel} {tokens} {r}").into_bytes();
        median((0..3).map(|_| bench::run_batch_time(host, &module, input.clone()).unwrap()).collect())
    };
    println!(
        "tensor layer matmul (x Wᵀ + b, f32) at all-MiniLM-L6-v2's shapes, {tokens} tokens, per matmul, {repeats} repeats"
    );
    println!(
        "  {:<10} {:>16} {:>14} {:>14} {:>8} {:>10}",
        "matmul", "m x k x n", "native ms", "sandboxed ms", "ratio", "GFLOP/s"
    );
    for (kernel, k, n, gelu) in [
        ("qkv", 384, 1152, false),
        ("attn_out", 384, 384, false),
        ("ffn_up", 384, 1536, true),
        ("ffn_down", 1536, 384, false),
    ] {
        let _ = native_tensor_matmul(native, tokens, k, n, gelu, 1);
        let native_one = median((0..3).map(|_| native_tensor_matmul(native, tokens, k, n, gelu, 1)).collect());
        let native_many =
            median((0..3).map(|_| native_tensor_matmul(native, tokens, k, n, gelu, 1 + repeats)).collect());
        let (one, many) = (sandboxed(kernel, 1), sandboxed(kernel, 1 + repeats));
        let per = |many: Duration, one: Duration| many.saturating_sub(one).as_secs_f64() / f64::from(repeats);
        let (nt, st) = (per(native_many, native_one), per(many, one));
        let flops = 2.0 * f64::from(tokens) * f64::from(k) * f64::from(n);
        println!(
            "  {:<10} {:>16} {:>14.2} {:>14.2} {:>8.3} {:>10.1}   (target ratio <= 1.05)",
            kernel,
            format!("{tokens}x{k}x{n}"),
            nt * 1e3,
            st * 1e3,
            st / nt,
            flops / st / 1e9
        );
    }
}

fn matrix_bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut state = seed;
    (0..n)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            ((state % 2001) as f32 / 1000.0 - 1.0).to_le_bytes()
        })
        .collect()
}

fn main() {
    let sizes: Vec<u32> = std::env::var("WASMGRID_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').map(|v| v.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![256, 1024, 2048]);
    let host = Host::new(HostConfig::default()).expect("a GPU adapter");
    let gpu = host.gpu().clone();
    println!("wasmgrid foundation benchmarks on {} ({}, {})", gpu.name, gpu.backend, gpu.device_type);
    println!("host CPU threads: {}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!();
    if std::env::var("WASMGRID_BENCH_SECTIONS").is_ok_and(|s| s == "tensor") {
        tensor_matmuls(&host, &Native::new());
        return;
    }

    // Instantiation.
    let empty = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#).unwrap();
    let module = host.load(&empty).unwrap();
    let iters = 20_000;
    let _ = bench::instantiate_job(&host, &module, 1_000);
    let job = bench::instantiate_job(&host, &module, iters);
    let pooled = bench::instantiate_bare(&empty, true, iters).unwrap();
    let on_demand = bench::instantiate_bare(&empty, false, iters).unwrap();
    println!("instantiation (per instance, {iters} instances, precompiled module)");
    println!("  {:<44} {:>10.2} us", "pooling allocator, bare store", us(pooled));
    println!("  {:<44} {:>10.2} us   (baseline)", "on-demand allocator, bare store", us(on_demand));
    println!("  {:<44} {:>10.2} us   (target <= 5 us)", "full job store (WASI, limits, GPU state)", us(job));
    println!();

    // ABI call overhead.
    let n = 20_000_000u32;
    let with_call = host.load(&call_loop(n, true)).unwrap();
    let without = host.load(&call_loop(n, false)).unwrap();
    let t_call = median((0..3).map(|_| bench::run_batch_time(&host, &with_call, Vec::new()).unwrap()).collect());
    let t_loop = median((0..3).map(|_| bench::run_batch_time(&host, &without, Vec::new()).unwrap()).collect());
    let per_call = t_call.saturating_sub(t_loop).as_secs_f64() * 1e9 / f64::from(n);
    println!("ABI call overhead ({n} calls of input_len from wasm, fuel metering on)");
    println!("  {:<44} {:>10.2} ns/iteration", "loop with the host call", t_call.as_secs_f64() * 1e9 / f64::from(n));
    println!(
        "  {:<44} {:>10.2} ns/iteration   (baseline)",
        "same loop without the call",
        t_loop.as_secs_f64() * 1e9 / f64::from(n)
    );
    println!("  {:<44} {:>10.2} ns   (target <= 20 ns)", "cost of one guest-to-host call", per_call);
    println!();

    // Compile vs cached load.
    let matmul_wasm = sample_artifacts::read(sample_artifacts::MATMUL);
    let dir = tempfile::tempdir().unwrap();
    let (compile, deserialize) = bench::compile_and_deserialize(&host, &matmul_wasm, dir.path()).unwrap();
    let matmul = host.load(&matmul_wasm).unwrap();
    let start = Instant::now();
    for _ in 0..1000 {
        std::hint::black_box(host.load(&matmul_wasm).unwrap());
    }
    let cached = start.elapsed() / 1000;
    println!("module load, matmul sample ({} KiB)", matmul_wasm.len() / 1024);
    println!("  {:<44} {:>10.2} ms   (baseline)", "compile from scratch (Cranelift)", ms(compile));
    println!("  {:<44} {:>10.2} ms", "load precompiled from the disk cache", ms(deserialize));
    println!("  {:<44} {:>10.2} us   (hash + in-memory cache hit)", "load from the in-memory cache", us(cached));
    println!();

    // Matmul sandboxed vs native.
    let native = Native::new();
    println!("matmul, f32, square, upload + dispatch + readback, median of runs (the same WGSL)");
    println!("  {:>6} {:>14} {:>16} {:>8}", "size", "native wgpu ms", "sandboxed ms", "ratio");
    for &s in &sizes {
        let cells = (s * s) as usize;
        let a = matrix_bytes(cells, 1);
        let b = matrix_bytes(cells, 2);
        let mut input: Vec<u8> = [s, s, s].iter().flat_map(|w| w.to_le_bytes()).collect();
        input.extend_from_slice(&a);
        input.extend_from_slice(&b);
        let runs = if s >= 2048 { 3 } else { 5 };
        // Warm both paths (shader compile caches, pool slots) before timing.
        let reference = native.matmul(s, &a, &b);
        let report = host.run_batch(&matmul, input.clone(), &host::Limits::default()).unwrap();
        assert_eq!(report.outcome, Ok(()));
        assert_eq!(report.output, reference, "sandboxed and native results must be identical");
        let mut native_t = Vec::new();
        let mut sandbox_t = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            std::hint::black_box(native.matmul(s, &a, &b));
            native_t.push(t.elapsed());
            sandbox_t.push(bench::run_batch_time(&host, &matmul, input.clone()).unwrap());
        }
        let (nt, st) = (median(native_t), median(sandbox_t));
        let note = if s == 1024 { "   (target <= 1.02)" } else { "" };
        println!("  {:>6} {:>14.2} {:>16.2} {:>8.3}{note}", s, ms(nt), ms(st), st.as_secs_f64() / nt.as_secs_f64());
    }
    println!();
    tensor_matmuls(&host, &native);
}
