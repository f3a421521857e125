//! The hostile suite through a real scheduler and a real provider daemon (not `wasmgrid run`):
//! each case is contained with its named error, the daemon stays alive with the same pid and
//! bounded memory, and a good job is served right after.

use std::time::{Duration, Instant};

use serde_json::Value;

use proto::msg::{SessionMsg, SessionReply};

use super::market::{Market, Sched, get_json, online, runtime};

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The direct children of a process (its workers, for a daemon).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU ticks a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; after the name, 12 and 13 (0-based 11, 12).
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn input(m: &Market, case: &str) -> String {
    let path = m.path(&format!("case-{}", case.replace(' ', "-")));
    std::fs::write(&path, case).unwrap();
    path.to_str().unwrap().to_string()
}

fn hostile(m: &Market, s: &Sched, case: &str, extra: &[&str]) -> Value {
    let file = input(m, case);
    let mut args = vec!["--input", file.as_str(), "--wait"];
    args.extend_from_slice(extra);
    m.submit(s, sample_artifacts::HOSTILE, &args)
}

fn failure(job: &Value) -> (String, String, String) {
    let f = &job["outcome"]["Failed"];
    assert!(f.is_object(), "the job did not fail: {job}");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&f["kind"]), text(&f["limit"]), text(&f["message"]))
}

/// A good job, served right after a hostile one.
fn good_job(m: &Market, s: &Sched) {
    let job = m.submit(s, sample_artifacts::MATMUL, &["--wait"]);
    assert_eq!(job["state"], "succeeded", "a good job after a hostile one: {job}");
}

#[test]
fn hostile_jobs_through_the_daemon_cost_their_worker_never_the_daemon() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (host, _) = m.host(&s, "target", &["--warm-workers", "1"]);
    online(&s, 1);
    let pid = host.child.id();
    good_job(&m, &s);
    let rss_before = rss_kib(pid);

    // A kernel that sleeps (WASI poll_oneoff) past its wall time is stopped at it.
    let t = Instant::now();
    let job = hostile(&m, &s, "sleep 10000", &["--wall-time", "1s"]);
    let (kind, limit, _) = failure(&job);
    assert_eq!((kind.as_str(), limit.as_str()), ("limit", "wall-time"), "{job}");
    assert!(t.elapsed() < Duration::from_secs(30), "a 1 s sleep limit took {:?}", t.elapsed());
    good_job(&m, &s);

    // A kernel that panics: a trap, named, and its worker replaced.
    let job = hostile(&m, &s, "panic", &[]);
    let (kind, _, message) = failure(&job);
    assert_eq!(kind, "trap", "{job}");
    assert!(message.contains("crashed") && message.contains("hostile::main"), "{message}");
    good_job(&m, &s);

    // A shader too deep for the compiler (the flat sum that once overflowed the daemon's
    // stack) is refused with an error the kernel sees; the job goes on.
    let job = hostile(&m, &s, "wgsl 300000 sum", &[]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let said = job["output"].as_str().unwrap_or_default();
    assert!(said.starts_with("sum 300000 ") && !said.contains(" ok"), "{said}");
    good_job(&m, &s);

    // Writes staged over and over without a submission stay within the job's GPU memory: the
    // worker's host memory is bounded, whatever becomes of the job.
    let job = hostile(&m, &s, "write-flood 64 100", &["--gpu-memory", "256MiB", "--wall-time", "60s"]);
    assert!(matches!(job["state"].as_str(), Some("succeeded" | "failed")), "{job}");
    good_job(&m, &s);

    // A shader that runs past the wall time: the job ends at it, and the worker (whose device
    // still runs the shader) is replaced.
    let t = Instant::now();
    let job = hostile(&m, &s, "long-shader 60000 100", &["--wall-time", "1s"]);
    let (kind, limit, _) = failure(&job);
    assert_eq!((kind.as_str(), limit.as_str()), ("limit", "wall-time"), "{job}");
    assert!(t.elapsed() < Duration::from_secs(30), "a 1 s GPU limit took {:?}", t.elapsed());
    good_job(&m, &s);

    // A worker killed from outside mid-job (the OOM killer, say) fails that job only.
    let workers_before = children(pid);
    let file = input(&m, "loop");
    let submitted = m.submit(&s, sample_artifacts::HOSTILE, &["--input", &file, "--wall-time", "60s"]);
    let id = submitted["id"].as_str().unwrap().to_string();
    let busy = super::market::until("a busy worker", || {
        let before: Vec<(u32, u64)> = children(pid).into_iter().map(|c| (c, cpu_ticks(c))).collect();
        std::thread::sleep(Duration::from_millis(400));
        before.into_iter().find(|&(c, ticks)| cpu_ticks(c) > ticks + 10).map(|(c, _)| c)
    });
    std::process::Command::new("kill").args(["-9", &busy.to_string()]).status().unwrap();
    let job = super::market::until("the job's end", || {
        let job = get_json(&s, &format!("/v1/jobs/{id}"));
        matches!(job["state"].as_str(), Some("succeeded" | "failed")).then_some(job)
    });
    let (kind, _, message) = failure(&job);
    assert_eq!(kind, "crash", "{job}");
    assert!(message.contains("signal 9"), "{message}");
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "a kernel's fault is not re-run: {job}");
    good_job(&m, &s);
    assert!(!workers_before.is_empty());

    assert!(alive(pid), "the daemon died");
    assert_eq!(host.child.id(), pid);
    let rss_after = rss_kib(pid);
    assert!(rss_after < rss_before + 64 * 1024, "the daemon grew from {rss_before} KiB to {rss_after} KiB");
}

