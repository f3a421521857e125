//! The provider daemon: connects out to the scheduler over QUIC (so a provider behind NAT needs
//! no port forwarding), registers its GPU, price and capacity, sends heartbeats, runs the jobs
//! the scheduler sends down the connection and serves renters' inference sessions.
//!
//! The daemon holds no tenant's wasmtime store and no tenant's GPU device: every job and every
//! session runs in a worker process from [`crate::pool`], and the daemon only moves bytes,
//! enforces wall time from outside (a worker past its job's wall time is killed), signs receipts
//! and takes payment. Whatever a tenant's code does costs its worker, never the daemon.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::frame::CONTROL_CAP;
use proto::msg::{
    BLOB_CAP, FailureKind, GpuInfo, HostMsg, JobMsg, JobReply, JobResult, OPEN_CAP, Outcome, Price, SchedulerMsg,
    SessionMsg, SessionReply,
};
use proto::worker::{FromWorker, ToWorker};
use proto::{Keypair, PublicKey};
use quic::{Connection, Identity, RecvStream, SendStream};

use crate::flow::{JobAction, JobFlow, failed_result};
use crate::memory::SessionMemory;
use crate::pool::{Pool, Worker, WorkerCommand, WorkerDied};
use crate::session::{Handback, Init, Paid, PayStep, SessionAction, SessionFlow, SessionTerms, Unpaid};

/// Calls of an unpaid session per signed receipt, unless configured.
pub const DEFAULT_RECEIPT_EVERY: u32 = 16;

/// How a provider daemon is set up.
#[derive(Debug)]
pub struct DaemonConfig {
    pub scheduler: SocketAddr,
    pub scheduler_key: PublicKey,
    pub keypair: Keypair,
    pub name: String,
    pub region: String,
    pub price: Price,
    /// Batch jobs run at once.
    pub capacity: u32,
    /// Inference sessions served at once, a count of their own (each holds a worker).
    pub session_capacity: u32,
    /// Workers kept started ahead of work, beyond those busy.
    pub warm_workers: u32,
    /// How the daemon starts a worker process, one command per GPU it offers (each opens its
    /// own adapter); every GPU gets a worker pool of its own.
    pub gpus: Vec<WorkerCommand>,
    /// GPU memory offered to jobs; `None` offers the adapter's largest buffer size.
    pub vram_bytes: Option<u64>,
    /// Where to listen for renters' inference sessions; `None` serves none.
    pub session_listen: Option<SocketAddr>,
    /// The session address to tell renters, when it differs from the listening one (behind NAT
    /// with a forwarded port, say).
    pub advertise: Option<String>,
    /// How sessions are paid; `None` serves them unpaid (a private fleet, a test).
    pub payment: Option<crate::payment::PaymentConfig>,
    /// A session with no request for this long is ended (its worker goes back to the pool).
    pub session_idle: Duration,
    /// Requests of one session being served or waiting at once; more streams wait.
    pub session_in_flight: u32,
    /// Largest request of a session, in bytes.
    pub session_request_bytes: usize,
    /// On an unpaid session, sign a receipt after every this many calls (and at its end); a
    /// paid session gets one after every call, for its vouchers.
    pub receipt_every: u32,
    /// The most private memory (the workers' own resident pages) all open sessions may hold
    /// together; a session that would not fit is turned away as `Busy`. `None`: bounded by
    /// `session_capacity` alone.
    pub session_memory: Option<u64>,
    /// How long a renter has to send its `Init` (weights, say) or a module the provider asked
    /// for, once its ticket is accepted; a session slot is held meanwhile. An init blob may
    /// take one second more per mebibyte that has arrived.
    pub upload_timeout: Duration,
    /// Where init inputs are kept by hash, so that the next session with the same weights
    /// sends nothing. Without one, an init blob is received into memory for its session only,
    /// up to [`INLINE_BLOB_MAX`] (a larger one is turned away as `Busy`).
    pub blobs: Option<Arc<crate::blobs::BlobCache>>,
}

/// The largest init blob a provider without a blob cache takes (it must fit in one frame to
/// its worker).
pub const INLINE_BLOB_MAX: u64 = BLOB_CAP as u64;

impl DaemonConfig {
    /// A configuration with the defaults for everything but who and where.
    pub fn new(scheduler: SocketAddr, scheduler_key: PublicKey, keypair: Keypair, worker: WorkerCommand) -> Self {
        DaemonConfig {
            scheduler,
            scheduler_key,
            keypair,
            name: "provider".into(),
            region: "local".into(),
            price: Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 },
            capacity: 2,
            session_capacity: 16,
            warm_workers: 2,
            gpus: vec![worker],
            vram_bytes: None,
            session_listen: None,
            advertise: None,
            payment: None,
            session_idle: Duration::from_secs(300),
            session_in_flight: 16,
            session_request_bytes: 16 << 20,
            receipt_every: DEFAULT_RECEIPT_EVERY,
            session_memory: None,
            upload_timeout: Duration::from_secs(120),
            blobs: None,
        }
    }
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
    #[error("the scheduler refused this provider: {0}")]
    Refused(String),
    #[error("the connection to the scheduler ended: {0}")]
    Lost(String),
    #[error("no worker could be started: {0}")]
    Worker(String),
}

/// What the daemon learnt about its GPU at start, from a worker.
#[derive(Clone, Debug)]
pub struct Started {
    pub gpu: GpuInfo,
}

/// The jobs and sessions a provider runs, across reconnections to the scheduler.
#[derive(Debug, Default)]
pub struct Running {
    jobs: AtomicU32,
    sessions: AtomicU32,
    cancels: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Session reports waiting for the control stream, newest per session.
    reports: Mutex<HashMap<[u8; 16], HostMsg>>,
    /// Round trips measured at the scheduler's request, waiting for the control stream.
    links: Mutex<Option<HostMsg>>,
    report_ready: tokio::sync::Notify,
    /// Session ids of tickets already used, with their expiry: a ticket opens one session.
    used_tickets: Mutex<HashMap<[u8; 16], u64>>,
}

impl Running {
    /// Queues a session report for the scheduler (a newer one replaces an unsent older one).
    fn report(&self, session_id: [u8; 16], msg: HostMsg) {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner).insert(session_id, msg);
        self.report_ready.notify_one();
    }

    fn take_reports(&self) -> Vec<HostMsg> {
        let mut out: Vec<HostMsg> =
            self.reports.lock().unwrap_or_else(PoisonError::into_inner).drain().map(|(_, m)| m).collect();
        out.extend(self.links.lock().unwrap_or_else(PoisonError::into_inner).take());
        out
    }

    /// Queues measured round trips for the scheduler.
    fn report_links(&self, measured: Vec<proto::msg::LinkRtt>) {
        *self.links.lock().unwrap_or_else(PoisonError::into_inner) = Some(HostMsg::Links { measured });
        self.report_ready.notify_one();
    }

    /// Jobs and sessions running now.
    pub fn counts(&self) -> (u32, u32) {
        (self.jobs.load(Ordering::SeqCst), self.sessions.load(Ordering::SeqCst))
    }

    /// Marks a ticket used; `false` if it was already.
    fn use_ticket(&self, session_id: [u8; 16], expires_at_ms: u64, now_ms: u64) -> bool {
        let mut used = self.used_tickets.lock().unwrap_or_else(PoisonError::into_inner);
        used.retain(|_, expiry| *expiry >= now_ms);
        used.insert(session_id, expires_at_ms).is_none()
    }
}

/// One slot of a bounded count, given back when dropped, however its job or session ends.
struct Slot<'a>(&'a AtomicU32);

