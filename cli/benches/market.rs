//! Market round trips on loopback, each beside its baseline from the same run:
//! - an inference over an open session (renter -> provider over QUIC, one sandbox call of the
//!   `echo` sample, metered) against a plain QUIC echo over the same link code;
//! - a batch job from submit to result on a warm host with the module cached (an upper bound on
//!   submit to first dispatch), against the job's own run time on the host.
//!
//! Run: `cargo bench -p cli --bench market`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::Keypair;
use proto::msg::{JobLimits, Requirements};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {label:<52} p50 {:>8.1} us  p99 {:>8.1} us  ({} samples)",
        us(pct(&samples, 0.5)),
        us(pct(&samples, 0.99)),
        samples.len()
    );
}

async fn plain_quic_echo(n: usize, payload: &[u8]) -> Vec<Duration> {
    let server_key = Keypair::generate();
    let server_id = quic::Identity::new(&server_key).unwrap();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = quic::server(&server_id, loopback, quic::Peers::Any).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let conn = incoming.await.unwrap();
                // The baseline trusts any peer: no ticket to check.
                conn.authenticated();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let msg: Option<Vec<u8>> = quic::read_msg(&mut recv, 1 << 20).await.unwrap();
                        let mut back = msg.unwrap();
                        back.reverse();
                        quic::write_msg(&mut send, &back, 1 << 20).await.unwrap();
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let endpoint = quic::client(loopback).unwrap();
    let id = quic::Identity::new(&Keypair::generate()).unwrap();
    let conn = quic::connect(&endpoint, &id, addr, server_key.public()).await.unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        quic::write_msg(&mut send, &payload.to_vec(), 1 << 20).await.unwrap();
        let _ = send.finish();
        let back: Option<Vec<u8>> = quic::read_msg(&mut recv, 1 << 20).await.unwrap();
        assert_eq!(back.unwrap().len(), payload.len());
        if i >= 100 {
            out.push(t.elapsed());
        }
    }
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let dir = tempfile::tempdir().unwrap();
        let l = scheduler::start(scheduler::SchedulerConfig {
            http: loopback,
            plain_http: false,
            // The benchmarks send far more than a renter would.
            renter_limits: None,
            quic: loopback,
            keypair: Keypair::generate(),
            providers: None,
            db: dir.path().join("bench.redb"),
            chain: None,
            state: scheduler::Config::default(),
        })
        .await
        .unwrap();
        let gpu = host::list_adapters().into_iter().next().unwrap();
        println!("market benchmarks on loopback; GPU {} ({})", gpu.name, gpu.device_type);
        // Jobs and sessions run in worker processes of the real binary, as on a provider.
        let worker = provider::WorkerCommand {
            program: env!("CARGO_BIN_EXE_wasmgrid").into(),
            args: vec!["worker".into(), "--no-cache".into()],
        };
        let mut config = provider::DaemonConfig::new(l.quic, l.key, Keypair::generate(), worker);
        config.name = "bench".into();
        config.capacity = 4;
        config.session_listen = Some(loopback);
        tokio::spawn(provider::run_forever(config));
        // HTTPS pinned to the scheduler's key, every request signed by the renter.
        let renter = Keypair::generate();
        let client = client::Scheduler::new(&l.url(), Some(l.key), Keypair::from_seed(renter.seed())).unwrap();
        loop {
            if client.providers().await.unwrap().iter().any(|p| p.online) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let payload = vec![7u8; 64];
        let n = 2_000;
        println!("\ninference round trip, 64-byte request and response, sequential");
        let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
        let session = client::Session::open(&client, renter, echo, Vec::new(), Requirements::default()).await.unwrap();
        let mut samples = Vec::with_capacity(n);
        for i in 0..n + 100 {
            let t = Instant::now();
            let a = session.infer(&payload).await.unwrap();
            if i >= 100 {
                samples.push(t.elapsed());
            }
            assert_eq!(a.response.len(), 64);
        }
        summary("session: renter -> provider, echo sample in the sandbox", samples);
        summary("baseline: plain QUIC echo, same link code", plain_quic_echo(n, &payload).await);

        println!("\nbatch job on a warm host, module and pipeline cached (16x16 matmul)");
        let matmul = std::fs::read(sample_artifacts::MATMUL).unwrap();
        let uploaded = client.upload(matmul).await.unwrap();
        let mut input: Vec<u8> = [16u32, 16, 16].iter().flat_map(|w| w.to_le_bytes()).collect();
        input.extend((0..512).flat_map(|i| (i as f32).to_le_bytes()));
        let (mut end_to_end, mut on_host, mut to_dispatch) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..60 {
            let t = Instant::now();
            let s = client
                .submit(&uploaded.module, &input, Requirements::default(), JobLimits::default(), None)
                .await
                .unwrap();
            let view = client.wait(&s.id, |_| {}).await.unwrap();
            let elapsed = t.elapsed();
            assert_eq!(view.state, proto::api::JobState::Succeeded);
            if i >= 10 {
                let run = Duration::from_micros(view.wall_time_us.unwrap_or(0));
                let first = Duration::from_micros(view.first_dispatch_us.unwrap_or(0));
                end_to_end.push(elapsed);
                on_host.push(run);
                // Everything but the job's time after its first dispatch: an upper bound on
                // submit to first dispatch (it still includes returning the result).
                to_dispatch.push(elapsed.saturating_sub(run.saturating_sub(first)));
            }
        }
        summary("submit -> result over HTTPS (signed requests) and QUIC", end_to_end);
        summary("submit -> first dispatch (upper bound)", to_dispatch);
        summary("baseline: the job's run time on the host", on_host);
    });
}
