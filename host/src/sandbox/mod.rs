//! The wasmtime sandbox: one engine per host with the pooling allocator, a cache of compiled
//! modules keyed by content hash, and a store per job holding its limits, meter and GPU state.

mod abi;
mod wasi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Memory, Module, PoolingAllocationConfig,
    ResourceLimiter, Store, Trap, TypedFunc, UpdateDeadline,
};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::error::Fatal;
use crate::gpu::{AdapterChoice, AdapterSummary, Gpu, JobGpu};
use crate::limits::{LimitKind, Limits};
use crate::meter::Usage;

/// How often the epoch ticks; CPU and wall time are checked at this granularity.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// A host's configuration. The limits of each job come with the job.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Which GPU to use.
    pub adapter: AdapterChoice,
    /// Jobs (and inference sessions) that may be alive at once; the pooling allocator reserves
    /// this many instance slots.
    pub max_instances: u32,
    /// The largest linear memory any job may have; a job's own limit can only be lower.
    pub max_memory_bytes: u64,
    /// Largest WebAssembly stack of a job, in bytes.
    pub max_wasm_stack: usize,
    /// Where compiled modules are kept between runs; `None` keeps them in memory only. Several
    /// hosts (worker processes) may share one directory: files are written whole under a
    /// temporary name and renamed into place, so no reader sees a partial one.
    pub cache_dir: Option<PathBuf>,
    /// Compiled modules kept in memory.
    pub cached_modules: usize,
    /// Most bytes of compiled modules kept in `cache_dir`. After each write the least recently
    /// used files (by modification time, which a load refreshes) are removed down to this.
    pub cache_max_bytes: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            adapter: AdapterChoice::default(),
            max_instances: 64,
            max_memory_bytes: 4 << 30,
            max_wasm_stack: 1 << 20,
            cache_dir: None,
            cached_modules: 256,
            cache_max_bytes: 2 << 30,
        }
    }
}

/// Why a module cannot run here. Nothing of the module has run when this is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    #[error(
        "this module was built against wasmgrid ABI v{found}, but this host speaks v{expected}: rebuild it with a guest SDK for ABI v{expected}"
    )]
    AbiVersion { found: u32, expected: u32 },
    #[error("the module imports `{module}::{name}`, which a wasmgrid sandbox does not provide")]
    ForbiddenImport { module: String, name: String },
    #[error(
        "the module imports `{name}` with the wrong signature for ABI v{version}; rebuild it with the current guest SDK"
    )]
    Signature { name: String, version: u32 },
    #[error(
        "the module exports neither `_start` (a batch job) nor `wasmgrid_init` and `wasmgrid_infer` (an inference service)"
    )]
    NoEntryPoint,
    #[error("this is an inference service: drive it with `wasmgrid infer`, not as a batch job")]
    NotBatch,
    #[error("this is a batch job, not an inference service: run it with `wasmgrid run`")]
    NotService,
    #[error("the host could not prepare the module: {0}")]
    Host(String),
    /// The compile was still running at the deadline given to [`Host::load_with_deadline`].
    #[error("limit wall-time exceeded: the module was still compiling after {0:.1?}, the job's wall time")]
    CompileTimeout(Duration),
}

/// Why a job (or one inference call) did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The job hit one of its limits and was ended.
    #[error("limit {limit} exceeded: {message}")]
    Limit { limit: LimitKind, message: String },
    /// The guest trapped (a Rust panic, an unreachable instruction, a bad memory access).
    #[error("the job crashed: {0}")]
    Trap(String),
    /// A batch job exited with a non-zero status; its log says why.
    #[error("the job exited with status {0}")]
    Exit(i32),
    /// The guest reported an error (an inference call returned one).
    #[error("the job failed: {0}")]
    Guest(String),
    /// The host could not serve the job (for example the GPU device was lost).
    #[error("host failure: {0}")]
    Host(String),
}

impl Failure {
    /// Whether the job was ended by a limit rather than by its own doing.
    pub fn is_limit(&self) -> bool {
        matches!(self, Failure::Limit { .. })
    }
}

/// Whether a job that ended so left its worker with nothing behind, fit for the next tenant: a
/// limit kill may leave GPU work running, a trap or a host failure may leave state nobody
/// checked.
pub(crate) fn ends_clean(outcome: &Result<(), Failure>) -> bool {
    matches!(outcome, Ok(()) | Err(Failure::Exit(_) | Failure::Guest(_)))
}

impl From<Fatal> for Failure {
    fn from(f: Fatal) -> Self {
        match f {
            Fatal::Limit { kind, message } => Failure::Limit { limit: kind, message },
            Fatal::Host(m) => Failure::Host(m),
            Fatal::Kernel(m) => Failure::Trap(m),
        }
    }
}

/// What a module is, judged from its exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// Exports `_start`: runs once.
    Batch,
    /// Exports `wasmgrid_init` and `wasmgrid_infer`: serves requests.
    Service,
}

/// A compiled, checked module, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct JobModule {
    hash: [u8; 32],
    kind: JobKind,
    pre: InstancePre<JobState>,
    compile_time: Duration,
}