impl<'a> Slot<'a> {
    /// Takes a slot if fewer than `capacity` are taken.
    fn take(count: &'a AtomicU32, capacity: u32) -> Option<Slot<'a>> {
        count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < capacity).then_some(n + 1)).ok()?;
        Some(Slot(count))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One GPU this provider offers: its worker pool, what it is, and the jobs and sessions on it.
struct GpuSlot {
    pool: Pool,
    gpu: GpuInfo,
    busy: Arc<AtomicU32>,
}

impl GpuSlot {
    /// Counts one more job or session on this GPU until the guard is dropped.
    fn hold(&self) -> OnGpu {
        self.busy.fetch_add(1, Ordering::SeqCst);
        OnGpu(self.busy.clone())
    }
}

/// A job or session counted on its GPU, until dropped.
struct OnGpu(Arc<AtomicU32>);

impl Drop for OnGpu {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Everything the daemon's tasks share.
struct Shared {
    config: DaemonConfig,
    /// Every GPU offered, in the order registered (a cluster member's `gpu` is a place here);
    /// never empty.
    gpus: Vec<GpuSlot>,
    running: Arc<Running>,
    keypair: Arc<Keypair>,
    payment: Option<Arc<crate::payment::PaymentConfig>>,
    /// Whether the payment setup worked (without it, no paid work is taken).
    paid_ready: bool,
    /// A worker's most for each job limit (what a job that asks for none gets).
    defaults: proto::msg::JobLimits,
    /// What each open session's worker holds, against `config.session_memory`.
    memory: SessionMemory,
    /// Cluster members' links dialled in, until their jobs take them.
    mesh: crate::mesh::Mesh,
}

impl Shared {
    /// The GPU a job or session goes to: the one the scheduler named (a cluster member's),
    /// or the one with the least on it. `None`: the named GPU is not one of this provider's.
    fn gpu_slot(&self, named: Option<u32>) -> Option<&GpuSlot> {
        match named {
            Some(at) => self.gpus.get(at as usize),
            None => self.gpus.iter().min_by_key(|g| g.busy.load(Ordering::SeqCst)),
        }
    }
}

/// Starts the worker pool, learns the GPU from a first worker (and benchmarks it), and serves
/// until the process ends, reconnecting to the scheduler with a growing pause when it is away.
pub async fn run_forever(config: DaemonConfig) -> Result<(), DaemonError> {
    let warm = (config.capacity + config.warm_workers) as usize;
    // Every GPU's first worker opens its adapter and benchmarks it, the GPUs at once.
    let mut starting = tokio::task::JoinSet::new();
    for (at, command) in config.gpus.iter().enumerate() {
        let pool = Pool::new(command.clone(), warm.max(1));
        starting.spawn(async move {
            let mut first = pool.take().await.map_err(|e| DaemonError::Worker(e.message))?;
            let mut gpu = first.gpu.clone();
            let defaults = first.defaults.clone();
            gpu.score_gflops = benchmark(&mut first).await;
            pool.give_back(first, true).await;
            // The rest of the pool starts while the daemon registers: a provider is online
            // (and can run a job in the worker it has) without waiting for every worker.
            pool.refill();
            Ok::<_, DaemonError>((at, pool, gpu, defaults))
        });
    }
    let mut started = Vec::new();
    while let Some(joined) = starting.join_next().await {
        started.push(joined.map_err(|e| DaemonError::Worker(e.to_string()))??);
    }
    started.sort_by_key(|(at, ..)| *at);
    let Some(defaults) = started.first().map(|(_, _, _, d)| d.clone()) else {
        return Err(DaemonError::Worker("no GPU to offer: give at least one".into()));
    };
    let gpus: Vec<GpuSlot> = started
        .into_iter()
        .map(|(at, pool, mut gpu, _)| {
            log::info!("GPU {at}: {}: {:.1} GFLOP/s f32 matmul", gpu.name, gpu.score_gflops);
            if let Some(v) = config.vram_bytes {
                gpu.vram_bytes = v;
            }
            GpuSlot { pool, gpu, busy: Arc::new(AtomicU32::new(0)) }
        })
        .collect();
    let paid_ready = match config.payment.clone() {
        Some(payment) => {
            let keypair = Keypair::from_seed(config.keypair.seed());
            let ready = tokio::task::spawn_blocking(move || {
                payment.prepare(&keypair)?;
                payment.resume()
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match &ready {
                Ok(n) if *n > 0 => log::info!("watching {n} channel(s) with vouchers the last run did not claim"),
                Ok(_) => {}
                Err(e) => log::error!("not serving paid sessions: {e}"),
            }
            ready.is_ok()
        }
        None => true,
    };
    let shared = Arc::new(Shared {
        keypair: Arc::new(Keypair::from_seed(config.keypair.seed())),
        payment: config.payment.clone().map(Arc::new),
        paid_ready,
        defaults,
        memory: SessionMemory::new(config.session_memory),
        mesh: crate::mesh::Mesh::default(),
        config,
        gpus,
        running: Arc::new(Running::default()),
    });
    if let Some(payment) = shared.payment.clone().filter(|_| paid_ready) {
        tokio::spawn(watch_channels(payment, shared.keypair.clone()));
    }
    let sessions = match shared.config.session_listen.filter(|_| paid_ready) {
        Some(addr) => match start_sessions(&shared, addr) {
            Ok(a) => Some(a),
            Err(e) => {
                log::error!("not serving inference sessions: {e}");
                None
            }
        },
        None => None,
    };
    let mut pause = Duration::from_millis(200);
    loop {
        match run(&shared, sessions).await {
            Ok(()) => pause = Duration::from_millis(200),
            Err(e @ DaemonError::Refused(_)) => {
                log::error!("{e}");
                pause = Duration::from_secs(5);
            }
            Err(e) => log::warn!("{e}; reconnecting in {pause:?}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// The GPU's measured score, from a worker; 0 when it cannot say.
async fn benchmark(worker: &mut Worker) -> f64 {
    if worker.send(&ToWorker::Benchmark).await.is_err() {
        return 0.0;
    }
    match tokio::time::timeout(Duration::from_secs(120), worker.recv()).await {
        Ok(Ok(FromWorker::Benchmarked { gflops })) => gflops,
        _ => 0.0,
    }
}

/// Connects, registers and serves until the connection ends; returns why it ended.
async fn run(shared: &Arc<Shared>, sessions: Option<SocketAddr>) -> Result<(), DaemonError> {
    let config = &shared.config;
    let identity = Identity::new(&config.keypair)?;
    let bind =
        if config.scheduler.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let endpoint = quic::client(bind)?;
    let conn = quic::connect(&endpoint, &identity, config.scheduler, config.scheduler_key).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| DaemonError::Lost(e.to_string()))?;
    // Renters reach the session endpoint at the address the scheduler sees this host from,
    // unless told otherwise.
    let session_addr = config.advertise.clone().or_else(|| {
        sessions.map(|a| {
            let ip = if a.ip().is_unspecified() {
                conn.local_ip()
                    .filter(|ip| !ip.is_unspecified())
                    .or_else(|| route_ip(config.scheduler))
                    .unwrap_or(a.ip())
            } else {
                a.ip()
            };
            SocketAddr::new(ip, a.port()).to_string()
        })
    });
    let register = HostMsg::Register {
        name: config.name.clone(),
        region: config.region.clone(),
        gpus: shared.gpus.iter().map(|g| g.gpu.clone()).collect(),
        price: config.price,
        capacity: config.capacity,
        session_addr,
        session_capacity: if sessions.is_some() { config.session_capacity } else { 0 },
    };
    quic::write_msg(&mut send, &register, CONTROL_CAP).await?;
    let heartbeat = match quic::read_msg::<SchedulerMsg>(&mut recv, CONTROL_CAP).await? {
        Some(SchedulerMsg::Registered { heartbeat_ms, .. }) => Duration::from_millis(heartbeat_ms.clamp(50, 60_000)),
        Some(SchedulerMsg::Refused { reason }) => return Err(DaemonError::Refused(reason)),
        Some(SchedulerMsg::Cancel { .. } | SchedulerMsg::MeasureLinks { .. }) => {
            return Err(DaemonError::Lost("the scheduler sent work before Registered".into()));
        }
        None => return Err(DaemonError::Refused("the scheduler closed the connection (is this key allowed?)".into())),
    };
    log::info!("registered with the scheduler at {} as {}", config.scheduler, config.keypair.public());

    let jobs = tokio::spawn(accept_jobs(conn.clone(), shared.clone()));
    // The scheduler cancels jobs it gave to another provider (after this one missed its
    // heartbeats, say): stop them, their results would be ignored and they hold slots.
    let watching = shared.running.clone();
    let prober = shared.keypair.clone();
    let control = tokio::spawn(async move {
        while let Ok(Some(msg)) = quic::read_msg::<SchedulerMsg>(&mut recv, CONTROL_CAP).await {
            if let SchedulerMsg::MeasureLinks { peers } = msg {
                let (running, keypair) = (watching.clone(), prober.clone());
                tokio::spawn(async move {
                    let measured = measure_links(&keypair, peers).await;
                    running.report_links(measured);
                });
                continue;
            }
            if let SchedulerMsg::Cancel { job_ids } = msg {
                let cancels = watching.cancels.lock().unwrap_or_else(PoisonError::into_inner);
                for id in job_ids {
                    match cancels.get(&id) {
                        Some(flag) => {
                            flag.notify_one();
                            log::info!(
                                "cancelled job {id} at the scheduler's word (given to another provider, or cancelled by its renter)"
                            );
                        }
                        None => log::info!("the scheduler cancelled job {id}, which is not running here"),
                    }
                }
            }
        }
    });
    let running = &shared.running;
    // Heartbeats keep their pace however often session reports go out between them.
    let mut next_beat = tokio::time::Instant::now() + heartbeat;
    let result = loop {
        let beat = tokio::select! {
            () = tokio::time::sleep_until(next_beat) => true,
            () = running.report_ready.notified() => false,
        };
        if beat {
            next_beat = tokio::time::Instant::now() + heartbeat;
        }
        let mut out = running.take_reports();
        if beat {
            let (jobs, sessions) = running.counts();
            let slots_left = shared.config.session_capacity.saturating_sub(sessions);
            let session_room = shared.memory.room(slots_left);
            out.push(HostMsg::Heartbeat { running: jobs, sessions, session_room });
        }
        let mut sent = Ok(());
        for msg in &out {
            sent = quic::write_msg(&mut send, msg, CONTROL_CAP).await;
            if sent.is_err() {
                break;
            }
        }
        if let Err(e) = sent {
            break Err(DaemonError::Lost(e.to_string()));
        }
        if let Some(reason) = conn.close_reason() {
            break Err(DaemonError::Lost(reason.to_string()));
        }
    };
    jobs.abort();
    control.abort();
    result
}

/// How long one link's probe may take: a peer that has not shown its key by then is unreachable.
const LINK_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes run at once.
const LINK_PROBES_AT_ONCE: usize = 8;

/// Measures the round trip to each peer (at most `MAX_LINK_PEERS`): a QUIC handshake to its
/// address that only the holder of its key completes, then quinn's estimate of the round trip;
/// `None` for a peer that cannot be reached, or is not who its key says, in time.
async fn measure_links(keypair: &Keypair, peers: Vec<proto::msg::LinkPeer>) -> Vec<proto::msg::LinkRtt> {
    let peers: Vec<proto::msg::LinkPeer> = peers.into_iter().take(proto::msg::MAX_LINK_PEERS).collect();
    let (endpoint, identity) = match (quic::client(SocketAddr::from(([0, 0, 0, 0], 0))), quic::Identity::new(keypair)) {
        (Ok(e), Ok(i)) => (e, Arc::new(i)),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("cannot measure links: {e}");
            return peers.iter().map(|p| proto::msg::LinkRtt { peer: p.key, rtt_us: None }).collect();
        }
    };
    let mut measured = Vec::with_capacity(peers.len());
    for batch in peers.chunks(LINK_PROBES_AT_ONCE) {
        let mut probes = tokio::task::JoinSet::new();
        for peer in batch.iter().cloned() {
            let (endpoint, identity) = (endpoint.clone(), identity.clone());
            probes.spawn(async move {
                let rtt = async {
                    let addr: SocketAddr = peer.addr.parse().ok()?;
                    let conn = quic::connect(&endpoint, &identity, addr, peer.key).await.ok()?;
                    let rtt = conn.rtt();
                    conn.close(0u32.into(), b"measured");
                    u32::try_from(rtt.as_micros()).ok()
                };
                let rtt_us = tokio::time::timeout(LINK_PROBE_TIMEOUT, rtt).await.ok().flatten();
                proto::msg::LinkRtt { peer: peer.key, rtt_us }
            });
        }
        measured.extend(probes.join_all().await);
    }
    measured
}

/// The local address this machine uses to reach `peer` (no packet is sent: connecting a UDP
/// socket only picks the route).
fn route_ip(peer: SocketAddr) -> Option<std::net::IpAddr> {
    let bind = if peer.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_unspecified())
}

// ---- batch jobs ----

async fn accept_jobs(conn: Connection, shared: Arc<Shared>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_job(send, recv, &shared).await {
                log::warn!("job stream: {e}");
            }
        });
    }
}

/// A job's entry in the cancel map, removed however the job's stream ends.
struct Cancellable<'a> {
    running: &'a Running,
    job_id: String,
    flag: Arc<tokio::sync::Notify>,
}

impl<'a> Cancellable<'a> {
    fn register(running: &'a Running, job_id: &str) -> Cancellable<'a> {
        let flag = Arc::new(tokio::sync::Notify::new());
        running.cancels.lock().unwrap_or_else(PoisonError::into_inner).insert(job_id.to_string(), flag.clone());
        Cancellable { running, job_id: job_id.to_string(), flag }
    }
}

impl Cancellable<'_> {
    /// Whether a cancel came (and was not yet taken by a waiter).
    fn flag_fired(&self) -> bool {
        // `notify_one` stores a permit when nobody waits: take it to see.
        let waiter = self.flag.notified();
        tokio::pin!(waiter);
        waiter.as_mut().enable()
    }
}

impl Drop for Cancellable<'_> {
    fn drop(&mut self) {
        self.running.cancels.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.job_id);
    }
}

