//! The GPU side of the ABI, on wgpu. One device is shared by every job of a host; each job gets
//! its own buffers, pipelines and quotas in a [`JobGpu`]. Every guest value is checked here
//! before wgpu sees it, and every wgpu call a guest can trigger runs inside error scopes, so a
//! guest mistake comes back as an error code and never reaches wgpu's panicking default handler.

pub(crate) mod wgsl;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use abi::{BindingDesc, DispatchDesc, ErrorCode};

use crate::error::{CallError, Fatal, GuestError, guest};
use crate::limits::{LimitKind, Limits};
use crate::meter::{GpuTimeSource, Usage};
use wgsl::{BindingKind, Reflection, ShaderLimits};

/// An adapter as `wasmgrid gpus` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub vendor: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size: [u32; 3],
    pub max_compute_workgroup_storage_size: u32,
    pub timestamp_queries: bool,
}

fn vendor_name(id: u32) -> &'static str {
    match id {
        0x10de => "NVIDIA",
        0x1002 | 0x1022 => "AMD",
        0x8086 => "Intel",
        0x106b => "Apple",
        0x13b5 => "ARM",
        0x5143 => "Qualcomm",
        0x1010 => "Imagination",
        0x10005 => "Mesa",
        _ => "unknown",
    }
}

fn summarize(adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    AdapterSummary {
        vendor: vendor_name(info.vendor).to_string(),
        vendor_id: info.vendor,
        device_id: info.device,
        name: info.name,
        backend: info.backend.to_str().to_string(),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver,
        driver_info: info.driver_info,
        max_buffer_size: limits.max_buffer_size,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_compute_workgroup_size: [
            limits.max_compute_workgroup_size_x,
            limits.max_compute_workgroup_size_y,
            limits.max_compute_workgroup_size_z,
        ],
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        timestamp_queries: adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY),
    }
}

fn instance() -> wgpu::Instance {
    // WGPU_BACKEND and friends still apply, so an operator can pin a backend.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.flags = wgpu::InstanceFlags::empty().with_env();
    wgpu::Instance::new(desc)
}

fn adapters() -> Vec<wgpu::Adapter> {
    let mut list = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
    list.retain(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS));
    // Real GPUs before software ones; native APIs before OpenGL, which runs the same device
    // with fewer features.
    list.sort_by_key(|a| {
        let info = a.get_info();
        let kind = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        };
        (kind, info.backend == wgpu::Backend::Gl)
    });
    list
}

/// Every adapter that can run compute shaders, best first.
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters().iter().map(summarize).collect()
}

/// Which adapter a host uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterChoice {
    /// The adapter's place in [`list_adapters`] (`"1"`), or a case-insensitive part of its
    /// name (`"H200"`, `"llvmpipe"`); `None` takes the best adapter.
    pub name: Option<String>,
}

/// The adapters a host offers when told none: every device through its best API only (the
/// same GPU reached through Vulkan and OpenGL is one GPU; two cards of one model on one API
/// are two), and software adapters only when there is no GPU at all. Each as its place in
/// [`list_adapters`] and its summary.
pub fn default_adapters() -> Vec<(usize, AdapterSummary)> {
    pick_default_adapters(list_adapters())
}

/// The adapters a host offers, as places in `adapters` (a list like [`list_adapters`]'s):
/// each one `named` gives, by its place (`"1"`) or a part of its name (every such GPU, through
/// its best API), or with none named, [`pick_default_adapters`]. A name matching nothing, a
/// place past the list, or a GPU named twice is an error saying so.
pub fn select_adapters(named: &[String], adapters: &[AdapterSummary]) -> Result<Vec<usize>, String> {
    let best: Vec<usize> = pick_default_adapters(adapters.to_vec()).into_iter().map(|(at, _)| at).collect();
    if named.is_empty() {
        return Ok(best);
    }
    let mut places = Vec::new();
    for want in named {
        let found: Vec<usize> = match want.trim().parse::<usize>() {
            Ok(at) if at < adapters.len() => vec![at],
            Ok(at) => {
                return Err(format!(
                    "--gpu {at}: this machine has {} GPU adapter(s) (`wasmgrid gpus` lists them)",
                    adapters.len()
                ));
            }
            Err(_) => {
                let lower = want.to_lowercase();
                let named = |at: &usize| adapters.get(*at).is_some_and(|a| a.name.to_lowercase().contains(&lower));
                best.iter().copied().filter(named).collect()
            }
        };
        if found.is_empty() {
            return Err(format!("--gpu {want:?} matches no GPU adapter (`wasmgrid gpus` lists them)"));
        }
        for at in found {
            if places.contains(&at) {
                return Err(format!("GPU {at} is named twice: each GPU is offered once"));
            }
            places.push(at);
        }
    }
    Ok(places)
}

/// [`default_adapters`] out of a list like [`list_adapters`]'s.
pub fn pick_default_adapters(all: Vec<AdapterSummary>) -> Vec<(usize, AdapterSummary)> {
    let hardware = all.iter().any(|a| a.device_type != "Cpu");
    // The list is best first: a model's first adapter has its best API.
    let mut best: HashMap<(String, u32, u32), String> = HashMap::new();
    for a in &all {
        best.entry((a.name.clone(), a.vendor_id, a.device_id)).or_insert_with(|| a.backend.clone());
    }
    all.into_iter()
        .enumerate()
        .filter(|(_, a)| !hardware || a.device_type != "Cpu")
        .filter(|(_, a)| best.get(&(a.name.clone(), a.vendor_id, a.device_id)) == Some(&a.backend))
        .collect()
}

/// One wgpu device and queue. Replaced as a whole when GPU work hangs past a job's wall time.
pub(crate) struct DeviceCtx {
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    timestamps: bool,
    timestamp_period: f64,
    /// Set once a job gave up waiting for this device; no new job gets it.
    abandoned: AtomicBool,
    lost: Arc<Lost>,
    /// Compiled pipelines by hash of (WGSL, entry point), shared by every job on this device:
    /// a pipeline holds no tenant data, and compiling the same kernel again for each job (a
    /// warm host's commonest case) costs more than running it.
    pipelines: Mutex<HashMap<[u8; 32], Arc<PipelineEntry>>>,
    /// Held across every `poll` and every `submit` of this device (a submit polls it too,
    /// inside wgpu). wgpu-core 30 asserts, and panics, when two threads poll one device at once
    /// and the other drained the queue between this one's fence read and its check (fixed
    /// upstream in gfx-rs/wgpu#9958); one poll at a time keeps jobs that share a device from
    /// taking that panic for a lost device. Waits poll in short slices, so nobody holds it for
    /// long.
    polling: Mutex<()>,
}

