//! What a server endpoint lets a peer use before the application has authenticated it, and after.

use std::time::Duration;

use crate::QuicError;

/// The default cap of the first frame on a connection not yet authenticated: room for a ticket
/// and an escrow's terms, not for a module or weights (those come after authentication).
pub const FIRST_FRAME_CAP: usize = 16 << 10;

/// The default time a peer has, from its first packet, to finish the handshake and be
/// authenticated by the application (`Connection::authenticated`).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// What one connection may hold on this side at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The connection receive window: bytes the peer may send, over all its streams together,
    /// beyond what the application has read. This is what bounds the memory a peer can make
    /// this side buffer.
    pub receive_window: u32,
    /// Bidirectional streams the peer may have open at once. Past it, the peer's `open_bi`
    /// waits until one of its streams ends (or the budget is raised).
    pub bidi_streams: u32,
}

impl Budget {
    /// Before authentication: a 64 KiB window and one stream, enough for the first message.
    pub const BEFORE_AUTH: Budget = Budget { receive_window: 64 << 10, bidi_streams: 1 };
    /// After authentication: a 64 MiB window and 1024 streams.
    pub const FULL: Budget = Budget { receive_window: 64 << 20, bidi_streams: 1024 };
}

/// How a server endpoint treats peers (see [`crate::server_with`]). Every connection starts on
/// the `before_auth` budget and moves to `full` when the application calls
/// `Connection::authenticated` (at once, in the handshake, for a key listed in `Peers::Only`). A
/// connection not authenticated within `auth_timeout` of its first packet is closed, and at most
/// `max_unauthenticated` connections wait for authentication at a time: attempts past that are
/// refused.
///
/// The per-stream receive window does not change over a connection's life (quinn 0.11 sets it
/// when the connection starts and has no setter), so it is the full one from the start; before
/// authentication the connection window, smaller, bounds every stream together.
///
/// Peers cannot open unidirectional streams or send datagrams: wasmgrid uses neither, and both
/// would be buffers a stranger could fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub(crate) before_auth: Budget,
    pub(crate) full: Budget,
    pub(crate) stream_receive_window: u32,
    pub(crate) auth_timeout: Duration,
    pub(crate) max_unauthenticated: usize,
}

impl Default for ServerLimits {
    /// [`Budget::BEFORE_AUTH`], [`Budget::FULL`], a 16 MiB stream receive window, [`AUTH_TIMEOUT`]
    /// and 128 connections waiting for authentication.
    fn default() -> Self {
        ServerLimits {
            before_auth: Budget::BEFORE_AUTH,
            full: Budget::FULL,
            stream_receive_window: 16 << 20,
            auth_timeout: AUTH_TIMEOUT,
            max_unauthenticated: 128,
        }
    }
}

impl ServerLimits {
    /// The budget of a connection until it is authenticated.
    pub fn before_auth(mut self, budget: Budget) -> Self {
        self.before_auth = budget;
        self
    }

    /// The budget of an authenticated connection.
    pub fn full(mut self, budget: Budget) -> Self {
        self.full = budget;
        self
    }

    /// Bytes the peer may send on one stream beyond what the application has read.
    pub fn stream_receive_window(mut self, bytes: u32) -> Self {
        self.stream_receive_window = bytes;
        self
    }

    /// How long a peer has, from its first packet, to finish the handshake and be authenticated.
    pub fn auth_timeout(mut self, timeout: Duration) -> Self {
        self.auth_timeout = timeout;
        self
    }

    /// How many connections may wait for authentication at once (handshakes included).
    pub fn max_unauthenticated(mut self, count: usize) -> Self {
        self.max_unauthenticated = count;
        self
    }

    /// Checks the limits against each other.
    pub(crate) fn check(&self) -> Result<(), QuicError> {
        let (before, full) = (self.before_auth, self.full);
        let bad = |why: &str| Err(QuicError::Limits(why.to_string()));
        if before.bidi_streams == 0 {
            return bad("before_auth.bidi_streams is 0: a peer could never send its first message");
        }
        if before.receive_window == 0 || self.stream_receive_window == 0 {
            return bad("a receive window of 0 lets no data through");
        }
        if before.receive_window > full.receive_window || before.bidi_streams > full.bidi_streams {
            return bad("the budget before authentication is larger than the full one");
        }
        if self.auth_timeout.is_zero() {
            return bad("auth_timeout is 0: no peer could ever authenticate");
        }
        if self.max_unauthenticated == 0 {
            return bad("max_unauthenticated is 0: every connection would be refused");
        }
        Ok(())
    }
}
