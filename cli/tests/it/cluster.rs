//! Cluster jobs with real processes on loopback: members on one provider or several, linked
//! directly by QUIC under the scheduler's signed roster; what a hostile dialler gets; what a
//! member's provider killed mid-run does to the job.

use std::time::Duration;

use proto::cluster::{Roster, RosterMember};
use proto::msg::{SessionMsg, SessionReply};
use serde_json::Value;

use crate::market::{Market, get_json, http, log_of, online, runtime, until};

fn numbers_after(out: &str, prefix: &str) -> Vec<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {out}"))
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn write_input(m: &Market, name: &str, text: &str) -> String {
    let path = m.path(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_cluster_job_runs_its_ranks_on_two_providers_and_matches_one_gpu() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_a, key_a) = m.host(&s, "a", &["--sessions", "127.0.0.1:0", "--capacity", "2"]);
    let (_b, key_b) = m.host(&s, "b", &["--sessions", "127.0.0.1:0", "--capacity", "2"]);
    online(&s, 2);
    let input = write_input(&m, "train.txt", "mode=sync steps=40 lr=0.8 samples=512 features=6 seed=11");
    let one = m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &["--input", &input, "--wait"]);
    assert_eq!(one["state"], "succeeded", "{one}");
    let one_out = one["output"].as_str().unwrap().to_string();
    assert!(one_out.contains("members 1"), "{one_out}");
    for gpus in ["2", "4"] {
        let job = m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &["--input", &input, "--gpus", gpus, "--wait"]);
        assert_eq!(job["state"], "succeeded", "{job}");
        let out = job["output"].as_str().unwrap();
        assert!(out.contains(&format!("members {gpus}")), "{out}");
        // The same global batch on 1, 2 or 4 GPUs: the same weights up to the order f32s
        // are added in.
        for (x, y) in numbers_after(out, "weights ").iter().zip(numbers_after(&one_out, "weights ")) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{gpus} members: {out}\n1 member: {one_out}");
        }
        let losses: Vec<f64> = out
            .lines()
            .filter_map(|l| l.strip_prefix("step "))
            .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
            .collect();
        assert!(losses.windows(2).all(|w| w[1] < w[0]), "the loss falls: {losses:?}");
        // The record says who ran which rank, and what each moved.
        let members = job["cluster"]["members"].as_array().unwrap_or_else(|| panic!("{job}"));
        assert_eq!(members.len(), gpus.parse::<usize>().unwrap());
        for (rank, member) in members.iter().enumerate() {
            assert_eq!(member["rank"], rank, "{job}");
            assert_eq!(member["state"], "succeeded");
            let p = member["provider"].as_str().unwrap();
            assert!(p == key_a || p == key_b, "{member}");
            assert!(member["usage"]["net_bytes_sent"].as_u64().unwrap() > 0, "{member}");
        }
        if gpus == "2" {
            // Two providers with a free GPU each, or one with two: either way every rank ran.
            let providers: std::collections::HashSet<&str> =
                members.iter().map(|m| m["provider"].as_str().unwrap()).collect();
            assert!(!providers.is_empty());
        }
    }
}