impl std::fmt::Debug for JobModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobModule").field("hash", &self.hash_hex()).field("kind", &self.kind).finish()
    }
}

impl JobModule {
    /// SHA-256 of the module bytes: the key it is cached and addressed by.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub fn hash_hex(&self) -> String {
        hex(&self.hash)
    }

    pub fn kind(&self) -> JobKind {
        self.kind
    }

    /// How long the load that returned this module took: the import check, and the compile or
    /// the read of the disk cache (near zero for a module that was in memory). This is time
    /// the host spent on the job's behalf: a caller counts it toward the job's wall time and its
    /// bill.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The result of a batch job.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub outcome: Result<(), Failure>,
    pub output: Vec<u8>,
    /// stdout, stderr and `log` lines, in order, up to the log limit.
    pub log: Vec<u8>,
    pub usage: Usage,
    /// Wall time from instantiation to the end of the job.
    pub wall_time: Duration,
    /// From instantiation to the job's first GPU dispatch, if it made one.
    pub first_dispatch: Option<Duration>,
    /// Checkpoints the job saved, and the step of its newest.
    pub checkpoints_saved: u64,
    pub newest_checkpoint_step: Option<u64>,
}

/// What a batch job runs in besides its module, input and limits.
#[derive(Debug, Default)]
pub struct JobContext {
    /// Set from outside to end the job.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Its place in its cluster ([`crate::collective::Member::solo`] on one GPU).
    pub member: crate::collective::Member,
    /// The checkpoint it resumes from, and where its saves go.
    pub checkpoints: crate::checkpoint::Checkpoints,
}

/// Why an inference service did not start.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(LoadError),
    #[error("init failed: {}", .0.failure)]
    Failed(Box<StartFailed>),
}

/// A failed start of an inference service.
#[derive(Clone, Debug)]
pub struct StartFailed {
    pub failure: Failure,
    pub log: Vec<u8>,
    pub usage: Usage,
}

/// One served inference.
#[derive(Clone, Debug)]
pub struct Inference {
    pub response: Vec<u8>,
    /// Usage of this call alone.
    pub usage: Usage,
}

/// The job log: stdout and stderr of the guest (through WASI) and its `log` lines, in one
/// buffer capped at the job's log limit. Past the cap, writes are dropped and the guest sees a
/// full stream.
#[derive(Clone, Debug)]
pub(crate) struct LogSink {
    pipe: MemoryOutputPipe,
    cap: usize,
}

impl LogSink {
    fn new(cap: usize) -> LogSink {
        LogSink { pipe: MemoryOutputPipe::new(cap), cap }
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWrite;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // The pipe's AsyncWrite keeps what fits and is always ready, so one poll is enough.
        let _ = std::pin::Pin::new(&mut self.pipe).poll_write(&mut cx, bytes);
    }

    fn contents(&self) -> Vec<u8> {
        self.pipe.contents().to_vec()
    }

    fn is_full(&self) -> bool {
        self.pipe.contents().len() >= self.cap
    }
}

/// A view of a running job's log, for streaming it while the job runs. Cheap to clone; reads
/// never block the job.
#[derive(Clone, Debug)]
pub struct LogWatch {
    sink: LogSink,
}

impl LogWatch {
    /// The log bytes from `offset` on (empty when there is nothing new).
    pub fn since(&self, offset: usize) -> Vec<u8> {
        let all = self.sink.pipe.contents();
        all.get(offset..).map(<[u8]>::to_vec).unwrap_or_default()
    }
}

/// Time accounting of the current call: wall time from its start, and the part of it spent in
/// host calls (GPU waits, shader compiles), which is not the guest's CPU time.
#[derive(Debug)]
pub(crate) struct CallClock {
    started: Instant,
    pub(crate) deadline: Instant,
    pub(crate) host_time: Duration,
}

impl CallClock {
    fn start(limits: &Limits) -> CallClock {
        let now = Instant::now();
        CallClock { started: now, deadline: later(now, limits.wall_time), host_time: Duration::ZERO }
    }

    /// When the call's CPU time runs out if everything from now on counts as CPU time.
    pub(crate) fn cpu_deadline(&self, limits: &Limits) -> Instant {
        let now = Instant::now();
        let cpu = now.duration_since(self.started).saturating_sub(self.host_time);
        later(now, limits.cpu_time.saturating_sub(cpu))
    }
}

/// `now + d`, or about 34 years from now where `d` is larger than an `Instant` can hold.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(1 << 30))).unwrap_or(now)
}

