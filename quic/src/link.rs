//! wasmgrid's own handles on quinn's endpoints, connections and streams: only what the rest of
//! the workspace uses, errors as [`QuicError`], and the pre-authentication budget kept here.

use std::future::{Future, IntoFuture};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proto::PublicKey;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{QuicError, ServerLimits};

/// The application error code a connection is closed with when its peer was not authenticated in
/// time.
pub const CLOSE_UNAUTHENTICATED: CloseCode = CloseCode(0x4155);

/// An application error code sent when closing a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u32);

impl From<u32> for CloseCode {
    fn from(code: u32) -> Self {
        CloseCode(code)
    }
}

/// A QUIC endpoint: a client-only one ([`crate::client`]) or a server ([`crate::server`]) that
/// keeps unauthenticated peers to their budget.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    gate: Option<Arc<Gate>>,
}

/// A server's count of connections waiting for authentication, and its limits.
#[derive(Debug)]
struct Gate {
    limits: ServerLimits,
    /// Peers are listed keys, checked in the handshake: a connection is authenticated once it is
    /// established.
    pinned: bool,
    waiting: AtomicUsize,
}

/// One place among the connections waiting for authentication; given back on drop.
#[derive(Debug)]
struct Permit(Arc<Gate>);

impl Gate {
    fn admit(self: &Arc<Self>) -> Option<Permit> {
        let max = self.limits.max_unauthenticated;
        self.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Permit(self.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Endpoint {
    pub(crate) fn client(inner: quinn::Endpoint) -> Endpoint {
        Endpoint { inner, gate: None }
    }

    pub(crate) fn server(inner: quinn::Endpoint, limits: ServerLimits, pinned: bool) -> Endpoint {
        Endpoint { inner, gate: Some(Arc::new(Gate { limits, pinned, waiting: AtomicUsize::new(0) })) }
    }

    pub(crate) fn quinn(&self) -> &quinn::Endpoint {
        &self.inner
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next connection attempt; `None` once the endpoint is closed. Attempts past the cap of
    /// connections waiting for authentication are refused here and never returned.
    pub async fn accept(&self) -> Option<Incoming> {
        loop {
            let incoming = self.inner.accept().await?;
            let Some(gate) = &self.gate else {
                // A client endpoint has no server configuration; quinn refuses these itself.
                incoming.refuse();
                continue;
            };
            match gate.admit() {
                Some(permit) => {
                    let deadline = Instant::now() + gate.limits.auth_timeout;
                    return Some(Incoming { inner: incoming, permit, deadline });
                }
                None => {
                    log::info!(
                        "refused a connection from {}: {} connections are already waiting for authentication",
                        incoming.remote_address(),
                        gate.limits.max_unauthenticated
                    );
                    incoming.refuse();
                }
            }
        }
    }

    /// How many connections are waiting for authentication now (handshakes included); 0 on a
    /// client endpoint.
    pub fn unauthenticated(&self) -> usize {
        self.gate.as_ref().map_or(0, |g| g.waiting.load(Ordering::Acquire))
    }
}

/// A connection attempt; `.await` it for the [`Connection`]. The handshake must end before the
/// authentication deadline. Dropping it refuses the attempt.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    permit: Permit,
    deadline: Instant,
}

impl Incoming {
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    async fn establish(self) -> Result<Connection, QuicError> {
        let Incoming { inner, permit, deadline } = self;
        let gate = permit.0.clone();
        let connecting = inner.accept().map_err(|e| QuicError::Handshake(e.to_string()))?;
        let conn = match tokio::time::timeout_at(deadline, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(QuicError::Handshake(e.to_string())),
            Err(_) => {
                return Err(QuicError::Handshake(format!(
                    "not finished within {:?} of the first packet",
                    gate.limits.auth_timeout
                )));
            }
        };
        let auth = Arc::new(Auth {
            full: gate.limits.full,
            state: Mutex::new(AuthState::Waiting { _place: permit }),
            changed: Notify::new(),
        });
        let conn = Connection { inner: conn, auth: Some(auth.clone()) };
        if gate.pinned {
            conn.authenticated();
        } else {
            tokio::spawn(watch(conn.inner.clone(), auth, deadline));
        }
        Ok(conn)
    }
}

impl IntoFuture for Incoming {
    type Output = Result<Connection, QuicError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Connection, QuicError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.establish())
    }
}

/// Where a server-side connection stands with authentication.
#[derive(Debug)]
enum AuthState {
    /// On the small budget, holding a place among the connections waiting (given back when the
    /// state changes).
    Waiting {
        _place: Permit,
    },
    Authenticated,
    /// Not authenticated in time, or closed before: it stays on the small budget.
    Expired,
}

#[derive(Debug)]
struct Auth {
    full: crate::Budget,
    state: Mutex<AuthState>,
    changed: Notify,
}

impl Auth {
    fn state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes the connection at the deadline unless the application authenticated it first. Holds
/// the connection open at most until the deadline, even if the application dropped it.
async fn watch(conn: quinn::Connection, auth: Arc<Auth>, deadline: Instant) {
    let expired = tokio::select! {
        () = auth.changed.notified() => false,
        _ = conn.closed() => false,
        () = tokio::time::sleep_until(deadline) => true,
    };
    let mut state = auth.state();
    if matches!(*state, AuthState::Waiting { .. }) {
        *state = AuthState::Expired;
        if expired {
            log::info!("closing the connection from {}: not authenticated in time", conn.remote_address());
            conn.close(quinn::VarInt::from_u32(CLOSE_UNAUTHENTICATED.0), b"not authenticated in time");
        }
    }
}

/// An established connection. Cloning gives another handle on the same connection; it closes
/// when the last handle goes (or on [`Connection::close`]).
#[derive(Clone, Debug)]
pub struct Connection {
    inner: quinn::Connection,
    /// `None` on the client side: the server proved the pinned key in the handshake.
    auth: Option<Arc<Auth>>,
}

impl Connection {
    pub(crate) fn client(inner: quinn::Connection) -> Connection {
        Connection { inner, auth: None }
    }