fn session_addr(s: &Sched) -> std::net::SocketAddr {
    let providers = get_json(s, "/v1/providers");
    providers[0]["session_addr"].as_str().unwrap().parse().unwrap()
}

/// Opens a session with a ticket the scheduler granted, by hand: (connection, first reply).
async fn open_with(
    addr: std::net::SocketAddr,
    provider: proto::PublicKey,
    renter: &proto::Keypair,
    ticket: &proto::ticket::Ticket,
    module: &[u8],
) -> (quic::Connection, Option<SessionReply>) {
    let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let id = quic::Identity::new(renter).unwrap();
    let conn = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = SessionMsg::Open { ticket: Box::new(ticket.clone()), channel: None };
    quic::write_msg(&mut send, &open, proto::msg::OPEN_CAP).await.unwrap();
    quic::write_msg(&mut send, &SessionMsg::Init { init_input: Vec::new() }, proto::msg::BLOB_CAP).await.unwrap();
    loop {
        let reply: Option<SessionReply> = quic::read_msg(&mut recv, 1 << 20).await.unwrap();
        match reply {
            Some(SessionReply::NeedModule) => {
                let m = SessionMsg::Module { bytes: module.to_vec() };
                quic::write_msg(&mut send, &m, proto::msg::BLOB_CAP).await.unwrap();
            }
            other => return (conn, other),
        }
    }
}

