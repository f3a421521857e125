//! The scheduler process: the HTTPS API for renters (requests signed: [`proto::httpsig`]), the
//! QUIC endpoint providers connect to, and the dispatcher between them. This is the IO around
//! [`State`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use proto::api::{ApiError, JobView, ModuleUploaded, OpenSession, SessionGrant, SubmitJob};
use proto::frame::CONTROL_CAP;
use proto::msg::{BLOB_CAP, HostMsg, JobMsg, JobReply, SchedulerMsg, hash_hex, parse_hash};
use proto::ticket::Ticket;
use proto::{Keypair, PublicKey};
use quic::{Connection, Identity, Peers};
use tokio::sync::Notify;

use crate::auth::{Gate, Renter};
use crate::ratelimit::RenterLimits;
use crate::state::{Assignment, Config, ConfigError, State};
use crate::store::RedbStore;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How a scheduler process is set up.
#[derive(Debug)]
pub struct SchedulerConfig {
    /// Where the renters' API listens: HTTPS with a certificate made from `keypair`, or plain
    /// HTTP with `plain_http`.
    pub http: SocketAddr,
    /// Serve the API as plain HTTP, not HTTPS: only on a loopback address (anything else is
    /// refused at start), where nobody is on the path.
    pub plain_http: bool,
    /// How fast each renter may send requests; `None` for no limit.
    pub renter_limits: Option<RenterLimits>,
    pub quic: SocketAddr,
    pub keypair: Keypair,
    /// Provider keys allowed to connect; `None` lets any key register.
    pub providers: Option<HashSet<PublicKey>>,
    pub db: PathBuf,
    pub state: Config,
}

/// Where a started scheduler listens.
#[derive(Clone, Debug)]
pub struct Listening {
    pub http: SocketAddr,
    /// Whether the API is served over TLS (clients pin `key`).
    pub tls: bool,
    pub quic: SocketAddr,
    pub key: PublicKey,
}

impl Listening {
    /// The API's base URL, `https://ADDR` (or `http://` on plain loopback).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.http)
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    keypair: Arc<Keypair>,
    conns: Arc<Mutex<HashMap<PublicKey, Connection>>>,
    wake: Arc<Notify>,
    /// Where to send control messages (cancellations) to each connected provider.
    control: Arc<Mutex<HashMap<PublicKey, tokio::sync::mpsc::UnboundedSender<SchedulerMsg>>>>,
    /// Bumped whenever a job may have changed, for long polls.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    listening: Arc<Mutex<Option<Listening>>>,
    /// Where the renter's payment messages for each running paid job go: its job stream.
    job_inbox: Arc<Mutex<HashMap<String, tokio::sync::mpsc::Sender<JobMsg>>>>,
    gate: Arc<Gate>,
    heartbeat_ms: u64,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "plain HTTP is served only on a loopback address, not {0}: drop the plain-HTTP option to serve HTTPS there"
    )]
    PlainHttp(SocketAddr),
}

/// Starts the scheduler's tasks on the current tokio runtime and returns where it listens.
pub async fn start(config: SchedulerConfig) -> Result<Listening, StartError> {
    config.state.validate()?;
    if config.plain_http && !config.http.ip().is_loopback() {
        return Err(StartError::PlainHttp(config.http));
    }
    let store = RedbStore::open(&config.db)?;
    let mut state = State::load(config.state.clone(), Box::new(store), now_ms())?;
    let keypair = Arc::new(config.keypair);
    state.set_signer(keypair.clone());
    let identity = Identity::new(&keypair)?;
    let peers = match config.providers {
        Some(keys) => Peers::Only(Arc::new(keys)),
        None => Peers::Any,
    };
    let endpoint = quic::server(&identity, config.quic, peers)?;
    let quic_addr = endpoint.local_addr().map_err(|source| StartError::Listen { addr: config.quic, source })?;
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| StartError::Listen { addr: config.http, source })?;
    let http_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.http, source })?;
    let tls = !config.plain_http;
    let listening = Listening { http: http_addr, tls, quic: quic_addr, key: keypair.public() };
    let acceptor = if tls { Some(quic::https::Acceptor::new(&identity)?) } else { None };

    let shared = Shared {
        state: Arc::new(Mutex::new(state)),
        keypair,
        conns: Arc::new(Mutex::new(HashMap::new())),
        wake: Arc::new(Notify::new()),
        changed: Arc::new(tokio::sync::watch::channel(0).0),
        control: Arc::new(Mutex::new(HashMap::new())),
        listening: Arc::new(Mutex::new(Some(listening.clone()))),
        job_inbox: Arc::new(Mutex::new(HashMap::new())),
        gate: Arc::new(Gate::new(config.renter_limits)),
        heartbeat_ms: config.state.heartbeat_interval_ms,
    };
    tokio::spawn(accept_providers(endpoint, shared.clone()));
    tokio::spawn(dispatch(shared.clone(), config.state.heartbeat_timeout_ms));
    let app = router(shared);
    tokio::spawn(async move {
        let served = match acceptor {
            Some(acceptor) => axum::serve(TlsListener::start(listener, acceptor), app).await,
            None => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            log::error!("http server stopped: {e}");
        }
    });
    Ok(listening)
}

