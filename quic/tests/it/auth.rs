//! After authentication the full budget applies: many streams, large frames.

use std::time::Duration;

use quic::{Peers, ServerLimits};

use crate::{HEAVY, authenticate, connect, echo_len, pinned, start};

#[tokio::test(flavor = "multi_thread")]
async fn an_authenticated_peer_gets_the_full_budget() {
    let _heavy = HEAVY.lock().await;
    let server = start(ServerLimits::default(), Peers::Any);
    let conn = connect(&server).await;
    authenticate(&conn).await;
    // Eight streams at once (one before authentication), then a frame 256 times the window
    // before authentication.
    let lens: Vec<u64> = futures_join(&conn, 8).await;
    assert_eq!(lens, (1..=8).map(|i| i * 1000).collect::<Vec<u64>>());
    assert_eq!(echo_len(&conn, 16 << 20).await, 16 << 20);
    assert_eq!(server.endpoint.unauthenticated(), 0);
}

/// Runs `n` echoes on as many streams, all open at the same time.
async fn futures_join(conn: &quic::Connection, n: u64) -> Vec<u64> {
    let mut streams = Vec::new();
    for _ in 0..n {
        let opened = tokio::time::timeout(Duration::from_secs(10), conn.open_bi()).await;
        streams.push(opened.expect("the full budget allows the stream").unwrap());
    }
    for (i, (send, _)) in streams.iter_mut().enumerate() {
        quic::write_msg(send, &vec![0u8; (i + 1) * 1000], crate::BIG_CAP).await.unwrap();
    }
    let mut lens = Vec::new();
    for (_, recv) in &mut streams {
        lens.push(quic::read_msg::<u64>(recv, 1024).await.unwrap().unwrap());
    }
    lens
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_key_is_authenticated_by_the_handshake() {
    let client_key = proto::Keypair::generate();
    let limits = ServerLimits::default().auth_timeout(Duration::from_millis(500));
    let server = start(limits, pinned(&[client_key.public()]));
    let endpoint = quic::client(crate::loopback()).unwrap();
    let identity = quic::Identity::new(&client_key).unwrap();
    let conn = quic::connect(&endpoint, &identity, server.addr, server.key).await.unwrap();
    assert_eq!(futures_join(&conn, 4).await, vec![1000, 2000, 3000, 4000]);
    // Well past the deadline, the connection is still there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert_eq!(echo_len(&conn, 10).await, 10);
    assert_eq!(server.endpoint.unauthenticated(), 0);
}