    /// Marks the peer as authenticated (its ticket checked, say): the connection moves from the
    /// small budget to the full one and is no longer closed at the authentication deadline.
    /// Call it before answering the message that authenticated the peer, so that the larger
    /// budget reaches the peer no later than the answer. Does nothing on a client-side
    /// connection, on one already authenticated, or after the deadline has passed (the
    /// connection is closed then).
    pub fn authenticated(&self) {
        let Some(auth) = &self.auth else { return };
        let mut state = auth.state();
        if !matches!(*state, AuthState::Waiting { .. }) {
            return;
        }
        // Dropping the permit gives back the place among the connections waiting.
        *state = AuthState::Authenticated;
        drop(state);
        self.inner.set_receive_window(quinn::VarInt::from_u32(auth.full.receive_window));
        self.inner.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(auth.full.bidi_streams));
        auth.changed.notify_one();
    }

    /// Whether the connection has its full budget: always on the client side.
    pub fn is_authenticated(&self) -> bool {
        self.auth.as_ref().is_none_or(|auth| matches!(*auth.state(), AuthState::Authenticated))
    }

    /// Opens a bidirectional stream; waits while the peer allows no more.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), QuicError> {
        let (send, recv) = self.inner.open_bi().await.map_err(|e| QuicError::Connection(e.to_string()))?;
        Ok((SendStream(send), RecvStream(recv)))
    }

    /// The next stream the peer opens.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), QuicError> {
        let (send, recv) = self.inner.accept_bi().await.map_err(|e| QuicError::Connection(e.to_string()))?;
        Ok((SendStream(send), RecvStream(recv)))
    }

    /// Closes the connection at once, telling the peer `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &[u8]) {
        self.inner.close(quinn::VarInt::from_u32(code.0), reason);
    }

    /// Waits until the connection is closed and says why.
    pub async fn closed(&self) -> QuicError {
        QuicError::Connection(self.inner.closed().await.to_string())
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<QuicError> {
        self.inner.close_reason().map(|e| QuicError::Connection(e.to_string()))
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// The local address the peer's packets arrive at, when the platform says.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.inner.local_ip()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// An id unique among the connections alive in this process.
    pub fn stable_id(&self) -> usize {
        self.inner.stable_id()
    }

    /// The key the peer proved in the handshake.
    pub fn peer_key(&self) -> Option<PublicKey> {
        let identity = self.inner.peer_identity()?;
        let certs = identity.downcast_ref::<Vec<rustls::pki_types::CertificateDer<'static>>>()?;
        certs.first().and_then(crate::cert_key)
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub struct SendStream(quinn::SendStream);

impl SendStream {
    /// Writes all of `buf`, waiting while the peer's flow control allows no more.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), QuicError> {
        self.0.write_all(buf).await.map_err(|e| QuicError::Stream(e.to_string()))
    }

    /// Ends the stream after what was written; does not wait for the peer.
    pub fn finish(&mut self) -> Result<(), QuicError> {
        self.0.finish().map_err(|e| QuicError::Stream(e.to_string()))
    }

    /// Waits until the peer has everything written (`Ok(None)`) or stopped reading
    /// (`Ok(Some(code))`).
    pub async fn stopped(&self) -> Result<Option<u64>, QuicError> {
        match self.0.stopped().await {
            Ok(code) => Ok(code.map(quinn::VarInt::into_inner)),
            Err(e) => Err(QuicError::Stream(e.to_string())),
        }
    }
}

/// The receiving half of a stream; read it with [`crate::read_msg`].
#[derive(Debug)]
pub struct RecvStream(quinn::RecvStream);

/// What one read of a stream returns at most; a frame's buffer grows by what arrives, never by
/// what its length prefix claims.
const READ_CHUNK: usize = 1 << 20;

impl RecvStream {
    /// Fills `buf`; `Ok(false)` if the stream ended cleanly before any byte of it.
    pub(crate) async fn read_exact_or_end(&mut self, buf: &mut [u8]) -> Result<bool, QuicError> {
        match self.0.read_exact(buf).await {
            Ok(()) => Ok(true),
            Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(false),
            Err(e) => Err(QuicError::Stream(e.to_string())),
        }
    }

    /// Reads exactly `len` bytes.
    pub(crate) async fn read_vec(&mut self, len: usize) -> Result<Vec<u8>, QuicError> {
        let mut body = Vec::with_capacity(len.min(READ_CHUNK));
        while body.len() < len {
            let want = (len - body.len()).min(READ_CHUNK);
            match self.0.read_chunk(want, true).await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return Err(QuicError::Stream(format!(
                        "the stream ended {} bytes into a {len}-byte frame",
                        body.len()
                    )));
                }
                Err(e) => return Err(QuicError::Stream(e.to_string())),
            }
        }
        Ok(body)
    }
}
