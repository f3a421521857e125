#![doc = include_str!("../README.md")]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::frame::{self, FrameError};
use proto::{Keypair, PublicKey};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod https;

mod limits;
mod link;

pub use limits::{AUTH_TIMEOUT, Budget, FIRST_FRAME_CAP, ServerLimits};
pub use link::{CLOSE_UNAUTHENTICATED, CloseCode, Connection, Endpoint, Incoming, RecvStream, SendStream};

/// The ALPN protocol every wasmgrid QUIC connection speaks.
pub const ALPN: &[u8] = b"wasmgrid/1";

/// What can go wrong setting up or using a link.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("building the TLS identity: {0}")]
    Identity(String),
    #[error("setting up the QUIC endpoint: {0}")]
    Endpoint(String),
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("connection: {0}")]
    Connection(String),
    #[error("stream: {0}")]
    Stream(String),
    #[error("no first message within {0:?}")]
    FirstMessageTimeout(Duration),
    #[error("server limits: {0}")]
    Limits(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// The DER prefix of an ed25519 SubjectPublicKeyInfo; the 32 key bytes follow it.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The ed25519 public key a certificate carries, read by a real X.509 parser (not by searching
/// bytes, which a crafted subject name could fool).
pub(crate) fn cert_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let rest = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let key: [u8; 32] = rest.try_into().ok()?;
    Some(PublicKey(key))
}

/// A party's TLS identity: a self-signed certificate for its ed25519 key.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    public: PublicKey,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { cert: self.cert.clone(), key: self.key.clone_key(), public: self.public }
    }
}

