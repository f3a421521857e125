//! The worker process: one tenant at a time in its own process, so that whatever a tenant's
//! code does to the process (a shader that overflows the compiler's stack, GPU work that never
//! ends, a driver fault) costs this worker and its job, never the provider's daemon or another
//! tenant. The daemon starts workers ahead of time (`wasmgrid worker`), speaks
//! [`proto::worker`] frames to them over stdin and stdout, and replaces a worker that ended a
//! tenant's work abnormally or died.
//!
//! [`serve`] is the whole loop: decoding frames on a reader thread (so a cancellation is seen
//! while a job runs), running jobs and services on the calling thread, streaming logs from a
//! third. It holds no key and signs nothing: receipts are the daemon's.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::frame::{self, FrameError};
use proto::msg::{FailureKind, GpuInfo, JobLimits, JobResult, Outcome, WireUsage};
use proto::worker::{FromWorker, Inferred, ToWorker, WORKER_CAP, WorkerFailure, WorkerMember};
use sha2::{Digest, Sha256};

use crate::limits::Limits;
use crate::meter::Usage;
use crate::sandbox::{Failure, Host, JobModule, LoadError, StartError};

/// How often a running job's new log lines go to the daemon.
const LOG_EVERY: Duration = Duration::from_millis(250);

/// Why a worker stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the daemon's frame was refused: {0}")]
    Frame(#[from] FrameError),
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon broke the worker protocol: {0}")]
    Protocol(String),
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
}

/// Reads one frame from `input`; `None` at a clean end of stream (the daemon went away).
fn read_frame(input: &mut impl Read, cap: usize) -> Result<Option<ToWorker>, WorkerError> {
    let mut prefix = [0u8; 4];
    match input.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(prefix, cap)?;
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    Ok(Some(frame::decode_body(&body)?))
}

/// The frames a worker writes, shared by the job's thread and the log streamer.
#[derive(Clone)]
struct Out(Arc<Mutex<Box<dyn Write + Send>>>);

impl Out {
    fn send(&self, msg: &FromWorker) -> Result<(), WorkerError> {
        let bytes = frame::encode(msg, WORKER_CAP)?;
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.write_all(&bytes)?;
        w.flush()?;
        Ok(())
    }
}

/// The limits a job runs under: what it asked for, never more than this host's defaults.
pub fn limits_from(w: &JobLimits) -> Limits {
    let d = Limits::default();
    let pick = |v: u64, default: u64| if v == 0 { default } else { v.min(default) };
    let time = |ms: u64, default: Duration| if ms == 0 { default } else { Duration::from_millis(ms).min(default) };
    Limits {
        memory_bytes: pick(w.memory_bytes, d.memory_bytes),
        fuel: pick(w.fuel, d.fuel),
        cpu_time: time(w.cpu_time_ms, d.cpu_time),
        wall_time: time(w.wall_time_ms, d.wall_time),
        gpu_bytes: pick(w.gpu_bytes, d.gpu_bytes),
        dispatches: pick(w.dispatches, d.dispatches),
        buffers: if w.buffers == 0 { d.buffers } else { w.buffers.min(d.buffers) },
        workgroups_per_dispatch: pick(w.workgroups_per_dispatch, d.workgroups_per_dispatch),
        output_bytes: pick(w.output_bytes, d.output_bytes).min(output_room(pick(w.log_bytes, d.log_bytes))),
        log_bytes: pick(w.log_bytes, d.log_bytes),
        net_bytes: pick(w.net_bytes, d.net_bytes),
        ..d
    }
}

/// The most output a job run by a worker may write: its result (output, log and a little
/// headroom) travels as one frame to the daemon and one to the scheduler.
fn output_room(log_bytes: u64) -> u64 {
    (proto::msg::BLOB_CAP as u64).saturating_sub(log_bytes).saturating_sub(1 << 20)
}

/// This host's default limits on the wire: the most a job may ask for.
pub fn default_limits() -> JobLimits {
    let d = Limits::default();
    JobLimits {
        memory_bytes: d.memory_bytes,
        fuel: d.fuel,
        cpu_time_ms: d.cpu_time.as_millis() as u64,
        wall_time_ms: d.wall_time.as_millis() as u64,
        gpu_bytes: d.gpu_bytes,
        dispatches: d.dispatches,
        buffers: d.buffers,
        workgroups_per_dispatch: d.workgroups_per_dispatch,
        output_bytes: d.output_bytes.min(output_room(d.log_bytes)),
        log_bytes: d.log_bytes,
        net_bytes: d.net_bytes,
    }
}

