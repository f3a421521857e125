//! The provider daemon: connects out to the scheduler over QUIC (so a provider behind NAT needs
//! no port forwarding), registers its GPU, price and capacity, sends heartbeats, and runs the
//! jobs the scheduler sends down the connection, fetching modules it does not have by hash.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use proto::frame::CONTROL_CAP;
use proto::msg::{
    BLOB_CAP, GpuInfo, HostMsg, JobLimits, JobMsg, JobReply, JobResult, Outcome, Price, SchedulerMsg, SessionMsg,
    SessionReply, WireUsage,
};
use proto::{Keypair, PublicKey};
use quic::{Connection, Identity, RecvStream, SendStream};
use sha2::{Digest, Sha256};

use crate::limits::Limits;
use crate::meter::Usage;
use crate::sandbox::{Failure, Host};

/// How a provider daemon is set up.
#[derive(Debug)]
pub struct DaemonConfig {
    pub scheduler: SocketAddr,
    pub scheduler_key: PublicKey,
    pub keypair: Keypair,
    pub name: String,
    pub region: String,
    pub price: Price,
    /// Jobs run at once.
    pub capacity: u32,
    /// GPU memory offered to jobs; `None` offers the adapter's largest buffer size.
    pub vram_bytes: Option<u64>,
    /// Where to listen for renters' inference sessions; `None` serves none.
    pub session_listen: Option<SocketAddr>,
    /// The session address to tell renters, when it differs from the listening one (behind NAT
    /// with a forwarded port, say).
    pub advertise: Option<String>,
    /// How sessions are paid; `None` serves them unpaid (a private fleet, a test).
    pub payment: Option<crate::payment::PaymentConfig>,
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
}

fn limits_from(w: &JobLimits) -> Limits {
    let d = Limits::default();
    // A renter may ask for less than this provider's limits, never for more.
    let pick = |v: u64, default: u64| if v == 0 { default } else { v.min(default) };
    let time = |ms: u64, default: Duration| if ms == 0 { default } else { Duration::from_millis(ms).min(default) };
    Limits {
        memory_bytes: pick(w.memory_bytes, d.memory_bytes),
        fuel: pick(w.fuel, d.fuel),
        cpu_time: time(w.cpu_time_ms, d.cpu_time),
        wall_time: time(w.wall_time_ms, d.wall_time),
        gpu_bytes: pick(w.gpu_bytes, d.gpu_bytes),
        dispatches: pick(w.dispatches, d.dispatches),
        ..d
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
    }
}

/// A failure as it goes on the wire.
pub fn wire_outcome(outcome: &Result<(), Failure>) -> Outcome {
    match outcome {
        Ok(()) => Outcome::Succeeded,
        Err(f) => {
            let (kind, limit) = match f {
                Failure::Limit { limit, .. } => ("limit", Some(limit.name().to_string())),
                Failure::Trap(_) => ("trap", None),
                Failure::Exit(_) => ("exit", None),
                Failure::Guest(_) => ("guest", None),
                Failure::Host(_) => ("host", None),
            };
            Outcome::Failed { kind: kind.into(), limit, message: f.to_string() }
        }
    }
}