impl Identity {
    pub fn new(keypair: &Keypair) -> Result<Identity, QuicError> {
        let der = PrivatePkcs8KeyDer::from(keypair.to_pkcs8_der());
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .map_err(|e| QuicError::Identity(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["wasmgrid".to_string()])
            .map_err(|e| QuicError::Identity(e.to_string()))?;
        let cert = params.self_signed(&key_pair).map_err(|e| QuicError::Identity(e.to_string()))?;
        Ok(Identity { cert: cert.der().clone(), key: der, public: keypair.public() })
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
}

fn schemes() -> Vec<rustls::SignatureScheme> {
    vec![rustls::SignatureScheme::ED25519]
}

/// Which peers a server accepts.
#[derive(Clone, Debug)]
pub enum Peers {
    /// Any peer with an ed25519 certificate; the application checks the key afterwards (for
    /// example against a signed ticket).
    Any,
    /// Only these keys; anything else is refused in the handshake.
    Only(Arc<HashSet<PublicKey>>),
}

#[derive(Debug)]
struct PinnedServer {
    expected: PublicKey,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match cert_key(end_entity) {
            Some(k) if k == self.expected => Ok(ServerCertVerified::assertion()),
            Some(k) => Err(rustls::Error::General(format!("peer presented key {k}, expected {}", self.expected))),
            None => Err(rustls::Error::General("peer certificate has no ed25519 key".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

#[derive(Debug)]
struct ClientPolicy {
    peers: Peers,
}

impl ClientCertVerifier for ClientPolicy {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key =
            cert_key(end_entity).ok_or_else(|| rustls::Error::General("peer certificate has no ed25519 key".into()))?;
        match &self.peers {
            Peers::Any => Ok(ClientCertVerified::assertion()),
            Peers::Only(keys) if keys.contains(&key) => Ok(ClientCertVerified::assertion()),
            Peers::Only(_) => Err(rustls::Error::General(format!("key {key} is not allowed here"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

/// The transport settings of every connection: a server's start on `budget` (the one before
/// authentication) and are raised per connection later; a client's are its full budget.
fn transport(budget: Budget, stream_receive_window: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t.receive_window(quinn::VarInt::from_u32(budget.receive_window));
    t.stream_receive_window(quinn::VarInt::from_u32(stream_receive_window));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(budget.bidi_streams));
    // Neither is used, and both would be buffers a peer could fill.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

fn server_config(identity: &Identity, peers: Peers, limits: &ServerLimits) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Identity(e.to_string()))?
        .with_client_cert_verifier(Arc::new(ClientPolicy { peers }))
        .with_single_cert(vec![identity.cert.clone()], PrivateKeyDer::Pkcs8(identity.key.clone_key()))
        .map_err(|e| QuicError::Identity(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| QuicError::Identity(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(limits.before_auth, limits.stream_receive_window));
    // Attempts the application has not taken yet: a few per place among the connections waiting
    // for authentication, each with a little buffered (no 0-RTT is accepted, so a client has
    // nothing large to send before the handshake ends).
    let queued = limits.max_unauthenticated.saturating_mul(2).max(16);
    config.max_incoming(queued);
    config.incoming_buffer_size(INCOMING_BUFFER);
    config.incoming_buffer_size_total(INCOMING_BUFFER.saturating_mul(queued as u64));
    Ok(config)
}

/// Bytes buffered for one connection attempt not yet taken by the application.
const INCOMING_BUFFER: u64 = 16 << 10;

fn client_config(identity: &Identity, expected: PublicKey) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Identity(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected }))
        .with_client_auth_cert(vec![identity.cert.clone()], PrivateKeyDer::Pkcs8(identity.key.clone_key()))
        .map_err(|e| QuicError::Identity(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| QuicError::Identity(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let full = ServerLimits::default();
    config.transport_config(transport(full.full, full.stream_receive_window));
    Ok(config)
}

/// A server endpoint on `addr` that accepts `peers`, with the default [`ServerLimits`].
pub fn server(identity: &Identity, addr: SocketAddr, peers: Peers) -> Result<Endpoint, QuicError> {
    server_with(identity, addr, peers, ServerLimits::default())
}

/// A server endpoint on `addr` that accepts `peers` and keeps each to `limits`. A connection
/// from a key in `Peers::Only` is authenticated by its handshake; under `Peers::Any` the
/// application must call [`Connection::authenticated`] once it has checked the peer (its first
/// message, read with [`read_first_msg`]), or the connection is closed at the deadline.
pub fn server_with(
    identity: &Identity,
    addr: SocketAddr,
    peers: Peers,
    limits: ServerLimits,
) -> Result<Endpoint, QuicError> {
    limits.check()?;
    let pinned = matches!(peers, Peers::Only(_));
    let config = server_config(identity, peers, &limits)?;
    let endpoint = quinn::Endpoint::server(config, addr).map_err(|e| QuicError::Endpoint(e.to_string()))?;
    Ok(Endpoint::server(endpoint, limits, pinned))
}

/// A client-only endpoint on an ephemeral port.
pub fn client(bind: SocketAddr) -> Result<Endpoint, QuicError> {
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| QuicError::Endpoint(e.to_string()))?;
    Ok(Endpoint::client(endpoint))
}

/// Connects to `addr`, which must prove it holds `expected`'s key; this side proves `identity`.
pub async fn connect(
    endpoint: &Endpoint,
    identity: &Identity,
    addr: SocketAddr,
    expected: PublicKey,
) -> Result<Connection, QuicError> {
    let config = client_config(identity, expected)?;
    let connecting = endpoint
        .quinn()
        .connect_with(config, addr, "wasmgrid")
        .map_err(|e| QuicError::Connect { addr, reason: e.to_string() })?;
    let conn = connecting.await.map_err(|e| QuicError::Connect { addr, reason: e.to_string() })?;
    Ok(Connection::client(conn))
}

/// The key the peer of an established connection proved.
pub fn peer_key(conn: &Connection) -> Option<PublicKey> {
    conn.peer_key()
}

/// Writes one frame.
pub async fn write_msg<T: Serialize>(send: &mut SendStream, msg: &T, cap: usize) -> Result<(), QuicError> {
    let bytes = frame::encode(msg, cap)?;
    send.write_all(&bytes).await
}

/// Reads one frame, checking its length against `cap` before reading the body. `Ok(None)` at a
/// clean end of stream. The body's buffer grows with the bytes that arrive, not with the length
/// the prefix claims.
pub async fn read_msg<T: DeserializeOwned>(recv: &mut RecvStream, cap: usize) -> Result<Option<T>, QuicError> {
    let mut prefix = [0u8; 4];
    if !recv.read_exact_or_end(&mut prefix).await? {
        return Ok(None);
    }
    let len = frame::body_len(prefix, cap)?;
    let body = recv.read_vec(len).await?;
    Ok(Some(frame::decode_body(&body)?))
}

/// Reads the first frame of a peer not yet authenticated: [`read_msg`] with a small `cap` (see
/// [`FIRST_FRAME_CAP`]) under `timeout`. The endpoint closes the connection at its own deadline
/// ([`ServerLimits::auth_timeout`]) whatever `timeout` says.
pub async fn read_first_msg<T: DeserializeOwned>(
    recv: &mut RecvStream,
    cap: usize,
    timeout: Duration,
) -> Result<Option<T>, QuicError> {
    tokio::time::timeout(timeout, read_msg(recv, cap)).await.map_err(|_| QuicError::FirstMessageTimeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn certificates_carry_the_party_key() {
        let k = Keypair::generate();
        let id = Identity::new(&k).unwrap();
        assert_eq!(cert_key(&id.cert), Some(k.public()));
        assert_eq!(cert_key(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[tokio::test]
    async fn pinned_keys_are_enforced_in_the_handshake() {
        let (server_key, client_key, stranger) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let server_id = Identity::new(&server_key).unwrap();
        let allowed = Peers::Only(Arc::new([client_key.public()].into_iter().collect()));
        let server = server(&server_id, localhost(), allowed).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let mut keys = Vec::new();
            while let Some(incoming) = server.accept().await {
                if let Ok(conn) = incoming.await {
                    keys.push(peer_key(&conn));
                    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                    let msg: Option<String> = read_msg(&mut recv, 1024).await.unwrap();
                    write_msg(&mut send, &msg, 1024).await.unwrap();
                    send.finish().unwrap();
                    let _ = send.stopped().await;
                    break;
                }
            }
            keys
        });

        let endpoint = client(localhost()).unwrap();
        // A client the server does not know is refused. In TLS 1.3 the client learns it just
        // after its side of the handshake: the connection closes before any stream is served.
        let stranger_id = Identity::new(&stranger).unwrap();
        if let Ok(conn) = connect(&endpoint, &stranger_id, addr, server_key.public()).await {
            let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
            assert!(
                closed.to_string().contains("not allowed") || closed.to_string().contains("certificate"),
                "{closed}"
            );
        }
        // A server presenting another key than expected is refused by the client.
        let client_id = Identity::new(&client_key).unwrap();
        assert!(connect(&endpoint, &client_id, addr, stranger.public()).await.is_err());
        // The right pair talks.
        let conn = connect(&endpoint, &client_id, addr, server_key.public()).await.unwrap();
        assert_eq!(peer_key(&conn), Some(server_key.public()));
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_msg(&mut send, &"hello".to_string(), 1024).await.unwrap();
        let back: Option<Option<String>> = read_msg(&mut recv, 1024).await.unwrap();
        assert_eq!(back, Some(Some("hello".to_string())));
        assert_eq!(accept.await.unwrap(), vec![Some(client_key.public())]);
    }
}
