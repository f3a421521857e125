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

pub use quinn::{Connection, Endpoint, RecvStream, SendStream};

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
    #[error("stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// The DER prefix of an ed25519 SubjectPublicKeyInfo; the 32 key bytes follow it.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The ed25519 public key a certificate carries, read by a real X.509 parser (not by searching
/// bytes, which a crafted subject name could fool).
pub fn cert_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
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

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    Arc::new(t)
}

fn server_config(identity: &Identity, peers: Peers) -> Result<quinn::ServerConfig, QuicError> {
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
    config.transport_config(transport());
    Ok(config)
}

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
    config.transport_config(transport());
    Ok(config)
}

/// A server endpoint on `addr` that accepts `peers`.
pub fn server(identity: &Identity, addr: SocketAddr, peers: Peers) -> Result<Endpoint, QuicError> {
    Endpoint::server(server_config(identity, peers)?, addr).map_err(|e| QuicError::Endpoint(e.to_string()))
}

/// A client-only endpoint on an ephemeral port.
pub fn client(bind: SocketAddr) -> Result<Endpoint, QuicError> {
    Endpoint::client(bind).map_err(|e| QuicError::Endpoint(e.to_string()))
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
        .connect_with(config, addr, "wasmgrid")
        .map_err(|e| QuicError::Connect { addr, reason: e.to_string() })?;
    connecting.await.map_err(|e| QuicError::Connect { addr, reason: e.to_string() })
}

/// The key the peer of an established connection proved.
pub fn peer_key(conn: &Connection) -> Option<PublicKey> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    certs.first().and_then(cert_key)
}

/// Writes one frame.
pub async fn write_msg<T: Serialize>(send: &mut SendStream, msg: &T, cap: usize) -> Result<(), QuicError> {
    let bytes = frame::encode(msg, cap)?;
    send.write_all(&bytes).await.map_err(|e| QuicError::Stream(e.to_string()))
}

/// Reads one frame, checking its length against `cap` before reading the body. `Ok(None)` at a
/// clean end of stream.
pub async fn read_msg<T: DeserializeOwned>(recv: &mut RecvStream, cap: usize) -> Result<Option<T>, QuicError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(QuicError::Stream(e.to_string())),
    }
    let len = frame::body_len(prefix, cap)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| QuicError::Stream(e.to_string()))?;
    Ok(Some(frame::decode_body(&body)?))
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