/// API connections open at once (handshakes included); more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 2048;

/// A connection that sends nothing for this long is closed: longer than the longest long
/// poll, so a renter waiting on one is not cut off.
const IDLE_TIMEOUT: Duration = Duration::from_secs(MAX_WAIT_MS / 1000 * 2);

/// The API's listener over TLS. Before a client has sent a signed request it has a fixed
/// budget: one of [`MAX_CONNECTIONS`] slots, the acceptor's handshake time, and
/// [`IDLE_TIMEOUT`] without a byte. Handshakes run concurrently; axum gets the connections
/// that finished theirs.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(ApiConn, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(listener: tokio::net::TcpListener, acceptor: quic::https::Acceptor) -> TlsListener {
        let local = listener.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: wait rather than spin.
                        log::warn!("accepting an API connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(tls) => {
                            let idle = Box::pin(tokio::time::sleep(IDLE_TIMEOUT));
                            let _ = ready.send((ApiConn { tls, idle, _slot: slot }, peer)).await;
                        }
                        Err(e) => log::debug!("API connection from {peer}: {e}"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = ApiConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task ended (the server is going away): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// One API connection over TLS: closed after [`IDLE_TIMEOUT`] without a byte either way, and
/// holding its slot until it closes.
struct ApiConn {
    tls: quic::https::TlsStream,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl ApiConn {
    fn touched(&mut self) {
        self.idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
    }
}

impl tokio::io::AsyncRead for ApiConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.tls).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.touched();
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for ApiConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.tls).poll_write(cx, buf);
        if polled.is_ready() {
            self.touched();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

// ---- providers over QUIC ----

async fn accept_providers(endpoint: quic::Endpoint, shared: Shared) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_provider(conn, shared).await,
                Err(e) => log::info!("refused a provider connection: {e}"),
            }
        });
    }
}

async fn serve_provider(conn: Connection, shared: Shared) {
    let Some(key) = quic::peer_key(&conn) else {
        conn.close(1u32.into(), b"no key");
        return;
    };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
    let first: Result<Option<HostMsg>, _> =
        quic::read_first_msg(&mut recv, quic::FIRST_FRAME_CAP, quic::AUTH_TIMEOUT).await;
    let Ok(Some(HostMsg::Register { name, region, gpus, price, capacity, session_addr, session_capacity })) = first
    else {
        let _ = quic::write_msg(
            &mut send,
            &SchedulerMsg::Refused { reason: "expected Register first".into() },
            CONTROL_CAP,
        )
        .await;
        conn.close(2u32.into(), b"protocol");
        return;
    };
    let registered = shared.state().register(
        key,
        name.clone(),
        region,
        gpus,
        price,
        capacity,
        session_addr,
        session_capacity,
        now_ms(),
    );
    if let Err(e) = registered {
        log::error!("registering {key}: {e}");
        conn.close(3u32.into(), b"store");
        return;
    }
    // Registered: the provider is who its key says, and gets the full budget of a peer.
    conn.authenticated();
    shared.conns.lock().unwrap_or_else(PoisonError::into_inner).insert(key, conn.clone());
    log::info!("provider {key} ({name}) registered from {}", conn.remote_address());
    let heartbeat_ms = shared.heartbeat_ms;
    let _ = quic::write_msg(&mut send, &SchedulerMsg::Registered { provider: key, heartbeat_ms }, CONTROL_CAP).await;
    // From here the control stream's send half belongs to a writer fed by the dispatcher.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SchedulerMsg>();
    shared.control.lock().unwrap_or_else(PoisonError::into_inner).insert(key, tx);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if quic::write_msg(&mut send, &msg, CONTROL_CAP).await.is_err() {
                break;
            }
        }
    });
    // A newcomer measures its round trips to the providers already here (the links gangs are
    // placed and ordered by); one measurement covers both directions.
    let peers = shared.state().link_peers(&key, now_ms());
    if !peers.is_empty()
        && let Some(tx) = shared.control.lock().unwrap_or_else(PoisonError::into_inner).get(&key)
    {
        let _ = tx.send(SchedulerMsg::MeasureLinks { peers });
    }
    shared.wake.notify_one();
    loop {
        match quic::read_msg::<HostMsg>(&mut recv, CONTROL_CAP).await {
            Ok(Some(HostMsg::Links { measured })) => match shared.state().links_measured(&key, &measured) {
                Ok(n) => log::info!("provider {key}: {n} round trip(s) to other providers measured"),
                Err(e) => log::warn!("provider {key}: its round trips are refused: {e}"),
            },
            Ok(Some(HostMsg::Heartbeat { running, sessions, session_room })) => {
                let rtt = u32::try_from(conn.rtt().as_millis()).ok();
                let mut state = shared.state();
                state.heartbeat(&key, running, sessions, rtt, now_ms());
                state.session_room(&key, session_room);
                drop(state);
                shared.wake.notify_one();
            }
            Ok(Some(HostMsg::SessionReport(report))) => {
                let reported = shared.state().session_report(&key, &report, now_ms());
                if let Err(e) = reported {
                    log::warn!("provider {key}: session report refused: {e}");
                }
            }
            Ok(Some(other)) => {
                log::warn!("provider {key} sent {other:?} on the control stream; closing");
                break;
            }
            Ok(None) => break,
            Err(e) => {
                log::info!("provider {key}: {e}");
                break;
            }
        }
    }
    conn.close(0u32.into(), b"bye");
    writer.abort();
    let mut conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
    // Only forget the connection if it is still this one (the provider may have reconnected).
    if conns.get(&key).is_some_and(|c| c.stable_id() == conn.stable_id()) {
        conns.remove(&key);
        drop(conns);
        shared.control.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        let _ = shared.state().disconnected(&key, now_ms());
    }
    shared.wake.notify_one();
}