/// Connects, registers and serves until the connection ends; returns why it ended. Callers
/// reconnect (see [`run_forever`]).
pub async fn run(
    host: &Host,
    config: &DaemonConfig,
    score_gflops: f64,
    sessions: Option<SocketAddr>,
    running: &Arc<Running>,
) -> Result<(), DaemonError> {
    let identity = Identity::new(&config.keypair)?;
    let bind =
        if config.scheduler.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let endpoint = quic::client(bind)?;
    let conn = quic::connect(&endpoint, &identity, config.scheduler, config.scheduler_key).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| DaemonError::Lost(e.to_string()))?;
    let gpu = host.gpu();
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
        gpus: vec![GpuInfo {
            name: gpu.name.clone(),
            vendor: gpu.vendor.clone(),
            backend: gpu.backend.clone(),
            device_type: gpu.device_type.clone(),
            vram_bytes: config.vram_bytes.unwrap_or(gpu.max_buffer_size),
            score_gflops,
        }],
        price: config.price,
        capacity: config.capacity,
        session_addr,
    };
    quic::write_msg(&mut send, &register, CONTROL_CAP).await?;
    let heartbeat = match quic::read_msg::<SchedulerMsg>(&mut recv, CONTROL_CAP).await? {
        Some(SchedulerMsg::Registered { heartbeat_ms, .. }) => Duration::from_millis(heartbeat_ms.clamp(100, 60_000)),
        Some(SchedulerMsg::Refused { reason }) => return Err(DaemonError::Refused(reason)),
        Some(SchedulerMsg::Cancel { .. }) => {
            return Err(DaemonError::Lost("the scheduler sent Cancel before Registered".into()));
        }
        None => return Err(DaemonError::Refused("the scheduler closed the connection (is this key allowed?)".into())),
    };
    log::info!("registered with the scheduler at {} as {}", config.scheduler, config.keypair.public());

    let biller = Biller {
        keypair: Arc::new(Keypair::from_seed(config.keypair.seed())),
        per_gpu_second: config.price.per_gpu_second,
    };
    let jobs = tokio::spawn(accept_jobs(conn.clone(), host.clone(), running.clone(), config.capacity, biller));
    // The scheduler cancels jobs it gave to another provider (after this one missed its
    // heartbeats, say): stop them, their results would be ignored and they hold slots.
    let watching = running.clone();
    let control = tokio::spawn(async move {
        while let Ok(Some(msg)) = quic::read_msg::<SchedulerMsg>(&mut recv, CONTROL_CAP).await {
            if let SchedulerMsg::Cancel { job_ids } = msg {
                let cancels = watching.cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for id in job_ids {
                    match cancels.get(&id) {
                        Some(flag) => {
                            flag.store(true, Ordering::SeqCst);
                            log::info!("cancelled job {id}: the scheduler gave it to another provider");
                        }
                        None => log::info!("the scheduler cancelled job {id}, which is not running here"),
                    }
                }
            }
        }
    });
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
            out.push(HostMsg::Heartbeat { running: running.count.load(Ordering::SeqCst) });
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

/// The jobs a provider runs, across reconnections to the scheduler: how many, and the flag that
/// cancels each.
#[derive(Debug, Default)]
pub struct Running {
    count: AtomicU32,
    cancels: std::sync::Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Session reports waiting for the control stream, newest per session.
    reports: std::sync::Mutex<HashMap<[u8; 16], HostMsg>>,
    report_ready: tokio::sync::Notify,
}

impl Running {
    /// Queues a session report for the scheduler (a newer one replaces an unsent older one).
    fn report(&self, session_id: [u8; 16], msg: HostMsg) {
        self.reports.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(session_id, msg);
        self.report_ready.notify_one();
    }

    fn take_reports(&self) -> Vec<HostMsg> {
        self.reports.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain().map(|(_, m)| m).collect()
    }
}

/// The local address this machine uses to reach `peer` (no packet is sent: connecting a UDP
/// socket only picks the route).
fn route_ip(peer: SocketAddr) -> Option<std::net::IpAddr> {
    let bind = if peer.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_unspecified())
}