/// Takes one job off a stream: hand it to a worker, fetch the module when the worker asks,
/// stream the log, kill the worker if it runs past the wall time, sign the receipt, report.
/// How long a paid job waits for the renter to name its payment channel before it fails.
const CHANNEL_WAIT: Duration = Duration::from_secs(60);

/// How long a paid job's stream stays open after its result for the renter's last voucher.
const LAST_VOUCHER_WAIT: Duration = Duration::from_secs(60);

/// A task aborted when this is dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_job(mut send: SendStream, mut recv: RecvStream, shared: &Shared) -> Result<(), quic::QuicError> {
    let Some(JobMsg::Run { job_id, module_hash, input, limits, renter, member, checkpoint }) =
        quic::read_msg::<JobMsg>(&mut recv, proto::msg::JOB_FRAME_CAP).await?
    else {
        return Ok(());
    };
    // A cluster member runs only under a roster its scheduler signed for this module, naming
    // this provider at that rank.
    if let Some(m) = &member {
        let me = shared.keypair.public();
        let checked = m.roster.check(&shared.config.scheduler_key, &me, now_ms()).map_err(|e| e.to_string());
        let why = match checked {
            Err(e) => Some(e),
            Ok(_) if m.roster.module_hash != module_hash => Some("the roster is for another module".to_string()),
            Ok(ranks) if !ranks.contains(&m.rank) => {
                Some(format!("the roster gives rank {} to another provider", m.rank))
            }
            Ok(_) => None,
        };
        if let Some(why) = why {
            let reason = format!("refused the cluster roster: {why}");
            quic::write_msg(&mut send, &JobReply::Declined { reason }, CONTROL_CAP).await?;
            return Ok(());
        }
    }
    let price = shared.config.price.per_gpu_second;
    let paying = shared.payment.clone().filter(|_| price > 0);
    if paying.is_some() && !shared.paid_ready {
        let reason = "this provider's payment setup failed: it takes no paid work now".to_string();
        quic::write_msg(&mut send, &JobReply::Declined { reason }, CONTROL_CAP).await?;
        return Ok(());
    }
    // A member runs on the GPU its signed roster names for its rank.
    let named = member.as_ref().map(|m| m.roster.members.iter().find(|r| r.rank == m.rank).map_or(u32::MAX, |r| r.gpu));
    let Some(on) = shared.gpu_slot(named) else {
        let reason = format!("the scheduler named GPU {named:?}; this provider has {}", shared.gpus.len());
        quic::write_msg(&mut send, &JobReply::Declined { reason }, CONTROL_CAP).await?;
        return Ok(());
    };
    let Some(slot) = Slot::take(&shared.running.jobs, shared.config.capacity) else {
        let reason = format!("at capacity ({} jobs)", shared.config.capacity);
        quic::write_msg(&mut send, &JobReply::Declined { reason }, CONTROL_CAP).await?;
        return Ok(());
    };
    let _on_gpu = on.hold();
    let pool = &on.pool;
    // Cancellable from the moment it is taken: a cancel that comes while a worker starts is
    // kept until the job runs.
    let cancel = Cancellable::register(&shared.running, &job_id);
    quic::write_msg(&mut send, &JobReply::Started, CONTROL_CAP).await?;
    // What the scheduler sends from here on (a module, the renter's channel and vouchers) is
    // read by its own task: a read is not cancel-safe, and the job waits on several things.
    let (inbox_tx, mut inbox) = tokio::sync::mpsc::channel::<JobMsg>(8);
    let _reader = AbortOnDrop(tokio::spawn(async move {
        while let Ok(Some(msg)) = quic::read_msg::<JobMsg>(&mut recv, BLOB_CAP).await {
            if inbox_tx.send(msg).await.is_err() {
                return;
            }
        }
    }));
    let mut pay = None;
    if let Some(config) = paying {
        let wall_ms = crate::flow::smaller(limits.wall_time_ms, shared.defaults.wall_time_ms);
        // A cluster member may also send up to its net-bytes limit, at the price per GiB.
        let net_bytes =
            if member.is_some() { crate::flow::smaller(limits.net_bytes, shared.defaults.net_bytes) } else { 0 };
        let need = proto::receipt::JobBill {
            wall_time_us: wall_ms.saturating_mul(1000),
            price_per_gpu_second: price,
            net_bytes,
            price_per_net_gib: shared.config.price.per_net_gib,
        }
        .amount();
        match take_channel(&mut send, &mut inbox, &cancel, &config, shared, &job_id, renter, need).await? {
            Ok(p) => pay = Some(p),
            Err(reason) => {
                // Nothing of the renter's ran: nothing is billed, and the job is not tried
                // elsewhere (the renter did not pay; another provider would want the same).
                log::info!("job {job_id}: {reason}");
                drop(cancel);
                drop(slot);
                let result = failed_result(FailureKind::Payment, None, reason);
                quic::write_msg(&mut send, &JobReply::Finished(Box::new(result)), BLOB_CAP).await?;
                let _ = send.finish();
                let _ = send.stopped().await;
                return Ok(());
            }
        }
    }
    // A cluster member first joins its ring: the link to the next member and the one from the
    // member before. Without them nothing of the renter's runs, and the scheduler places the
    // cluster again.
    let mut links = None;
    let worker_member = member.as_ref().map(|m| proto::worker::WorkerMember { rank: m.rank, world: m.roster.world() });
    if let Some(m) = &member {
        let joined = tokio::select! {
            j = crate::mesh::join(&shared.mesh, &shared.keypair, &m.roster, m.rank) => j,
            () = cancel.flag.notified() => Err("the job was cancelled".to_string()),
        };
        match joined {
            Ok(l) => links = Some(l),
            Err(reason) => {
                log::info!("job {job_id}: joining its cluster: {reason}");
                drop(cancel);
                drop(slot);
                let result = failed_result(FailureKind::Host, None, format!("joining the cluster: {reason}"));
                quic::write_msg(&mut send, &JobReply::Finished(Box::new(result)), BLOB_CAP).await?;
                let _ = send.finish();
                let _ = send.stopped().await;
                return Ok(());
            }
        }
    }
    // A worker that dies before it takes the job (one that died idle, say) is the provider's
    // failure: another worker gets the job, once.
    let mut tries = 0;
    // What a member moved counts over the whole job, a second worker's try included.
    let mut moved = NetCount::default();
    let (mut result, slices) = loop {
        tries += 1;
        let worker = match pool.take().await {
            Ok(w) => w,
            Err(e) => break (failed_result(FailureKind::Host, None, format!("no worker to run it: {e}")), 0),
        };
        log::info!("running job {job_id} in worker {}", worker.pid());
        let defaults = worker.defaults.clone();
        let (mut flow, actions) = JobFlow::start(
            job_id.clone(),
            module_hash,
            input.clone(),
            limits.clone(),
            &defaults,
            worker_member,
            checkpoint.clone(),
            Instant::now(),
        );
        if let Some(config) = shared.payment.as_ref().filter(|_| pay.is_some()) {
            flow.paid_by_the_slice(config.job_slice);
        }
        let net_limit = crate::flow::smaller(limits.net_bytes, defaults.net_bytes);
        let mut job = JobPump {
            flow,
            worker,
            send: &mut send,
            inbox: &mut inbox,
            shared,
            pay: pay.as_mut(),
            links: links.as_mut(),
            net: NetCount { limit: net_limit, ..std::mem::take(&mut moved) },
            pending_out: None,
        };
        // Whatever happens on the scheduler's stream, the worker goes back to the pool (or is
        // replaced): the pool never shrinks.
        let end = job.pump(actions, &cancel, &job_id, module_hash).await;
        let JobPump { flow, worker, net, .. } = job;
        moved = NetCount { limit: net.limit, ..net };
        let (result, reusable) = match end {
            Ok((mut result, reusable)) => {
                // What a member moved is what this daemon counted, not what its worker says.
                if member.is_some() {
                    result.usage.net_bytes_sent = net.sent;
                    result.usage.net_bytes_received = net.received;
                }
                (result, reusable)
            }
            Err(e) => {
                pool.give_back(worker, false).await;
                return Err(e);
            }
        };
        pool.give_back(worker, reusable && !cancel.flag_fired()).await;
        if !(flow.never_taken() && tries < 2) {
            break (result, flow.slices());
        }
        log::warn!("job {job_id}: its worker died before taking it; trying another");
    };
    drop(cancel);
    // Every run of the renter's code is billed, a failed one as a succeeded one: a kernel that
    // writes its result and then fails does not run free. Only the provider's own failures are
    // not.
    let billed = match &result.outcome {
        Outcome::Succeeded => true,
        Outcome::Failed { kind, .. } => kind.is_kernel_fault(),
    };
    if billed {
        let u = &result.usage;
        let counts = proto::receipt::Counts {
            inferences: 0,
            fuel: u.fuel,
            invocations: u.invocations,
            bytes_uploaded: u.bytes_uploaded,
            bytes_downloaded: u.bytes_downloaded,
            gpu_time_ns: u.gpu_time_ns,
        };
        // A member's bytes are the daemon's own count: those it sent to another provider.
        let bill = proto::receipt::JobBill {
            wall_time_us: result.wall_time_us,
            price_per_gpu_second: price,
            net_bytes: if member.is_some() { moved.billed } else { 0 },
            price_per_net_gib: shared.config.price.per_net_gib,
        };
        let receipt = proto::receipt::JobReceipt::sign_billed(
            &shared.keypair,
            &job_id,
            module_hash,
            slices + 1,
            &result.output,
            counts,
            bill,
        );
        if let Some(p) = pay.as_mut() {
            p.signed(&receipt);
        }
        result.receipt = Some(receipt);
    }
    match &result.outcome {
        Outcome::Succeeded => log::info!("job {job_id} ended: succeeded"),
        Outcome::Failed { message, .. } => log::info!("job {job_id} ended: {message}"),
    }
    // Free the slot before reporting: the scheduler may send the next job the moment it hears.
    drop(slot);
    let last = result.receipt.as_ref().map(|r| r.sequence);
    let finished = JobReply::Finished(Box::new(result));
    if let Err(e) = proto::frame::encode(&finished, BLOB_CAP) {
        // Output and log too big for one frame: a failure with a reason, not a lost stream
        // (which the scheduler would take for the provider's fault and run again).
        let message = format!("the job's output and log do not fit in one result ({e}): write less output");
        let reply =
            JobReply::Finished(Box::new(failed_result(FailureKind::Limit, Some("output-bytes".into()), message)));
        quic::write_msg(&mut send, &reply, BLOB_CAP).await?;
    } else {
        quic::write_msg(&mut send, &finished, BLOB_CAP).await?;
    }
    if let (Some(mut p), Some(last)) = (pay.take(), last) {
        last_voucher(&mut send, &mut inbox, &mut p, last, &job_id).await?;
        let keypair = shared.keypair.clone();
        let claimed = tokio::task::spawn_blocking(move || p.finish(&keypair)).await.ok().flatten();
        if let Some(c) = claimed {
            let _ = quic::write_msg(&mut send, &JobReply::Claimed(Box::new(c)), CONTROL_CAP).await;
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

/// Asks the renter (through the scheduler) for its payment channel and checks the one it
/// names on the chain. `Ok(Err(reason))`: the job does not run.
#[allow(clippy::too_many_arguments)]
async fn take_channel(
    send: &mut SendStream,
    inbox: &mut tokio::sync::mpsc::Receiver<JobMsg>,
    cancel: &Cancellable<'_>,
    config: &Arc<crate::payment::PaymentConfig>,
    shared: &Shared,
    job_id: &str,
    renter: Option<PublicKey>,
    need: u64,
) -> Result<Result<crate::payment::JobPay, String>, quic::QuicError> {
    let Some(renter) = renter else {
        return Ok(Err("the job names no renter to be paid by: this provider takes payment".into()));
    };
    let ask = JobReply::AwaitingChannel {
        program: config.program,
        mint: config.mint,
        need,
        slice_ms: config.job_slice.as_millis() as u64,
    };
    quic::write_msg(send, &ask, CONTROL_CAP).await?;
    let deadline = tokio::time::Instant::now() + CHANNEL_WAIT;
    let terms = loop {
        let msg = tokio::select! {
            m = inbox.recv() => m,
            () = cancel.flag.notified() => return Ok(Err("the job was cancelled".into())),
            () = tokio::time::sleep_until(deadline) => None,
        };
        match msg {
            Some(JobMsg::Channel(terms)) => break terms,
            Some(_) => continue,
            None => {
                return Ok(Err(format!(
                    "the renter named no payment channel within {} s: this provider takes payment in mint {} through program {}",
                    CHANNEL_WAIT.as_secs(),
                    config.mint,
                    config.program
                )));
            }
        }
    };
    let (config2, keypair, id) = (config.clone(), shared.keypair.clone(), job_id.to_string());
    let opened = tokio::task::spawn_blocking(move || {
        crate::payment::JobPay::open(&config2, &keypair, &id, renter, &terms, need)
    })
    .await
    .unwrap_or_else(|e| Err(format!("checking the channel failed: {e}")));
    match opened {
        Ok((pay, newest)) => {
            let taken = JobReply::ChannelTaken { newest: newest.map(Box::new), base: pay.base() };
            quic::write_msg(send, &taken, CONTROL_CAP).await?;
            Ok(Ok(pay))
        }
        Err(reason) => {
            let reason = format!("the payment channel was refused: {reason}");
            quic::write_msg(send, &JobReply::ChannelRefused { reason: reason.clone() }, CONTROL_CAP).await?;
            Ok(Err(reason))
        }
    }
}

/// Waits (a while) for the renter's voucher for the job's last receipt, answering each voucher.
async fn last_voucher(
    send: &mut SendStream,
    inbox: &mut tokio::sync::mpsc::Receiver<JobMsg>,
    pay: &mut crate::payment::JobPay,
    last: u64,
    job_id: &str,
) -> Result<(), quic::QuicError> {
    let deadline = tokio::time::Instant::now() + LAST_VOUCHER_WAIT;
    loop {
        let msg = tokio::select! {
            m = inbox.recv() => m,
            () = tokio::time::sleep_until(deadline) => None,
        };
        match msg {
            Some(JobMsg::Voucher(v)) => {
                if answer_voucher(send, pay, &v).await? == Some(last) {
                    return Ok(());
                }
            }
            Some(_) => {}
            None => {
                log::info!("job {job_id}: no voucher for its last receipt; its output stays withheld");
                return Ok(());
            }
        }
    }
}

/// Takes (or refuses) a voucher and tells the scheduler; the sequence it answers when taken.
async fn answer_voucher(
    send: &mut SendStream,
    pay: &mut crate::payment::JobPay,
    v: &proto::voucher::Voucher,
) -> Result<Option<u64>, quic::QuicError> {
    match pay.take(v) {
        Ok(sequence) => {
            let reply = JobReply::Vouched { sequence, voucher: Box::new(*v) };
            quic::write_msg(send, &reply, CONTROL_CAP).await?;
            Ok(Some(sequence))
        }
        Err(reason) => {
            quic::write_msg(send, &JobReply::VoucherRefused { reason }, CONTROL_CAP).await?;
            Ok(None)
        }
    }
}

/// One job between its worker, the scheduler's job stream, the cancel flag and a timer, until
/// its [`JobFlow`] says it is done; on a paid job, its slices' receipts and vouchers too.
struct JobPump<'a> {
    flow: JobFlow,
    worker: Worker,
    send: &'a mut SendStream,
    inbox: &'a mut tokio::sync::mpsc::Receiver<JobMsg>,
    shared: &'a Shared,
    pay: Option<&'a mut crate::payment::JobPay>,
    /// A cluster member's links to its peers.
    links: Option<&'a mut crate::mesh::Links>,
    net: NetCount,
    /// A frame for the next member waiting for room in its link: until it goes, nothing more is
    /// read from the worker (cancels, deadlines and the member before still are).
    pending_out: Option<Vec<u8>>,
}

/// What woke a job's pump.
enum Woke {
    Worker(Result<FromWorker, crate::pool::WorkerDied>),
    Peer(crate::mesh::PeerEvent),
    Inbox(JobMsg),
    Actions(Vec<JobAction>),
    /// Room in the link to the next member for the frame held back.
    Room(Option<tokio::sync::mpsc::OwnedPermit<Vec<u8>>>),
}

/// A cluster member's bytes to and from its peers, as the daemon moved them, and their limit.
/// `billed` is the part of `sent` that went to a member on another provider: what the job's
/// receipts bill (frames to a member on this provider never cross a network).
#[derive(Default)]
struct NetCount {
    sent: u64,
    received: u64,
    billed: u64,
    limit: u64,
}

impl NetCount {
    /// Counts `n` more bytes, or, when they would take the job past its limit, counts nothing
    /// and says so: a frame refused is never billed.
    fn add(&mut self, sent: bool, n: usize) -> Result<(), String> {
        let n = n as u64;
        let used = self.sent.saturating_add(self.received).saturating_add(n);
        if self.limit > 0 && used > self.limit {
            return Err(format!("{used} bytes to and from peers, over the job's {}", self.limit));
        }
        if sent {
            self.sent = self.sent.saturating_add(n);
        } else {
            self.received = self.received.saturating_add(n);
        }
        Ok(())
    }

    /// Takes back `n` bytes counted as sent that never reached the link (it closed first).
    fn unsend(&mut self, n: usize, remote: bool) {
        self.sent = self.sent.saturating_sub(n as u64);
        if remote {
            self.billed = self.billed.saturating_sub(n as u64);
        }
    }

    /// Counts `n` bytes sent as billed: they went to a member on another provider.
    fn bill(&mut self, n: usize) {
        self.billed = self.billed.saturating_add(n as u64);
    }
}

impl JobPump<'_> {
    /// Returns the result and whether the worker may serve another tenant.
    async fn pump(
        &mut self,
        mut actions: Vec<JobAction>,
        cancel: &Cancellable<'_>,
        job_id: &str,
        module_hash: [u8; 32],
    ) -> Result<(JobResult, bool), quic::QuicError> {
        let price = self.shared.config.price.per_gpu_second;
        loop {
            for action in std::mem::take(&mut actions) {
                match action {
                    // Up to 16 MiB, on a link that may be slow: written while the job's cancel
                    // and deadlines are still heeded.
                    JobAction::ToScheduler(reply @ JobReply::Checkpoint(_)) => {
                        actions.extend(self.write_heeding(&reply, cancel).await?);
                    }
                    JobAction::ToScheduler(reply) => quic::write_msg(self.send, &reply, BLOB_CAP).await?,
                    JobAction::ToWorker(msg) => {
                        if let Err(died) = self.worker.send(&msg).await {
                            actions.extend(self.flow.on_worker(Err(died), Instant::now()));
                        }
                    }
                    JobAction::FetchModule(hash) => {
                        let reply = fetch_module(self.send, self.inbox, hash).await?;
                        actions.extend(self.flow.on_module(reply));
                    }
                    JobAction::Slice { sequence, wall_time_us } => {
                        let bill = proto::receipt::JobBill {
                            wall_time_us,
                            price_per_gpu_second: price,
                            net_bytes: self.net.billed,
                            price_per_net_gib: self.shared.config.price.per_net_gib,
                        };
                        let r = proto::receipt::JobReceipt::sign_slice_billed(
                            &self.shared.keypair,
                            job_id,
                            module_hash,
                            sequence,
                            bill,
                        );
                        if let Some(stop) = self.slice_stop(r.amount_due).await {
                            actions.extend(self.flow.stop_unpaid(stop, Instant::now()));
                            continue;
                        }
                        if let Some(p) = self.pay.as_deref_mut() {
                            p.signed(&r);
                        }
                        quic::write_msg(self.send, &JobReply::Slice(Box::new(r)), CONTROL_CAP).await?;
                    }
                    JobAction::Done { result, reusable } => return Ok((*result, reusable)),
                }
            }
            if !actions.is_empty() {
                continue;
            }
            let wake = self.flow.next_wake();
            let out = self.links.as_deref().map(|l| l.out.clone()).filter(|_| self.pending_out.is_some());
            let room = async move {
                match out {
                    Some(out) => out.reserve_owned().await.ok(),
                    None => std::future::pending().await,
                }
            };
            let reading = self.pending_out.is_none();
            let links = self.links.as_deref_mut();
            let peer_in = async move {
                match links {
                    Some(l) => l.inbound.recv().await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                msg = self.worker.recv(), if reading => Woke::Worker(msg),
                permit = room => Woke::Room(permit),
                Some(event) = peer_in => Woke::Peer(event),
                () = cancel.flag.notified() => Woke::Actions(self.flow.on_cancel()),
                () = tokio::time::sleep_until(wake.into()) => Woke::Actions(self.flow.on_deadline(Instant::now())),
                Some(msg) = self.inbox.recv() => Woke::Inbox(msg),
            };
            actions = match woke {
                Woke::Actions(a) => a,
                // A member's frame for the next member: counted, then moved.
                Woke::Worker(Ok(FromWorker::Peer { bytes })) if self.links.is_some() => self.forward_out(bytes, job_id),
                Woke::Worker(msg) => self.flow.on_worker(msg, Instant::now()),
                Woke::Peer(event) => self.forward_in(event).await,
                Woke::Room(permit) => {
                    match (permit, self.pending_out.take()) {
                        (Some(permit), Some(bytes)) => {
                            permit.send(bytes);
                        }
                        (None, Some(bytes)) => {
                            // Counted when it was held; it never went.
                            let remote = self.links.as_deref().is_some_and(|l| l.remote_next);
                            self.net.unsend(bytes.len(), remote);
                            log::info!("job {job_id}: the link to the next member is gone");
                        }
                        _ => log::info!("job {job_id}: the link to the next member is gone"),
                    }
                    Vec::new()
                }
                Woke::Inbox(msg) => {
                    if let (JobMsg::Voucher(v), Some(p)) = (msg, self.pay.as_deref_mut())
                        && let Some(sequence) = answer_voucher(self.send, p, &v).await?
                    {
                        self.flow.on_vouched(sequence);
                    }
                    Vec::new()
                }
            };
        }
    }

    /// Writes a bulky reply (a checkpoint) to the scheduler while heeding the job's cancel and
    /// deadlines: the worker hears of a cancel at once, and a worker past its wall-time limit
    /// is killed at once. What they mean for the scheduler follows the write, in order.
    async fn write_heeding(
        &mut self,
        reply: &JobReply,
        cancel: &Cancellable<'_>,
    ) -> Result<Vec<JobAction>, quic::QuicError> {
        let mut later = Vec::new();
        let mut ended = false;
        let write = quic::write_msg(&mut *self.send, reply, BLOB_CAP);
        tokio::pin!(write);
        loop {
            let wake = self.flow.next_wake();
            let woke = tokio::select! {
                written = &mut write => {
                    written?;
                    return Ok(later);
                }
                () = cancel.flag.notified() => self.flow.on_cancel(),
                () = tokio::time::sleep_until(wake.into()), if !ended => self.flow.on_deadline(Instant::now()),
            };
            for action in woke {
                match action {
                    JobAction::ToWorker(msg) => {
                        if let Err(died) = self.worker.send(&msg).await {
                            later.extend(self.flow.on_worker(Err(died), Instant::now()));
                        }
                    }
                    JobAction::Done { reusable, .. } => {
                        ended = true;
                        if !reusable {
                            self.worker.stop_now().await;
                        }
                        later.push(action);
                    }
                    other => later.push(other),
                }
            }
        }
    }

    /// The worker's frame for the next member, counted against the job's limit and sent, or
    /// held until its link has room (the pump never waits on it).
    fn forward_out(&mut self, bytes: Vec<u8>, job_id: &str) -> Vec<JobAction> {
        if let Err(why) = self.net.add(true, bytes.len()) {
            return self.flow.stop_at_limit("net-bytes", why, Instant::now());
        }
        let Some(links) = self.links.as_deref() else { return Vec::new() };
        let (out, remote) = (&links.out, links.remote_next);
        if remote {
            self.net.bill(bytes.len());
        }
        match out.try_send(bytes) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(bytes)) => self.pending_out = Some(bytes),
            // The worker hears of it as its collective fails (the member after is gone).
            // Not billed: it never reached the link.
            Err(tokio::sync::mpsc::error::TrySendError::Closed(bytes)) => {
                self.net.unsend(bytes.len(), remote);
                log::info!("job {job_id}: the link to the next member is gone");
            }
        }
        Vec::new()
    }

    /// What came from the member before, counted against the job's limit, to the worker.
    async fn forward_in(&mut self, event: crate::mesh::PeerEvent) -> Vec<JobAction> {
        let msg = match event {
            crate::mesh::PeerEvent::Frame(bytes) => {
                if let Err(why) = self.net.add(false, bytes.len()) {
                    return self.flow.stop_at_limit("net-bytes", why, Instant::now());
                }
                ToWorker::Peer { bytes }
            }
            crate::mesh::PeerEvent::Closed(reason) => ToWorker::PeerClosed { reason },
        };
        match self.worker.send(&msg).await {
            Ok(()) => Vec::new(),
            Err(died) => self.flow.on_worker(Err(died), Instant::now()),
        }
    }

    /// Why the job cannot go on past a slice billing `amount_due` in all, if it cannot: its
    /// deposit would be spent, or the channel (re-read now and then) is closing or unreadable.
    async fn slice_stop(&mut self, amount_due: u64) -> Option<String> {
        let p = self.pay.as_deref_mut()?;
        if let Err(e) = p.room_for(amount_due) {
            return Some(e);
        }
        if p.read_due() {
            return p.refresh().await.err();
        }
        None
    }
}