async fn dispatch(shared: Shared, heartbeat_timeout_ms: u64) {
    let tick = Duration::from_millis((heartbeat_timeout_ms / 4).clamp(50, 1_000));
    loop {
        let _ = tokio::time::timeout(tick, shared.wake.notified()).await;
        let assignments = {
            let mut state = shared.state();
            if let Err(e) = state.tick(now_ms()) {
                log::error!("scheduler tick: {e}");
            }
            let control = shared.control.lock().unwrap_or_else(PoisonError::into_inner);
            for (provider, job_ids) in state.take_revoked() {
                let cancel = SchedulerMsg::Cancel { job_ids: job_ids.clone() };
                let sent = control.get(&provider).is_some_and(|tx| tx.send(cancel).is_ok());
                if !sent {
                    state.keep_revoked(provider, job_ids);
                }
            }
            for (provider, peers) in state.links_due(now_ms()) {
                if let Some(tx) = control.get(&provider) {
                    let _ = tx.send(SchedulerMsg::MeasureLinks { peers });
                }
            }
            drop(control);
            match state.assign(now_ms()) {
                Ok(a) => a,
                Err(e) => {
                    log::error!("assigning jobs: {e}");
                    Vec::new()
                }
            }
        };
        if !assignments.is_empty() {
            shared.bump();
        }
        for a in assignments {
            tokio::spawn(run_on_provider(shared.clone(), a));
        }
    }
}

async fn run_on_provider(shared: Shared, a: Assignment) {
    let conn = shared.conns.lock().unwrap_or_else(PoisonError::into_inner).get(&a.provider).cloned();
    let result = match conn {
        Some(conn) => drive_job(&shared, &conn, &a).await,
        None => Err("the provider is not connected".to_string()),
    };
    if let Err(reason) = result {
        log::info!("job {} on {}: {reason}", a.job_id, a.provider);
        let _ = shared.state().attempt_failed(&a.job_id, &a.provider, &reason, now_ms());
    }
    shared.bump();
    shared.wake.notify_one();
}

/// Payment messages a renter may have in flight to one job's provider.
const JOB_INBOX: usize = 8;