/// Usage as it goes on the wire.
pub fn wire_usage(u: &Usage) -> WireUsage {
    WireUsage {
        inferences: u.inferences,
        fuel: u.fuel,
        dispatches: u.dispatches,
        workgroups: u.workgroups,
        invocations: u.invocations,
        bytes_uploaded: u.bytes_uploaded,
        bytes_downloaded: u.bytes_downloaded,
        peak_gpu_bytes: u.peak_gpu_bytes,
        gpu_time_ns: u.gpu_time_ns,
        gpu_time_source: u.gpu_time_source.name().to_string(),
        net_bytes_sent: u.net_bytes_sent,
        net_bytes_received: u.net_bytes_received,
        net_wait_ns: u.net_wait_ns,
    }
}

/// A failure as it goes on the wire.
pub fn wire_failure(f: &Failure) -> WorkerFailure {
    let (kind, limit) = match f {
        Failure::Limit { limit, .. } => (FailureKind::Limit, Some(limit.name().to_string())),
        Failure::Trap(_) => (FailureKind::Trap, None),
        Failure::Exit(_) => (FailureKind::Exit, None),
        Failure::Guest(_) => (FailureKind::Guest, None),
        Failure::Host(_) => (FailureKind::Host, None),
    };
    WorkerFailure { kind, limit, message: f.to_string() }
}

fn load_failure(e: &LoadError) -> WorkerFailure {
    let (kind, limit) = match e {
        LoadError::Host(_) => (FailureKind::Host, None),
        // Compiling is work done for the job: past its wall time, it is the job's limit.
        LoadError::CompileTimeout(_) => {
            (FailureKind::Limit, Some(crate::limits::LimitKind::WallTime.name().to_string()))
        }
        _ => (FailureKind::Load, None),
    };
    WorkerFailure { kind, limit, message: e.to_string() }
}

/// Whether a worker may serve the next tenant after this ending: only after one that left
/// nothing behind (those others are replaced).
fn reusable(outcome: &Result<(), Failure>) -> bool {
    crate::sandbox::ends_clean(outcome)
}

/// An init input from the daemon's blob cache, checked against the length and hash the
/// renter announced (a file changed on disk since is not what the renter sent).
fn read_blob(blob: &proto::worker::InitBlob) -> Result<Vec<u8>, String> {
    // The renter sees the message; the provider's paths stay in its own log.
    let bytes = std::fs::read(&blob.path).map_err(|e| {
        log::warn!("reading the init blob {}: {e}", blob.path);
        format!("this provider could not read the init blob it keeps ({})", e.kind())
    })?;
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    if bytes.len() as u64 != blob.len || hash != blob.hash {
        log::warn!("the init blob {} does not hash to its name", blob.path);
        return Err("the init blob this provider keeps no longer holds what the renter sent".into());
    }
    Ok(bytes)
}

/// What a worker reports about itself at start.
pub fn ready(host: &Host) -> FromWorker {
    let gpu = host.gpu();
    FromWorker::Ready {
        gpu: GpuInfo {
            name: gpu.name.clone(),
            vendor: gpu.vendor.clone(),
            backend: gpu.backend.clone(),
            device_type: gpu.device_type.clone(),
            vram_bytes: gpu.max_buffer_size,
            score_gflops: 0.0,
        },
        defaults: default_limits(),
    }
}

/// Serves the daemon until it closes `input` (then `Ok`), breaks the protocol, or the GPU device
/// is lost. Sends [`FromWorker::Ready`] first.
pub fn serve(
    host: &Host,
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
) -> Result<(), WorkerError> {
    let out = Out(Arc::new(Mutex::new(Box::new(output))));
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = cancel.clone();
    let peers = Peers::default();
    let inbox = peers.clone();
    std::thread::Builder::new().name("wasmgrid-worker-in".into()).spawn(move || reader(input, &tx, &flag, &inbox))?;
    out.send(&ready(host))?;
    let mut worker = Worker { host, out, rx, cancel, peers };
    worker.run()
}

/// What comes from the member before, for the running cluster job.
enum PeerIn {
    Frame(Vec<u8>),
    Closed(String),
}

/// Most bytes of peer frames a job holds unread: a member before that runs this far ahead (a
/// broadcast root in a loop, a hostile peer) ends the link rather than the worker's memory.
const MAX_PEER_BUFFERED: usize = 256 << 20;