#[derive(Debug)]
struct MemoryLimiter {
    max: u64,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.max {
            return Err(wasmtime::Error::new(Fatal::limit(
                LimitKind::Memory,
                format!(
                    "linear memory would grow from {current} to {desired} bytes, over the job's {} bytes",
                    self.max
                ),
            )));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// Everything a job's store holds.
pub(crate) struct JobState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    pub(crate) memory: Option<Memory>,
    pub(crate) limits: Limits,
    pub(crate) gpu: JobGpu,
    pub(crate) input: Vec<u8>,
    pub(crate) output: Vec<u8>,
    pub(crate) log: LogSink,
    pub(crate) last_error: String,
    pub(crate) failure: Option<String>,
    pub(crate) fatal: Option<Fatal>,
    pub(crate) clock: CallClock,
    /// Where the guest's monotonic clock starts.
    clock_base: Instant,
    /// Set from outside to end the job (the scheduler gave it to another provider).
    cancel: Option<Arc<AtomicBool>>,
    /// This job's place in its cluster (alone, for a job on one GPU).
    pub(crate) member: crate::collective::Member,
    /// An all-reduce running while the kernel computes (`all_reduce_start`), which holds the
    /// member meanwhile.
    pub(crate) in_flight: Option<abi::InFlight>,
    /// The checkpoint it resumes from, and where its saves go.
    pub(crate) checkpoints: crate::checkpoint::Checkpoints,
}

/// Increments the engine's epoch until dropped.
#[derive(Debug)]
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let weak = engine.weak();
        let _ = std::thread::Builder::new().name("wasmgrid-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        });
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct HostInner {
    engine: Engine,
    linker: Linker<JobState>,
    gpu: Gpu,
    config: HostConfig,
    cache: Mutex<HashMap<[u8; 32], JobModule>>,
    _ticker: EpochTicker,
}

/// A provider host: one wasmtime engine and one GPU, shared by every job it runs. Cheap to clone
/// and safe to use from many threads at once.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("gpu", &self.inner.gpu.summary().name).finish_non_exhaustive()
    }
}

/// Why a host could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Gpu(String),
    #[error("could not set up the WebAssembly engine: {0}")]
    Engine(String),
}

