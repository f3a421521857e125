//! Worker processes, supervised: started ahead of time so that isolation costs no cold start,
//! handed one tenant at a time, reused after work that ended normally, killed and replaced
//! after anything else. A worker's death is described from its exit status and the last lines
//! it wrote to stderr, so the job it took down gets a reason that says what happened.

use std::collections::VecDeque;
use std::ffi::OsString;
#[cfg(target_os = "linux")]
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proto::frame;
use proto::msg::{FailureKind, GpuInfo, JobLimits};
use proto::worker::{FromWorker, ToWorker, WORKER_CAP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long a new worker may take to open its GPU and say it is ready (a software driver
/// takes a second or two).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes of a worker's stderr kept to explain its death.
const STDERR_TAIL: usize = 8 << 10;

/// How the daemon starts a worker: `wasmgrid worker` and its flags, normally.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This very program with `worker` and `args`: what the `wasmgrid` binary uses.
    pub fn this_program(args: Vec<OsString>) -> std::io::Result<WorkerCommand> {
        let mut all = vec![OsString::from("worker")];
        all.extend(args);
        Ok(WorkerCommand { program: std::env::current_exe()?, args: all })
    }
}

/// The most a pipe to or from a worker holds: a whole peer frame (1 MiB) crosses in one write,
/// not sixteen with a wake-up of the other process each. Linux's default most for a user
/// (`/proc/sys/fs/pipe-max-size`).
const PIPE_BYTES: usize = 1 << 20;

/// Widens the worker's pipes to [`PIPE_BYTES`] where the system allows (a smaller limit keeps
/// the default 64 KiB: only slower).
#[cfg(target_os = "linux")]
fn widen_pipes(stdin: &ChildStdin, stdout: &ChildStdout) {
    for (which, fd) in [("stdin", stdin.as_fd()), ("stdout", stdout.as_fd())] {
        if let Err(e) = rustix::pipe::fcntl_setpipe_size(fd, PIPE_BYTES) {
            log::debug!("keeping the worker's {which} pipe at its size: {e}");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn widen_pipes(_: &ChildStdin, _: &ChildStdout) {}

/// Why a worker could not be had or used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WorkerDied {
    pub kind: FailureKind,
    pub message: String,
}

/// One worker process, with the pipes the protocol runs over.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// Bytes read from stdout not yet a whole frame: kept here so that a `recv` dropped
    /// mid-frame (a `select!` that took another branch) loses nothing and framing holds.
    frames: proto::FrameDecoder,
    /// Where `recv` reads into, kept between calls (a session reads once per inference).
    chunk: Box<[u8]>,
    pid: u32,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    /// The task copying stderr: done once the worker's stderr closed.
    stderr_done: Option<tokio::task::JoinHandle<()>>,
    /// Set while the worker is handed out: counts it busy, and uncounts it however the worker
    /// ends (given back, or dropped on an error path).
    busy: Option<Busy>,
    /// The GPU the worker opened and its default limits, from its `Ready`.
    pub gpu: GpuInfo,
    pub defaults: JobLimits,
}

impl Worker {
    /// Starts a worker and waits for its `Ready`.
    pub async fn start(command: &WorkerCommand) -> Result<Worker, WorkerDied> {
        let host_failure = |message: String| WorkerDied { kind: FailureKind::Host, message };
        let mut cmd = tokio::process::Command::new(&command.program);
        // A worker gets what it needs to find its GPU driver and log, not the daemon's whole
        // environment (which may hold secrets meant for the daemon).
        cmd.env_clear();
        for (key, value) in std::env::vars_os() {
            if key.to_str().is_some_and(worker_env) {
                cmd.env(key, value);
            }
        }
        let mut child = cmd
            .args(&command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| host_failure(format!("starting a worker ({}): {e}", command.program.display())))?;
        let pid = child.id().unwrap_or(0);
        // Under memory pressure the kernel ends a worker (one tenant) before the daemon.
        if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000") {
            log::debug!("could not raise worker {pid}'s OOM score: {e}");
        }
        let (Some(stdin), Some(stdout), Some(err)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(host_failure("a worker started without its pipes".into()));
        };
        widen_pipes(&stdin, &stdout);
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_done = Some(tokio::spawn(keep_stderr(pid, err, stderr.clone())));
        let mut worker = Worker {
            child,
            stdin,
            stdout,
            frames: proto::FrameDecoder::new(WORKER_CAP),
            chunk: vec![0u8; 64 << 10].into_boxed_slice(),
            pid,
            stderr,
            stderr_done,
            busy: None,
            gpu: GpuInfo {
                name: String::new(),
                vendor: String::new(),
                backend: String::new(),
                device_type: String::new(),
                vram_bytes: 0,
                score_gflops: 0.0,
            },
            defaults: JobLimits::default(),
        };
        match tokio::time::timeout(READY_TIMEOUT, worker.recv()).await {
            Ok(Ok(FromWorker::Ready { gpu, defaults })) => {
                worker.gpu = gpu;
                worker.defaults = defaults;
                Ok(worker)
            }
            Ok(Ok(FromWorker::Fatal { reason })) => Err(host_failure(format!("a worker could not start: {reason}"))),
            Ok(Ok(other)) => Err(host_failure(format!("a new worker said {other:?} instead of Ready"))),
            Ok(Err(died)) => Err(host_failure(format!("a worker died at start: {}", died.message))),
            Err(_) => {
                worker.kill().await;
                Err(host_failure(format!("a worker was not ready within {READY_TIMEOUT:?}")))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends one frame. A worker that cannot take it is dead: its death is described.
    pub async fn send(&mut self, msg: &ToWorker) -> Result<(), WorkerDied> {
        let bytes = frame::encode(msg, WORKER_CAP)
            .map_err(|e| WorkerDied { kind: FailureKind::Host, message: format!("encoding for the worker: {e}") })?;
        let sent = async {
            self.stdin.write_all(&bytes).await?;
            self.stdin.flush().await
        }
        .await;
        match sent {
            Ok(()) => Ok(()),
            Err(_) => Err(self.death().await),
        }
    }

    /// Receives one frame. The worker runs tenant code: a frame over the cap or that does not
    /// decode is treated as the worker's death (it is killed). Cancel-safe: dropped while
    /// waiting, it keeps what it read for the next call.
    pub async fn recv(&mut self) -> Result<FromWorker, WorkerDied> {
        loop {
            match self.frames.next_frame() {
                Ok(Some(body)) => {
                    return match frame::decode_body(&body) {
                        Ok(m) => Ok(m),
                        Err(e) => Err(self.broke(format!("the worker sent a bad frame: {e}")).await),
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(self.broke(format!("the worker sent a bad frame: {e}")).await),
            }
            // `read` is cancel-safe: bytes are only taken once it returns.
            match self.stdout.read(&mut self.chunk).await {
                Ok(0) | Err(_) => return Err(self.death().await),
                Ok(n) => {
                    self.frames.extend(self.chunk.get(..n).unwrap_or_default());
                }
            }
        }
    }

    async fn broke(&mut self, message: String) -> WorkerDied {
        self.kill_now().await;
        WorkerDied { kind: FailureKind::Crash, message }
    }

    async fn kill_now(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    /// Kills the worker now, keeping it to be given back (which finds it dead).
    pub(crate) async fn stop_now(&mut self) {
        self.kill_now().await;
    }

    /// Kills the worker and reaps it.
    pub async fn kill(mut self) {
        self.kill_now().await;
    }

    /// Why the worker's pipes closed: waits for its exit and reads what it last wrote.
    async fn death(&mut self) -> WorkerDied {
        let status = match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                self.kill_now().await;
                None
            }
        };
        // The stderr reader may still be draining the last lines.
        if let Some(done) = self.stderr_done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
        }
        let tail = {
            let t = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>()).into_owned()
        };
        describe_death(status, &tail)
    }
}

/// Longest stderr line a worker's log line keeps; the rest is cut.
const STDERR_LINE: usize = 1 << 10;
/// Stderr lines of one worker that go to the daemon's log; later ones only to the tail.
const STDERR_LOGGED: usize = 256;

/// Whether a variable of the daemon's environment goes to its workers: the GPU drivers' and the
/// loggers' own, and where the user's runtime, cache and data directories are.
fn worker_env(key: &str) -> bool {
    const EXACT: [&str; 11] = [
        "PATH",
        "HOME",
        "LANG",
        "XDG_RUNTIME_DIR",
        "XDG_DATA_DIRS",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_DIRS",
        "LD_LIBRARY_PATH",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "DISPLAY",
    ];
    const PREFIXES: [&str; 7] = ["VK_", "MESA_", "LP_", "WGPU_", "__GL", "__NV", "NVIDIA_"];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Forwards a worker's stderr to the daemon's log and keeps its tail. Read in fixed chunks and
/// cut into bounded lines: a worker writing gigabytes without a newline costs the daemon
/// nothing but the tail.
async fn keep_stderr(pid: u32, mut err: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<u8>>>) {
    let mut chunk = vec![0u8; 8 << 10];
    let mut line = Vec::new();
    let mut logged = 0usize;
    while let Ok(n) = err.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let bytes = chunk.get(..n).unwrap_or_default();
        {
            let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
            t.extend(bytes);
            let over = t.len().saturating_sub(STDERR_TAIL);
            t.drain(..over);
        }
        for &b in bytes {
            if b == b'\n' || line.len() >= STDERR_LINE {
                if logged < STDERR_LOGGED {
                    log::info!("worker {pid}: {}", String::from_utf8_lossy(&line));
                } else if logged == STDERR_LOGGED {
                    log::info!("worker {pid}: (more output; only its last {STDERR_TAIL} bytes are kept)");
                }
                logged += 1;
                line.clear();
            }
            if b != b'\n' {
                line.push(b);
            }
        }
    }
}

/// A dead worker's exit, in words a renter can act on.
pub fn describe_death(status: Option<ExitStatus>, stderr: &str) -> WorkerDied {
    let crash = |message: String| WorkerDied { kind: FailureKind::Crash, message };
    if let Some(line) = stderr.lines().rev().find(|l| l.contains("has overflowed its stack")) {
        let compiling = ["wgsl", "shader", "naga", "compile"].iter().any(|w| line.contains(w));
        return crash(if compiling {
            "the kernel's shader overflowed the compiler's stack: the worker running it was stopped".into()
        } else {
            "the worker running the kernel overflowed its stack and was stopped".into()
        });
    }
    if stderr.contains("memory allocation of") {
        return crash("the worker running the kernel ran out of host memory and was stopped".into());
    }
    let how = match status {
        None => "did not exit when its pipes closed".to_string(),
        Some(s) => match (s.code(), signal_of(&s)) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was ended by signal {sig}{}", signal_name(sig)),
            (None, None) => "ended".to_string(),
        },
    };
    crash(format!("the worker running the kernel died: it {how}"))
}

#[cfg(unix)]
fn signal_of(s: &ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(s)
}

#[cfg(not(unix))]
fn signal_of(_: &ExitStatus) -> Option<i32> {
    None
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        6 => " (abort)",
        9 => " (killed)",
        11 => " (segmentation fault)",
        7 => " (bus error)",
        4 => " (illegal instruction)",
        _ => "",
    }
}

/// One worker handed out by a pool, counted until dropped.
#[derive(Debug)]
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pool of ready workers for one GPU.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    command: WorkerCommand,
    /// Workers kept started and idle, waiting for work.
    warm: usize,
    idle: Mutex<Vec<Worker>>,
    /// Starts in flight, so that a burst of takes does not start more than it needs.
    starting: AtomicUsize,
    started: AtomicUsize,
    replaced: AtomicUsize,
    /// Workers handed out and not yet back: they count toward `warm`, so taking one does not
    /// start a spare that would then push the returning (warm, compiled) worker out.
    busy: Arc<AtomicUsize>,
}