impl DeviceCtx {
    /// Polls the device, one caller at a time; `Err` is wgpu's panic (a device error).
    fn poll(&self, kind: wgpu::PollType) -> Result<Result<wgpu::PollStatus, wgpu::PollError>, String> {
        let _one = self.polling.lock().unwrap_or_else(PoisonError::into_inner);
        std::panic::catch_unwind(AssertUnwindSafe(|| self.device.poll(kind))).map_err(|p| panic_message(p.as_ref()))
    }

    /// Submits command buffers, one caller at a time with every poll (see `polling`).
    fn submit<I: IntoIterator<Item = wgpu::CommandBuffer>>(&self, commands: I) -> wgpu::SubmissionIndex {
        let _one = self.polling.lock().unwrap_or_else(PoisonError::into_inner);
        self.queue.submit(commands)
    }
}

impl std::fmt::Debug for DeviceCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCtx").field("timestamps", &self.timestamps).finish_non_exhaustive()
    }
}

/// Whether a device was lost, and why. Set by wgpu's device-lost callback, or by the host when
/// wgpu reports a device error while waiting.
#[derive(Debug, Default)]
struct Lost {
    flag: AtomicBool,
    why: Mutex<Option<String>>,
}

impl Lost {
    /// Records the first reason; later ones add nothing.
    fn set(&self, why: String) {
        let mut slot = self.why.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(why);
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    fn get(&self) -> Option<String> {
        if !self.flag.load(Ordering::SeqCst) {
            return None;
        }
        let why = self.why.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Some(why.unwrap_or_else(|| "no reason given".into()))
    }
}

/// The GPU of a host: the adapter and the device jobs currently share.
#[derive(Clone, Debug)]
pub(crate) struct Gpu {
    shared: Arc<GpuShared>,
}

#[derive(Debug)]
struct GpuShared {
    adapter: wgpu::Adapter,
    summary: AdapterSummary,
    current: Mutex<Arc<DeviceCtx>>,
    /// Devices given up on because GPU work hung past a job's wall time.
    replaced: AtomicU64,
}

impl Gpu {
    pub(crate) fn new(choice: &AdapterChoice) -> Result<Gpu, String> {
        let all = adapters();
        let adapter = match &choice.name {
            None => all.into_iter().next(),
            Some(want) => match want.trim().parse::<usize>() {
                Ok(at) => all.into_iter().nth(at),
                Err(_) => {
                    let want = want.to_lowercase();
                    all.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&want))
                }
            },
        };
        let adapter = adapter.ok_or_else(|| match &choice.name {
            Some(n) => format!("no GPU adapter is {n:?} (a place or a part of a name); `wasmgrid gpus` lists them"),
            None => "no GPU adapter with compute shaders found; install a Vulkan driver \
                     (for a CPU fallback: apt-get install mesa-vulkan-drivers libvulkan1)"
                .to_string(),
        })?;
        let summary = summarize(&adapter);
        let ctx = open_device(&adapter)?;
        Ok(Gpu {
            shared: Arc::new(GpuShared { adapter, summary, current: Mutex::new(ctx), replaced: AtomicU64::new(0) }),
        })
    }

    pub(crate) fn summary(&self) -> &AdapterSummary {
        &self.shared.summary
    }

    /// The device new work should use.
    pub(crate) fn device(&self) -> Arc<DeviceCtx> {
        self.shared.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Why the device new work would use was lost, if it was. Work on a lost device fails; this
    /// host does not open another one (a worker that sees this reports it and exits, and its
    /// supervisor starts a fresh worker).
    pub(crate) fn device_lost(&self) -> Option<String> {
        self.device().lost.get()
    }

    /// How many times GPU work hung past a job's wall time and the device was given up on (and
    /// replaced, for later jobs). A worker whose count grew during a job should be replaced: the
    /// hung work still holds the GPU and a thread of this process.
    pub(crate) fn replaced_count(&self) -> u64 {
        self.shared.replaced.load(Ordering::SeqCst)
    }

    /// Destroys the current device as a driver fault would lose it, for tests of device loss.
    pub(crate) fn destroy_device(&self) {
        let ctx = self.device();
        ctx.device.destroy();
        // The lost callback runs from the next poll once the queue is empty.
        poll_now(&ctx);
    }

    /// Replaces `broken` with a fresh device, unless another job already did. Jobs still holding
    /// `broken` finish (or time out) on it; new jobs get the new one.
    fn replace(&self, broken: &Arc<DeviceCtx>) {
        broken.abandoned.store(true, Ordering::SeqCst);
        let mut current = self.shared.current.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&current, broken) {
            return;
        }
        self.shared.replaced.fetch_add(1, Ordering::SeqCst);
        match open_device(&self.shared.adapter) {
            Ok(fresh) => {
                log::warn!("gpu work hung past a job's wall time; opened a fresh device");
                *current = fresh;
            }
            Err(e) => log::error!("could not open a fresh device after a hang: {e}"),
        }
    }
}

/// The tiled kernel of the matmul sample: the host's own benchmark runs the same code renters'
/// kernels do.
const BENCH_MATMUL_WGSL: &str = include_str!("../../../samples/matmul/src/matmul.wgsl");

impl Gpu {
    /// Runs a 512 x 512 x 512 f32 matmul a few times and returns the best throughput in GFLOP/s
    /// (0 if the GPU failed it).
    pub(crate) fn benchmark_gflops(&self) -> f64 {
        let n: u32 = 512;
        let ctx = self.device();
        let device = &ctx.device;
        let ((pipeline, group, c), err) = scoped(device, || {
            let bytes = u64::from(n) * u64::from(n) * 4;
            let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
            let make = |usage| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            };
            let (a, b, c) = (make(storage), make(storage), make(storage));
            let dims = device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let words: Vec<u8> = [n, n, n, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
            ctx.queue.write_buffer(&dims, 0, &words);
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(BENCH_MATMUL_WGSL.into()),
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: None,
                module: &module,
                entry_point: Some("matmul"),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            });
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: dims.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: a.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: b.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 3, resource: c.as_entire_binding() },
                ],
            });
            (pipeline, group, c)
        });
        if err.is_some() {
            return 0.0;
        }
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(n / 16, n / 16, 1);
            }
            let index = ctx.submit([encoder.finish()]);
            let done = ctx
                .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: Some(Duration::from_secs(60)) });
            if !matches!(done, Ok(Ok(_))) {
                return 0.0;
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        drop(c);
        2.0 * f64::from(n).powi(3) / best / 1e9
    }
}