/// Sends a job to a provider and waits for its end. `Err` is a reason to try elsewhere. A paid
/// job's stream also carries its payment: the provider's receipts and answers come here, the
/// renter's channel and vouchers go there (through `job_inbox`), until the provider ends the
/// stream after the last voucher.
async fn drive_job(shared: &Shared, conn: &Connection, a: &Assignment) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("opening a job stream: {e}"))?;
    let run = JobMsg::Run {
        job_id: a.job_id.clone(),
        module_hash: a.module,
        input: a.input.clone(),
        limits: a.limits.clone(),
        renter: a.renter,
        member: a.member.clone(),
        checkpoint: a.checkpoint.clone(),
    };
    quic::write_msg(&mut send, &run, proto::msg::JOB_FRAME_CAP).await.map_err(|e| e.to_string())?;
    // Replies are read by their own task (a read is not cancel-safe), so that the renter's
    // messages can be sent while one is awaited.
    let (replies_tx, mut replies) = tokio::sync::mpsc::channel::<Result<Option<JobReply>, String>>(4);
    let reader = tokio::spawn(async move {
        loop {
            let r = quic::read_msg::<JobReply>(&mut recv, BLOB_CAP).await.map_err(|e| e.to_string());
            let end = !matches!(r, Ok(Some(_)));
            if replies_tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
    let (inbox_tx, mut inbox) = tokio::sync::mpsc::channel::<JobMsg>(JOB_INBOX);
    let _inbox = InboxEntry::register(shared, &a.job_id, inbox_tx);
    let mut finished = false;
    let result = loop {
        let reply = tokio::select! {
            r = replies.recv() => r.unwrap_or(Ok(None)),
            Some(msg) = inbox.recv() => {
                if let Err(e) = quic::write_msg(&mut send, &msg, CONTROL_CAP).await {
                    log::info!("job {}: relaying the renter's payment: {e}", a.job_id);
                }
                continue;
            }
        };
        let reply = match reply {
            Ok(r) => r,
            // A stream lost after the result is the end of its payment, not a failed try.
            Err(_) if finished => break Ok(()),
            Err(e) => break Err(e),
        };
        match reply {
            Some(JobReply::NeedModule) => {
                let bytes = shared.state().module(&a.module).map_err(|e| e.to_string())?;
                let bytes = bytes.ok_or_else(|| format!("module {} is not in the store", hash_hex(&a.module)))?;
                quic::write_msg(&mut send, &JobMsg::Module { bytes }, BLOB_CAP).await.map_err(|e| e.to_string())?;
            }
            Some(JobReply::Started) => {
                log::info!("job {} started on {}", a.job_id, a.provider);
                shared.state().member_started(&a.job_id, &a.provider);
            }
            Some(JobReply::Log { bytes }) => shared.state().append_log(&a.job_id, &a.provider, &bytes),
            Some(JobReply::Checkpoint(c)) if !finished => {
                // Up to 16 MiB hashed off the runtime's threads and outside the state's lock.
                let hashed = tokio::task::spawn_blocking(move || {
                    use sha2::Digest;
                    let sha256: [u8; 32] = sha2::Sha256::digest(&c.bytes).into();
                    (c, sha256)
                })
                .await;
                let kept = match hashed {
                    Ok((c, sha256)) => shared.state().checkpoint_saved(&a.job_id, &a.provider, *c, sha256, now_ms()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = kept {
                    log::warn!("job {} on {}: keeping its checkpoint: {e}", a.job_id, a.provider);
                }
            }
            Some(JobReply::Finished(result)) => {
                log::info!("job {} finished on {}: {:?}", a.job_id, a.provider, result.outcome);
                shared.state().finished(&a.job_id, &a.provider, *result, now_ms()).map_err(|e| e.to_string())?;
                durable(shared).await?;
                finished = true;
                shared.bump();
                // A cluster's member may have ended its cluster: the others are cancelled now.
                shared.wake.notify_one();
                // A paid job's stream stays open for the last voucher; the provider ends it.
                if shared.state().job(&a.job_id).is_none_or(|v| v.channel.is_none()) {
                    break Ok(());
                }
            }
            Some(JobReply::Declined { reason }) => break Err(format!("the provider declined: {reason}")),
            Some(pay)
                if !finished
                    || matches!(
                        pay,
                        JobReply::Vouched { .. } | JobReply::VoucherRefused { .. } | JobReply::Claimed(_)
                    ) =>
            {
                let noted = shared.state().job_payment(&a.job_id, &a.provider, pay, now_ms());
                if let Err(e) = noted {
                    log::warn!("job {} on {}: {e}", a.job_id, a.provider);
                }
                shared.bump();
            }
            Some(other) => log::warn!("job {} on {}: {other:?} after the result; ignored", a.job_id, a.provider),
            None if finished => break Ok(()),
            None => break Err("the provider closed the job stream without a result".into()),
        }
    };
    let _ = send.finish();
    reader.abort();
    result
}

/// A running job's entry in `job_inbox`, removed when its stream ends.
struct InboxEntry<'a> {
    shared: &'a Shared,
    job_id: String,
}

impl<'a> InboxEntry<'a> {
    fn register(shared: &'a Shared, job_id: &str, tx: tokio::sync::mpsc::Sender<JobMsg>) -> InboxEntry<'a> {
        shared.job_inbox.lock().unwrap_or_else(PoisonError::into_inner).insert(job_id.to_string(), tx);
        InboxEntry { shared, job_id: job_id.to_string() }
    }
}

impl Drop for InboxEntry<'_> {
    fn drop(&mut self) {
        self.shared.job_inbox.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.job_id);
    }
}

// ---- HTTP ----

pub(crate) fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(ApiError { error: message.into(), retry_after_secs: None })).into_response()
}