/// Where the reader puts peer frames: a fresh channel per job, so a frame left over from one
/// job never reaches the next; with the bytes waiting in it.
#[derive(Clone, Default)]
struct Peers {
    to_job: Arc<Mutex<Option<Sender<PeerIn>>>>,
    for_job: Arc<Mutex<Option<Receiver<PeerIn>>>>,
    buffered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Peers {
    fn new_job(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.to_job.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        *self.for_job.lock().unwrap_or_else(PoisonError::into_inner) = Some(rx);
        self.buffered.store(0, Ordering::SeqCst);
    }

    fn deliver(&self, msg: PeerIn) {
        let mut to_job = self.to_job.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = to_job.as_ref() else { return };
        let msg = match msg {
            PeerIn::Frame(f) if self.buffered.fetch_add(f.len(), Ordering::SeqCst) + f.len() > MAX_PEER_BUFFERED => {
                // Nothing more is taken for this job: its link is as good as closed.
                let why = format!("the member before sent more than {} MiB ahead of this one", MAX_PEER_BUFFERED >> 20);
                let _ = tx.send(PeerIn::Closed(why));
                *to_job = None;
                return;
            }
            other => other,
        };
        let _ = tx.send(msg);
    }

    fn take(&self) -> Option<Receiver<PeerIn>> {
        self.for_job.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A cluster member's links as a worker has them: frames out to the daemon, which sends them
/// to the next member; frames in as the daemon hands them over from the one before.
struct WorkerLink {
    out: Out,
    from: Receiver<PeerIn>,
    cancel: Arc<AtomicBool>,
    closed: Option<String>,
    buffered: Arc<std::sync::atomic::AtomicUsize>,
}

impl crate::collective::PeerLink for WorkerLink {
    fn send(&mut self, frame: Vec<u8>) -> Result<(), crate::collective::LinkClosed> {
        self.out.send(&FromWorker::Peer { bytes: frame }).map_err(|_| crate::collective::LinkClosed)
    }

    fn recv(&mut self, until: Instant) -> crate::collective::Recv {
        use crate::collective::Recv;
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return Recv::Cancelled;
            }
            if let Some(why) = &self.closed {
                log::info!("the link from the member before is closed: {why}");
                return Recv::Closed;
            }
            let now = Instant::now();
            if now >= until {
                return Recv::Timeout;
            }
            // Wake now and then to see a cancellation.
            match self.from.recv_timeout((until - now).min(Duration::from_millis(100))) {
                Ok(PeerIn::Frame(f)) => {
                    self.buffered.fetch_sub(f.len(), Ordering::SeqCst);
                    return Recv::Frame(f);
                }
                Ok(PeerIn::Closed(why)) => self.closed = Some(why),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Recv::Closed,
            }
        }
    }
}

/// Decodes the daemon's frames; a cancellation takes effect here, at once, while the job's
/// thread is busy. A new job clears the flag in stream order, so a late cancel of the previous
/// job cannot stop the next one, and an early one cannot be lost.
fn reader(mut input: impl Read, tx: &Sender<Result<ToWorker, WorkerError>>, cancel: &AtomicBool, peers: &Peers) {
    loop {
        let msg = match read_frame(&mut input, WORKER_CAP) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        match msg {
            ToWorker::Cancel => cancel.store(true, Ordering::SeqCst),
            ToWorker::Job { .. } => {
                cancel.store(false, Ordering::SeqCst);
                peers.new_job();
            }
            ToWorker::Service { .. } => cancel.store(false, Ordering::SeqCst),
            // Peer frames go straight to the running job, whatever it is doing.
            ToWorker::Peer { bytes } => {
                peers.deliver(PeerIn::Frame(bytes));
                continue;
            }
            ToWorker::PeerClosed { reason } => {
                peers.deliver(PeerIn::Closed(reason));
                continue;
            }
            _ => {}
        }
        if tx.send(Ok(msg)).is_err() {
            return;
        }
    }
}

struct Worker<'h> {
    host: &'h Host,
    out: Out,
    rx: Receiver<Result<ToWorker, WorkerError>>,
    cancel: Arc<AtomicBool>,
    peers: Peers,
}