/// Asks the scheduler for a module's bytes on the job's stream.
async fn fetch_module(
    send: &mut SendStream,
    inbox: &mut tokio::sync::mpsc::Receiver<JobMsg>,
    hash: [u8; 32],
) -> Result<ToWorker, quic::QuicError> {
    quic::write_msg(send, &JobReply::NeedModule, CONTROL_CAP).await?;
    // Nothing else is due from the scheduler before the module (no receipt is out yet).
    let reply = loop {
        match inbox.recv().await {
            Some(JobMsg::Module { bytes }) => break Some(bytes),
            Some(JobMsg::Voucher(_) | JobMsg::Channel(_)) => continue,
            _ => break None,
        }
    };
    match reply {
        Some(bytes) => {
            use sha2::Digest;
            let got: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            if got == hash {
                Ok(ToWorker::Module { bytes })
            } else {
                Ok(ToWorker::NoModule { reason: "the module bytes do not match the hash they were sent for".into() })
            }
        }
        _ => Ok(ToWorker::NoModule { reason: "the scheduler sent no module".into() }),
    }
}

// ---- inference sessions ----

/// How often each session's worker memory is read.
const MEMORY_SAMPLE: Duration = Duration::from_secs(1);

/// A session's place in the memory budget, given back when dropped.
struct MemoryHold<'a> {
    memory: &'a SessionMemory,
    session_id: [u8; 16],
}