#[test]
fn a_host_offers_each_of_its_gpus_and_a_cluster_on_it_runs_one_rank_per_gpu_billing_no_bytes() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    // Naming a GPU that is not there, or one twice, is bad input before anything starts.
    for (bad, want) in [(&["--gpu", "99"][..], "GPU adapter(s)"), (&["--gpu", "0", "--gpu", "0"][..], "named twice")] {
        let mut args = vec!["host", "--scheduler", &s.quic, "--scheduler-key", &s.key];
        args.extend_from_slice(bad);
        let out = m.cmd(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // This machine's software adapter through Vulkan and through OpenGL: two adapters, each
    // opened by workers of its own. Bytes between ranks are priced but never cross a network.
    let (_h, _) = m.host(&s, "h", &["--gpu", "0", "--gpu", "1", "--capacity", "2", "--price-per-net-gib", "1000"]);
    online(&s, 1);
    let providers = get_json(&s, "/v1/providers");
    let gpus = providers[0]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{providers}");
    let input = write_input(&m, "train.txt", "mode=sync steps=30 lr=0.8 samples=256 features=4 seed=5");
    let one = m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &["--input", &input, "--wait"]);
    assert_eq!(one["state"], "succeeded", "{one}");
    let job =
        m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &["--input", &input, "--gpus", "2", "--one-provider", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let members = job["cluster"]["members"].as_array().unwrap();
    let on: std::collections::HashSet<u64> = members.iter().map(|m| m["gpu"].as_u64().unwrap()).collect();
    assert_eq!(on, std::collections::HashSet::from([0, 1]), "one rank per GPU: {job}");
    for (x, y) in numbers_after(job["output"].as_str().unwrap(), "weights ")
        .iter()
        .zip(numbers_after(one["output"].as_str().unwrap(), "weights "))
    {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{job}\n{one}");
    }
    for member in members {
        let view = get_json(&s, &format!("/v1/jobs/{}", member["job_id"].as_str().unwrap()));
        assert!(view["usage"]["net_bytes_sent"].as_u64() > Some(0), "{view}");
        assert_eq!(view["receipt"]["net_bytes"], 0, "handed over in memory, not billed: {view}");
    }
    // The host's log says it opened both.
    let log = log_of(&m, "h.log");
    assert!(log.contains("GPU 0: ") && log.contains("GPU 1: "), "{log}");
}

#[test]
fn a_members_provider_killed_mid_run_and_the_cluster_finishes_from_its_checkpoint_on_others() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (a, key_a) = m.host(&s, "a", &["--sessions", "127.0.0.1:0"]);
    let (b, key_b) = m.host(&s, "b", &["--sessions", "127.0.0.1:0"]);
    let (c, key_c) = m.host(&s, "c", &["--sessions", "127.0.0.1:0"]);
    online(&s, 3);
    let mut hosts = [(a, key_a), (b, key_b), (c, key_c)];
    // Long enough that the kill lands mid-run; rank 0 saves every 50 steps.
    let input =
        write_input(&m, "train.txt", "mode=sync steps=1500 lr=0.5 samples=256 features=4 report=300 checkpoint=50");
    let submitted = m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &["--input", &input, "--gpus", "2"]);
    let id = submitted["id"].as_str().unwrap().to_string();
    // Killed once the scheduler holds a checkpoint of the running try.
    let (running, saved) = until("both members to run and a checkpoint to be kept", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        let members = v["cluster"]["members"].as_array()?.clone();
        let step = v["checkpoint"]["step"].as_u64().filter(|&s| s > 0)?;
        (members.len() == 2 && members.iter().all(|m| m["state"] == "running")).then_some((members, step))
    });
    let victim_key = running[1]["provider"].as_str().unwrap().to_string();
    let at = hosts.iter().position(|(_, k)| *k == victim_key).unwrap();
    hosts[at].0.kill9();
    let view = until("the cluster to finish", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        v["state"].as_str().is_some_and(|st| st != "queued" && st != "running").then_some(v)
    });
    assert_eq!(view["state"], "succeeded", "{view}");
    assert!(view["cluster"]["tries"].as_u64().unwrap() >= 2, "{view}");
    for member in view["cluster"]["members"].as_array().unwrap() {
        assert_ne!(member["provider"], victim_key.as_str(), "the retry avoids the dead provider: {view}");
    }
    // The first try ended for the dead member's provider, and said so; the last one resumed
    // from the newest checkpoint the first had saved, rank 0's.
    let first = view["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(first.contains("rank 1") && first.contains(&victim_key), "{view}");
    assert_eq!(view["attempts"][0]["resumed_from_step"], Value::Null, "{view}");
    let resumed = view["attempts"].as_array().unwrap().last().unwrap()["resumed_from_step"].as_u64();
    assert!(resumed.is_some_and(|r| r >= saved && r % 50 == 0 && r < 1500), "{view}");
    assert_eq!(view["checkpoint"]["rank"], 0, "{view}");
    // And it ended exactly as a run that was never stopped does.
    let (status, out) = http(&s, "GET", &format!("/v1/jobs/{id}/output"), None, b"");
    assert_eq!(status, 200, "{out}");
    let whole = m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &["--input", &input, "--gpus", "2", "--wait"]);
    assert_eq!(whole["state"], "succeeded", "{whole}");
    assert_eq!(whole["attempts"][0]["resumed_from_step"], Value::Null, "{whole}");
    assert_eq!(out, whole["output"].as_str().unwrap(), "resumed from step {resumed:?}");
}