/// Runs the daemon, reconnecting with a growing pause when the scheduler is away.
pub async fn run_forever(host: Host, config: DaemonConfig) {
    let score = {
        let h = host.clone();
        tokio::task::spawn_blocking(move || h.benchmark_gflops()).await.unwrap_or(0.0)
    };
    log::info!("GPU benchmark: {score:.1} GFLOP/s f32 matmul");
    let paid_ready = match config.payment.clone() {
        Some(payment) => {
            let keypair = Keypair::from_seed(config.keypair.seed());
            let ready = tokio::task::spawn_blocking(move || {
                payment.prepare(&keypair)?;
                payment.resume(&keypair)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match &ready {
                Ok(n) if *n > 0 => log::info!("settled {n} session(s) left unsettled by the last run"),
                Ok(_) => {}
                Err(e) => log::error!("not serving paid sessions: {e}"),
            }
            ready.is_ok()
        }
        None => true,
    };
    let running = Arc::new(Running::default());
    let sessions = match config.session_listen.filter(|_| paid_ready) {
        Some(addr) => match start_sessions(&host, &config, addr, running.clone()) {
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
        match run(&host, &config, score, sessions, &running).await {
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

/// Who signs job receipts, at what price per GPU-second.
#[derive(Clone)]
struct Biller {
    keypair: Arc<Keypair>,
    per_gpu_second: u64,
}

async fn accept_jobs(conn: Connection, host: Host, running: Arc<Running>, capacity: u32, biller: Biller) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (host, running, biller) = (host.clone(), running.clone(), biller.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_job(send, recv, host, running, capacity, biller).await {
                log::warn!("job stream: {e}");
            }
        });
    }
}

/// Runs `f` on a blocking thread: compiling or loading a module takes long enough to stall the
/// async threads, heartbeats included (a provider that compiled two modules at once on a small
/// machine used to miss its heartbeats and lose both jobs). `None` if the thread panicked.
async fn blocking<T: Send + 'static>(host: &Host, f: impl FnOnce(&Host) -> T + Send + 'static) -> Option<T> {
    let host = host.clone();
    tokio::task::spawn_blocking(move || f(&host)).await.ok()
}

/// How often a running job's new log lines go to the scheduler.
const LOG_EVERY: Duration = Duration::from_millis(250);

/// One of the provider's job slots, given back when dropped, however the job's stream ends.
struct Slot(u32, Arc<Running>);

impl Slot {
    /// Takes a slot; `.0` is how many were taken before it.
    fn take(running: &Arc<Running>) -> Slot {
        Slot(running.count.fetch_add(1, Ordering::SeqCst), running.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.1.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The result of a job that never ran.
fn not_run(kind: &str, message: String) -> JobResult {
    JobResult {
        outcome: Outcome::Failed { kind: kind.into(), limit: None, message },
        output: Vec::new(),
        log: Vec::new(),
        usage: WireUsage::default(),
        wall_time_ms: 0,
        wall_time_us: 0,
        first_dispatch_us: None,
        receipt: None,
    }
}

/// Takes one job off a stream: fetch the module if needed, run it, report.
async fn serve_job(
    mut send: SendStream,
    mut recv: RecvStream,
    host: Host,
    running: Arc<Running>,
    capacity: u32,
    biller: Biller,
) -> Result<(), quic::QuicError> {
    let Some(JobMsg::Run { job_id, module_hash, input, limits }) =
        quic::read_msg::<JobMsg>(&mut recv, BLOB_CAP).await?
    else {
        return Ok(());
    };
    let module = match blocking(&host, move |h| h.cached(&module_hash)).await.flatten() {
        Some(m) => Ok(m),
        None => {
            quic::write_msg(&mut send, &JobReply::NeedModule, CONTROL_CAP).await?;
            match quic::read_msg::<JobMsg>(&mut recv, BLOB_CAP).await? {
                Some(JobMsg::Module { bytes }) => {
                    let got: [u8; 32] = Sha256::digest(&bytes).into();
                    if got != module_hash {
                        let reason = "the module bytes do not match the hash they were sent for".to_string();
                        quic::write_msg(&mut send, &JobReply::Declined { reason }, CONTROL_CAP).await?;
                        return Ok(());
                    }
                    blocking(&host, move |h| h.load(&bytes))
                        .await
                        .unwrap_or_else(|| Err(crate::sandbox::LoadError::Host("the compile thread failed".into())))
                }
                _ => return Ok(()),
            }
        }
    };
    let slot = Slot::take(&running);
    if slot.0 >= capacity {
        drop(slot);
        quic::write_msg(
            &mut send,
            &JobReply::Declined { reason: format!("at capacity ({capacity} jobs)") },
            CONTROL_CAP,
        )
        .await?;
        return Ok(());
    }
    quic::write_msg(&mut send, &JobReply::Started, CONTROL_CAP).await?;
    log::info!("running job {job_id}");
    let limits = limits_from(&limits);
    let (watch_tx, watch_rx) = tokio::sync::oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    running.cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(job_id.clone(), cancel.clone());
    let mut job = tokio::task::spawn_blocking(move || {
        let report = module.and_then(|m| {
            host.run_batch_cancellable(
                &m,
                input,
                &limits,
                |w| {
                    let _ = watch_tx.send(w);
                },
                Some(cancel),
            )
        });
        match report {
            Ok(report) => JobResult {
                outcome: wire_outcome(&report.outcome),
                output: report.output,
                log: report.log,
                usage: wire_usage(&report.usage),
                wall_time_ms: report.wall_time.as_millis() as u64,
                wall_time_us: report.wall_time.as_micros() as u64,
                first_dispatch_us: report.first_dispatch.map(|d| d.as_micros() as u64),
                receipt: None,
            },
            Err(e) => not_run("load", e.to_string()),
        }
    });
    // Stream the log while the job runs, so a renter sees progress (or why it is stuck).
    let watch = watch_rx.await.ok();
    let mut sent = 0usize;
    let result = loop {
        tokio::select! {
            done = &mut job => break done,
            () = tokio::time::sleep(LOG_EVERY) => {
                let fresh = watch.as_ref().map(|w| w.since(sent)).unwrap_or_default();
                if !fresh.is_empty() {
                    sent += fresh.len();
                    quic::write_msg(&mut send, &JobReply::Log { bytes: fresh }, BLOB_CAP).await?;
                }
            }
        }
    };
    let mut result = result.unwrap_or_else(|e| not_run("host", format!("the job's thread failed: {e}")));
    if result.outcome == Outcome::Succeeded {
        let u = &result.usage;
        let counts = proto::receipt::Counts {
            inferences: 0,
            fuel: u.fuel,
            invocations: u.invocations,
            bytes_uploaded: u.bytes_uploaded,
            bytes_downloaded: u.bytes_downloaded,
            gpu_time_ns: u.gpu_time_ns,
        };
        result.receipt = Some(proto::receipt::JobReceipt::sign(
            &biller.keypair,
            &job_id,
            module_hash,
            &result.output,
            counts,
            result.wall_time_us,
            biller.per_gpu_second,
        ));
    }
    match &result.outcome {
        Outcome::Succeeded => log::info!("job {job_id} ended: succeeded"),
        Outcome::Failed { message, .. } => log::info!("job {job_id} ended: {message}"),
    }
    // Free the slot before reporting: the scheduler may send the next job the moment it hears.
    running.cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&job_id);
    drop(slot);
    quic::write_msg(&mut send, &JobReply::Finished(Box::new(result)), BLOB_CAP).await?;
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

// ---- inference sessions ----

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Opens the session endpoint and serves it in the background; returns where it listens.
fn start_sessions(
    host: &Host,
    config: &DaemonConfig,
    addr: SocketAddr,
    running: Arc<Running>,
) -> Result<SocketAddr, DaemonError> {
    let identity = Identity::new(&config.keypair)?;
    // Any renter key may connect; what it may do is decided by the ticket it shows.
    let endpoint = quic::server(&identity, addr, quic::Peers::Any)?;
    let local = endpoint.local_addr().map_err(|e| DaemonError::Lost(e.to_string()))?;
    let (host, scheduler) = (host.clone(), config.scheduler_key);
    let keypair = Arc::new(Keypair::from_seed(config.keypair.seed()));
    let payment = config.payment.clone().map(Arc::new);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let (host, keypair, payment, running) = (host.clone(), keypair.clone(), payment.clone(), running.clone());
            tokio::spawn(async move {
                let served = match incoming.await {
                    Ok(conn) => serve_session(conn, host, scheduler, keypair, payment, running).await,
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

fn failed(f: &Failure) -> SessionReply {
    match wire_outcome(&Err(f.clone())) {
        Outcome::Failed { kind, limit, message } => SessionReply::Failed { kind, limit, message },
        Outcome::Succeeded => SessionReply::Failed { kind: "host".into(), limit: None, message: f.to_string() },
    }
}

/// Tells the renter why its session is refused, and closes the connection.
async fn refuse_session(
    send: &mut SendStream,
    conn: &Connection,
    peer: &PublicKey,
    reason: String,
) -> Result<(), quic::QuicError> {
    log::info!("refused a session from {peer}: {reason}");
    quic::write_msg(send, &SessionReply::Refused { reason }, CONTROL_CAP).await?;
    let _ = send.finish();
    let _ = send.stopped().await;
    conn.close(1u32.into(), b"refused");
    Ok(())
}

/// One renter's session: check the ticket, get the module, run `init`, then serve one request
/// per stream until the renter goes.
async fn serve_session(
    conn: Connection,
    host: Host,
    scheduler: PublicKey,
    keypair: Arc<Keypair>,
    payment: Option<Arc<crate::payment::PaymentConfig>>,
    running: Arc<Running>,
) -> Result<(), quic::QuicError> {
    let me = keypair.public();
    let refuse = |conn: &Connection| conn.close(1u32.into(), b"refused");
    let Some(peer) = quic::peer_key(&conn) else {
        refuse(&conn);
        return Ok(());
    };
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| quic::QuicError::Stream(e.to_string()))?;
    let Some(SessionMsg::Open { ticket, init_input, escrow }) =
        quic::read_msg::<SessionMsg>(&mut recv, BLOB_CAP).await?
    else {
        refuse(&conn);
        return Ok(());
    };
    if let Err(e) = ticket.check(&scheduler, &me, &peer, now_ms()) {
        return refuse_session(&mut send, &conn, &peer, e.to_string()).await;
    }
    // A paid session starts only on an escrow the chain shows as promised.
    let pay = match payment {
        Some(config) => {
            let (kp, t, device) = (keypair.clone(), ticket.clone(), host.gpu().name.clone());
            let opened = tokio::task::spawn_blocking(move || {
                crate::payment::SessionPay::open(&config, &kp, &t, escrow, &device)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match opened {
                Ok(p) => Some(p),
                Err(reason) => return refuse_session(&mut send, &conn, &peer, reason).await,
            }
        }
        None => None,
    };
    let (pay, refund) = match pay {
        Some((p, r)) => (Some(p), Some(Box::new(r))),
        None => (None, None),
    };
    let hash = ticket.module_hash;
    let module = match blocking(&host, move |h| h.cached(&hash)).await.flatten() {
        Some(m) => Ok(m),
        None => {
            quic::write_msg(&mut send, &SessionReply::NeedModule, CONTROL_CAP).await?;
            let Some(SessionMsg::Module { bytes }) = quic::read_msg::<SessionMsg>(&mut recv, BLOB_CAP).await? else {
                refuse(&conn);
                return Ok(());
            };
            let got: [u8; 32] = Sha256::digest(&bytes).into();
            if got != ticket.module_hash {
                let reason = "the module bytes do not match the ticket's module".to_string();
                quic::write_msg(&mut send, &SessionReply::Refused { reason }, CONTROL_CAP).await?;
                refuse(&conn);
                return Ok(());
            }
            blocking(&host, move |h| h.load(&bytes))
                .await
                .unwrap_or_else(|| Err(crate::sandbox::LoadError::Host("the compile thread failed".into())))
        }
    };
    let module = match module {
        Ok(m) => m,
        Err(e) => {
            quic::write_msg(&mut send, &SessionReply::Refused { reason: e.to_string() }, CONTROL_CAP).await?;
            refuse(&conn);
            return Ok(());
        }
    };
    let h = host.clone();
    let started = tokio::task::spawn_blocking(move || h.start_service(&module, init_input, &Limits::default()))
        .await
        .map_err(|e| quic::QuicError::Stream(e.to_string()))?;
    let service = match started {
        Ok(s) => s,
        Err(crate::sandbox::StartError::Failed(f)) => {
            quic::write_msg(&mut send, &failed(&f.failure), CONTROL_CAP).await?;
            return Ok(());
        }
        Err(crate::sandbox::StartError::Load(e)) => {
            quic::write_msg(&mut send, &SessionReply::Refused { reason: e.to_string() }, CONTROL_CAP).await?;
            return Ok(());
        }
    };
    quic::write_msg(&mut send, &SessionReply::Opened { usage: wire_usage(&service.usage()), refund }, CONTROL_CAP)
        .await?;
    let _ = send.finish();
    let id: String = ticket.session_id.iter().map(|b| format!("{b:02x}")).collect();
    log::info!("session {id} opened for {peer}");
    // The instance serves one call at a time, and the receipt of each call is signed in that
    // same order, so the renter can check the chain.
    let signer = proto::receipt::Signer::new(ticket.session_id, peer, ticket.price_per_inference);
    let state = Arc::new(std::sync::Mutex::new(Served {
        service,
        signer,
        pay,
        over: None,
        session_id: ticket.session_id,
        last: None,
        running,
    }));
    // Requests may arrive on many streams at once; the instance serves them one at a time.
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let (state, keypair) = (state.clone(), keypair.clone());
        tokio::spawn(async move {
            let Ok(Some(msg)) = quic::read_msg::<SessionMsg>(&mut recv, BLOB_CAP).await else {
                return;
            };
            let reply = tokio::task::spawn_blocking(move || {
                let mut guard = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                guard.answer(msg, &keypair)
            })
            .await
            .unwrap_or_else(|e| SessionReply::Failed {
                kind: "host".into(),
                limit: None,
                message: e.to_string(),
            });
            if quic::write_msg(&mut send, &reply, BLOB_CAP).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        });
    }
    // The renter went: settle what it vouched for.
    let _ = tokio::task::spawn_blocking(move || {
        let mut guard = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = guard.pay.as_mut() {
            p.ended(&keypair);
        }
        guard.report(true);
    })
    .await;
    log::info!("session {id} ended");
    Ok(())
}

/// A session's instance, its receipts and its payment; one call at a time.
struct Served {
    service: crate::sandbox::Service,
    signer: proto::receipt::Signer,
    pay: Option<crate::payment::SessionPay>,
    /// Why the session stopped, once it has.
    over: Option<String>,
    session_id: [u8; 16],
    /// The newest receipt signed.
    last: Option<Box<proto::receipt::Receipt>>,
    /// Where reports to the scheduler queue.
    running: Arc<Running>,
}

impl Served {
    /// Tells the scheduler where the session stands (usage, payments).
    fn report(&self, closed: bool) {
        let (paid, settlements, settlement_count) =
            self.pay.as_ref().map(|p| p.paid_and_settlements()).unwrap_or_default();
        let msg = HostMsg::SessionReport(Box::new(proto::msg::SessionReport {
            session_id: self.session_id,
            receipt: self.last.as_deref().cloned(),
            paid,
            settlements,
            settlement_count,
            closed,
        }));
        self.running.report(self.session_id, msg);
    }

    fn payment_failed(&mut self, message: String) -> SessionReply {
        log::info!("session stopped: {message}");
        self.over = Some(message.clone());
        SessionReply::Failed { kind: "payment".into(), limit: None, message }
    }

    fn answer(&mut self, msg: SessionMsg, keypair: &Keypair) -> SessionReply {
        // A close is answered whatever happened before: the renter needs the current refund.
        if let Some(why) = self.over.as_ref().filter(|_| !matches!(msg, SessionMsg::Close { .. })) {
            return SessionReply::Failed { kind: "payment".into(), limit: None, message: why.clone() };
        }
        match msg {
            SessionMsg::Request { bytes, voucher } => self.infer(bytes, voucher.as_deref(), keypair),
            SessionMsg::Close { voucher } => match self.pay.as_mut().map(|p| p.close(keypair, voucher.as_deref())) {
                None => SessionReply::Closed { settled: None, refund: None },
                Some(Ok((settled, refund))) => {
                    self.over = Some("the renter closed the session".into());
                    self.report(true);
                    SessionReply::Closed { settled: settled.map(Box::new), refund: Some(Box::new(refund)) }
                }
                Some(Err(e)) => self.payment_failed(e),
            },
            other => SessionReply::Failed {
                kind: "host".into(),
                limit: None,
                message: format!("a session stream must carry a request or a close, not {other:?}"),
            },
        }
    }

    fn infer(&mut self, bytes: Vec<u8>, voucher: Option<&proto::voucher::Voucher>, keypair: &Keypair) -> SessionReply {
        if let Some(Err(message)) = self.pay.as_mut().map(|p| p.funded()) {
            return SessionReply::Failed { kind: "payment".into(), limit: None, message };
        }
        if let Some(Err(e)) = self.pay.as_mut().map(|p| p.before_serve(voucher)) {
            return self.payment_failed(e);
        }
        match self.service.infer(&bytes) {
            Ok(inf) => {
                let u = &inf.usage;
                let call = proto::receipt::Counts {
                    inferences: u.inferences,
                    fuel: u.fuel,
                    invocations: u.invocations,
                    bytes_uploaded: u.bytes_uploaded,
                    bytes_downloaded: u.bytes_downloaded,
                    gpu_time_ns: u.gpu_time_ns,
                };
                let receipt = Box::new(self.signer.next(keypair, &call, &bytes, &inf.response));
                let settled = self.pay.as_mut().and_then(|p| {
                    p.served(&receipt);
                    p.after_serve(keypair).map(Box::new)
                });
                self.last = Some(receipt.clone());
                if settled.is_some() {
                    self.report(false);
                }
                SessionReply::Response { bytes: inf.response, usage: wire_usage(u), receipt, settled }
            }
            Err(f) => failed(&f),
        }
    }
}
