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
        price: Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 },
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

/// A request to the scheduler's HTTPS API signed by `key`.
async fn signed_http(
    l: &scheduler::Listening,
    key: &Keypair,
    method: reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> (reqwest::StatusCode, Vec<u8>) {
    let http = quic::https::pinned_client(l.key).unwrap().build().unwrap();
    let mut req = http.request(method.clone(), format!("{}{path}", l.url()));
    for (name, value) in proto::httpsig::sign(key, method.as_str(), path, &body, crate::now_secs(), crate::nonce()) {
        req = req.header(name, value);
    }
    if body.first() == Some(&b'{') {
        req = req.header("content-type", "application/json");
    }
    let resp = req.body(body).send().await.unwrap();
    (resp.status(), resp.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_record_shows_as_paid_only_what_the_renters_own_voucher_signed() {
    use proto::voucher::{ChannelRef, Voucher};
    let (l, _dir) = start().await;
    // A provider serving sessions, over the real endpoint, that will lie in its reports.
    let provider = Keypair::generate();
    let endpoint = quic::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let conn = quic::connect(&endpoint, &Identity::new(&provider).unwrap(), l.quic, l.key).await.unwrap();
    let (mut control, mut replies) = conn.open_bi().await.unwrap();
    let register = HostMsg::Register {
        name: "liar".into(),
        region: "eu".into(),
        gpus: vec![crate::gpu()],
        price: Price { per_gpu_second: 1, per_inference: 3, per_net_gib: 0 },
        capacity: 1,
        session_addr: Some("127.0.0.1:9".into()),
        session_capacity: 4,
    };
    quic::write_msg(&mut control, &register, CONTROL_CAP).await.unwrap();
    let reply: Option<SchedulerMsg> = quic::read_msg(&mut replies, CONTROL_CAP).await.unwrap();
    assert!(matches!(reply, Some(SchedulerMsg::Registered { .. })), "{reply:?}");

    // A renter's session on it.
    let renter = Keypair::generate();
    let (status, body) =
        signed_http(&l, &renter, reqwest::Method::POST, "/v1/modules", b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let module: proto::api::ModuleUploaded = serde_json::from_slice(&body).unwrap();
    let open = serde_json::to_vec(&serde_json::json!({ "module": module.module, "renter": renter.public() })).unwrap();
    let (status, body) = signed_http(&l, &renter, reqwest::Method::POST, "/v1/sessions", open).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let grant: proto::api::SessionGrant = serde_json::from_slice(&body).unwrap();
    let session_id = grant.ticket.session_id;
    let sid: String = session_id.iter().map(|b| format!("{b:02x}")).collect();

    let mut receipts = proto::receipt::Signer::new(session_id, renter.public(), grant.ticket.price_per_inference);
    let call = proto::receipt::Counts { inferences: 1, ..Default::default() };
    let first = receipts.next(&provider, &call, b"q", b"a");
    let second = receipts.next(&provider, &call, b"q", b"a");
    let channel =
        ChannelRef { program: proto::Address([4; 32]), mint: Keypair::generate().public(), id: 0, generation: 1 };
    let voucher = |by: &Keypair, c: &ChannelRef, r: &proto::receipt::Receipt| Voucher {
        cumulative: r.amount_due,
        receipt_digest: r.digest(),
        signature: by.sign(&c.message(&renter.public(), &provider.public(), r.amount_due, &r.digest())),
    };
    let report = |receipt: &proto::receipt::Receipt, vouched: Option<(ChannelRef, Voucher)>| {
        HostMsg::SessionReport(Box::new(proto::msg::SessionReport {
            session_id,
            receipt: Some(receipt.clone()),
            vouched: vouched.map(|(channel, voucher)| {
                Box::new(proto::msg::SessionVouched { channel, receipt: receipt.clone(), voucher })
            }),
            settlements: Vec::new(),
            closed: false,
        }))
    };
    // Its own signature as the renter's voucher; the renter's voucher for another channel; a
    // voucher for the first receipt passed off as the second's: none counts as paid.
    let lies = [
        report(&second, Some((channel, voucher(&provider, &channel, &second)))),
        report(&second, Some((channel, voucher(&renter, &ChannelRef { id: 9, ..channel }, &second)))),
        report(&second, Some((channel, voucher(&renter, &channel, &first)))),
    ];
    for lie in &lies {
        quic::write_msg(&mut control, lie, CONTROL_CAP).await.unwrap();
    }
    // Reports are taken in order: once the next one shows, the lies were read.
    quic::write_msg(&mut control, &report(&first, None), CONTROL_CAP).await.unwrap();
    let record = |want: fn(&serde_json::Value) -> bool| {
        let (l, renter, sid) = (&l, &renter, &sid);
        async move {
            let mut v = serde_json::Value::Null;
            for _ in 0..100 {
                let path = format!("/v1/sessions/{sid}");
                let (status, body) = signed_http(l, renter, reqwest::Method::GET, &path, Vec::new()).await;
                assert_eq!(status, 200);
                v = serde_json::from_slice(&body).unwrap();
                if want(&v) {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the session record never showed what was reported: {v}");
        }
    };
    let v = record(|v| v["receipts"] == 1).await;
    assert_eq!((v["vouched"].as_u64(), v["channel"].is_null()), (Some(0), true), "{v}");
    // The renter's own voucher for the receipt it answers counts, and names the channel.
    quic::write_msg(&mut control, &report(&second, Some((channel, voucher(&renter, &channel, &second)))), CONTROL_CAP)
        .await
        .unwrap();
    let v = record(|v| v["vouched"] == 6).await;
    assert_eq!(v["channel"], channel.address(&renter.public(), &provider.public()).to_string(), "{v}");
    assert_eq!(v["receipts"], 2);
}

/// A provider on its own QUIC connection, registered; its control stream.
async fn provider_at(
    l: &scheduler::Listening,
    key: &Keypair,
    name: &str,
    session_addr: Option<&str>,
) -> (quic::Endpoint, quic::Connection, quic::SendStream, quic::RecvStream) {
    let endpoint = quic::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let conn = quic::connect(&endpoint, &Identity::new(key).unwrap(), l.quic, l.key).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let register = HostMsg::Register {
        name: name.into(),
        region: "eu".into(),
        gpus: vec![crate::gpu()],
        price: Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 },
        capacity: 1,
        session_addr: session_addr.map(String::from),
        session_capacity: 1,
    };
    quic::write_msg(&mut send, &register, CONTROL_CAP).await.unwrap();
    let reply: Option<SchedulerMsg> = quic::read_msg(&mut recv, CONTROL_CAP).await.unwrap();
    assert!(matches!(reply, Some(SchedulerMsg::Registered { .. })), "{reply:?}");
    (endpoint, conn, send, recv)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_providers_round_trips_are_taken_only_for_the_peers_it_was_asked_about() {
    use proto::msg::LinkRtt;
    let (l, _dir) = start().await;
    let (first, second) = (Keypair::generate(), Keypair::generate());
    let (_e1, _c1, mut control1, _r1) = provider_at(&l, &first, "first", Some("127.0.0.1:9")).await;
    let (_e2, _c2, mut control2, mut replies2) = provider_at(&l, &second, "second", None).await;
    // The newcomer is asked to measure its link to the provider already there.
    let asked: Option<SchedulerMsg> = quic::read_msg(&mut replies2, CONTROL_CAP).await.unwrap();
    let Some(SchedulerMsg::MeasureLinks { peers }) = asked else { panic!("expected MeasureLinks, got {asked:?}") };
    assert_eq!(peers.iter().map(|p| p.key).collect::<Vec<_>>(), vec![first.public()]);
    assert_eq!(peers[0].addr, "127.0.0.1:9");
    let links = |measured: Vec<LinkRtt>| HostMsg::Links { measured };
    let rtt = |peer: &Keypair, us: u32| LinkRtt { peer: peer.public(), rtt_us: Some(us) };
    // A provider nobody asked, a peer it was not asked about, one twice, a round trip past a
    // minute: each report is refused whole (had one been taken, the honest one below would be
    // refused as answered already, and the link would read otherwise).
    quic::write_msg(&mut control1, &links(vec![rtt(&second, 1_000)]), CONTROL_CAP).await.unwrap();
    for lie in [
        vec![rtt(&first, 1_000), rtt(&Keypair::generate(), 1)],
        vec![rtt(&first, 1_000), rtt(&first, 2_000)],
        vec![rtt(&first, 61_000_000)],
    ] {
        quic::write_msg(&mut control2, &links(lie), CONTROL_CAP).await.unwrap();
    }
    // The honest answer is taken, and shows at both ends.
    quic::write_msg(&mut control2, &links(vec![rtt(&first, 6_500)]), CONTROL_CAP).await.unwrap();
    let mut shown = serde_json::Value::Null;
    for _ in 0..100 {
        shown = serde_json::Value::Array(providers(&l).await);
        if shown.as_array().unwrap().iter().any(|p| !p["links"].as_array().unwrap().is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let links_of = |key: &Keypair| {
        shown.as_array().unwrap().iter().find(|p| p["key"] == key.public().to_string()).unwrap()["links"].clone()
    };
    let want = |peer: &Keypair| serde_json::json!([{ "peer": peer.public().to_string(), "rtt_ms": 7 }]);
    assert_eq!(links_of(&second), want(&first), "{shown}");
    assert_eq!(links_of(&first), want(&second), "{shown}");
}

/// A provider that runs whatever member of a cluster it is sent: it checks the roster against
/// the scheduler's key, says it started and answers `rank N`. Heartbeats until dropped.
async fn member_provider(l: scheduler::Listening, key: Keypair, name: &'static str) -> proto::cluster::MemberAssign {
    use proto::msg::{BLOB_CAP, JobMsg, JobReply};
    let (_endpoint, conn, mut control, _replies) = provider_at(&l, &key, name, Some("127.0.0.1:9")).await;
    let _beat = tokio::spawn(async move {
        let beat = HostMsg::Heartbeat { running: 1, sessions: 0, session_room: None };
        while quic::write_msg(&mut control, &beat, CONTROL_CAP).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let run: Option<JobMsg> = quic::read_msg(&mut recv, BLOB_CAP).await.unwrap();
    let Some(JobMsg::Run { job_id, member: Some(member), .. }) = run else { panic!("not a member's run: {run:?}") };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert_eq!(member.roster.check(&l.key, &key.public(), now), Ok(vec![member.rank]), "{name}");
    assert!(job_id.starts_with(&member.roster.job_id) && job_id.ends_with(&format!("-r{}", member.rank)));
    quic::write_msg(&mut send, &JobReply::Started, CONTROL_CAP).await.unwrap();
    let result = proto::msg::JobResult {
        outcome: proto::msg::Outcome::Succeeded,
        output: format!("rank {}", member.rank).into_bytes(),
        log: Vec::new(),
        usage: proto::msg::WireUsage { fuel: 10, ..Default::default() },
        wall_time_ms: 5,
        wall_time_us: 5_000,
        first_dispatch_us: None,
        receipt: None,
    };
    quic::write_msg(&mut send, &JobReply::Finished(Box::new(result)), BLOB_CAP).await.unwrap();
    let _ = send.finish();
    // Keep the connection until the scheduler has taken the result (it stops the stream then).
    let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    drop(recv);
    *member
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_job_runs_over_the_real_endpoints_one_member_per_provider_with_a_signed_roster() {
    let (l, _dir) = start().await;
    let members = [
        tokio::spawn(member_provider(l.clone(), Keypair::generate(), "a")),
        tokio::spawn(member_provider(l.clone(), Keypair::generate(), "b")),
    ];
    // Both registered before the cluster is submitted.
    for _ in 0..100 {
        if providers(&l).await.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renter = Keypair::generate();
    let (status, body) =
        signed_http(&l, &renter, reqwest::Method::POST, "/v1/modules", b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let module: proto::api::ModuleUploaded = serde_json::from_slice(&body).unwrap();
    let submit = serde_json::json!({ "module": module.module, "cluster": { "gpus": 2 } });
    let (status, body) =
        signed_http(&l, &renter, reqwest::Method::POST, "/v1/jobs", serde_json::to_vec(&submit).unwrap()).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let id = serde_json::from_slice::<proto::api::Submitted>(&body).unwrap().id;
    let mut ranks = Vec::new();
    for m in members {
        let m = tokio::time::timeout(Duration::from_secs(20), m).await.expect("every member is sent").unwrap();
        assert_eq!(m.roster.job_id, id);
        ranks.push(m.rank);
    }
    ranks.sort();
    assert_eq!(ranks, vec![0, 1]);
    // The cluster ends once both have; a long poll answers as members change.
    let mut view = serde_json::Value::Null;
    for _ in 0..20 {
        let path = format!("/v1/jobs/{id}?wait_ms=2000&state=running");
        let (status, body) = signed_http(&l, &renter, reqwest::Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200);
        view = serde_json::from_slice(&body).unwrap();
        if view["state"] == "succeeded" {
            break;
        }
    }
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["usage"]["fuel"], 20, "{view}");
    let members = view["cluster"]["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m["state"] == "succeeded"), "{view}");
    let (status, out) =
        signed_http(&l, &renter, reqwest::Method::GET, &format!("/v1/jobs/{id}/output"), Vec::new()).await;
    assert_eq!((status.as_u16(), out.as_slice()), (200, &b"rank 0"[..]));
    // Each member reads like any job of the renter's, and like nothing to anyone else.
    let child = members[1]["job_id"].as_str().unwrap();
    let (status, body) = signed_http(&l, &renter, reqwest::Method::GET, &format!("/v1/jobs/{child}"), Vec::new()).await;
    assert_eq!(status, 200);
    let child_view: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (child_view["member_of"].as_str(), child_view["state"].as_str()),
        (Some(id.as_str()), Some("succeeded"))
    );
    let stranger = Keypair::generate();
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{child}"), format!("/v1/jobs/{child}/output")] {
        let (status, _) = signed_http(&l, &stranger, reqwest::Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 404, "{path}");
    }
}
