//! Peers that have not authenticated get a small fixed budget: one stream, a small window, a
//! small first frame, and a deadline.

use std::time::Duration;

use quic::{Budget, Peers, ServerLimits};

use crate::{HEAVY, authenticate, connect, echo_len, eventually, resident_bytes, start};

const CHUNK: usize = 16 << 10;

/// Writes `CHUNK`s on `send` until one does not go through within a second (flow control holds
/// it) or `limit` bytes are written; returns the bytes written.
async fn push(send: &mut quic::SendStream, limit: usize) -> usize {
    let chunk = [0xabu8; CHUNK];
    let mut written = 0;
    while written < limit {
        match tokio::time::timeout(Duration::from_secs(1), send.write_all(&chunk)).await {
            Ok(Ok(())) => written += CHUNK,
            _ => break,
        }
    }
    written
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_get_the_budget_and_a_good_peer_is_still_served() {
    let _heavy = HEAVY.lock().await;
    let server = start(ServerLimits::default(), Peers::Any);
    let window = Budget::BEFORE_AUTH.receive_window as usize;
    let before = resident_bytes();

    // Strangers whose first message keeps the server busy push as much as they can behind it
    // and try to open more streams. Without the budget each could make the server buffer 16 MiB
    // (the stream window) per stream.
    let mut pushing = Vec::new();
    for _ in 0..8 {
        let conn = connect(&server).await;
        pushing.push(tokio::spawn(async move {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            quic::write_msg(&mut send, &"wait".to_string(), 1024).await.unwrap();
            let pushed = push(&mut send, 16 << 20).await;
            let more = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
            (conn, send, recv, pushed, matches!(more, Ok(Ok(_))))
        }));
    }
    let mut strangers = Vec::new();
    for task in pushing {
        let (conn, send, recv, pushed, opened_more) = task.await.unwrap();
        assert!(pushed <= window, "a stranger got {pushed} bytes past a {window}-byte window");
        assert!(pushed >= window / 2, "the window lets the first {pushed} bytes through");
        assert!(!opened_more, "a second stream opened before authentication");
        strangers.push((conn, send, recv));
    }
    assert_eq!(server.endpoint.unauthenticated(), 8);
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < 24 << 20, "8 strangers grew this process by {grown} bytes");

    // A first frame over the cap is refused on its length alone.
    let big = connect(&server).await;
    let (mut send, _recv) = big.open_bi().await.unwrap();
    send.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
    let _ = push(&mut send, 1 << 20).await;
    let why = tokio::time::timeout(Duration::from_secs(10), big.closed()).await.expect("the server closes it");
    assert!(why.to_string().contains("exceeds the cap"), "{why}");

    // A good peer is served meanwhile, with its full budget.
    let good = connect(&server).await;
    authenticate(&good).await;
    assert_eq!(echo_len(&good, 16 << 20).await, 16 << 20);

    // The strangers are closed at the deadline, and their places given back.
    for (conn, _, _) in &strangers {
        let why = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.expect("closed at the deadline");
        assert!(why.to_string().contains("not authenticated in time"), "{why}");
    }
    eventually("places given back", || server.endpoint.unauthenticated() == 0).await;
    assert!(good.close_reason().is_none(), "the good peer stays");
    assert_eq!(echo_len(&good, 1000).await, 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_peer_is_closed_at_the_deadline() {
    let server = start(ServerLimits::default().auth_timeout(Duration::from_secs(1)), Peers::Any);
    // One never opens a stream; one sends half a first frame and stalls.
    let silent = connect(&server).await;
    let slow = connect(&server).await;
    let (mut send, _recv) = slow.open_bi().await.unwrap();
    send.write_all(&100u32.to_be_bytes()).await.unwrap();
    send.write_all(&[1, 2, 3]).await.unwrap();
    for conn in [&silent, &slow] {
        let why = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.expect("closed at the deadline");
        assert!(why.to_string().contains("not authenticated in time"), "{why}");
    }
    // A wrong ticket is refused at once.
    let wrong = connect(&server).await;
    let (mut send, _recv) = wrong.open_bi().await.unwrap();
    quic::write_msg(&mut send, &"forged".to_string(), 1024).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(10), wrong.closed()).await.expect("refused");
    assert!(why.to_string().contains("refused"), "{why}");
    eventually("places given back", || server.endpoint.unauthenticated() == 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_of_those_waiting_are_refused() {
    let limits = ServerLimits::default().max_unauthenticated(4).auth_timeout(Duration::from_secs(2));
    let server = start(limits, Peers::Any);
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(connect(&server).await);
    }
    assert_eq!(server.endpoint.unauthenticated(), 4);
    let endpoint = quic::client(crate::loopback()).unwrap();
    let identity = quic::Identity::new(&proto::Keypair::generate()).unwrap();
    let refused = quic::connect(&endpoint, &identity, server.addr, server.key).await;
    assert!(refused.is_err(), "a fifth connection waiting for authentication was let in");
    // Once the silent ones are gone there is room again, and an authenticated peer gives its
    // place back at once.
    for conn in &waiting {
        tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.expect("closed at the deadline");
    }
    eventually("places given back", || server.endpoint.unauthenticated() == 0).await;
    let good = connect(&server).await;
    authenticate(&good).await;
    assert_eq!(server.endpoint.unauthenticated(), 0);
    assert_eq!(echo_len(&good, 10).await, 10);
}

#[test]
fn limits_are_checked_against_each_other() {
    let identity = quic::Identity::new(&proto::Keypair::generate()).unwrap();
    let bad = [
        ServerLimits::default().before_auth(Budget { receive_window: 1 << 30, bidi_streams: 1 }),
        ServerLimits::default().before_auth(Budget { receive_window: 1 << 10, bidi_streams: 0 }),
        ServerLimits::default().auth_timeout(Duration::ZERO),
        ServerLimits::default().max_unauthenticated(0),
        ServerLimits::default().stream_receive_window(0),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    for limits in bad {
        let err = quic::server_with(&identity, crate::loopback(), Peers::Any, limits.clone()).unwrap_err();
        assert!(matches!(err, quic::QuicError::Limits(_)), "{limits:?}: {err}");
    }
}