fn open_device(adapter: &wgpu::Adapter) -> Result<Arc<DeviceCtx>, String> {
    let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let required_features = if timestamps { wgpu::Features::TIMESTAMP_QUERY } else { wgpu::Features::empty() };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("wasmgrid"),
        required_features,
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .map_err(|e| format!("could not open the GPU device: {e}"))?;
    let lost = Arc::new(Lost::default());
    // Errors outside a scope would otherwise panic in wgpu's default handler. Every call a guest
    // can trigger is scoped; anything that still lands here is logged, never a crash. (A lost
    // device is told by the callback below, not by errors.)
    device.on_uncaptured_error(Arc::new(|e| log::error!("uncaptured gpu error: {e}")));
    let flag = lost.clone();
    device.set_device_lost_callback(move |reason, message| {
        log::error!("gpu device lost ({reason:?}): {message}");
        let why = match (reason, message.is_empty()) {
            (wgpu::DeviceLostReason::Destroyed, true) => "the device was destroyed".to_string(),
            (wgpu::DeviceLostReason::Destroyed, false) => format!("the device was destroyed: {message}"),
            (wgpu::DeviceLostReason::Unknown, true) => "the driver gave no reason".to_string(),
            (wgpu::DeviceLostReason::Unknown, false) => message,
        };
        flag.set(why);
    });
    let timestamp_period = f64::from(queue.get_timestamp_period());
    let limits = device.limits();
    Ok(Arc::new(DeviceCtx {
        device,
        queue,
        limits,
        timestamps,
        timestamp_period,
        abandoned: AtomicBool::new(false),
        lost,
        pipelines: Mutex::new(HashMap::new()),
        polling: Mutex::new(()),
    }))
}

/// Runs `f` inside validation, out-of-memory and internal error scopes and returns the first
/// error any of them caught.
fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> T) -> (T, Option<wgpu::Error>) {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let v = pollster::block_on(validation.pop());
    let i = pollster::block_on(internal.pop());
    let o = pollster::block_on(oom.pop());
    (out, v.or(i).or(o))
}

fn gpu_error(what: &str, e: &wgpu::Error) -> GuestError {
    match e {
        wgpu::Error::OutOfMemory { .. } => GuestError::new(ErrorCode::Gpu, format!("{what}: the GPU is out of memory")),
        other => GuestError::new(ErrorCode::Gpu, format!("{what}: {other}")),
    }
}

#[derive(Debug)]
struct BufferEntry {
    buffer: wgpu::Buffer,
    size: u64,
    uniform: bool,
}