#[test]
fn sessions_hold_bounded_slots_tickets_open_one_session_and_idle_sessions_end() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let args = ["--sessions", "127.0.0.1:0", "--session-capacity", "2", "--session-idle", "2s"];
    let (host, key) = m.host(&s, "h", &args);
    online(&s, 1);
    let pid = host.child.id();
    let addr = session_addr(&s);
    let provider: proto::PublicKey = key.parse().unwrap();
    let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
    runtime().block_on(async {
        let renter = proto::Keypair::generate();
        let scheduler = s.client(&renter);
        let uploaded = scheduler.upload(echo.clone()).await.unwrap();
        let ask = proto::api::OpenSession {
            module: uploaded.module.clone(),
            renter: renter.public(),
            requirements: Default::default(),
            exclude: Vec::new(),
        };
        // A ticket opens one session: shown again, it is refused before anything runs.
        let grant = scheduler.open_session(&ask).await.unwrap();
        let (first, reply) = open_with(addr, provider, &renter, &grant.ticket, &echo).await;
        assert!(matches!(reply, Some(SessionReply::Opened { .. })), "{reply:?}");
        let (_again, reply) = open_with(addr, provider, &renter, &grant.ticket, &echo).await;
        assert!(
            matches!(&reply, Some(SessionReply::Refused { reason }) if reason.contains("already used")),
            "{reply:?}"
        );
        first.close(0u32.into(), b"done");
        // Its slot comes back once the provider has seen it go (its next heartbeat says so).
        tokio::task::block_in_place(|| {
            super::market::until("the closed session's slot back", || {
                (get_json(&s, "/v1/providers")[0]["sessions"] == 0).then_some(())
            })
        });

        // Two sessions fill the provider; a third is turned away with a reason, at once.
        let open = || {
            let renter = proto::Keypair::from_seed(renter.seed());
            client::Session::open(&scheduler, renter, echo.clone(), Vec::new(), Default::default())
        };
        let a = open().await.unwrap();
        let b = open().await.unwrap();
        assert_eq!(a.infer(b"ab").await.unwrap().response, b"ba");
        assert_eq!(b.infer(b"cd").await.unwrap().response, b"dc");
        let c = open().await;
        let refused = match c {
            Ok(c) => c.infer(b"x").await.map(|_| ()),
            Err(e) => Err(e),
        };
        let why = refused.expect_err("a third session on a provider with two slots").to_string();
        assert!(why.contains("session"), "the reason says sessions are full: {why}");

        // An idle session ends on its own and gives its slot back.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let d = open().await.unwrap();
        assert_eq!(d.infer(b"ef").await.unwrap().response, b"fe", "a slot freed by the idle sessions serves");
    });
    assert!(super::market::log_of(&m, "h.log").contains("idle for"), "the provider says it ended idle sessions");
    assert!(alive(pid));
}