impl Drop for MemoryHold<'_> {
    fn drop(&mut self) {
        if let Some(peak) = self.memory.release(&self.session_id) {
            let id: String = self.session_id.iter().map(|b| format!("{b:02x}")).collect();
            log::info!("session {id}: its worker held at most {:.1} MiB of its own", peak as f64 / 1048576.0);
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long one request may take to arrive once it is its turn, and its answer to leave.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the session endpoint and serves it in the background; returns where it listens.
fn start_sessions(shared: &Arc<Shared>, addr: SocketAddr) -> Result<SocketAddr, DaemonError> {
    let identity = Identity::new(&shared.config.keypair)?;
    // Any renter key may connect; what it may do is decided by the ticket it shows. Until then
    // it gets the small pre-authentication budget; after, as many streams as requests it may
    // have in flight (and one for the close).
    let full = quic::Budget {
        bidi_streams: shared.config.session_in_flight.max(1) + 1,
        // What a session may have in flight unread, all streams together.
        receive_window: 16 << 20,
    };
    let limits = quic::ServerLimits::default().full(full);
    let endpoint = quic::server_with(&identity, addr, quic::Peers::Any, limits)?;
    let local = endpoint.local_addr().map_err(|e| DaemonError::Lost(e.to_string()))?;
    let sampled = Arc::downgrade(shared);
    tokio::spawn(async move {
        while let Some(shared) = sampled.upgrade() {
            shared.memory.sample_with(crate::memory::private_bytes);
            drop(shared);
            tokio::time::sleep(MEMORY_SAMPLE).await;
        }
    });
    let shared = shared.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let served = match incoming.await {
                    Ok(conn) => serve_session(conn, &shared).await,
                    Err(e) => Err(quic::QuicError::Stream(e.to_string())),
                };
                if let Err(e) = served {
                    log::info!("session: {e}");
                }
            });
        }
    });
    log::info!("serving inference sessions on {local}");
    Ok(local)
}