impl Host {
    /// Starts a host: opens the GPU and sets up the engine. Opening a device can take seconds on
    /// a software driver; share one `Host` rather than making many.
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        let gpu = Gpu::new(&config.adapter).map_err(HostError::Gpu)?;

        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .total_stacks(config.max_instances)
            .total_component_instances(0)
            .total_gc_heaps(0)
            .max_memory_size(usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX))
            .max_unused_warm_slots(config.max_instances.min(16));
        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .wasm_threads(false)
            .wasm_component_model(false);
        let engine = Engine::new(&wasm).map_err(|e| HostError::Engine(format!("{e:#}")))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut JobState| &mut s.wasi)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        // The WASI calls that can block are the host's own, bounded by the call's deadline.
        wasi::shadow_blocking(&mut linker).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        abi::add_to_linker(&mut linker).map_err(|e| HostError::Engine(format!("{e:#}")))?;

        let ticker = EpochTicker::start(&engine);
        Ok(Host {
            inner: Arc::new(HostInner {
                engine,
                linker,
                gpu,
                config,
                cache: Mutex::new(HashMap::new()),
                _ticker: ticker,
            }),
        })
    }

    /// The GPU this host runs jobs on.
    pub fn gpu(&self) -> &AdapterSummary {
        self.inner.gpu.summary()
    }

    /// Checks and compiles a module, or takes it from the cache when these exact bytes were
    /// loaded before. The imports and entry points are checked before anything is compiled.
    pub fn load(&self, wasm: &[u8]) -> Result<JobModule, LoadError> {
        self.load_with_deadline(wasm, None)
    }

    /// Like [`Host::load`], giving up on a compile still running at `deadline` (the job's wall
    /// time, counted from when the job started) with [`LoadError::CompileTimeout`]. wasmtime
    /// cannot stop a compile half way: the given-up compile goes on, on a thread of its own,
    /// until it ends, and its result is dropped. A host that must get that CPU back at once
    /// (a worker process) is stopped by its supervisor instead.
    pub fn load_with_deadline(&self, wasm: &[u8], deadline: Option<Instant>) -> Result<JobModule, LoadError> {
        let started = Instant::now();
        let hash: [u8; 32] = Sha256::digest(wasm).into();
        if let Some(m) = self.inner.cache.lock().unwrap_or_else(PoisonError::into_inner).get(&hash) {
            return Ok(JobModule { compile_time: started.elapsed(), ..m.clone() });
        }
        precheck(wasm)?;
        let module = self.compile(wasm, &hash, deadline.map(|d| (started, d)))?;
        let kind = check_module(&module)?;
        let pre = self.inner.linker.instantiate_pre(&module).map_err(|e| LoadError::Host(format!("{e:#}")))?;
        let job = JobModule { hash, kind, pre, compile_time: started.elapsed() };
        let mut cache = self.inner.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.inner.config.cached_modules {
            // Any entry will do: a miss costs one compile (or one load from the disk cache).
            if let Some(k) = cache.keys().next().copied() {
                cache.remove(&k);
            }
        }
        cache.insert(hash, job.clone());
        Ok(job)
    }

    /// Whether a module with this hash is compiled and in memory.
    pub fn is_cached(&self, hash: &[u8; 32]) -> bool {
        self.inner.cache.lock().unwrap_or_else(PoisonError::into_inner).contains_key(hash)
    }

    /// The module with this hash if this host has it compiled, in memory or in its disk cache,
    /// so that a module fetched once need not travel again.
    pub fn cached(&self, hash: &[u8; 32]) -> Option<JobModule> {
        let started = Instant::now();
        if let Some(m) = self.inner.cache.lock().unwrap_or_else(PoisonError::into_inner).get(hash) {
            return Some(JobModule { compile_time: started.elapsed(), ..m.clone() });
        }
        let dir = self.inner.config.cache_dir.as_ref()?;
        let module = load_precompiled(&self.inner.engine, &cache_path(dir, hash))?;
        let kind = check_module(&module).ok()?;
        let pre = self.inner.linker.instantiate_pre(&module).ok()?;
        let job = JobModule { hash: *hash, kind, pre, compile_time: started.elapsed() };
        self.inner.cache.lock().unwrap_or_else(PoisonError::into_inner).insert(*hash, job.clone());
        Some(job)
    }

    /// Why this host's GPU device was lost, if it was (a driver reset, a GPU that fell off the
    /// bus). Jobs running when it is lost, and every later one, fail with
    /// `Failure::Host("the GPU device was lost: ...")`; this host opens no other device, so a
    /// worker that sees this should report it and exit.
    pub fn device_lost(&self) -> Option<String> {
        self.inner.gpu.device_lost()
    }

    /// How many times GPU work ran past a job's wall time and this host gave up on its device
    /// (such a job fails with limit `wall-time`, "GPU work was still running at the wall-time
    /// limit"). Later jobs here get a fresh device, but the hung work keeps the old one and a
    /// thread of this process busy until it ends: a worker whose count grew during a job should
    /// be replaced.
    pub fn device_replaced_count(&self) -> u64 {
        self.inner.gpu.replaced_count()
    }

    /// Measures this host's GPU: f32 matmul throughput in GFLOP/s, for the score providers
    /// advertise.
    pub fn benchmark_gflops(&self) -> f64 {
        self.inner.gpu.benchmark_gflops()
    }

    /// Compiles `wasm`, or reads it from the disk cache. With a `window` (start, deadline) the
    /// compile runs on a thread of its own and is given up on at the deadline.
    fn compile(&self, wasm: &[u8], hash: &[u8; 32], window: Option<(Instant, Instant)>) -> Result<Module, LoadError> {
        let engine = &self.inner.engine;
        let path = self.inner.config.cache_dir.as_ref().map(|d| cache_path(d, hash));
        if let Some(m) = path.as_ref().and_then(|p| load_precompiled(engine, p)) {
            return Ok(m);
        }
        let module = match window {
            None => Module::new(engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))?,
            Some((started, deadline)) => compile_until(engine, wasm, started, deadline)?,
        };
        if let Some(path) = &path {
            // A cache that cannot be written only costs a compile next time.
            if let Err(e) = store_precompiled(&module, path, self.inner.config.cache_max_bytes) {
                log::warn!("could not write the module cache {}: {e}", path.display());
            }
        }
        Ok(module)
    }

    /// Compiles a module without caching it, for benchmarks of compile time.
    pub fn compile_uncached(&self, wasm: &[u8]) -> Result<(), LoadError> {
        Module::new(&self.inner.engine, wasm).map(drop).map_err(|e| LoadError::Invalid(format!("{e:#}")))
    }

    pub(crate) fn gpu_handle(&self) -> &Gpu {
        &self.inner.gpu
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn new_store(&self, module: &JobModule, input: Vec<u8>, limits: &Limits) -> Store<JobState> {
        let log = LogSink::new(usize::try_from(limits.log_bytes).unwrap_or(usize::MAX));
        // Randomness is derived from the module and its input, so a re-run on another provider
        // sees the same bytes and can be compared with the first.
        let seed: [u8; 32] = Sha256::new().chain_update(module.hash).chain_update(&input).finalize().into();
        let clock_base = Instant::now();
        let wasi = WasiCtxBuilder::new()
            .monotonic_clock(wasi::JobMonotonicClock { base: clock_base })
            .stdout(log.pipe.clone())
            .stderr(log.pipe.clone())
            .args(&["job.wasm"])
            .secure_random(wasmtime_wasi::Deterministic::new(seed.to_vec()))
            .insecure_random(wasmtime_wasi::Deterministic::new(seed.to_vec()))
            .build_p1();
        let state = JobState {
            wasi,
            limiter: MemoryLimiter { max: limits.memory_bytes.min(self.inner.config.max_memory_bytes) },
            memory: None,
            limits: limits.clone(),
            gpu: JobGpu::new(&self.inner.gpu, limits),
            input,
            output: Vec::new(),
            log,
            last_error: String::new(),
            failure: None,
            fatal: None,
            clock: CallClock::start(limits),
            clock_base,
            cancel: None,
            member: crate::collective::Member::solo(),
            in_flight: None,
            checkpoints: crate::checkpoint::Checkpoints::default(),
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Fuel is set once for the whole job (or session); it only counts down.
        let _ = store.set_fuel(limits.fuel);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let s = ctx.data();
            if s.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(wasmtime::Error::new(Fatal::Host("the job was cancelled".into())));
            }
            let now = Instant::now();
            let wall = now.duration_since(s.clock.started);
            let cpu = wall.saturating_sub(s.clock.host_time);
            if now >= s.clock.deadline {
                return Err(wasmtime::Error::new(Fatal::limit(
                    LimitKind::WallTime,
                    format!("the call ran for {:.1?}, over its {:.1?}", wall, s.limits.wall_time),
                )));
            }
            if cpu >= s.limits.cpu_time {
                return Err(wasmtime::Error::new(Fatal::limit(
                    LimitKind::CpuTime,
                    format!("the guest ran for {:.1?} of CPU time, over its {:.1?}", cpu, s.limits.cpu_time),
                )));
            }
            // Come back at least every 100 ms, so a cancellation is seen promptly.
            let left = (s.limits.cpu_time - cpu).min(s.clock.deadline - now).min(Duration::from_millis(100));
            let ticks = (left.as_micros() / EPOCH_TICK.as_micros().max(1)).max(1);
            Ok(UpdateDeadline::Continue(u64::try_from(ticks).unwrap_or(u64::MAX)))
        });
        store
    }

    pub(crate) fn instantiate(
        &self,
        module: &JobModule,
        store: &mut Store<JobState>,
    ) -> Result<wasmtime::Instance, Failure> {
        let instance = module.pre.instantiate(&mut *store).map_err(|e| classify(store, &e))?;
        store.data_mut().memory = instance.get_memory(&mut *store, "memory");
        Ok(instance)
    }

    /// Runs a batch job to completion.
    pub fn run_batch(&self, module: &JobModule, input: Vec<u8>, limits: &Limits) -> Result<JobReport, LoadError> {
        self.run_batch_watched(module, input, limits, |_| {})
    }

    /// Runs a batch job like [`Host::run_batch`], first handing `watch` a [`LogWatch`] through
    /// which another thread can read the log as it grows.
    pub fn run_batch_watched(
        &self,
        module: &JobModule,
        input: Vec<u8>,
        limits: &Limits,
        watch: impl FnOnce(LogWatch),
    ) -> Result<JobReport, LoadError> {
        self.run_batch_cancellable(module, input, limits, watch, None)
    }

    /// Runs a batch job like [`Host::run_batch_watched`]; setting `cancel` ends it within
    /// milliseconds whatever it is doing: running WebAssembly (at the next epoch tick),
    /// sleeping, waiting for the GPU or for a shader compile. GPU work already submitted still
    /// runs to its end on the device.
    pub fn run_batch_cancellable(
        &self,
        module: &JobModule,
        input: Vec<u8>,
        limits: &Limits,
        watch: impl FnOnce(LogWatch),
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<JobReport, LoadError> {
        self.run_member(module, input, limits, watch, cancel, crate::collective::Member::solo())
    }

    /// Runs one rank of a cluster job like [`Host::run_batch_cancellable`]: its collectives
    /// go through `member`.
    pub fn run_member(
        &self,
        module: &JobModule,
        input: Vec<u8>,
        limits: &Limits,
        watch: impl FnOnce(LogWatch),
        cancel: Option<Arc<AtomicBool>>,
        member: crate::collective::Member,
    ) -> Result<JobReport, LoadError> {
        let context = JobContext { cancel, member, checkpoints: crate::checkpoint::Checkpoints::default() };
        self.run_job(module, input, limits, watch, context)
    }

    /// Runs a batch job in `context`: its cancel flag, its place in its cluster, the
    /// checkpoint it resumes from and where its saves go.
    pub fn run_job(
        &self,
        module: &JobModule,
        input: Vec<u8>,
        limits: &Limits,
        watch: impl FnOnce(LogWatch),
        context: JobContext,
    ) -> Result<JobReport, LoadError> {
        if module.kind != JobKind::Batch {
            return Err(LoadError::NotBatch);
        }
        let started = Instant::now();
        let mut store = self.new_store(module, input, limits);
        store.data_mut().gpu.set_cancel(context.cancel.clone());
        store.data_mut().cancel = context.cancel;
        store.data_mut().member = context.member;
        store.data_mut().checkpoints = context.checkpoints;
        watch(LogWatch { sink: store.data().log.clone() });
        let outcome = self.instantiate(module, &mut store).and_then(|instance| {
            let start: TypedFunc<(), ()> = instance
                .get_typed_func(&mut store, ::abi::EXPORT_START)
                .map_err(|e| Failure::Host(format!("{e:#}")))?;
            store.data_mut().clock = CallClock::start(limits);
            match start.call(&mut store, ()) {
                Ok(()) => Ok(()),
                Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    Some(wasmtime_wasi::I32Exit(0)) => Ok(()),
                    Some(wasmtime_wasi::I32Exit(code)) => Err(Failure::Exit(*code)),
                    None => Err(classify(&store, &e)),
                },
            }
        });
        // However the job ended, its newest save goes on: a next try resumes from it. An
        // all-reduce still in flight is waited for after a clean end (its peers are in the
        // same call, and the worker is reused); after any other it is left to end with the
        // worker, which is replaced, rather than hold it until its peers' round or the wall time.
        store.data_mut().checkpoints.flush();
        abi::settle_in_flight(store.data_mut(), ends_clean(&outcome));
        let usage = usage_of(&store);
        let state = store.data();
        let first_dispatch = state.gpu.first_dispatch.map(|t| t.saturating_duration_since(started));
        Ok(JobReport {
            checkpoints_saved: state.checkpoints.saved,
            newest_checkpoint_step: state.checkpoints.newest_step,
            first_dispatch,
            outcome,
            output: state.output.clone(),
            log: state.log.contents(),
            usage,
            wall_time: started.elapsed(),
        })
    }

    /// Starts an inference service: instantiates it and runs its `init` with `init_input`.
    pub fn start_service(
        &self,
        module: &JobModule,
        init_input: Vec<u8>,
        limits: &Limits,
    ) -> Result<Service, StartError> {
        if module.kind != JobKind::Service {
            return Err(StartError::Load(LoadError::NotService));
        }
        let mut store = self.new_store(module, init_input, limits);
        let started = self.instantiate(module, &mut store).and_then(|instance| {
            if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, ::abi::EXPORT_INITIALIZE) {
                init.call(&mut store, ()).map_err(|e| classify(&store, &e))?;
            }
            let init: TypedFunc<(), i32> =
                instance.get_typed_func(&mut store, ::abi::EXPORT_INIT).map_err(|e| Failure::Host(format!("{e:#}")))?;
            let infer: TypedFunc<(), i32> = instance
                .get_typed_func(&mut store, ::abi::EXPORT_INFER)
                .map_err(|e| Failure::Host(format!("{e:#}")))?;
            call_service(&mut store, &init, limits)?;
            Ok(infer)
        });
        match started {
            Ok(infer) => Ok(Service { store, infer, limits: limits.clone(), dead: None }),
            Err(failure) => {
                let usage = usage_of(&store);
                Err(StartError::Failed(Box::new(StartFailed { failure, log: store.data().log.contents(), usage })))
            }
        }
    }
}