/// Counts of what a pool did, for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub idle: usize,
    pub started: usize,
    pub replaced: usize,
}

impl Pool {
    /// A pool that keeps `warm` workers started ahead of work. Call [`Pool::fill`] to start
    /// them.
    pub fn new(command: WorkerCommand, warm: usize) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                command,
                warm,
                idle: Mutex::new(Vec::new()),
                starting: AtomicUsize::new(0),
                started: AtomicUsize::new(0),
                replaced: AtomicUsize::new(0),
                busy: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts workers until `warm` are idle (or starting). Returns the first start's error,
    /// if any.
    pub async fn fill(&self) -> Result<(), WorkerDied> {
        let mut first_error = None;
        loop {
            // Claim a start first, then check: concurrent fills never start more than `warm`.
            let before = self.inner.starting.fetch_add(1, Ordering::SeqCst);
            if self.idle().len() + before + self.inner.busy.load(Ordering::SeqCst) >= self.inner.warm {
                self.inner.starting.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            let started = Worker::start(&self.inner.command).await;
            match started {
                Ok(w) => {
                    self.inner.started.fetch_add(1, Ordering::SeqCst);
                    // Counted idle before it stops counting as starting.
                    self.idle().push(w);
                    self.inner.starting.fetch_sub(1, Ordering::SeqCst);
                }
                Err(e) => {
                    self.inner.starting.fetch_sub(1, Ordering::SeqCst);
                    log::error!("{e}");
                    first_error = Some(e);
                    break;
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Fills the pool in the background.
    pub fn refill(&self) {
        let pool = self.clone();
        tokio::spawn(async move {
            let _ = pool.fill().await;
        });
    }

    /// A ready worker: an idle one, or a new one when none is idle. The pool refills itself.
    pub async fn take(&self) -> Result<Worker, WorkerDied> {
        // An idle worker can die too (the OOM killer, a lost device it noticed): never hand one
        // out, or its death would be blamed on the next tenant's kernel.
        let idle = loop {
            let Some(mut w) = self.idle().pop() else { break None };
            if matches!(w.child.try_wait(), Ok(None)) {
                break Some(w);
            }
            log::warn!("worker {} died while idle; starting another", w.pid);
            self.inner.replaced.fetch_add(1, Ordering::SeqCst);
        };
        let worker = match idle {
            Some(w) => Ok(w),
            None => {
                let w = Worker::start(&self.inner.command).await;
                if w.is_ok() {
                    self.inner.started.fetch_add(1, Ordering::SeqCst);
                }
                w
            }
        };
        let worker = worker.map(|mut w| {
            w.busy = Some(Busy::new(&self.inner.busy));
            w
        });
        self.refill();
        worker
    }

    /// Hands a worker back after its tenant's work: kept if that work ended normally, killed
    /// otherwise, with a fresh one started in its place. A returning worker has its module
    /// compiled and its pipelines built: it is worth more than a spare started meanwhile, so it
    /// goes on top (the next take gets it) and the oldest spare goes if the pool is over.
    pub async fn give_back(&self, mut worker: Worker, reusable: bool) {
        worker.busy = None;
        if reusable {
            let spare = {
                let mut idle = self.idle();
                idle.push(worker);
                (idle.len() + self.inner.busy.load(Ordering::SeqCst) > self.inner.warm).then(|| idle.remove(0))
            };
            if let Some(spare) = spare {
                spare.kill().await;
            }
            return;
        }
        self.inner.replaced.fetch_add(1, Ordering::SeqCst);
        log::info!("replacing worker {}", worker.pid);
        worker.kill().await;
        self.refill();
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            idle: self.idle().len(),
            started: self.inner.started.load(Ordering::SeqCst),
            replaced: self.inner.replaced.load(Ordering::SeqCst),
        }
    }

    /// The pids of the idle workers (for tests and reports).
    pub fn idle_pids(&self) -> Vec<u32> {
        self.idle().iter().map(|w| w.pid).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_are_described_from_stderr_and_status() {
        let d = describe_death(
            None,
            "thread 'wasmgrid-wgsl' has overflowed its stack\nfatal runtime error: stack overflow",
        );
        assert_eq!(d.kind, FailureKind::Crash);
        assert!(d.message.contains("shader overflowed the compiler's stack"), "{}", d.message);
        let d = describe_death(None, "thread 'main' has overflowed its stack");
        assert!(d.message.contains("overflowed its stack"), "{}", d.message);
        assert!(!d.message.contains("shader"), "{}", d.message);
        let d = describe_death(None, "memory allocation of 1000000 bytes failed");
        assert!(d.message.contains("out of host memory"), "{}", d.message);
        let d = describe_death(None, "");
        assert!(d.message.contains("did not exit"), "{}", d.message);
    }
}