/// Tells the renter why its session is refused, and closes the connection.
async fn refuse_session(
    send: &mut SendStream,
    conn: &Connection,
    peer: &PublicKey,
    reply: SessionReply,
) -> Result<(), quic::QuicError> {
    log::info!("refused a session from {peer}: {reply:?}");
    quic::write_msg(send, &reply, CONTROL_CAP).await?;
    let _ = send.finish();
    let _ = send.stopped().await;
    conn.close(1u32.into(), b"refused");
    Ok(())
}

/// What a session's first message said of its init input.
enum InitAsked {
    Bytes(Vec<u8>),
    /// Kept already, pinned for this session.
    Kept(crate::blobs::Pinned, [u8; 32], u64),
    /// To be received once the session has its worker (nothing is taken from a renter the
    /// provider would then turn away).
    Blob([u8; 32], u64),
}

/// The session's held blob, if any: kept until the session ends (the worker reads it at
/// `init`).
type Held = Option<crate::blobs::Pinned>;

fn blob_init(pinned: &crate::blobs::Pinned, hash: [u8; 32], len: u64) -> Init {
    Init::Blob(proto::worker::InitBlob { path: pinned.path().to_string_lossy().into_owned(), hash, len })
}

/// Checks an announced init blob before anything else is taken for the session: `Err` is why
/// this provider turns it away (as `Busy`: another provider may take it).
fn ask_blob(config: &DaemonConfig, hash: [u8; 32], len: u64) -> Result<InitAsked, String> {
    use proto::msg::MAX_INIT_BLOB;
    let Some(cache) = &config.blobs else {
        if len > INLINE_BLOB_MAX {
            return Err(format!(
                "this provider keeps no blob cache and takes inits up to {INLINE_BLOB_MAX} bytes, not {len}: ask the scheduler for another provider"
            ));
        }
        return Ok(InitAsked::Blob(hash, len));
    };
    let most = MAX_INIT_BLOB.min(cache.max_bytes());
    if len > most {
        return Err(format!("an init of {len} bytes is over the {most} this provider takes: ask for another provider"));
    }
    match cache.get(&hash, len) {
        Some(pinned) => {
            log::info!("init blob {} ({len} bytes) is in the cache", proto::msg::hash_hex(&hash));
            Ok(InitAsked::Kept(pinned, hash, len))
        }
        None => Ok(InitAsked::Blob(hash, len)),
    }
}

/// Receives an init blob the cache does not hold: asks for it ([`SessionReply::NeedBlob`]),
/// takes the chunks (hashed as they land, written off the async threads), checks the hash and
/// keeps it where there is a cache. The renter must keep up a mebibyte a second on average
/// past `upload_timeout`: a silent one is dropped after that timeout, a trickle soon after.
/// `Ok(Err)` is a reply refusing the session; `Err`, a broken stream.
async fn receive_blob(
    config: &DaemonConfig,
    send: &mut SendStream,
    recv: &mut RecvStream,
    hash: [u8; 32],
    len: u64,
) -> Result<Result<(Init, Held), SessionReply>, quic::QuicError> {
    use crate::blobs::Refusal;
    use proto::msg::BLOB_CHUNK_CAP;
    let mut incoming = match &config.blobs {
        Some(cache) => match cache.receive(hash, len) {
            Ok(i) => Some(i),
            Err(Refusal::TooLarge(reason)) => return Ok(Err(refused(reason))),
            Err(Refusal::Full(reason)) => {
                return Ok(Err(SessionReply::Busy { reason: format!("{reason}: ask for another provider") }));
            }
        },
        None => None,
    };
    quic::write_msg(send, &SessionReply::NeedBlob, CONTROL_CAP).await?;
    let start = tokio::time::Instant::now();
    let mut memory: Vec<u8> = Vec::new();
    let mut received = 0u64;
    while received < len {
        let deadline = start + config.upload_timeout + Duration::from_secs(received >> 20);
        let chunk = match tokio::time::timeout_at(deadline, quic::read_msg::<SessionMsg>(recv, BLOB_CHUNK_CAP)).await {
            Ok(Ok(Some(SessionMsg::BlobChunk { bytes }))) => bytes,
            Ok(Ok(Some(other))) => {
                return Ok(Err(refused(format!("expected the init blob's next chunk, got {other:?}"))));
            }
            Ok(Ok(None)) => return Ok(Err(refused("the renter stopped sending the init blob"))),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Ok(Err(refused(format!("the init blob came too slowly ({received} of {len} bytes)"))));
            }
        };
        if chunk.is_empty() || received + chunk.len() as u64 > len {
            return Ok(Err(refused(format!("a chunk of {} bytes does not fit the {len}-byte init blob", chunk.len()))));
        }
        received += chunk.len() as u64;
        match incoming.take() {
            Some(mut i) => {
                let pushed = tokio::task::spawn_blocking(move || i.push(&chunk).map(|()| i))
                    .await
                    .unwrap_or_else(|e| Err(format!("writing the init blob: {e}")));
                match pushed {
                    Ok(i) => incoming = Some(i),
                    Err(reason) => return Ok(Err(refused(reason))),
                }
            }
            None => memory.extend_from_slice(&chunk),
        }
    }
    match (&config.blobs, incoming) {
        (Some(cache), Some(i)) => {
            let cache = cache.clone();
            let stored = tokio::task::spawn_blocking(move || cache.finish(i))
                .await
                .unwrap_or_else(|e| Err(format!("storing the init blob: {e}")));
            Ok(stored.map(|pinned| (blob_init(&pinned, hash, len), Some(pinned))).map_err(refused))
        }
        _ => {
            let got = tokio::task::spawn_blocking(move || (proto::msg::sha256(&memory), memory)).await;
            match got {
                Ok((got, memory)) if got == hash => Ok(Ok((Init::Bytes(memory), None))),
                _ => Ok(Err(refused("the init blob's bytes do not hash to what was announced: refused"))),
            }
        }
    }
}

fn refused(reason: impl Into<String>) -> SessionReply {
    SessionReply::Refused { reason: reason.into() }
}