/// Compiles `wasm` on a thread of its own and waits for it until `deadline`.
fn compile_until(engine: &Engine, wasm: &[u8], started: Instant, deadline: Instant) -> Result<Module, LoadError> {
    if Instant::now() >= deadline {
        return Err(LoadError::CompileTimeout(deadline.saturating_duration_since(started)));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (engine, bytes) = (engine.clone(), wasm.to_vec());
    std::thread::Builder::new()
        .name("wasmgrid-module-compile".into())
        .spawn(move || {
            let _ = tx.send(Module::new(&engine, &bytes).map_err(|e| LoadError::Invalid(format!("{e:#}"))));
        })
        .map_err(|e| LoadError::Host(format!("could not start a thread to compile the module: {e}")))?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(compiled) => compiled,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(LoadError::CompileTimeout(deadline.saturating_duration_since(started)))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(LoadError::Host("the module compiler stopped without an answer".into()))
        }
    }
}

/// Where the disk cache keeps the compiled module of the source with this hash.
fn cache_path(dir: &Path, hash: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.cwasm", hex(hash)))
}

fn load_precompiled(engine: &Engine, path: &Path) -> Option<Module> {
    if !path.exists() {
        return None;
    }
    // SAFETY: the file is one this host (or another sharing the directory) wrote with
    // `Module::serialize` into its own cache directory, named by the hash of the source
    // module, and renamed into place only once complete; wasmtime also checks that it was
    // compiled by a compatible engine with the same settings and refuses it otherwise. Files
    // are replaced by rename and removed by unlink, never changed in place, so the mapping
    // wasmtime makes of it stays whole.
    #[allow(unsafe_code)]
    let loaded = unsafe { Module::deserialize_file(engine, path) };
    match loaded {
        Ok(m) => {
            // The cache evicts by modification time: a module in use stays.
            let touched = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
            if let Err(e) = touched {
                log::debug!("could not mark {} as used: {e}", path.display());
            }
            Some(m)
        }
        Err(e) => {
            log::warn!("ignoring the cached module {}: {e:#}", path.display());
            None
        }
    }
}