/// What a job that is not the caller's reads as: the same as one that does not exist.
fn no_job(id: &str) -> Response {
    api_error(StatusCode::NOT_FOUND, format!("no job {id:?}"))
}

fn router(shared: Shared) -> Router {
    // Everything that creates or reads a renter's work: signed by that renter.
    let signed = Router::new()
        .route("/v1/modules", post(upload_module))
        .route("/v1/jobs", post(submit_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/output", get(get_output))
        .route("/v1/jobs/{id}/channel", post(job_channel))
        .route("/v1/jobs/{id}/voucher", post(job_voucher))
        .route("/v1/jobs/{id}/log", get(get_log))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/sessions", post(open_session))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/plan", post(plan))
        .route_layer(axum::middleware::from_fn_with_state(shared.gate.clone(), crate::auth::authenticate));
    Router::new()
        .route("/v1/providers", get(list_providers))
        .route("/v1/info", get(info))
        .route("/openapi.json", get(openapi))
        .merge(signed)
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "no such endpoint; see /openapi.json") })
        .layer(DefaultBodyLimit::max(BLOB_CAP))
        .with_state(shared)
}

/// What [`test_router`] runs with besides the state.
#[derive(Default)]
pub struct TestOptions {
    /// How fast each renter may send requests; `None` for no limit.
    pub renter_limits: Option<RenterLimits>,
    /// The scheduler's key (it signs tickets and cluster rosters); a new one when `None`.
    pub keypair: Option<Keypair>,
}

impl std::fmt::Debug for TestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestOptions")
            .field("renter_limits", &self.renter_limits)
            .field("keypair", &self.keypair.as_ref().map(Keypair::public))
            .finish()
    }
}

/// The router alone, for tests that drive it without sockets.
pub fn test_router(mut state: State, options: TestOptions) -> Router {
    let heartbeat_ms = Config::default().heartbeat_interval_ms;
    let keypair = Arc::new(options.keypair.unwrap_or_else(Keypair::generate));
    state.set_signer(keypair.clone());
    router(Shared {
        state: Arc::new(Mutex::new(state)),
        keypair,
        conns: Arc::new(Mutex::new(HashMap::new())),
        wake: Arc::new(Notify::new()),
        changed: Arc::new(tokio::sync::watch::channel(0).0),
        control: Arc::new(Mutex::new(HashMap::new())),
        listening: Arc::new(Mutex::new(None)),
        job_inbox: Arc::new(Mutex::new(HashMap::new())),
        gate: Arc::new(Gate::new(options.renter_limits)),
        heartbeat_ms,
    })
}

