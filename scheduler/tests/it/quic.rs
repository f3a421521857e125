//! The scheduler's QUIC endpoint against misbehaving peers: oversized and malformed frames are
//! refused, that connection is closed, and the scheduler goes on serving everyone else.

use std::net::SocketAddr;
use std::time::Duration;

use proto::Keypair;
use proto::frame::CONTROL_CAP;
use proto::msg::{HostMsg, Price, SchedulerMsg};
use quic::Identity;

async fn start() -> (scheduler::Listening, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let listening = scheduler::start(scheduler::SchedulerConfig {
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        plain_http: false,
        renter_limits: None,
        quic: SocketAddr::from(([127, 0, 0, 1], 0)),
        keypair: Keypair::generate(),
        providers: None,
        db: dir.path().join("db"),
        state: scheduler::Config::default(),
    })
    .await
    .unwrap();
    (listening, dir)
}

async fn connect(l: &scheduler::Listening) -> quic::Connection {
    let endpoint = quic::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let id = Identity::new(&Keypair::generate()).unwrap();
    quic::connect(&endpoint, &id, l.quic, l.key).await.unwrap()
}

fn register(name: &str) -> HostMsg {
    HostMsg::Register {
        name: name.into(),
        region: "eu".into(),
        gpus: vec![],
        price: Price { per_gpu_second: 1, per_inference: 1 },
        capacity: 1,
        session_addr: None,
        session_capacity: 1,
    }
}

async fn get(l: &scheduler::Listening, path: &str) -> serde_json::Value {
    let http = quic::https::pinned_client(l.key).unwrap().build().unwrap();
    http.get(format!("{}{path}", l.url())).send().await.unwrap().json().await.unwrap()
}

async fn providers(l: &scheduler::Listening) -> Vec<serde_json::Value> {
    serde_json::from_value(get(l, "/v1/providers").await).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_close_only_their_connection() {
    let (l, _dir) = start().await;

    // A length prefix far over the cap: refused before any body is read.
    let oversized = connect(&l).await;
    let (mut send, _recv) = oversized.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    send.write_all(&[0u8; 64]).await.unwrap();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), oversized.closed()).await.expect("the scheduler closes it");
    assert!(!closed.to_string().is_empty());

    // Garbage after a valid length: malformed, refused.
    let malformed = connect(&l).await;
    let (mut send, _recv) = malformed.open_bi().await.unwrap();
    send.write_all(&8u32.to_be_bytes()).await.unwrap();
    send.write_all(&[proto::PROTOCOL_VERSION, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), malformed.closed()).await.expect("the scheduler closes it");

    // Another wire version: refused with the reason.
    let foreign = connect(&l).await;
    let (mut send, _recv) = foreign.open_bi().await.unwrap();
    send.write_all(&2u32.to_be_bytes()).await.unwrap();
    send.write_all(&[99, 0]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), foreign.closed()).await.expect("the scheduler closes it");

    // A good provider registers all the while.
    let good = connect(&l).await;
    let (mut send, mut recv) = good.open_bi().await.unwrap();
    quic::write_msg(&mut send, &register("good"), CONTROL_CAP).await.unwrap();
    let reply: Option<SchedulerMsg> = quic::read_msg(&mut recv, CONTROL_CAP).await.unwrap();
    assert!(matches!(reply, Some(SchedulerMsg::Registered { .. })), "{reply:?}");
    // A heartbeat over the cap from the registered provider closes it too.
    let list = providers(&l).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "good");
    assert_eq!(list[0]["online"], true);
    send.write_all(&((CONTROL_CAP as u32) + 1).to_be_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), good.closed()).await.expect("the scheduler closes it");
    let list = providers(&l).await;
    assert_eq!(list[0]["online"], false, "a closed provider is offline at once");

    // And the HTTP side never noticed.
    let info = get(&l, "/v1/info").await;
    assert_eq!(info["key"], l.key.to_string());
}
