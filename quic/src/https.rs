//! HTTPS with the same identities as the QUIC links: the server's certificate is self-signed
//! with its ed25519 key, and clients pin that key instead of trusting certificate authorities,
//! so nobody on the path can read or change what the server says. TLS 1.3 and ed25519 only.
//!
//! No rustls type crosses this API: the server side is an [`Acceptor`] that turns a TCP
//! connection into a [`TlsStream`] (bytes in, bytes out), and the client side is a
//! `reqwest::ClientBuilder` already pinned to the server's key.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use proto::PublicKey;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{Identity, PinnedServer, QuicError, provider};

/// How long a client may take over its TLS handshake before it is dropped: before it has
/// proved anything it gets a small, fixed budget.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const HTTP1: &[u8] = b"http/1.1";

/// The server side: TLS over accepted TCP connections, presenting `identity`'s certificate.
/// Clients are not asked for certificates (renters sign their requests instead).
#[derive(Clone)]
pub struct Acceptor {
    tls: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").field("handshake_timeout", &self.handshake_timeout).finish_non_exhaustive()
    }
}

impl Acceptor {
    pub fn new(identity: &Identity) -> Result<Acceptor, QuicError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Identity(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert.clone()], PrivateKeyDer::Pkcs8(identity.key.clone_key()))
            .map_err(|e| QuicError::Identity(e.to_string()))?;
        tls.alpn_protocols = vec![HTTP1.to_vec()];
        Ok(Acceptor { tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)), handshake_timeout: HANDSHAKE_TIMEOUT })
    }

    /// The same, with another handshake budget.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Acceptor {
        self.handshake_timeout = timeout;
        self
    }

    /// Runs the TLS handshake on an accepted connection, within the handshake budget.
    pub async fn accept(&self, tcp: TcpStream) -> Result<TlsStream, QuicError> {
        match tokio::time::timeout(self.handshake_timeout, self.tls.accept(tcp)).await {
            Ok(Ok(stream)) => Ok(TlsStream(Box::new(stream))),
            Ok(Err(e)) => Err(QuicError::Stream(format!("TLS handshake: {e}"))),
            Err(_) => Err(QuicError::Stream(format!(
                "TLS handshake: not done within {} ms",
                self.handshake_timeout.as_millis()
            ))),
        }
    }
}

/// One server-side TLS connection: plain bytes to and from the client.
pub struct TlsStream(Box<tokio_rustls::server::TlsStream<TcpStream>>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.0.as_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// An HTTP client builder whose HTTPS connections accept only a server proving `expected`'s
/// key (whatever name or address it is reached by); set timeouts and the like on it, then
/// `build`. Plain `http://` URLs are not protected by it: refuse them where that matters.
pub fn pinned_client(expected: PublicKey) -> Result<reqwest::ClientBuilder, QuicError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Identity(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![HTTP1.to_vec()];
    Ok(reqwest::Client::builder().use_preconfigured_tls(tls))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Answers every connection's first request with `hello`, over TLS.
    async fn serve(acceptor: Acceptor) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ =
                        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello").await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn clients_reach_only_the_key_they_pinned() {
        let server = proto::Keypair::generate();
        let acceptor = Acceptor::new(&Identity::new(&server).unwrap()).unwrap();
        let addr = serve(acceptor).await;
        let url = format!("https://{addr}/");
        let wrong = pinned_client(proto::Keypair::generate().public()).unwrap().build().unwrap();
        let err = wrong.get(&url).send().await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let right = pinned_client(server.public()).unwrap().build().unwrap();
        let resp = right.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.text().await.unwrap(), "hello");
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_handshake_budget() {
        let acceptor = Acceptor::new(&Identity::new(&proto::Keypair::generate()).unwrap())
            .unwrap()
            .with_handshake_timeout(Duration::from_millis(200));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let err = acceptor.accept(tcp).await.unwrap_err();
        assert!(err.to_string().contains("not done within 200 ms"), "{err}");
    }
}