/// Waits until every write so far is on disk, off the async threads and outside the state's lock.
async fn durable(shared: &Shared) -> Result<(), String> {
    let store = shared.state().store_handle();
    match tokio::task::spawn_blocking(move || store.sync()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn upload_module(AxumState(shared): AxumState<Shared>, body: Bytes) -> Response {
    // Signed like every write, though a module belongs to nobody: it is named by its hash.
    if body.is_empty() {
        return api_error(StatusCode::BAD_REQUEST, "the request body must be the module's bytes");
    }
    if !body.starts_with(b"\0asm") {
        return api_error(StatusCode::UNPROCESSABLE_ENTITY, "the body is not a WebAssembly module (no \\0asm header)");
    }
    let stored = shared.state().put_module(&body);
    match stored {
        Ok(hash) => {
            if let Err(e) = durable(&shared).await {
                return api_error(StatusCode::INTERNAL_SERVER_ERROR, e);
            }
            (StatusCode::CREATED, axum::Json(ModuleUploaded { module: hash_hex(&hash), bytes: body.len() as u64 }))
                .into_response()
        }
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn submit_job(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    body: Result<axum::Json<SubmitJob>, JsonRejection>,
) -> Response {
    let axum::Json(req) = match body {
        Ok(j) => j,
        Err(rejection) => return api_error(rejection.status(), rejection.body_text()),
    };
    use base64::Engine;
    let input = match base64::engine::general_purpose::STANDARD.decode(req.input_base64.as_bytes()) {
        Ok(i) => i,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("input_base64 is not base64: {e}")),
    };
    let submitted = shared.state().submit_job(
        renter,
        &req.module,
        input,
        req.requirements,
        req.limits,
        req.deadline_secs,
        req.cluster,
        now_ms(),
    );
    shared.wake.notify_one();
    match submitted {
        Ok(s) => {
            // The answer promises the job survives a restart: it is on disk first.
            if let Err(e) = durable(&shared).await {
                return api_error(StatusCode::INTERNAL_SERVER_ERROR, e);
            }
            (StatusCode::CREATED, axum::Json(s)).into_response()
        }
        Err(e @ crate::state::SubmitError::UnknownModule(_)) => api_error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ crate::state::SubmitError::Invalid(_)) => api_error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ crate::state::SubmitError::TooManyJobs { .. }) => crate::auth::retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{e} (retry in {} s)", QUEUE_FULL_RETRY_MS / 1000),
            QUEUE_FULL_RETRY_MS,
        ),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Query of `GET /v1/jobs/{id}`: with `wait_ms`, answer as soon as the job is no longer in
/// `state` (or has ended), waiting at most that long: a long poll, so clients need not spin.
#[derive(Debug, serde::Deserialize)]
struct JobQuery {
    wait_ms: Option<u64>,
    state: Option<proto::api::JobState>,
    /// Also answer once the job's payment moves past this count of changes
    /// (`JobChannel::updates`): a paying client hears each receipt as it comes.
    pay: Option<u64>,
}

/// Longest long poll.
const MAX_WAIT_MS: u64 = 30_000;

/// When a renter at its job cap is told to try again: jobs take seconds at least.
const QUEUE_FULL_RETRY_MS: u64 = 5_000;

async fn get_job(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let axum::extract::Query(query) = match query {
        Ok(q) => q,
        Err(rejection) => return api_error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(query.wait_ms.unwrap_or(0).min(MAX_WAIT_MS));
    let mut changes = shared.changed.subscribe();
    // A cluster job's long poll also answers once any of its members changes.
    let mut members: Option<Vec<proto::api::MemberView>> = None;
    loop {
        let view = {
            let state = shared.state();
            if !state.owns(&id, &renter) {
                return no_job(&id);
            }
            state.job(&id)
        };
        let Some(view) = view else { return no_job(&id) };
        let paying = view.channel.as_ref().map_or(0, |c| c.updates);
        let now_members = view.cluster.as_ref().map(|c| c.members.clone());
        let members_moved = members.as_ref().is_some_and(|before| Some(before) != now_members.as_ref());
        if members.is_none() {
            members = now_members;
        }
        let moved =
            query.state.is_none_or(|s| s != view.state) || query.pay.is_some_and(|n| n != paying) || members_moved;
        // A paying client also waits on an ended job, for its last voucher to be taken.
        let ended = view.state.is_final() && query.pay.is_none();
        if ended || moved || tokio::time::Instant::now() >= deadline {
            return axum::Json(view).into_response();
        }
        if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
            continue;
        }
    }
}

async fn get_output(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
) -> Response {
    let state = shared.state();
    if !state.owns(&id, &renter) {
        return no_job(&id);
    }
    match (state.job(&id), state.output(&id)) {
        (None, _) => no_job(&id),
        (Some(v), Some(_)) if !state.released(&id) => {
            api_error(StatusCode::PAYMENT_REQUIRED, unpaid(&state, &v, "output"))
        }
        (Some(_), Some(out)) => ([(header::CONTENT_TYPE, "application/octet-stream")], out.to_vec()).into_response(),
        (Some(v), None) => api_error(StatusCode::CONFLICT, format!("job {id} has no output yet (it is {:?})", v.state)),
    }
}

/// Why a paid job's output or log is withheld.
fn unpaid(state: &State, v: &JobView, what: &str) -> String {
    let id = &v.id;
    if let Some(member) = state.output_member(id) {
        return format!(
            "cluster job {id}'s {what} is its member {member}'s: released once that member is paid (each member \
             pays its own provider)"
        );
    }
    match v.channel.as_ref().and_then(|c| c.receipt.as_ref()) {
        Some(r) if r.done => format!(
            "job {id}'s {what} is released once the renter's voucher for its last receipt ({} in all) is taken: the \
             client that submitted it with a chain answers it (POST /v1/jobs/{id}/voucher)",
            r.amount_due
        ),
        _ => format!("job {id}'s {what} is released once the job has ended and is paid"),
    }
}

/// Hands a renter's payment message to its running job's stream.
/// `Some(error)` when it cannot be handed over.
fn relay(shared: &Shared, id: &str, msg: JobMsg) -> Option<Response> {
    let inbox = shared.job_inbox.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned();
    let Some(inbox) = inbox else {
        return Some(api_error(
            StatusCode::CONFLICT,
            format!("job {id} is not on a provider that waits for payment now"),
        ));
    };
    inbox.try_send(msg).err().map(|_| {
        crate::auth::retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("job {id}'s provider has not taken the payment messages sent before; retry in a second"),
            1_000,
        )
    })
}

/// `POST /v1/jobs/{id}/channel`: the renter names its payment channel with the provider that
/// waits to run its job (the job's `channel` says which program and mint, and what it must
/// hold). The provider reads it on the chain; the job view says whether it was taken.
async fn job_channel(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
    body: Result<axum::Json<proto::voucher::ChannelTerms>, JsonRejection>,
) -> Response {
    let axum::Json(terms) = match body {
        Ok(j) => j,
        Err(rejection) => return api_error(rejection.status(), rejection.body_text()),
    };
    {
        let mut state = shared.state();
        if !state.owns(&id, &renter) {
            return no_job(&id);
        }
        if let Err(e) = state.channel_named(&id, &terms) {
            return api_error(StatusCode::CONFLICT, e);
        }
    }
    if let Some(r) = relay(&shared, &id, JobMsg::Channel(Box::new(terms))) {
        return r;
    }
    shared.bump();
    (StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "relayed": true }))).into_response()
}