impl Worker<'_> {
    fn next(&self) -> Result<Option<ToWorker>, WorkerError> {
        match self.rx.recv() {
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }

    fn run(&mut self) -> Result<(), WorkerError> {
        while let Some(msg) = self.next()? {
            // A device lost while idle must not take the next tenant's job down with it.
            self.check_device()?;
            match msg {
                ToWorker::Benchmark => {
                    let gflops = self.host.benchmark_gflops();
                    self.out.send(&FromWorker::Benchmarked { gflops })?;
                }
                ToWorker::Job { job_id, module_hash, input, limits, member, checkpoint } => {
                    self.out.send(&FromWorker::Accepted)?;
                    self.job(&job_id, module_hash, input, &limits, member, checkpoint.map(|c| *c))?;
                }
                ToWorker::Service { module_hash, init_input, limits, init_blob } => {
                    self.out.send(&FromWorker::Accepted)?;
                    let init_input = match init_blob {
                        None => init_input,
                        Some(blob) => match read_blob(&blob) {
                            Ok(bytes) => bytes,
                            Err(message) => {
                                let result = Err(WorkerFailure { kind: FailureKind::Host, limit: None, message });
                                self.out.send(&FromWorker::ServiceStarted {
                                    result,
                                    log: Vec::new(),
                                    reusable: true,
                                })?;
                                continue;
                            }
                        },
                    };
                    self.service(module_hash, init_input, &limits)?;
                }
                // A cancel that arrived after its job ended: nothing to stop.
                ToWorker::Cancel => {}
                other => return Err(WorkerError::Protocol(format!("{other:?} while idle"))),
            }
            self.check_device()?;
        }
        Ok(())
    }

    /// A lost device ends the worker: every later job here would fail.
    fn check_device(&self) -> Result<(), WorkerError> {
        if let Some(why) = self.host.device_lost() {
            let _ = self.out.send(&FromWorker::Fatal { reason: format!("the GPU device was lost: {why}") });
            return Err(WorkerError::DeviceLost(why));
        }
        Ok(())
    }

    /// The compiled module with this hash: from this worker's caches, or from bytes the daemon
    /// sends. `Err` is why the job cannot run (nothing of it ran), `Ok(None)` a cancellation.
    fn module(
        &self,
        hash: [u8; 32],
        wall_time: Duration,
    ) -> Result<Result<(JobModule, Duration), WorkerFailure>, WorkerError> {
        if let Some(m) = self.host.cached(&hash) {
            // A load from the disk cache is work for the job too.
            let took = m.compile_time();
            return Ok(Ok((m, took)));
        }
        self.out.send(&FromWorker::NeedModule { module_hash: hash })?;
        loop {
            match self.next()? {
                Some(ToWorker::Module { bytes }) => {
                    let got: [u8; 32] = Sha256::digest(&bytes).into();
                    if got != hash {
                        return Err(WorkerError::Protocol("the module bytes do not match their hash".into()));
                    }
                    // Compile time is the job's: it counts toward its wall time and its bill, and
                    // a compile that outlasts the wall time ends the job.
                    let compiling = Instant::now();
                    let loaded = self.host.load_with_deadline(&bytes, Some(compiling + wall_time));
                    return Ok(loaded.map(|m| (m, compiling.elapsed())).map_err(|e| load_failure(&e)));
                }
                Some(ToWorker::NoModule { reason }) => {
                    return Ok(Err(WorkerFailure { kind: FailureKind::Load, limit: None, message: reason }));
                }
                Some(ToWorker::Cancel) => {}
                Some(other) => return Err(WorkerError::Protocol(format!("{other:?} while waiting for a module"))),
                None => return Err(WorkerError::Protocol("the daemon went while a module was awaited".into())),
            }
        }
    }

    fn job(
        &mut self,
        job_id: &str,
        hash: [u8; 32],
        input: Vec<u8>,
        wire: &JobLimits,
        member: Option<WorkerMember>,
        resume: Option<crate::checkpoint::Checkpoint>,
    ) -> Result<(), WorkerError> {
        let limits = limits_from(wire);
        let from = self.peers.take();
        let member = match (member, from) {
            (Some(m), Some(from)) if m.world > 1 && m.rank < m.world => {
                let link = WorkerLink {
                    out: self.out.clone(),
                    from,
                    cancel: self.cancel.clone(),
                    closed: None,
                    buffered: self.peers.buffered.clone(),
                };
                crate::collective::Member::new(m.rank, m.world, Box::new(link), limits.net_bytes)
            }
            (Some(m), _) if m.world > 1 => {
                return Err(WorkerError::Protocol(format!("rank {} of a {}-member job", m.rank, m.world)));
            }
            _ => crate::collective::Member::solo(),
        };
        let (module, compile) = match self.module(hash, limits.wall_time)? {
            Ok(m) => m,
            Err(f) => {
                let result = not_run(f);
                return self.out.send(&FromWorker::JobDone { result: Box::new(result), reusable: true });
            }
        };
        log::info!("worker {}: running job {job_id}", std::process::id());
        let replaced = self.host.device_replaced_count();
        // Dropping `stop` wakes the streamer at once: the job's end does not wait out a tick.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let mut streamer = None;
        // Every save goes to the daemon as it is made; the daemon decides what reaches the
        // scheduler. A pipe that is gone ends the job at its next frame anyway.
        let out = self.out.clone();
        let sink: crate::checkpoint::CheckpointSink = Box::new(move |c| {
            let _ = out.send(&FromWorker::Checkpoint(Box::new(c)));
        });
        let context = crate::JobContext {
            cancel: Some(self.cancel.clone()),
            member,
            checkpoints: crate::checkpoint::Checkpoints::new(resume, Some(sink)),
        };
        let report = self.host.run_job(
            &module,
            input,
            &limits,
            |watch| {
                let out = self.out.clone();
                streamer = std::thread::Builder::new()
                    .name("wasmgrid-worker-log".into())
                    .spawn(move || {
                        let mut sent = 0usize;
                        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(LOG_EVERY) {
                            let fresh = watch.since(sent);
                            if !fresh.is_empty() {
                                sent += fresh.len();
                                if out.send(&FromWorker::Log { bytes: fresh }).is_err() {
                                    return sent;
                                }
                            }
                        }
                        sent
                    })
                    .ok();
            },
            context,
        );
        drop(stop);
        // The log went in pieces while the job ran; the final report carries it whole.
        let _ = streamer.map(std::thread::JoinHandle::join);
        let (result, reusable) = match report {
            Ok(report) => {
                let wall = report.wall_time + compile;
                let outcome = match &report.outcome {
                    Ok(()) => Outcome::Succeeded,
                    Err(f) => {
                        let w = wire_failure(f);
                        Outcome::Failed { kind: w.kind, limit: w.limit, message: w.message }
                    }
                };
                let result = JobResult {
                    outcome,
                    output: report.output,
                    log: report.log,
                    usage: wire_usage(&report.usage),
                    wall_time_ms: wall.as_millis() as u64,
                    wall_time_us: wall.as_micros() as u64,
                    first_dispatch_us: report.first_dispatch.map(|d| (d + compile).as_micros() as u64),
                    receipt: None,
                };
                // GPU work abandoned past the wall time keeps a thread and the old device busy:
                // such a worker is replaced, never handed to the next tenant.
                let clean = self.host.device_replaced_count() == replaced;
                (result, clean && reusable(&report.outcome))
            }
            Err(e) => (not_run(load_failure(&e)), true),
        };
        self.out.send(&FromWorker::JobDone { result: Box::new(result), reusable })
    }

    fn service(&mut self, hash: [u8; 32], init_input: Vec<u8>, wire: &JobLimits) -> Result<(), WorkerError> {
        let limits = limits_from(wire);
        let module = match self.module(hash, limits.wall_time)? {
            Ok((m, _)) => m,
            Err(f) => {
                return self.out.send(&FromWorker::ServiceStarted { result: Err(f), log: Vec::new(), reusable: true });
            }
        };
        let mut service = match self.host.start_service(&module, init_input, &limits) {
            Ok(s) => s,
            Err(StartError::Load(e)) => {
                let result = Err(load_failure(&e));
                return self.out.send(&FromWorker::ServiceStarted { result, log: Vec::new(), reusable: true });
            }
            Err(StartError::Failed(f)) => {
                let outcome = Err(f.failure.clone());
                let msg = FromWorker::ServiceStarted {
                    result: Err(wire_failure(&f.failure)),
                    log: f.log,
                    reusable: reusable(&outcome),
                };
                return self.out.send(&msg);
            }
        };
        self.out.send(&FromWorker::ServiceStarted {
            result: Ok(wire_usage(&service.usage())),
            log: Vec::new(),
            reusable: true,
        })?;
        loop {
            match self.next()? {
                Some(ToWorker::Infer { bytes }) => {
                    let result = service
                        .infer(&bytes)
                        .map(|inf| Inferred { response: inf.response, usage: wire_usage(&inf.usage) });
                    self.out.send(&FromWorker::Inferred { result: result.map_err(|f| wire_failure(&f)) })?;
                    self.check_device()?;
                }
                Some(ToWorker::EndService) => {
                    drop(service);
                    return self.out.send(&FromWorker::Idle);
                }
                Some(ToWorker::Cancel) => {}
                Some(other) => return Err(WorkerError::Protocol(format!("{other:?} while a service runs"))),
                None => return Ok(()),
            }
        }
    }
}

/// The result of a job that could not start.
fn not_run(f: WorkerFailure) -> JobResult {
    JobResult::failed(f.kind, f.limit, f.message)
}

/// Tells the daemon this worker cannot start (no GPU, say), as its one frame.
pub fn refuse(mut output: impl Write, reason: &str) {
    if let Ok(bytes) = frame::encode(&FromWorker::Fatal { reason: reason.to_string() }, WORKER_CAP) {
        let _ = output.write_all(&bytes);
        let _ = output.flush();
    }
}