/// One renter's session: check the ticket before anything else, take a session slot and a
/// worker, get the module, run `init`, then serve one request per stream until the renter goes
/// or the session is idle too long.
async fn serve_session(conn: Connection, shared: &Arc<Shared>) -> Result<(), quic::QuicError> {
    let me = shared.keypair.public();
    let refuse = |conn: &Connection| conn.close(1u32.into(), b"refused");
    let Some(peer) = quic::peer_key(&conn) else {
        refuse(&conn);
        return Ok(());
    };
    // Before the ticket is checked the peer gets one small frame and a short time.
    let first = tokio::time::timeout(quic::AUTH_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let msg = quic::read_first_msg::<SessionMsg>(&mut recv, OPEN_CAP, quic::AUTH_TIMEOUT).await?;
        Ok::<_, quic::QuicError>((send, recv, msg))
    })
    .await;
    let (mut send, mut recv, ticket, channel) = match first {
        Ok(Ok((send, recv, Some(SessionMsg::Open { ticket, channel })))) => (send, recv, ticket, channel),
        // Not a renter: a cluster member dialling the member after it.
        Ok(Ok((mut send, recv, Some(SessionMsg::Peer { roster, from_rank })))) => {
            let scheduler = shared.config.scheduler_key;
            let accepted = crate::mesh::accept(
                &shared.mesh,
                (&scheduler, &me, &peer),
                &conn,
                &mut send,
                recv,
                &roster,
                from_rank,
                now_ms(),
            )
            .await;
            return match accepted {
                Ok(()) => {
                    let _ = send.finish();
                    Ok(())
                }
                Err(reason) => refuse_session(&mut send, &conn, &peer, refused(reason)).await,
            };
        }
        Ok(Err(e)) => {
            refuse(&conn);
            return Err(e);
        }
        _ => {
            refuse(&conn);
            return Ok(());
        }
    };
    let now = now_ms();
    if let Err(e) = ticket.check(&shared.config.scheduler_key, &me, &peer, now) {
        return refuse_session(&mut send, &conn, &peer, refused(e.to_string())).await;
    }
    if !shared.running.use_ticket(ticket.session_id, ticket.expires_at_ms, now) {
        let reason = "this ticket was already used: ask the scheduler for a new session";
        return refuse_session(&mut send, &conn, &peer, refused(reason)).await;
    }
    let Some(_slot) = Slot::take(&shared.running.sessions, shared.config.session_capacity) else {
        let reason = format!(
            "this provider is serving its {} sessions: ask the scheduler for another provider",
            shared.config.session_capacity
        );
        return refuse_session(&mut send, &conn, &peer, SessionReply::Busy { reason }).await;
    };
    // The renter is who its ticket says: from here on it may send real data.
    conn.authenticated();
    // A renter that never sends it (or sends it at a trickle) holds a slot: it has a bounded
    // time, like every later read.
    let init =
        tokio::time::timeout(shared.config.upload_timeout, quic::read_msg::<SessionMsg>(&mut recv, BLOB_CAP)).await;
    let asked = match init {
        Ok(Ok(Some(SessionMsg::Init { init_input }))) => InitAsked::Bytes(init_input),
        Ok(Ok(Some(SessionMsg::InitBlob { hash, len }))) => match ask_blob(&shared.config, hash, len) {
            Ok(asked) => asked,
            Err(reason) => return refuse_session(&mut send, &conn, &peer, SessionReply::Busy { reason }).await,
        },
        Ok(Err(e)) => {
            refuse(&conn);
            return Err(e);
        }
        _ => {
            refuse(&conn);
            return Ok(());
        }
    };
    // The session runs on the GPU with the least on it.
    let Some(on) = shared.gpu_slot(None) else {
        let reason = "this provider has no GPU to serve it".to_string();
        return refuse_session(&mut send, &conn, &peer, SessionReply::Busy { reason }).await;
    };
    let on_gpu = on.hold();
    // A paid session starts only on a channel the chain shows as promised.
    let pay = match &shared.payment {
        Some(config) => {
            let (config, kp, t, device) = (config.clone(), shared.keypair.clone(), ticket.clone(), on.gpu.name.clone());
            let opened = tokio::task::spawn_blocking(move || {
                crate::payment::SessionPay::open(&config, &kp, &t, channel, &device)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match opened {
                Ok(p) => Some(p),
                Err(reason) => return refuse_session(&mut send, &conn, &peer, refused(reason)).await,
            }
        }
        None => None,
    };
    let (paid, pay, newest) = match pay {
        Some((p, v)) => (true, Some(p), v.map(Box::new)),
        None => (false, None, None),
    };
    let worker = match on.pool.take().await {
        Ok(w) => w,
        Err(e) => {
            let reason = format!("no worker to serve it: {e}; ask the scheduler for another provider");
            return refuse_session(&mut send, &conn, &peer, SessionReply::Busy { reason }).await;
        }
    };
    // The worker's memory before the session is what the session holds at least; once it runs,
    // it is measured.
    let baseline = crate::memory::private_bytes(worker.pid()).unwrap_or(0);
    if let Err(reason) = shared.memory.admit(ticket.session_id, worker.pid(), baseline) {
        on.pool.give_back(worker, true).await;
        return refuse_session(&mut send, &conn, &peer, SessionReply::Busy { reason }).await;
    }
    let _memory = MemoryHold { memory: &shared.memory, session_id: ticket.session_id };
    // The init input, now that the session has all it needs to start.
    let blob_hash = match &asked {
        InitAsked::Kept(_, hash, _) | InitAsked::Blob(hash, _) => Some(*hash),
        InitAsked::Bytes(_) => None,
    };
    let (init, _held): (Init, Held) = match asked {
        InitAsked::Bytes(bytes) => (Init::Bytes(bytes), None),
        InitAsked::Kept(pinned, hash, len) => (blob_init(&pinned, hash, len), Some(pinned)),
        InitAsked::Blob(hash, len) => match receive_blob(&shared.config, &mut send, &mut recv, hash, len).await {
            Ok(Ok(got)) => got,
            Ok(Err(reply)) => {
                on.pool.give_back(worker, true).await;
                return refuse_session(&mut send, &conn, &peer, reply).await;
            }
            Err(e) => {
                on.pool.give_back(worker, true).await;
                refuse(&conn);
                return Err(e);
            }
        },
    };
    let terms = SessionTerms {
        session_id: ticket.session_id,
        renter: peer,
        price_per_inference: ticket.price_per_inference,
        module_hash: ticket.module_hash,
        limits: proto::msg::JobLimits::default(),
        // A paid session's receipts are each answered by a voucher: one every `max_unvouched`
        // calls (each call by default), so the provider's exposure stays that many calls.
        sign_every: match &shared.payment {
            Some(p) if paid => p.max_unvouched.max(1),
            _ => u64::from(shared.config.receipt_every),
        },
        paid,
        newest,
    };
    let (flow, actions) = SessionFlow::start(terms, init, &worker.defaults, shared.keypair.clone(), Instant::now());
    let mut pump = SessionPump {
        flow,
        worker: Some(worker),
        pay: pay.map(|p| Arc::new(Mutex::new(p))),
        session_id: ticket.session_id,
        running: shared.running.clone(),
        keypair: shared.keypair.clone(),
        pool: on.pool.clone(),
        _on_gpu: on_gpu,
    };
    let upload = Some((&mut send, &mut recv, shared.config.upload_timeout));
    let opened = match pump.drive(actions, upload).await {
        Ok(reply) => reply,
        Err(e) => {
            pump.abandon().await;
            return Err(e);
        }
    };
    match opened {
        Some(reply @ SessionReply::Opened { .. }) if !pump.flow.is_done() => {
            if let Err(e) = quic::write_msg(&mut send, &reply, CONTROL_CAP).await {
                let end = pump.flow.on_end();
                let _ = pump.drive(end, None).await;
                return Err(e);
            }
        }
        reply => {
            pump.abandon().await;
            let mut reply = reply.unwrap_or_else(|| refused("the session's service did not start"));
            // A kept blob the worker could not read whole is this provider's fault: it is
            // forgotten (the next session sends it again), and this renter goes elsewhere.
            if let (SessionReply::Failed { kind: FailureKind::Host, message, .. }, Some(hash), Some(cache)) =
                (&reply, blob_hash, &shared.config.blobs)
                && message.contains("init blob")
            {
                cache.forget(&hash);
                reply = SessionReply::Busy { reason: format!("{message}: ask the scheduler for another provider") };
            }
            return refuse_session(&mut send, &conn, &peer, reply).await;
        }
    }
    let _ = send.finish();
    let id: String = ticket.session_id.iter().map(|b| format!("{b:02x}")).collect();
    log::info!("session {id} opened for {peer} in worker {}", pump.worker.as_ref().map_or(0, Worker::pid));
    let pump = Arc::new(tokio::sync::Mutex::new(pump));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(shared.config.session_in_flight.max(1) as usize));
    let last_active = Arc::new(Mutex::new(Instant::now()));
    let answering = Arc::new(AtomicU32::new(0));
    let idle = shared.config.session_idle;
    let request_cap = shared.config.session_request_bytes;
    loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            () = tokio::time::sleep(idle.min(Duration::from_secs(1))) => {
                // Idle means no request answered for that long and none being answered: open
                // streams that carry nothing, or half a request, do not keep a session alive.
                let quiet = last_active.lock().unwrap_or_else(PoisonError::into_inner).elapsed();
                if quiet >= idle && answering.load(Ordering::SeqCst) == 0 {
                    log::info!("session {id}: idle for {quiet:.0?}, ending it");
                    conn.close(2u32.into(), b"idle");
                    break;
                }
                continue;
            }
        };
        let Ok((mut send, mut recv)) = accepted else { break };
        let (pump, in_flight, last_active, answering) =
            (pump.clone(), in_flight.clone(), last_active.clone(), answering.clone());
        tokio::spawn(async move {
            let Ok(_permit) = in_flight.acquire_owned().await else { return };
            // One request is read at a time, in the instance's turn, within a bounded time and
            // size: a renter cannot make the daemon buffer many large requests at once.
            let mut turn = pump.lock().await;
            let read = tokio::time::timeout(REQUEST_TIMEOUT, quic::read_msg::<SessionMsg>(&mut recv, request_cap));
            let Ok(Ok(Some(msg))) = read.await else { return };
            answering.fetch_add(1, Ordering::SeqCst);
            let actions = turn.flow.on_request(msg, Instant::now());
            let reply = turn.drive(actions, None).await;
            drop(turn);
            *last_active.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            if let Ok(Some(reply)) = reply {
                let write = tokio::time::timeout(REQUEST_TIMEOUT, quic::write_msg(&mut send, &reply, BLOB_CAP));
                if matches!(write.await, Ok(Ok(()))) {
                    let _ = send.finish();
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, send.stopped()).await;
                }
            }
            answering.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // The renter went (or the session idled out): settle what it vouched for, report, free the
    // worker.
    let mut pump = pump.lock().await;
    let end = pump.flow.on_end();
    let _ = pump.drive(end, None).await;
    log::info!("session {id} ended");
    Ok(())
}

