//! The `quic` crate's integration tests: one binary, a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod auth;
mod budget;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::{Keypair, PublicKey};
use quic::{Connection, Endpoint, Identity, Peers, ServerLimits};

/// The cap of frames after authentication in these tests.
const BIG_CAP: usize = 32 << 20;

/// Tests that measure this process's memory, or move large frames, take this so that they do not
/// run at the same time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A miniature session port: the first message is the "ticket". `"ticket"` authenticates the
/// peer, which may then send frames up to `BIG_CAP` on any stream and hears back their length;
/// `"wait"` makes the server busy for a long time without reading (as if checking an escrow on a
/// slow chain) and without authenticating; anything else, or a first frame over the cap, is
/// refused with the reason.
struct Server {
    endpoint: Endpoint,
    addr: SocketAddr,
    key: PublicKey,
}

fn start(limits: ServerLimits, peers: Peers) -> Server {
    let key = Keypair::generate();
    let identity = Identity::new(&key).unwrap();
    let endpoint = quic::server_with(&identity, loopback(), peers, limits).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    serve(conn).await;
                }
            });
        }
    });
    Server { endpoint, addr, key: key.public() }
}

async fn serve(conn: Connection) {
    if !conn.is_authenticated() {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
        match quic::read_first_msg::<String>(&mut recv, quic::FIRST_FRAME_CAP, quic::AUTH_TIMEOUT).await {
            Ok(Some(ticket)) if ticket == "ticket" => {
                conn.authenticated();
                let _ = quic::write_msg(&mut send, &format!("welcome {}", conn.is_authenticated()), 1024).await;
            }
            Ok(Some(ticket)) if ticket == "wait" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            Ok(other) => {
                conn.close(1u32.into(), format!("refused: {other:?}").as_bytes());
                return;
            }
            Err(e) => {
                conn.close(1u32.into(), format!("refused: {e}").as_bytes());
                return;
            }
        }
    }
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            while let Ok(Some(msg)) = quic::read_msg::<Vec<u8>>(&mut recv, BIG_CAP).await {
                if quic::write_msg(&mut send, &(msg.len() as u64), 1024).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn connect(server: &Server) -> Connection {
    let endpoint = quic::client(loopback()).unwrap();
    let identity = Identity::new(&Keypair::generate()).unwrap();
    quic::connect(&endpoint, &identity, server.addr, server.key).await.unwrap()
}

/// Shows the ticket and checks the welcome.
async fn authenticate(conn: &Connection) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    quic::write_msg(&mut send, &"ticket".to_string(), 1024).await.unwrap();
    let welcome: Option<String> = quic::read_msg(&mut recv, 1024).await.unwrap();
    assert_eq!(welcome.as_deref(), Some("welcome true"));
}

/// Sends `len` bytes as one frame on a new stream and returns the length the server read.
async fn echo_len(conn: &Connection, len: usize) -> u64 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    quic::write_msg(&mut send, &vec![7u8; len], BIG_CAP).await.unwrap();
    send.finish().unwrap();
    quic::read_msg::<u64>(&mut recv, 1024).await.unwrap().unwrap()
}

/// This process's resident memory, from /proc (Linux).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: still not so after 10 s");
}

fn pinned(keys: &[PublicKey]) -> Peers {
    Peers::Only(Arc::new(keys.iter().copied().collect()))
}