/// A dispatch that passed every check: its pipeline, its buffers in binding order, and the
/// invocations it will run.
type CheckedDispatch<'a> = (&'a PipelineEntry, Vec<(u32, &'a BufferEntry)>, u64);

#[derive(Debug)]
struct PipelineEntry {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    reflection: Reflection,
}

/// Compiled pipelines a device keeps for reuse.
const PIPELINE_CACHE: usize = 256;

/// The message of a job whose GPU work was still running at its wall-time limit: the device
/// that work runs on is given up on (see [`Gpu::replaced_count`]).
pub(crate) const GPU_HANG: &str = "GPU work was still running at the wall-time limit";

/// Most bytes of buffer writes one job may have staged in host memory before the host submits
/// them and waits: `queue.write_buffer` copies into host memory until the next submission, so
/// without a bound a guest that writes without submitting grows the host without end. A job
/// with a smaller GPU quota gets that quota as its bound (but at least `MIN_STAGING`). The same
/// bound sizes the staging buffer of a readback.
const STAGING_BUDGET: u64 = 64 << 20;
const MIN_STAGING: u64 = 1 << 20;

/// Stack of the thread that compiles a shader. naga's WGSL front end and the driver's compiler
/// recurse over the shader; [`wgsl::check_shape`] bounds how deep before any of them runs, and
/// this stack (reserved address space, touched only as far as a compile goes) leaves a wide
/// margin over what the deepest shader that passes needs.
const COMPILE_STACK: usize = 256 << 20;

/// How often a wait for the GPU or for a shader compile looks at the job's cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// One job's GPU resources, quotas and counts.
#[derive(Debug)]
pub(crate) struct JobGpu {
    gpu: Gpu,
    ctx: Arc<DeviceCtx>,
    limits: Limits,
    buffers: HashMap<u32, BufferEntry>,
    pipelines: HashMap<u32, Arc<PipelineEntry>>,
    /// Handles are never reused, so a freed handle stays unknown.
    next_handle: u32,
    gpu_bytes: u64,
    /// Bytes of buffer writes staged in host memory since the last submission that was waited
    /// for.
    staged: u64,
    /// Set from outside to end the job.
    cancel: Option<Arc<AtomicBool>>,
    /// A wait for the GPU was cut short by a cancellation: work of this job may still run.
    in_flight: bool,
    pub(crate) usage: Usage,
    /// When the job's first dispatch was submitted.
    pub(crate) first_dispatch: Option<Instant>,
}

impl JobGpu {
    pub(crate) fn new(gpu: &Gpu, limits: &Limits) -> JobGpu {
        let ctx = gpu.device();
        let source = if ctx.timestamps { GpuTimeSource::Timestamps } else { GpuTimeSource::WallClock };
        JobGpu {
            gpu: gpu.clone(),
            ctx,
            limits: limits.clone(),
            buffers: HashMap::new(),
            pipelines: HashMap::new(),
            next_handle: 1,
            gpu_bytes: 0,
            staged: 0,
            cancel: None,
            in_flight: false,
            usage: Usage::new(source),
            first_dispatch: None,
        }
    }

    fn handle(&mut self) -> Result<u32, CallError> {
        let h = self.next_handle;
        self.next_handle = h
            .checked_add(1)
            .filter(|&n| n <= i32::MAX as u32)
            .ok_or_else(|| GuestError::new(ErrorCode::QuotaExceeded, "this job has used up its handles"))?;
        Ok(h)
    }

    fn check_device(&self) -> Result<(), CallError> {
        match self.ctx.lost.get() {
            Some(why) => Err(Fatal::Host(format!("the GPU device was lost: {why}")).into()),
            None => Ok(()),
        }
    }

    /// Sets the flag that cancels the job: waits for the GPU and for shader compiles see it.
    pub(crate) fn set_cancel(&mut self, cancel: Option<Arc<AtomicBool>>) {
        self.cancel = cancel;
    }

    fn check_cancel(&self) -> Result<(), CallError> {
        if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Fatal::Host("the job was cancelled".into()).into());
        }
        Ok(())
    }

    /// The most bytes of writes this job may have staged in host memory at once; a multiple of
    /// the copy alignment.
    fn staging_budget(&self) -> u64 {
        let budget = self.limits.gpu_bytes.clamp(MIN_STAGING, STAGING_BUDGET);
        budget - budget % abi::COPY_ALIGNMENT
    }

    /// Submits the buffer writes wgpu has staged and waits for them until `deadline`, which
    /// frees their host memory.
    fn flush_writes(&mut self, deadline: Instant) -> Result<(), CallError> {
        if self.staged == 0 {
            return Ok(());
        }
        let (index, err) = scoped(&self.ctx.device, || self.ctx.submit(std::iter::empty()));
        if let Some(e) = err {
            return Err(gpu_error("flushing buffer writes", &e).into());
        }
        self.wait(index, deadline)?;
        self.staged = 0;
        Ok(())
    }

    pub(crate) fn buffer_create(&mut self, size: i64, usage: i32) -> Result<u32, CallError> {
        self.check_device()?;
        let uniform = match usage {
            abi::BUFFER_STORAGE => false,
            abi::BUFFER_UNIFORM => true,
            other => return guest(ErrorCode::InvalidArgument, format!("unknown buffer usage {other}")),
        };
        let size = u64::try_from(size).ok().filter(|&s| s > 0).ok_or_else(|| {
            GuestError::new(ErrorCode::InvalidArgument, format!("buffer size {size} must be positive"))
        })?;
        if !size.is_multiple_of(abi::COPY_ALIGNMENT) {
            return guest(ErrorCode::Misaligned, format!("buffer size {size} is not a multiple of 4"));
        }
        if self.buffers.len() >= self.limits.buffers as usize {
            return guest(
                ErrorCode::QuotaExceeded,
                format!("limit {}: the job already holds {} buffers", LimitKind::Buffers, self.buffers.len()),
            );
        }
        let after = self.gpu_bytes.saturating_add(size);
        if after > self.limits.gpu_bytes {
            return guest(
                ErrorCode::QuotaExceeded,
                format!(
                    "limit {}: a {size}-byte buffer would bring the job to {after} bytes of GPU memory, over its {} bytes",
                    LimitKind::GpuBytes,
                    self.limits.gpu_bytes
                ),
            );
        }
        let max =
            if uniform { self.ctx.limits.max_uniform_buffer_binding_size } else { self.ctx.limits.max_buffer_size };
        if size > max {
            return guest(
                ErrorCode::InvalidArgument,
                format!("buffer size {size} exceeds this device's maximum of {max}"),
            );
        }
        let usage = if uniform { wgpu::BufferUsages::UNIFORM } else { wgpu::BufferUsages::STORAGE }
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let (buffer, err) = scoped(&self.ctx.device, || {
            // wgpu zero-fills every buffer before first use: a job never sees what an earlier
            // job left in that memory.
            self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = err {
            return Err(gpu_error("creating a buffer", &e).into());
        }
        let h = self.handle()?;
        self.buffers.insert(h, BufferEntry { buffer, size, uniform });
        self.gpu_bytes = after;
        self.usage.peak_gpu_bytes = self.usage.peak_gpu_bytes.max(after);
        Ok(h)
    }

    fn buffer(&self, handle: i32) -> Result<&BufferEntry, CallError> {
        u32::try_from(handle).ok().and_then(|h| self.buffers.get(&h)).ok_or_else(|| {
            GuestError::new(ErrorCode::UnknownHandle, format!("{handle} is not a buffer of this job")).into()
        })
    }

    /// Checks that `len` bytes at `offset` lie in a buffer this job holds, aligned, as a read or
    /// write of them would.
    pub(crate) fn check_range(&self, handle: i32, offset: i64, len: usize) -> Result<(), CallError> {
        Self::range(self.buffer(handle)?, offset, len).map(|_| ())
    }

    fn range(entry: &BufferEntry, offset: i64, len: usize) -> Result<u64, CallError> {
        let offset = u64::try_from(offset)
            .map_err(|_| GuestError::new(ErrorCode::OutOfBounds, format!("offset {offset} is negative")))?;
        let len = len as u64;
        if !offset.is_multiple_of(abi::COPY_ALIGNMENT) || !len.is_multiple_of(abi::COPY_ALIGNMENT) {
            return guest(ErrorCode::Misaligned, format!("offset {offset} and length {len} must be multiples of 4"));
        }
        if offset.checked_add(len).is_none_or(|end| end > entry.size) {
            return guest(
                ErrorCode::OutOfBounds,
                format!("bytes {offset}..{} are outside a {}-byte buffer", offset.saturating_add(len), entry.size),
            );
        }
        Ok(offset)
    }

    /// Copies `data` into a buffer. The copy is staged in host memory until the next submission;
    /// past the job's staging budget the staged writes are submitted and waited for (until
    /// `deadline`) first, so host memory stays bounded whatever the guest writes.
    pub(crate) fn buffer_write(
        &mut self,
        handle: i32,
        offset: i64,
        data: &[u8],
        deadline: Instant,
    ) -> Result<(), CallError> {
        self.check_device()?;
        let entry = self.buffer(handle)?;
        let offset = Self::range(entry, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let buffer = entry.buffer.clone();
        let budget = self.staging_budget();
        let mut at = offset;
        for part in data.chunks(usize::try_from(budget).unwrap_or(usize::MAX)) {
            let n = part.len() as u64;
            if self.staged.saturating_add(n) > budget {
                self.flush_writes(deadline)?;
            }
            let ((), err) = scoped(&self.ctx.device, || self.ctx.queue.write_buffer(&buffer, at, part));
            if let Some(e) = err {
                return Err(gpu_error("writing a buffer", &e).into());
            }
            self.staged = self.staged.saturating_add(n);
            at += n;
        }
        self.usage.bytes_uploaded += data.len() as u64;
        Ok(())
    }

    /// Copies buffer bytes into `dst`, waiting for the GPU until `deadline` at most. A large read
    /// goes through one staging buffer of the job's staging budget, a part at a time.
    pub(crate) fn buffer_read(
        &mut self,
        handle: i32,
        offset: i64,
        dst: &mut [u8],
        deadline: Instant,
    ) -> Result<(), CallError> {
        self.check_device()?;
        let entry = self.buffer(handle)?;
        let offset = Self::range(entry, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let source = entry.buffer.clone();
        let len = dst.len() as u64;
        let budget = self.staging_budget();
        let size = len.min(budget);
        let device = self.ctx.device.clone();
        let (staging, err) = scoped(&device, || {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = err {
            return Err(gpu_error("reading a buffer", &e).into());
        }
        let mut at = offset;
        for part in dst.chunks_mut(usize::try_from(budget).unwrap_or(usize::MAX)) {
            let n = part.len() as u64;
            let (index, err) = scoped(&device, || {
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
                encoder.copy_buffer_to_buffer(&source, at, &staging, 0, n);
                self.ctx.submit([encoder.finish()])
            });
            if let Some(e) = err {
                return Err(gpu_error("reading a buffer", &e).into());
            }
            let (tx, mapped) = std::sync::mpsc::sync_channel(1);
            staging.slice(..n).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            self.wait(index, deadline)?;
            // Staged writes went out with this submission and are done.
            self.staged = 0;
            let until = deadline.min(Instant::now() + MAP_WAIT);
            match map_done(&self.ctx, &mapped, until, self.cancel.as_deref()) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Fatal::Host(format!("mapping a readback buffer failed: {e}")).into()),
                Err(MapStop::Never) => return Err(Fatal::Host("a readback buffer was never mapped".into()).into()),
                Err(MapStop::Cancelled) => return Err(Fatal::Host("the job was cancelled".into()).into()),
                Err(MapStop::Lost(why)) => {
                    return Err(Fatal::Host(format!("the GPU device was lost: {why}")).into());
                }
            }
            {
                let view = staging
                    .slice(..n)
                    .get_mapped_range()
                    .map_err(|e| Fatal::Host(format!("reading a mapped buffer failed: {e}")))?;
                if view.len() != part.len() {
                    return Err(Fatal::Host("a readback buffer was mapped at the wrong size".into()).into());
                }
                part.copy_from_slice(&view);
            }
            staging.unmap();
            at += n;
        }
        self.usage.bytes_downloaded += len;
        Ok(())
    }

    pub(crate) fn buffer_destroy(&mut self, handle: i32) -> Result<(), CallError> {
        self.buffer(handle)?;
        let removed = u32::try_from(handle).ok().and_then(|h| self.buffers.remove(&h));
        if let Some(entry) = removed {
            entry.buffer.destroy();
            self.gpu_bytes = self.gpu_bytes.saturating_sub(entry.size);
        }
        Ok(())
    }

    fn shader_limits(&self) -> ShaderLimits {
        let l = &self.ctx.limits;
        ShaderLimits {
            max_workgroup_size: [
                l.max_compute_workgroup_size_x,
                l.max_compute_workgroup_size_y,
                l.max_compute_workgroup_size_z,
            ],
            max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_bindings: l
                .max_bindings_per_bind_group
                .min(l.max_storage_buffers_per_shader_stage + l.max_uniform_buffers_per_shader_stage),
            max_workgroup_storage_bytes: l.max_compute_workgroup_storage_size,
        }
    }

    /// Checks and compiles a compute pipeline, or takes it from the device's cache. The compile
    /// runs on a thread of its own with a large stack ([`COMPILE_STACK`]), after
    /// [`wgsl::check_shape`] has bounded how deep it can recurse; this call waits for it until
    /// `deadline` (the call's wall time) or `cpu_deadline` (the rest of the job's CPU time: a
    /// compile is work done for the guest) and then ends the job with that limit. A compile
    /// given up on finishes on its own thread, and its result is dropped.
    pub(crate) fn pipeline_create(
        &mut self,
        source: &[u8],
        entry: &[u8],
        deadline: Instant,
        cpu_deadline: Instant,
    ) -> Result<u32, CallError> {
        self.check_device()?;
        if source.len() as u64 > self.limits.wgsl_bytes {
            return guest(
                ErrorCode::InvalidArgument,
                format!(
                    "limit {}: {} bytes of WGSL, over {}",
                    LimitKind::WgslBytes,
                    source.len(),
                    self.limits.wgsl_bytes
                ),
            );
        }
        if self.pipelines.len() >= self.limits.pipelines as usize {
            return guest(
                ErrorCode::QuotaExceeded,
                format!("limit {}: the job already holds {} pipelines", LimitKind::Pipelines, self.pipelines.len()),
            );
        }
        let key: [u8; 32] = {
            use sha2::{Digest, Sha256};
            let len = (source.len() as u64).to_le_bytes();
            Sha256::new().chain_update(len).chain_update(source).chain_update(entry).finalize().into()
        };
        let cached = self.ctx.pipelines.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
        if let Some(compiled) = cached {
            let h = self.handle()?;
            self.pipelines.insert(h, compiled);
            return Ok(h);
        }
        let source = std::str::from_utf8(source)
            .map_err(|e| GuestError::new(ErrorCode::InvalidWgsl, format!("WGSL is not UTF-8: {e}")))?;
        let entry = std::str::from_utf8(entry)
            .map_err(|e| GuestError::new(ErrorCode::InvalidArgument, format!("entry point is not UTF-8: {e}")))?;
        wgsl::check_shape(source).map_err(|m| GuestError::new(ErrorCode::InvalidWgsl, m))?;

        let (tx, rx) = mpsc::sync_channel(1);
        let (device, source, entry, limits) =
            (self.ctx.device.clone(), source.to_owned(), entry.to_owned(), self.shader_limits());
        std::thread::Builder::new()
            .name("wasmgrid-shader-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || {
                let _ = tx.send(compile_pipeline(&device, &source, &entry, &limits));
            })
            .map_err(|e| Fatal::Host(format!("could not start a thread to compile the shader: {e}")))?;
        let until = deadline.min(cpu_deadline);
        let compiled = loop {
            self.check_cancel()?;
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(CANCEL_CHECK)) {
                Ok(result) => break result?,
                Err(mpsc::RecvTimeoutError::Timeout) if left > CANCEL_CHECK => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let kind = if cpu_deadline < deadline { LimitKind::CpuTime } else { LimitKind::WallTime };
                    return Err(Fatal::limit(kind, "the shader was still compiling when the job's time ran out").into());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Fatal::Host("the shader compiler failed on this shader".into()).into());
                }
            }
        };
        let h = self.handle()?;
        let compiled = Arc::new(compiled);
        {
            let mut cache = self.ctx.pipelines.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= PIPELINE_CACHE {
                cache.clear();
            }
            cache.insert(key, compiled.clone());
        }
        self.pipelines.insert(h, compiled);
        Ok(h)
    }

    pub(crate) fn pipeline_destroy(&mut self, handle: i32) -> Result<(), CallError> {
        let removed = u32::try_from(handle).ok().and_then(|h| self.pipelines.remove(&h));
        match removed {
            Some(_) => Ok(()),
            None => guest(ErrorCode::UnknownHandle, format!("{handle} is not a pipeline of this job")),
        }
    }

    /// Checks one dispatch against its pipeline, the job's quotas and the device, and returns the
    /// bind group entries in binding order plus the workgroup count.
    fn check_dispatch(&self, d: &DispatchDesc, bindings: &[BindingDesc]) -> Result<CheckedDispatch<'_>, CallError> {
        let p = self.pipelines.get(&d.pipeline).ok_or_else(|| {
            GuestError::new(ErrorCode::UnknownHandle, format!("{} is not a pipeline of this job", d.pipeline))
        })?;
        let max_dim = self.ctx.limits.max_compute_workgroups_per_dimension;
        for (axis, n) in [("x", d.x), ("y", d.y), ("z", d.z)] {
            if n > max_dim {
                return guest(
                    ErrorCode::WorkgroupLimit,
                    format!("{n} workgroups along {axis} exceed this device's maximum of {max_dim}"),
                );
            }
        }
        let groups = u64::from(d.x) * u64::from(d.y) * u64::from(d.z);
        if groups > self.limits.workgroups_per_dispatch {
            return guest(
                ErrorCode::WorkgroupLimit,
                format!(
                    "limit {}: {groups} workgroups in one dispatch, over {}",
                    LimitKind::WorkgroupsPerDispatch,
                    self.limits.workgroups_per_dispatch
                ),
            );
        }
        for b in bindings {
            if !p.reflection.declared.contains(&b.binding) {
                return guest(
                    ErrorCode::BindingMismatch,
                    format!("the shader declares no @group(0) @binding({})", b.binding),
                );
            }
            if bindings.iter().filter(|o| o.binding == b.binding).count() > 1 {
                return guest(ErrorCode::BindingMismatch, format!("@binding({}) is given twice", b.binding));
            }
        }
        let mut resolved = Vec::with_capacity(p.reflection.bindings.len());
        for info in &p.reflection.bindings {
            let desc = bindings.iter().find(|b| b.binding == info.binding).ok_or_else(|| {
                GuestError::new(
                    ErrorCode::BindingMismatch,
                    format!("@binding({}) ({}) has no buffer", info.binding, info.kind.describe()),
                )
            })?;
            let entry = i32::try_from(desc.buffer)
                .map_err(|_| {
                    GuestError::new(ErrorCode::UnknownHandle, format!("{} is not a buffer of this job", desc.buffer))
                })
                .and_then(|h| {
                    self.buffer(h).map_err(|_| {
                        GuestError::new(ErrorCode::UnknownHandle, format!("{h} is not a buffer of this job"))
                    })
                })?;
            let (want_uniform, max) = match info.kind {
                BindingKind::Uniform => (true, self.ctx.limits.max_uniform_buffer_binding_size),
                BindingKind::Storage { .. } => (false, self.ctx.limits.max_storage_buffer_binding_size),
            };
            if entry.uniform != want_uniform {
                let have = if entry.uniform { "a uniform" } else { "a storage" };
                return guest(
                    ErrorCode::BindingMismatch,
                    format!(
                        "@binding({}) is {} but buffer {} is {have} buffer",
                        info.binding,
                        info.kind.describe(),
                        desc.buffer
                    ),
                );
            }
            if entry.size < info.min_size {
                return guest(
                    ErrorCode::BindingMismatch,
                    format!(
                        "@binding({}) needs at least {} bytes but buffer {} has {}",
                        info.binding, info.min_size, desc.buffer, entry.size
                    ),
                );
            }
            if entry.size > max {
                return guest(
                    ErrorCode::BindingMismatch,
                    format!(
                        "buffer {} of {} bytes exceeds this device's binding size of {max}",
                        desc.buffer, entry.size
                    ),
                );
            }
            resolved.push((info.binding, entry, desc.buffer, info.kind));
        }
        // One buffer may not be written through one binding while bound at another.
        for (i, (bi, _, hi, ki)) in resolved.iter().enumerate() {
            for (bj, _, hj, kj) in resolved.iter().skip(i + 1) {
                let writes = matches!(ki, BindingKind::Storage { read_only: false })
                    || matches!(kj, BindingKind::Storage { read_only: false });
                if hi == hj && writes {
                    return guest(
                        ErrorCode::BindingMismatch,
                        format!("buffer {hi} is bound at @binding({bi}) and @binding({bj}) and written"),
                    );
                }
            }
        }
        let workgroup_invocations: u64 = p.reflection.workgroup_size.iter().map(|&n| u64::from(n)).product();
        let entries = resolved.into_iter().map(|(b, e, _, _)| (b, e)).collect();
        Ok((p, entries, groups.saturating_mul(workgroup_invocations)))
    }

    /// Runs the dispatches in order in one submission and waits for them until `deadline`.
    pub(crate) fn submit(
        &mut self,
        dispatches: &[(DispatchDesc, Vec<BindingDesc>)],
        deadline: Instant,
    ) -> Result<(), CallError> {
        self.check_device()?;
        if dispatches.is_empty() {
            return Ok(());
        }
        let total = self.usage.dispatches.saturating_add(dispatches.len() as u64);
        if total > self.limits.dispatches {
            return Err(Fatal::limit(
                LimitKind::Dispatches,
                format!("the job reached {total} dispatches, over its {}", self.limits.dispatches),
            )
            .into());
        }
        let mut checked = Vec::with_capacity(dispatches.len());
        let (mut groups, mut invocations) = (0u64, 0u64);
        for (d, bindings) in dispatches {
            let (p, entries, inv) = self.check_dispatch(d, bindings)?;
            groups = groups.saturating_add(u64::from(d.x) * u64::from(d.y) * u64::from(d.z));
            invocations = invocations.saturating_add(inv);
            checked.push((d, p, entries));
        }

        let started = Instant::now();
        let ctx = &self.ctx;
        let device = &ctx.device;
        let (out, err) = scoped(device, || {
            let queries = ctx.timestamps.then(|| {
                let set = device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: None,
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                });
                let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                let readback = device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 16,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                (set, resolve, readback)
            });
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            let last = checked.len().saturating_sub(1);
            for (i, (d, p, entries)) in checked.iter().enumerate() {
                let group_entries: Vec<wgpu::BindGroupEntry> = entries
                    .iter()
                    .map(|(binding, e)| wgpu::BindGroupEntry {
                        binding: *binding,
                        resource: e.buffer.as_entire_binding(),
                    })
                    .collect();
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &p.layout,
                    entries: &group_entries,
                });
                // Only the first pass starts the clock and only the last stops it (a pass that does
                // neither must not name the query set).
                let timestamp_writes = queries.as_ref().filter(|_| i == 0 || i == last).map(|(set, _, _)| {
                    wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: (i == 0).then_some(0),
                        end_of_pass_write_index: (i == last).then_some(1),
                    }
                });
                let mut pass =
                    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
                pass.set_pipeline(&p.pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(d.x, d.y, d.z);
            }
            if let Some((set, resolve, readback)) = &queries {
                encoder.resolve_query_set(set, 0..2, resolve, 0);
                encoder.copy_buffer_to_buffer(resolve, 0, readback, 0, 16);
            }
            let index = ctx.submit([encoder.finish()]);
            (index, queries.map(|(_, _, readback)| readback))
        });
        if let Some(e) = err {
            return Err(gpu_error("submitting dispatches", &e).into());
        }
        let (index, readback) = out;
        let stamps = readback.map(|buffer| {
            let (tx, mapped) = std::sync::mpsc::sync_channel(1);
            buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            (buffer, mapped)
        });
        self.wait(index, deadline)?;
        // Staged writes went out with this submission and are done.
        self.staged = 0;
        let wall_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let gpu_ns = stamps.and_then(|(buffer, mapped)| {
            // Timestamps not there soon are metered as wall time instead.
            let until = Instant::now() + STAMP_WAIT;
            if !matches!(map_done(&self.ctx, &mapped, until.min(deadline), self.cancel.as_deref()), Ok(Ok(()))) {
                return None;
            }
            let ns = {
                let view = buffer.slice(..).get_mapped_range().ok()?;
                let mut words = view.chunks_exact(8).map(|c| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    u64::from_le_bytes(w)
                });
                let (begin, end) = (words.next()?, words.next()?);
                end.checked_sub(begin).map(|ticks| (ticks as f64 * self.ctx.timestamp_period) as u64)
            };
            buffer.unmap();
            ns
        });
        self.usage.gpu_time_ns += gpu_ns.unwrap_or(wall_ns);
        self.first_dispatch.get_or_insert(started);
        self.usage.dispatches = total;
        self.usage.workgroups = self.usage.workgroups.saturating_add(groups);
        self.usage.invocations = self.usage.invocations.saturating_add(invocations);
        Ok(())
    }

    /// Waits for a submission. GPU work cannot be interrupted like WebAssembly, so past the
    /// deadline the job ends, the device is handed over to a fresh one for later jobs, and this
    /// job's thread goes on without waiting.
    ///
    /// A cancellation is seen within [`CANCEL_CHECK`]; the work already submitted still runs to
    /// its end on the GPU (a later job that waits behind hung work meets its own wall time).
    fn wait(&mut self, index: wgpu::SubmissionIndex, deadline: Instant) -> Result<(), CallError> {
        let polled = loop {
            if let Err(cancelled) = self.check_cancel() {
                self.in_flight = true;
                return Err(cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = left.min(CANCEL_CHECK).max(Duration::from_millis(1));
            let polled =
                self.ctx.poll(wgpu::PollType::Wait { submission_index: Some(index.clone()), timeout: Some(timeout) });
            match polled {
                Ok(Err(wgpu::PollError::Timeout)) if left > CANCEL_CHECK => {}
                other => break other,
            }
        };
        match polled {
            Ok(Ok(_)) => self.check_device(),
            Ok(Err(wgpu::PollError::Timeout)) => {
                self.gpu.replace(&self.ctx);
                Err(Fatal::limit(LimitKind::WallTime, GPU_HANG).into())
            }
            Ok(Err(e)) => Err(Fatal::Host(format!("waiting for the GPU failed: {e}")).into()),
            // wgpu panics on a device error while polling (a lost device among them).
            Err(panic) => {
                self.ctx.lost.set(panic);
                self.check_device()
            }
        }
    }
}

/// naga's check of the WGSL, then wgpu's shader module and pipeline (where the driver compiles
/// it), inside error scopes, which wgpu keeps per thread: this runs whole on the compile thread.
fn compile_pipeline(
    device: &wgpu::Device,
    source: &str,
    entry: &str,
    limits: &ShaderLimits,
) -> Result<PipelineEntry, CallError> {
    let reflection = wgsl::check(source, entry, limits).map_err(|m| GuestError::new(ErrorCode::InvalidWgsl, m))?;
    let ((pipeline, layout), err) = scoped(device, || {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = reflection
            .bindings
            .iter()
            .map(|b| wgpu::BindGroupLayoutEntry {
                binding: b.binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b.kind {
                        BindingKind::Storage { read_only } => wgpu::BufferBindingType::Storage { read_only },
                        BindingKind::Uniform => wgpu::BufferBindingType::Uniform,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: std::num::NonZeroU64::new(b.min_size),
                },
                count: None,
            })
            .collect();
        let layout =
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        (pipeline, layout)
    });
    if let Some(e) = err {
        return Err(match e {
            wgpu::Error::Validation { description, .. } => GuestError::new(ErrorCode::InvalidWgsl, description),
            other => gpu_error("creating a pipeline", &other),
        }
        .into());
    }
    Ok(PipelineEntry { pipeline, layout, reflection })
}

/// How long a submission's timestamps may take to map once it finished.
const STAMP_WAIT: Duration = Duration::from_millis(50);

/// How long a readback may take to map once its submission finished: its callback is due in
/// the next poll of any thread on the device, so this is a backstop, not a wait for the GPU.
const MAP_WAIT: Duration = Duration::from_secs(2);

/// Why a map's result did not come.
#[derive(Debug, PartialEq)]
enum MapStop {
    /// Not in time, or its callback was dropped uncalled.
    Never,
    Cancelled,
    Lost(String),
}

/// The result of a map whose submission has finished, polling until `until`, or until the
/// job is cancelled or its device lost. Its callback runs in some thread's poll: maybe this
/// one's, maybe another job's on the same device that took it up first and has yet to call it,
/// so it is waited for rather than expected at once.
fn map_done(
    ctx: &DeviceCtx,
    mapped: &std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
    until: Instant,
    cancel: Option<&AtomicBool>,
) -> Result<Result<(), wgpu::BufferAsyncError>, MapStop> {
    loop {
        poll_now(ctx);
        match mapped.recv_timeout(Duration::from_millis(1)) {
            Ok(r) => return Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < until => {}
            Err(_) => return Err(MapStop::Never),
        }
        if let Some(why) = ctx.lost.get() {
            return Err(MapStop::Lost(why));
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(MapStop::Cancelled);
        }
    }
}

/// Polls `ctx` once without waiting. wgpu panics on a device error while polling; that is
/// taken for a lost device.
fn poll_now(ctx: &DeviceCtx) {
    if let Err(panic) = ctx.poll(wgpu::PollType::Poll) {
        ctx.lost.set(panic);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "the driver failed".into())
}

impl Drop for JobGpu {
    fn drop(&mut self) {
        let abandoned = self.ctx.abandoned.load(Ordering::SeqCst);
        if !abandoned && !self.in_flight {
            self.buffers.clear();
            self.pipelines.clear();
            if self.staged > 0 {
                // Writes the job staged and never submitted would otherwise wait in host memory
                // for the next job's submission.
                let _ = scoped(&self.ctx.device, || self.ctx.submit(std::iter::empty()));
            }
            return;
        }
        // Dropping resources that GPU work still uses, or a device with work still running,
        // blocks until that work ends, which for a hung shader may be hours: let a throwaway
        // thread hold the last references.
        let buffers = std::mem::take(&mut self.buffers);
        let pipelines = std::mem::take(&mut self.pipelines);
        let ctx = if abandoned { std::mem::replace(&mut self.ctx, self.gpu.device()) } else { self.ctx.clone() };
        let _ = std::thread::Builder::new().name("wasmgrid-gpu-reaper".into()).spawn(move || {
            drop(buffers);
            drop(pipelines);
            drop(ctx);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, backend: &str, kind: &str) -> AdapterSummary {
        AdapterSummary {
            name: name.into(),
            vendor: "v".into(),
            vendor_id: 1,
            device_id: 2,
            backend: backend.into(),
            device_type: kind.into(),
            driver: String::new(),
            driver_info: String::new(),
            max_buffer_size: 0,
            max_storage_buffer_binding_size: 0,
            max_compute_workgroups_per_dimension: 0,
            max_compute_invocations_per_workgroup: 0,
            max_compute_workgroup_size: [0; 3],
            max_compute_workgroup_storage_size: 0,
            timestamp_queries: false,
        }
    }

    #[test]
    fn a_host_offers_every_card_through_its_best_api_and_software_only_without_a_gpu() {
        let a = adapter;
        let places =
            |list: Vec<AdapterSummary>| pick_default_adapters(list).into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        // Two cards of one model on Vulkan, the same two through OpenGL, and a software one.
        let rig = vec![
            a("RTX 3090", "vulkan", "DiscreteGpu"),
            a("RTX 3090", "vulkan", "DiscreteGpu"),
            a("RTX 3090", "gl", "DiscreteGpu"),
            a("RTX 3090", "gl", "DiscreteGpu"),
            a("llvmpipe", "vulkan", "Cpu"),
        ];
        assert_eq!(places(rig), vec![0, 1]);
        // No GPU: the software adapter, once.
        assert_eq!(places(vec![a("llvmpipe", "vulkan", "Cpu"), a("llvmpipe", "gl", "Cpu")]), vec![0]);
        assert_eq!(places(Vec::new()), Vec::<usize>::new());
    }

    #[test]
    fn an_operator_names_gpus_by_place_or_name_and_a_bad_or_repeated_one_is_refused() {
        let a = |name: &str, backend: &str| adapter(name, backend, "DiscreteGpu");
        let list = vec![a("H200", "vulkan"), a("H200", "vulkan"), a("H200", "gl"), a("A10", "vulkan")];
        let pick = |named: &[&str]| {
            let named: Vec<String> = named.iter().map(|s| s.to_string()).collect();
            select_adapters(&named, &list)
        };
        assert_eq!(pick(&[]), Ok(vec![0, 1, 3]), "every card once, through its best API");
        assert_eq!(pick(&["h200"]), Ok(vec![0, 1]), "a name: every such card");
        assert_eq!(pick(&["2", "3"]), Ok(vec![2, 3]), "a place: exactly that adapter, OpenGL too");
        assert!(pick(&["4"]).unwrap_err().contains("has 4 GPU adapter(s)"));
        assert!(pick(&["RTX"]).unwrap_err().contains("matches no GPU"));
        assert!(pick(&["0", "H200"]).unwrap_err().contains("named twice"));
    }

    /// A map whose callback never comes: the wait ends at once on a cancel, on a lost device,
    /// and at its bound otherwise, never at the job's far deadline.
    #[test]
    fn a_readback_wait_ends_on_cancel_on_device_loss_and_at_its_bound() {
        let gpu = Gpu::new(&AdapterChoice::default()).expect("a GPU adapter (lavapipe will do)");
        let ctx = gpu.device();
        let (tx, never) = std::sync::mpsc::sync_channel::<Result<(), wgpu::BufferAsyncError>>(1);
        let far = Instant::now() + Duration::from_secs(600);
        let cancel = AtomicBool::new(true);
        let t = Instant::now();
        assert_eq!(map_done(&ctx, &never, far, Some(&cancel)), Err(MapStop::Cancelled));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let t = Instant::now();
        assert_eq!(map_done(&ctx, &never, Instant::now() + Duration::from_millis(30), None), Err(MapStop::Never));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        ctx.lost.set("on purpose".into());
        assert_eq!(map_done(&ctx, &never, far, None), Err(MapStop::Lost("on purpose".into())));
        // A result that came is taken, whatever else holds.
        tx.send(Ok(())).unwrap();
        assert_eq!(map_done(&ctx, &never, far, Some(&cancel)), Ok(Ok(())));
    }
}