#[test]
fn strangers_without_a_ticket_get_a_small_budget_and_renters_are_still_served() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (host, key) = m.host(&s, "h", &["--sessions", "127.0.0.1:0"]);
    online(&s, 1);
    let pid = host.child.id();
    let addr = session_addr(&s);
    let provider: proto::PublicKey = key.parse().unwrap();
    let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
    let rss_before = rss_kib(pid);
    runtime().block_on(async {
        // Strangers: many streams each, a first frame that claims 16 MiB, then as much junk as
        // the provider will take, and never a ticket.
        let mut strangers = Vec::new();
        for _ in 0..24 {
            let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let id = quic::Identity::new(&proto::Keypair::generate()).unwrap();
            let conn = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
            let c = conn.clone();
            tokio::spawn(async move {
                for _ in 0..16 {
                    let Ok(Ok((mut send, _recv))) = tokio::time::timeout(Duration::from_millis(500), c.open_bi()).await
                    else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let _ = send.write_all(&(16u32 << 20).to_be_bytes()).await;
                        let junk = vec![0x5a; 1 << 20];
                        for _ in 0..16 {
                            if send.write_all(&junk).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            strangers.push((endpoint, conn));
        }
        // Meanwhile a renter with a ticket is served.
        let renter = proto::Keypair::generate();
        let scheduler = s.client(&renter);
        let session = client::Session::open(&scheduler, renter, echo, Vec::new(), Default::default()).await.unwrap();
        for i in 0..20u8 {
            assert_eq!(session.infer(&[i, 1]).await.unwrap().response, vec![1, i]);
        }
        // Strangers are closed once their time to show a ticket is over.
        for (_endpoint, conn) in &strangers {
            tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.expect("a stranger is closed");
        }
    });
    let rss_after = rss_kib(pid);
    assert!(alive(pid), "the daemon died");
    assert!(
        rss_after < rss_before + 48 * 1024,
        "24 strangers grew the daemon from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn a_ticketed_renter_that_stalls_or_sends_empty_streams_does_not_keep_its_slot() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let args =
        ["--sessions", "127.0.0.1:0", "--session-capacity", "1", "--session-idle", "2s", "--upload-timeout", "2s"];
    let (host, key) = m.host(&s, "h", &args);
    online(&s, 1);
    let pid = host.child.id();
    let addr = session_addr(&s);
    let provider: proto::PublicKey = key.parse().unwrap();
    let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
    let rss_before = rss_kib(pid);
    runtime().block_on(async {
        let renter = proto::Keypair::generate();
        let scheduler = s.client(&renter);
        let uploaded = scheduler.upload(echo.clone()).await.unwrap();
        let ask = proto::api::OpenSession {
            module: uploaded.module.clone(),
            renter: renter.public(),
            requirements: Default::default(),
            exclude: Vec::new(),
        };
        let slot_back = || {
            tokio::task::block_in_place(|| {
                super::market::until("the session slot back", || {
                    (get_json(&s, "/v1/providers")[0]["sessions"] == 0).then_some(())
                })
            })
        };
        // A good ticket, then nothing: the slot comes back after the upload timeout.
        let grant = scheduler.open_session(&ask).await.unwrap();
        let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let id = quic::Identity::new(&renter).unwrap();
        let stalled = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
        let (mut send, _recv) = stalled.open_bi().await.unwrap();
        let open = SessionMsg::Open { ticket: Box::new(grant.ticket), channel: None };
        quic::write_msg(&mut send, &open, proto::msg::OPEN_CAP).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), stalled.closed()).await.expect("the stalled renter is closed");
        slot_back();

        // An open session whose renter only opens empty streams, and one request's prefix
        // with most of its body never sent, still ends when idle.
        let grant = scheduler.open_session(&ask).await.unwrap();
        let (conn, reply) = open_with(addr, provider, &renter, &grant.ticket, &echo).await;
        assert!(matches!(reply, Some(SessionReply::Opened { .. })), "{reply:?}");
        let (mut half, _r) = conn.open_bi().await.unwrap();
        half.write_all(&(8u32 << 20).to_be_bytes()).await.unwrap();
        half.write_all(&vec![1u8; 1 << 20]).await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..8 {
            if let Ok(Ok(pair)) = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await {
                streams.push(pair);
            }
        }
        tokio::time::timeout(Duration::from_secs(60), conn.closed()).await.expect("the idle session is closed");
        slot_back();

        // Sixteen requests that claim more than a request may be are refused on their length,
        // one at a time, and the daemon buffers none of them.
        let grant = scheduler.open_session(&ask).await.unwrap();
        let (conn, reply) = open_with(addr, provider, &renter, &grant.ticket, &echo).await;
        assert!(matches!(reply, Some(SessionReply::Opened { .. })), "{reply:?}");
        for _ in 0..16 {
            let c = conn.clone();
            tokio::spawn(async move {
                if let Ok((mut send, _recv)) = c.open_bi().await {
                    let _ = send.write_all(&(64u32 << 20).to_be_bytes()).await;
                    let junk = vec![7u8; 1 << 20];
                    for _ in 0..63 {
                        if send.write_all(&junk).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_now = rss_kib(pid);
        assert!(
            rss_now < rss_before + 64 * 1024,
            "oversized requests grew the daemon from {rss_before} KiB to {rss_now} KiB"
        );
        conn.close(0u32.into(), b"done");
        slot_back();

        // And the provider still serves a renter that behaves.
        let session = client::Session::open(&scheduler, renter, echo, Vec::new(), Default::default()).await.unwrap();
        assert_eq!(session.infer(b"ok").await.unwrap().response, b"ko");
    });
    assert!(alive(pid));
}

#[test]
fn a_worker_that_died_while_idle_is_not_blamed_on_the_next_kernel() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (host, _) = m.host(&s, "h", &["--warm-workers", "1"]);
    online(&s, 1);
    let pid = host.child.id();
    good_job(&m, &s);
    let idle = super::market::until("idle workers", || {
        let c = children(pid);
        (c.len() >= 2).then_some(c)
    });
    for worker in &idle {
        std::process::Command::new("kill").args(["-9", &worker.to_string()]).status().unwrap();
    }
    let job = m.submit(&s, sample_artifacts::MATMUL, &["--wait"]);
    assert_eq!(job["state"], "succeeded", "a job after its provider's idle workers died: {job}");
    assert!(alive(pid));
}