/// How often the watcher reads the channels no session holds: well inside the shortest dispute
/// window the program allows (60 s), so a close the renter starts is answered by a claim.
const WATCH_EVERY: Duration = Duration::from_secs(10);

/// The provider's watcher: claims the newest voucher of every channel whose renter started a
/// close (and what the claim policy says is due), for as long as the daemon runs.
async fn watch_channels(payment: Arc<crate::payment::PaymentConfig>, keypair: Arc<Keypair>) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let (p, kp) = (payment.clone(), keypair.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || p.watch(&kp)).await {
            log::error!("the channel watcher failed: {e}");
        }
    }
}

/// Ends a session's service and hands its worker back: reused if it comes back idle in time.
async fn end_service(pool: &Pool, mut worker: Worker) {
    let idle = async {
        worker.send(&ToWorker::EndService).await.ok()?;
        match worker.recv().await {
            Ok(FromWorker::Idle) => Some(()),
            _ => None,
        }
    };
    let reusable = matches!(tokio::time::timeout(Duration::from_secs(5), idle).await, Ok(Some(())));
    pool.give_back(worker, reusable).await;
}

/// Runs one session's [`SessionFlow`]: its worker, its payment and its reports.
struct SessionPump {
    flow: SessionFlow,
    /// `None` once the flow retired it.
    worker: Option<Worker>,
    pay: Option<Arc<Mutex<crate::payment::SessionPay>>>,
    session_id: [u8; 16],
    /// Where reports to the scheduler queue.
    running: Arc<Running>,
    keypair: Arc<Keypair>,
    pool: Pool,
    /// The session counts on its GPU while it runs.
    _on_gpu: OnGpu,
}

impl SessionPump {
    /// Carries out the flow's actions, and waits for the worker while the flow does, until the
    /// flow has nothing left to do: returns its answer to the renter's current stream, if any.
    /// `upload` is the opening stream and how long the renter has to send the module, while the
    /// session opens.
    async fn drive(
        &mut self,
        mut actions: Vec<SessionAction>,
        mut upload: Option<(&mut SendStream, &mut RecvStream, Duration)>,
    ) -> Result<Option<SessionReply>, quic::QuicError> {
        let mut reply = None;
        loop {
            for action in std::mem::take(&mut actions) {
                match action {
                    SessionAction::ToWorker(msg) => {
                        let sent = match self.worker.as_mut() {
                            Some(w) => w.send(&msg).await,
                            None => Err(WorkerDied { kind: FailureKind::Host, message: "the worker is gone".into() }),
                        };
                        if let Err(died) = sent {
                            actions.extend(self.flow.on_worker(Err(died), Instant::now()));
                        }
                    }
                    SessionAction::FetchModule => {
                        let module = match upload.as_mut() {
                            Some((send, recv, timeout)) => fetch_session_module(send, recv, *timeout).await?,
                            None => Err("the module can only be sent while the session opens".into()),
                        };
                        actions.extend(self.flow.on_module(module, Instant::now()));
                    }
                    SessionAction::Pay(step) => {
                        let paid = self.pay_step(step).await;
                        actions.extend(self.flow.on_paid(paid, Instant::now()));
                    }
                    SessionAction::Reply(r) => reply = Some(r),
                    SessionAction::Report { receipt, closed } => self.report(receipt, closed),
                    SessionAction::Retire(how) => {
                        if let Some(w) = self.worker.take() {
                            match how {
                                Handback::Idle => self.pool.give_back(w, true).await,
                                Handback::EndService => end_service(&self.pool, w).await,
                                Handback::Kill => self.pool.give_back(w, false).await,
                            }
                        }
                    }
                }
            }
            if !actions.is_empty() {
                continue;
            }
            let (Some(deadline), Some(worker)) = (self.flow.deadline(), self.worker.as_mut()) else {
                return Ok(reply);
            };
            actions = tokio::select! {
                msg = worker.recv() => self.flow.on_worker(msg, Instant::now()),
                () = tokio::time::sleep_until(deadline.into()) => self.flow.on_deadline(Instant::now()),
            };
        }
    }

    /// Kills the worker of a session that could not open.
    async fn abandon(&mut self) {
        if let Some(w) = self.worker.take() {
            self.pool.give_back(w, false).await;
        }
    }

    /// Runs a payment step on a blocking thread (it may talk to the chain).
    async fn pay_step(&self, step: PayStep) -> Paid {
        let Some(p) = self.pay.clone() else {
            // An unpaid session's flow asks for none; answer as if there were nothing to pay.
            return match step {
                PayStep::Before(..) => Paid::Before(Ok(())),
                PayStep::After(_) => Paid::After(None),
                PayStep::Close(..) => Paid::Close(Err("this session is not paid".into())),
                PayStep::End => Paid::End,
            };
        };
        // A step that needs no chain runs here (a signature check or two, microseconds); one
        // that may read or write the chain runs on a blocking thread.
        let inline = {
            let p = p.lock().unwrap_or_else(PoisonError::into_inner);
            match &step {
                PayStep::Before(..) => !p.before_needs_chain(),
                PayStep::After(_) => !p.claim_due(),
                PayStep::Close(..) | PayStep::End => false,
            }
        };
        let kp = self.keypair.clone();
        let run = move || {
            let mut p = p.lock().unwrap_or_else(PoisonError::into_inner);
            match step {
                PayStep::Before(voucher, served) => {
                    Paid::Before(p.before_serve(voucher.as_deref(), served, !inline).map_err(Unpaid::Stopped))
                }
                PayStep::After(receipt) => {
                    p.served(&receipt);
                    Paid::After(p.after_serve(&kp))
                }
                PayStep::Close(voucher, receipt) => Paid::Close(p.close(&kp, voucher.as_deref(), receipt.as_deref())),
                PayStep::End => {
                    p.ended(&kp);
                    Paid::End
                }
            }
        };
        if inline {
            return run();
        }
        match tokio::task::spawn_blocking(run).await {
            Ok(paid) => paid,
            Err(e) => {
                let why = format!("the payment step failed: {e}");
                Paid::Before(Err(Unpaid::Stopped(why)))
            }
        }
    }

    /// Tells the scheduler where the session stands (usage, payments).
    fn report(&self, receipt: Option<Box<proto::receipt::Receipt>>, closed: bool) {
        let (vouched, settlements) = self
            .pay
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(PoisonError::into_inner).vouched_and_settlements())
            .unwrap_or_default();
        let msg = HostMsg::SessionReport(Box::new(proto::msg::SessionReport {
            session_id: self.session_id,
            receipt: receipt.map(|r| *r),
            vouched,
            settlements,
            closed,
        }));
        self.running.report(self.session_id, msg);
    }
}

/// Asks the renter for the session's module on the opening stream; the flow checks its hash.
async fn fetch_session_module(
    send: &mut SendStream,
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<Result<Vec<u8>, String>, quic::QuicError> {
    quic::write_msg(send, &SessionReply::NeedModule, CONTROL_CAP).await?;
    match tokio::time::timeout(timeout, quic::read_msg::<SessionMsg>(recv, BLOB_CAP)).await {
        Ok(Ok(Some(SessionMsg::Module { bytes }))) => Ok(Ok(bytes)),
        Ok(Ok(_)) => Ok(Err("the renter sent no module".into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(Err(format!("the renter sent no module within {timeout:?}"))),
    }
}

#[cfg(test)]
mod net_count_tests {
    use super::NetCount;

    #[test]
    fn a_frame_over_the_limit_is_refused_and_not_counted() {
        let mut net = NetCount { limit: 100, ..NetCount::default() };
        assert!(net.add(true, 60).is_ok());
        assert!(net.add(false, 40).is_ok());
        let why = net.add(true, 1).unwrap_err();
        assert!(why.contains("over the job's 100"), "{why}");
        assert_eq!((net.sent, net.received), (60, 40), "the refused frame is not billed");
    }

    #[test]
    fn no_limit_counts_everything_and_a_frame_never_sent_is_taken_back() {
        let mut net = NetCount::default();
        assert!(net.add(true, usize::MAX).is_ok());
        assert!(net.add(true, 5).is_ok());
        assert_eq!(net.sent, u64::MAX, "saturates");
        let mut net = NetCount { limit: 10, ..NetCount::default() };
        assert!(net.add(true, 10).is_ok());
        net.bill(10);
        net.unsend(10, true);
        assert_eq!((net.sent, net.billed), (0, 0));
        assert!(net.add(true, 10).is_ok(), "room again once the unsent frame is taken back");
    }
}