/// `POST /v1/jobs/{id}/cancel`: the renter stops its job (a cluster's member stands for its
/// cluster). A queued job never runs; a running one ends now and its provider is told to stop.
/// Answers with the job's view; a job that already ended is a conflict.
async fn cancel_job(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
) -> Response {
    let cancelled = {
        let mut state = shared.state();
        if !state.owns(&id, &renter) {
            return no_job(&id);
        }
        state.cancel(&id, now_ms())
    };
    let view = match cancelled {
        Ok(view) => view,
        Err(e @ crate::state::CancelError::NoJob(_)) => return api_error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ crate::state::CancelError::Ended(..)) => return api_error(StatusCode::CONFLICT, e.to_string()),
        Err(crate::state::CancelError::Store(e)) => {
            log::error!("cancelling job {id}: {e}");
            return api_error(StatusCode::INTERNAL_SERVER_ERROR, format!("cancelling job {id}: {e}"));
        }
    };
    if let Err(e) = durable(&shared).await {
        log::error!("cancelling job {id}: {e}");
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, format!("cancelling job {id}: {e}"));
    }
    shared.bump();
    // The dispatcher tells the providers now.
    shared.wake.notify_one();
    axum::Json(view).into_response()
}

/// `POST /v1/jobs/{id}/voucher`: the renter's voucher for the job's newest receipt, relayed to
/// the provider, which checks it against the channel; the job view says when it was taken.
async fn job_voucher(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
    body: Result<axum::Json<proto::voucher::Voucher>, JsonRejection>,
) -> Response {
    let axum::Json(voucher) = match body {
        Ok(j) => j,
        Err(rejection) => return api_error(rejection.status(), rejection.body_text()),
    };
    {
        let mut state = shared.state();
        if !state.owns(&id, &renter) {
            return no_job(&id);
        }
        // The scheduler checks what it can (the voucher names one of the job's receipts still
        // to be vouched); the provider checks the rest (signature, amount, deposit).
        let receipt = state.job(&id).and_then(|v| v.channel).and_then(|c| c.unvouched().cloned());
        match receipt {
            None => return api_error(StatusCode::CONFLICT, format!("job {id} has no receipt waiting for a voucher")),
            Some(r) if r.digest() != voucher.receipt_digest => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    format!("the voucher answers another receipt than job {id}'s newest (number {})", r.sequence),
                );
            }
            Some(r) => state.voucher_sent(&id, r.sequence, voucher),
        }
    }
    if let Some(r) = relay(&shared, &id, JobMsg::Voucher(Box::new(voucher))) {
        return r;
    }
    (StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "relayed": true }))).into_response()
}