/// Writes a compiled module into the disk cache: whole, under a name no other writer uses,
/// synced, then renamed into place, so that a reader in any process finds the old file, the new
/// one or none, never part of one. Then trims the directory to `max_bytes`.
fn store_precompiled(module: &Module, path: &Path, max_bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let bytes = module.serialize().map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("the cache path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let nonce = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), (n, Instant::now()));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{n}.{nonce:016x}{TMP_SUFFIX}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // The rename itself reaches the disk with the directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    evict(dir, max_bytes, path);
    Ok(())
}

/// Ending of a cache file still being written.
const TMP_SUFFIX: &str = ".tmp";
/// A temporary file older than this was left by a writer that died.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Removes the least recently used compiled modules in `dir` until the rest fit in
/// `max_bytes`; `keep` (just written) goes last. Other processes may be evicting at once: a
/// file already gone is no error.
fn evict(dir: &Path, max_bytes: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    let mut files = Vec::new();
    let mut total = 0u64;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let modified = meta.modified().unwrap_or(now);
        if name.ends_with(TMP_SUFFIX) {
            if now.duration_since(modified).is_ok_and(|age| age > STALE_TMP) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if !name.ends_with(".cwasm") {
            continue;
        }
        total = total.saturating_add(meta.len());
        files.push((path == keep, modified, path, meta.len()));
    }
    if total <= max_bytes {
        return;
    }
    // Oldest first, the file just written last.
    files.sort_by_key(|f| (f.0, f.1));
    for (_, _, path, len) in files {
        if total <= max_bytes {
            break;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => log::debug!("evicted {} from the module cache", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                log::warn!("could not evict {} from the module cache: {e}", path.display());
                continue;
            }
        }
        total = total.saturating_sub(len);
    }
}

/// Checks a module's imports and entry points from its header sections, before anything is
/// compiled: a module that imports what the sandbox does not provide, with the wrong
/// signature, or that has no entry point, costs a parse of its first sections, not a compile.
/// `check_module` repeats the check on the compiled module.
fn precheck(wasm: &[u8]) -> Result<(), LoadError> {
    use wasmparser::{CompositeInnerType, Encoding, ExternalKind, Parser, Payload, TypeRef};
    let invalid = |e: wasmparser::BinaryReaderError| LoadError::Invalid(e.to_string());
    // Function types by type index (`None` for other kinds of type).
    let mut types: Vec<Option<(Vec<wasmparser::ValType>, Vec<wasmparser::ValType>)>> = Vec::new();
    let mut exports: Vec<String> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::Version { encoding: Encoding::Component, .. } => {
                return Err(LoadError::Invalid("this is a WebAssembly component, not a core module".into()));
            }
            Payload::TypeSection(reader) => {
                for group in reader {
                    for ty in group.map_err(invalid)?.into_types() {
                        types.push(match ty.composite_type.inner {
                            CompositeInnerType::Func(f) => Some((f.params().to_vec(), f.results().to_vec())),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(invalid)?;
                    let (m, name) = (import.module, import.name);
                    if let Some(found) = ::abi::import_module_version(m).filter(|&v| v != ::abi::ABI_VERSION) {
                        return Err(LoadError::AbiVersion { found, expected: ::abi::ABI_VERSION });
                    }
                    let forbidden = || LoadError::ForbiddenImport { module: m.to_string(), name: name.to_string() };
                    if !::abi::import_allowed(m, name) {
                        return Err(forbidden());
                    }
                    // Everything the sandbox provides is a function.
                    let TypeRef::Func(index) = import.ty else { return Err(forbidden()) };
                    if m == ::abi::IMPORT_MODULE {
                        let want = ::abi::import(name).ok_or_else(forbidden)?;
                        let same = |have: &[wasmparser::ValType], want: &[::abi::ValType]| {
                            have.len() == want.len()
                                && have.iter().zip(want).all(|(h, w)| match w {
                                    ::abi::ValType::I32 => *h == wasmparser::ValType::I32,
                                    ::abi::ValType::I64 => *h == wasmparser::ValType::I64,
                                })
                        };
                        let ok = usize::try_from(index)
                            .ok()
                            .and_then(|i| types.get(i))
                            .and_then(Option::as_ref)
                            .is_some_and(|(params, results)| same(params, want.params) && same(results, want.results));
                        if !ok {
                            return Err(LoadError::Signature { name: name.to_string(), version: ::abi::ABI_VERSION });
                        }
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(invalid)?;
                    if matches!(export.kind, ExternalKind::Func) {
                        exports.push(export.name.to_string());
                    }
                }
            }
            // The code and data come after every section this check reads.
            Payload::CodeSectionStart { .. } | Payload::DataSection(_) | Payload::End(_) => break,
            _ => {}
        }
    }
    let has = |name: &str| exports.iter().any(|e| e == name);
    if !(has(::abi::EXPORT_START) || (has(::abi::EXPORT_INIT) && has(::abi::EXPORT_INFER))) {
        return Err(LoadError::NoEntryPoint);
    }
    Ok(())
}

/// Checks a module's imports against the ABI and tells batch jobs from services.
fn check_module(module: &Module) -> Result<JobKind, LoadError> {
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        if let Some(found) = ::abi::import_module_version(m).filter(|&v| v != ::abi::ABI_VERSION) {
            return Err(LoadError::AbiVersion { found, expected: ::abi::ABI_VERSION });
        }
        if !::abi::import_allowed(m, name) {
            return Err(LoadError::ForbiddenImport { module: m.to_string(), name: name.to_string() });
        }
        if m == ::abi::IMPORT_MODULE {
            let want = ::abi::import(name)
                .ok_or_else(|| LoadError::ForbiddenImport { module: m.into(), name: name.into() })?;
            let ok = match import.ty() {
                wasmtime::ExternType::Func(f) => {
                    let same = |have: &mut dyn ExactSizeIterator<Item = wasmtime::ValType>, want: &[::abi::ValType]| {
                        have.len() == want.len()
                            && have.zip(want).all(|(h, w)| match w {
                                ::abi::ValType::I32 => matches!(h, wasmtime::ValType::I32),
                                ::abi::ValType::I64 => matches!(h, wasmtime::ValType::I64),
                            })
                    };
                    same(&mut f.params(), want.params) && same(&mut f.results(), want.results)
                }
                _ => false,
            };
            if !ok {
                return Err(LoadError::Signature { name: name.to_string(), version: ::abi::ABI_VERSION });
            }
        }
    }
    let has = |name: &str| module.get_export(name).is_some_and(|e| matches!(e, wasmtime::ExternType::Func(_)));
    if has(::abi::EXPORT_INFER) && has(::abi::EXPORT_INIT) {
        Ok(JobKind::Service)
    } else if has(::abi::EXPORT_START) {
        Ok(JobKind::Batch)
    } else {
        Err(LoadError::NoEntryPoint)
    }
}

/// Turns a wasmtime error from a call into a job failure, naming the limit when one was hit.
fn classify(store: &Store<JobState>, e: &wasmtime::Error) -> Failure {
    if let Some(f) = &store.data().fatal {
        return f.clone().into();
    }
    if let Some(f) = e.downcast_ref::<Fatal>() {
        return f.clone().into();
    }
    let state = store.data();
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::Limit {
            limit: LimitKind::Fuel,
            message: format!("the job used all of its {} fuel", state.limits.fuel),
        },
        Some(Trap::StackOverflow) => Failure::Limit {
            limit: LimitKind::Stack,
            message: "the guest overflowed its WebAssembly stack (deep or endless recursion?)".into(),
        },
        _ if state.log.is_full() => Failure::Limit {
            limit: LimitKind::LogBytes,
            message: format!("the job wrote more than its {} bytes of log", state.limits.log_bytes),
        },
        Some(trap) => Failure::Trap(format!("{trap}{}", backtrace(e))),
        None => Failure::Trap(format!("{e:#}")),
    }
}

/// The innermost guest functions of a trap, demangled, past the panic and abort machinery of
/// the standard library, so a renter can see where their kernel crashed.
fn backtrace(e: &wasmtime::Error) -> String {
    let Some(bt) = e.downcast_ref::<wasmtime::WasmBacktrace>() else { return String::new() };
    let runtime = ["std::", "core::", "alloc::", "__rustc::", "__rust", "rust_panic", "abort", "<std::", "<core::"];
    let names: Vec<String> = bt
        .frames()
        .iter()
        .map(|f| {
            f.func_name()
                .map_or_else(|| format!("#{}", f.func_index()), |n| format!("{:#}", rustc_demangle::demangle(n)))
        })
        .filter(|n| !runtime.iter().any(|p| n.starts_with(p)))
        .take(4)
        .collect();
    if names.is_empty() { String::new() } else { format!(" (in {})", names.join(" <- ")) }
}

fn usage_of(store: &Store<JobState>) -> Usage {
    let mut usage = store.data().gpu.usage;
    usage.fuel = store.data().limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
    usage.net_bytes_sent = store.data().member.bytes_sent();
    usage.net_bytes_received = store.data().member.bytes_received();
    usage.net_wait_ns = u64::try_from(store.data().member.network_wait().as_nanos()).unwrap_or(u64::MAX);
    usage
}

/// Calls `wasmgrid_init` or `wasmgrid_infer` with a fresh call clock.
fn call_service(store: &mut Store<JobState>, f: &TypedFunc<(), i32>, limits: &Limits) -> Result<(), Failure> {
    {
        let s = store.data_mut();
        s.clock = CallClock::start(limits);
        s.failure = None;
        s.output.clear();
    }
    match f.call(&mut *store, ()) {
        Ok(0) => Ok(()),
        Ok(code) => {
            let s = store.data();
            let reason = s.failure.clone().unwrap_or_else(|| format!("returned error code {code}"));
            Err(Failure::Guest(reason))
        }
        Err(e) => Err(classify(store, &e)),
    }
}

/// A running inference service: `init` has run; each [`infer`](Service::infer) is one request.
pub struct Service {
    store: Store<JobState>,
    infer: TypedFunc<(), i32>,
    limits: Limits,
    /// Set once a call ended the instance (a limit or a trap); every later call answers it.
    dead: Option<Failure>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("dead", &self.dead).finish_non_exhaustive()
    }
}

impl Service {
    /// Serves one request. A guest error fails this request only; a limit or a crash ends the
    /// service, and every later request gets the same failure.
    pub fn infer(&mut self, request: &[u8]) -> Result<Inference, Failure> {
        if let Some(f) = &self.dead {
            return Err(f.clone());
        }
        let infer = self.infer.clone();
        let before = usage_of(&self.store);
        self.store.data_mut().input = request.to_vec();
        let result = call_service(&mut self.store, &infer, &self.limits);
        let s = self.store.data_mut();
        s.input.clear();
        let response = std::mem::take(&mut s.output);
        match result {
            Ok(()) => {
                s.gpu.usage.inferences += 1;
                let usage = usage_of(&self.store) - before;
                Ok(Inference { response, usage })
            }
            Err(f @ Failure::Guest(_)) => Err(f),
            Err(f) => {
                self.dead = Some(f.clone());
                Err(f)
            }
        }
    }

    /// Usage since the service started, `init` included.
    pub fn usage(&self) -> Usage {
        usage_of(&self.store)
    }

    /// The service's log so far.
    pub fn log(&self) -> Vec<u8> {
        self.store.data().log.contents()
    }
}