/// Dials `addr` (pinned to `provider`) as `as_key` and shows `roster` claiming `from_rank`.
fn dial_with(
    addr: std::net::SocketAddr,
    provider: proto::PublicKey,
    as_key: &proto::Keypair,
    roster: &Roster,
    from_rank: u32,
) -> Option<SessionReply> {
    dial_then(addr, provider, as_key, roster, from_rank, &[])
}

/// [`dial_with`], then, once accepted, `junk` written on the link as if it were frames.
fn dial_then(
    addr: std::net::SocketAddr,
    provider: proto::PublicKey,
    as_key: &proto::Keypair,
    roster: &Roster,
    from_rank: u32,
    junk: &[&[u8]],
) -> Option<SessionReply> {
    runtime().block_on(async {
        let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let id = quic::Identity::new(as_key).unwrap();
        let conn = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let hello = SessionMsg::Peer { roster: Box::new(roster.clone()), from_rank };
        quic::write_msg(&mut send, &hello, proto::msg::OPEN_CAP).await.unwrap();
        let reply = quic::read_msg::<SessionReply>(&mut recv, 1 << 20).await.ok().flatten();
        for bytes in junk {
            if send.write_all(bytes).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
        tokio::time::sleep(Duration::from_millis(200)).await;
        reply
    })
}

#[test]
fn forged_rosters_and_peers_it_does_not_name_are_refused_before_any_work() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_h, key) = m.host(&s, "h", &["--sessions", "127.0.0.1:0"]);
    online(&s, 1);
    let providers = get_json(&s, "/v1/providers");
    let addr: std::net::SocketAddr = providers[0]["session_addr"].as_str().unwrap().parse().unwrap();
    let provider: proto::PublicKey = key.parse().unwrap();
    // The scheduler's own key, read from its key file: rosters it would really sign.
    let scheduler = proto::Keypair::read(&m.path("sched.json")).unwrap();
    let (member, outsider, forger) =
        (proto::Keypair::generate(), proto::Keypair::generate(), proto::Keypair::generate());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let ranks = |keys: &[proto::PublicKey]| -> Vec<RosterMember> {
        keys.iter()
            .zip(0u32..)
            .map(|(k, rank)| RosterMember { rank, provider: *k, gpu: 0, addr: Some(addr.to_string()) })
            .collect()
    };
    let genuine = |keys: &[proto::PublicKey], expires: u64| {
        Roster::issue(&scheduler, "job-forged".into(), [3; 32], ranks(keys), expires)
    };
    let mut forged =
        Roster::issue(&forger, "job-forged".into(), [3; 32], ranks(&[member.public(), provider]), now + 60_000);
    forged.scheduler = s.key();
    let cases: Vec<(Roster, &proto::Keypair, u32, &str)> = vec![
        (forged, &member, 0, "signature does not verify"),
        (
            Roster::issue(&forger, "job-forged".into(), [3; 32], ranks(&[member.public(), provider]), now + 60_000),
            &member,
            0,
            "not signed by the scheduler",
        ),
        (genuine(&[member.public(), provider], now.saturating_sub(1000)), &member, 0, "expired"),
        // A roster the scheduler signed, shown by someone it does not name, or by a member
        // claiming another's rank, or for a rank this provider does not run.
        (genuine(&[member.public(), provider], now + 60_000), &outsider, 0, "not a member"),
        (genuine(&[member.public(), outsider.public(), provider], now + 60_000), &member, 1, "claims rank 1"),
        (genuine(&[member.public(), outsider.public(), provider], now + 60_000), &member, 0, "does not run"),
        (genuine(&[member.public(), outsider.public()], now + 60_000), &member, 0, "names no rank on this provider"),
    ];
    for (roster, as_key, from_rank, want) in cases {
        match dial_with(addr, provider, as_key, &roster, from_rank) {
            Some(SessionReply::Refused { reason }) => assert!(reason.contains(want), "{want:?}: {reason}"),
            other => panic!("{want:?}: expected a refusal, got {other:?}"),
        }
    }
    // The genuine roster, shown by the member it names at rank 0, is taken (and then waits for a
    // job that never comes: nothing runs).
    let good = genuine(&[member.public(), provider], now + 60_000);
    assert_eq!(dial_with(addr, provider, &member, &good, 0), Some(SessionReply::PeerAccepted));
    // Accepted, then garbage where frames go: a length past any frame's cap, and bytes that
    // are no frame at all. The provider is unharmed.
    let huge = u32::MAX.to_le_bytes();
    let junk: [&[u8]; 3] = [&huge, &[0xc1; 64], &[0; 1 << 16]];
    let again = genuine(&[member.public(), provider], now + 61_000);
    assert_eq!(dial_then(addr, provider, &member, &again, 0, &junk), Some(SessionReply::PeerAccepted));
    // The provider serves a normal job right after.
    let job = m.submit(&s, sample_artifacts::MATMUL, &["--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let log = log_of(&m, "h.log");
    // "forged" is not hex, so no real job id (`job-` and random hex) can contain it.
    assert!(!log.contains("job-forged"), "nothing of the forged clusters ran: {log}");
    let _: Value = job;
}

#[test]
fn a_paid_cluster_submitted_from_the_cli_pays_every_member_and_one_it_cannot_pay_is_said_at_once() {
    let m = Market::new();
    let renter = m.renter.public().to_string();
    // The hosts' keys (`host NAME` uses NAME.json), made first so the chain can fund them.
    let (pa, pb) = (crate::market::keygen(&m, "a.json"), crate::market::keygen(&m, "b.json"));
    let (_chain, url, mint) = crate::market::local_chain(&m, &[&renter, &pa, &pb]);
    let (_sched, s) = m.scheduler(&[]);
    let paid = || {
        vec![
            "--price-per-gpu-second".to_string(),
            "1000".into(),
            "--price-per-net-gib".into(),
            "2000000".into(),
            "--rpc-url".into(),
            url.clone(),
            "--mint".into(),
            mint.clone(),
            "--job-slice".into(),
            "1s".into(),
        ]
    };
    let (a_args, b_args) = (paid(), paid());
    let (_a, _) = m.host(&s, "a", &a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let (_b, _) = m.host(&s, "b", &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    online(&s, 2);
    let input = write_input(&m, "train.txt", "mode=sync steps=30 samples=256 features=4");
    let renter_key = m.renter_key();
    let spend = m.path("spend");
    let submit = |extra: &[&str]| {
        let mut args =
            vec!["submit", sample_artifacts::CLUSTER_TRAIN, "--scheduler", &s.url, "--scheduler-key", &s.key];
        args.extend_from_slice(&["--wait", "--json", "--input", &input, "--gpus", "2", "--per-provider", "1"]);
        args.extend_from_slice(&["--rpc-url", &url, "--mint", &mint, "--key", renter_key.to_str().unwrap()]);
        args.extend_from_slice(&["--ledger", spend.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let started = std::time::Instant::now();
        (m.cmd(&args).output().unwrap(), started.elapsed())
    };
    // Bounded bytes: each member's channel holds its cost at its limits, and every member is paid
    // exactly its last receipt, bytes included.
    let (out, _) = submit(&["--max-net-bytes", "16777216", "--channel-id", "20"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(0), "{text}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let paid = v["members_paid"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(paid.len(), 2, "{v}");
    for p in paid {
        let member = get_json(&s, &format!("/v1/jobs/{}", p["job_id"].as_str().unwrap()));
        assert!(member["receipt"]["net_bytes"].as_u64() > Some(0), "{member}");
        assert_eq!(p["vouched"], member["receipt"]["amount_due"], "{member}");
    }
    // Unbounded bytes (the default 64 GiB) at 2,000,000 per GiB cost more than the renter holds:
    // said as soon as the channel cannot be opened, not after the provider's minute of waiting.
    let (out, took) = submit(&["--channel-id", "30"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("paying member"), "{text}");
    assert!(took < Duration::from_secs(50), "took {took:?}: {text}");
    // The cluster it could not pay is cancelled, not left to hold two GPUs for nothing.
    let id = text.split_whitespace().find_map(|w| w.strip_prefix("job-")).map(|w| format!("job-{}", &w[..32]));
    let id = id.unwrap_or_else(|| panic!("no job id in {text}"));
    let view = get_json(&s, &format!("/v1/jobs/{id}"));
    let view = if view["member_of"].is_string() {
        get_json(&s, &format!("/v1/jobs/{}", view["member_of"].as_str().unwrap()))
    } else {
        view
    };
    assert_eq!((view["state"].as_str(), view["error"].as_str()), (Some("failed"), Some("cancelled by its renter")));
    until("both providers to be free", || {
        let list = get_json(&s, "/v1/providers");
        list.as_array().unwrap().iter().all(|p| p["running"] == 0).then_some(())
    });
}