async fn get_log(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
) -> Response {
    let state = shared.state();
    if !state.owns(&id, &renter) {
        return no_job(&id);
    }
    match (state.job(&id), state.log(&id)) {
        (None, _) => no_job(&id),
        // Work that is billed shows nothing before it is paid: not its output, not its log (a
        // kernel could print its result there). A paid job streams no live log.
        (Some(v), _) if !state.released(&id) => api_error(StatusCode::PAYMENT_REQUIRED, unpaid(&state, &v, "log")),
        (Some(_), Some(log)) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], log.to_vec()).into_response(),
        (Some(v), None) => api_error(StatusCode::CONFLICT, format!("job {id} has no log yet (it is {:?})", v.state)),
    }
}

/// How long a session ticket stays valid for opening a session.
const TICKET_LIFETIME_MS: u64 = 10 * 60 * 1000;

async fn open_session(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(signer)): Extension<Renter>,
    body: Result<axum::Json<OpenSession>, JsonRejection>,
) -> Response {
    let axum::Json(req) = match body {
        Ok(j) => j,
        Err(rejection) => return api_error(rejection.status(), rejection.body_text()),
    };
    if req.renter != signer {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!("the session's renter {} is not the key that signed the request ({signer})", req.renter),
        );
    }
    let Some(module) = parse_hash(&req.module) else {
        return api_error(StatusCode::BAD_REQUEST, format!("{:?} is not a hex SHA-256", req.module));
    };
    let picked = {
        let state = shared.state();
        match state.module(&module) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return api_error(
                    StatusCode::NOT_FOUND,
                    format!("unknown module {}: upload it with POST /v1/modules first", req.module),
                );
            }
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
        state.pick_session_provider(&req.requirements, &req.exclude)
    };
    match picked {
        Ok((provider, addr, price)) => {
            let mut session_id = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut session_id);
            let ticket = Ticket::issue(
                &shared.keypair,
                session_id,
                req.renter,
                provider,
                module,
                price.per_inference,
                now_ms() + TICKET_LIFETIME_MS,
            );
            let now = now_ms();
            let view = proto::api::SessionView::granted(
                session_id.iter().map(|b| format!("{b:02x}")).collect(),
                req.renter,
                provider,
                req.module.clone(),
                price.per_inference,
                now,
            );
            if let Err(e) = shared.state().open_session(view) {
                return api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
            let grant = SessionGrant { provider, addr, price_per_inference: price.per_inference, ticket };
            (StatusCode::CREATED, axum::Json(grant)).into_response()
        }
        Err(no_match) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "error": no_match.summary, "no_match": no_match })),
        )
            .into_response(),
    }
}

async fn get_session(
    AxumState(shared): AxumState<Shared>,
    Extension(Renter(renter)): Extension<Renter>,
    Path(id): Path<String>,
) -> Response {
    match shared.state().session(&id, &renter) {
        Some(v) => axum::Json(v.clone()).into_response(),
        None => api_error(StatusCode::NOT_FOUND, format!("no session {id:?}")),
    }
}

/// `POST /v1/plan`: where a cluster would be placed now, or why none fits (409, with counts).
async fn plan(
    AxumState(shared): AxumState<Shared>,
    body: Result<axum::Json<proto::api::PlanRequest>, JsonRejection>,
) -> Response {
    let axum::Json(req) = match body {
        Ok(j) => j,
        Err(rejection) => return api_error(rejection.status(), rejection.body_text()),
    };
    if let Err(e) = (crate::gang::Shape { members: req.gpus, ..Default::default() }).check() {
        return api_error(StatusCode::BAD_REQUEST, e);
    }
    match shared.state().plan_gang(&req) {
        Ok(plan) => axum::Json(plan).into_response(),
        Err(no_match) => {
            let answer = proto::api::NoPlan { error: no_match.summary.clone(), no_match };
            (StatusCode::CONFLICT, axum::Json(answer)).into_response()
        }
    }
}

async fn list_providers(AxumState(shared): AxumState<Shared>) -> Response {
    axum::Json(shared.state().providers()).into_response()
}

async fn info(AxumState(shared): AxumState<Shared>) -> Response {
    let listening = shared.listening.lock().unwrap_or_else(PoisonError::into_inner).clone();
    match listening {
        Some(l) => axum::Json(serde_json::json!({
            "key": l.key, "quic": l.quic.to_string(), "http": l.http.to_string(), "tls": l.tls, "url": l.url(),
        }))
        .into_response(),
        None => axum::Json(serde_json::json!({})).into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}
