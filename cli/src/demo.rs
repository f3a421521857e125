//! `wasmgrid demo`: a scheduler and two providers on loopback in one process, the sample jobs
//! submitted through the scheduler's HTTP API, and an inference session straight to a
//! provider; prints who ran what, with timings and usage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::Keypair;
use proto::api::JobState;
use proto::msg::{JobLimits, Price, Requirements};
use serde_json::{Value, json};

use crate::{Exit, exit};

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Folder holding the built samples (`matmul.wasm`, `train.wasm`, `mlp.wasm`).
    #[arg(long, value_name = "DIR", default_value = "target/wasm32-wasip1/release")]
    samples: PathBuf,
    /// Requests sent in the inference session.
    #[arg(long, default_value_t = 24)]
    requests: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn read_sample(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (build the samples: cargo build --release --target wasm32-wasip1 -p matmul -p train -p mlp)",
            path.display()
        )
    })
}

fn usage_line(u: &proto::msg::WireUsage) -> String {
    format!(
        "fuel {}, {} dispatches, {} invocations, GPU {:.2} ms ({})",
        u.fuel,
        u.dispatches,
        u.invocations,
        u.gpu_time_ns as f64 / 1e6,
        u.gpu_time_source
    )
}

fn matmul_input(n: u32) -> Vec<u8> {
    let mut input: Vec<u8> = [n, n, n].iter().flat_map(|w| w.to_le_bytes()).collect();
    input.extend((0..2 * n * n).flat_map(|i| ((i % 13) as f32 * 0.25 - 1.0).to_le_bytes()));
    input
}

pub(crate) fn demo(args: &DemoArgs) -> Result<u8, Exit> {
    let fail = |e: anyhow::Error| Exit { code: exit::HOST, error: e };
    let bad = |e: anyhow::Error| Exit { code: exit::BAD_INPUT, error: e };
    let matmul = read_sample(&args.samples, "matmul").map_err(bad)?;
    let train = read_sample(&args.samples, "train").map_err(bad)?;
    let mlp = read_sample(&args.samples, "mlp").map_err(bad)?;
    let dir = std::env::temp_dir().join(format!("wasmgrid-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display())).map_err(fail)?;
    let text = !args.json;
    let say = |line: String| {
        if text {
            eprintln!("{line}");
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| fail(e.into()))?;
    let result = rt.block_on(async {
        let t0 = Instant::now();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let scheduler_key = Keypair::generate();
        let listening = scheduler::start(scheduler::SchedulerConfig {
            http: loopback,
            quic: loopback,
            keypair: Keypair::from_seed(scheduler_key.seed()),
            providers: None,
            db: dir.join("scheduler.redb"),
            state: scheduler::Config::default(),
        })
        .await?;
        say(format!("scheduler   http://{}  quic {}  key {}", listening.http, listening.quic, listening.key));

        // Both providers share this machine's GPU, each with its own key, price and sandbox pool.
        let host = tokio::task::spawn_blocking(|| {
            host::Host::new(host::HostConfig { max_instances: 16, ..host::HostConfig::default() })
        })
        .await??;
        say(format!("GPU         {} ({}, {})", host.gpu().name, host.gpu().backend, host.gpu().device_type));
        let mut names = HashMap::new();
        for (name, per_second, per_inference) in [("alpha", 2, 1), ("beta", 3, 2)] {
            let key = Keypair::generate();
            names.insert(key.public(), name.to_string());
            let config = host::daemon::DaemonConfig {
                scheduler: listening.quic,
                scheduler_key: listening.key,
                keypair: key,
                name: name.to_string(),
                region: "local".into(),
                price: Price { per_gpu_second: per_second, per_inference },
                capacity: 2,
                vram_bytes: None,
                session_listen: Some(loopback),
                advertise: None,
            };
            tokio::spawn(host::daemon::run_forever(host.clone(), config));
            say(format!("provider    {name:<6} {per_second}/GPU-second, {per_inference}/inference"));
        }
        let client = client::Scheduler::new(&format!("http://{}", listening.http));
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let providers: Vec<proto::api::ProviderView> =
                http.get(format!("http://{}/v1/providers", listening.http)).send().await?.json().await?;
            if providers.iter().filter(|p| p.online).count() == 2 {
                break;
            }
            if Instant::now() > deadline {
                return Err(anyhow!("the providers did not come online within a minute"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        say(format!("both providers online after {:.1} s\n", t0.elapsed().as_secs_f64()));

        // Batch jobs, submitted together.
        let jobs: [(&str, &Vec<u8>, Vec<u8>); 4] = [
            ("matmul (self-checking demo)", &matmul, Vec::new()),
            ("matmul 192x192x192", &matmul, matmul_input(192)),
            ("train (logistic regression)", &train, b"epochs=300".to_vec()),
            ("matmul 64x64x64", &matmul, matmul_input(64)),
        ];
        let mut submitted = Vec::new();
        for (label, module, input) in &jobs {
            let uploaded = client.upload((*module).clone()).await?;
            let t = Instant::now();
            let s = client.submit(&uploaded.module, input, Requirements::default(), JobLimits::default(), None).await?;
            submitted.push((*label, s.id, t));
        }
        let mut job_reports = Vec::new();
        for (label, id, t) in submitted {
            let view = client.wait(&id, |_| {}).await?;
            let elapsed = t.elapsed();
            let output = if view.output_bytes.is_some() { client.bytes(&id, "output").await? } else { Vec::new() };
            let head = match std::str::from_utf8(&output) {
                Ok(s) => s.lines().last().unwrap_or("").to_string(),
                Err(_) => format!("{} bytes of f32 results", output.len()),
            };
            let provider = view.provider.and_then(|p| names.get(&p).cloned()).unwrap_or_default();
            let usage = view.usage.clone().unwrap_or_default();
            say(format!(
                "job {id}  {label:<28} {:?} on {provider:<5} in {:>6.0} ms  {}",
                view.state,
                elapsed.as_secs_f64() * 1e3,
                usage_line(&usage)
            ));
            say(format!("            -> {head}"));
            job_reports.push(json!({
                "id": id,
                "job": label,
                "status": view.state,
                "provider": view.provider.map(|p| p.to_string()),
                "provider_name": provider,
                "elapsed_ms": elapsed.as_millis() as u64,
                "wall_time_ms": view.wall_time_ms,
                "usage": usage,
                "output": head,
            }));
            if view.state != JobState::Succeeded {
                return Err(anyhow!("job {id} ({label}) ended {:?}: {:?} {:?}", view.state, view.outcome, view.error));
            }
        }

        // An inference session, straight to the provider the scheduler picks.
        let t = Instant::now();
        let renter = Keypair::generate();
        let session =
            std::sync::Arc::new(client::Session::open(&client, renter, mlp.clone(), Vec::new(), Requirements::default()).await?);
        let opened = t.elapsed();
        let provider = session.provider().await.map(|p| names.get(&p).cloned().unwrap_or_default()).unwrap_or_default();
        say(format!(
            "\nsession on {provider} (cheapest per inference), opened with init in {:.0} ms",
            opened.as_secs_f64() * 1e3
        ));
        let mut latencies = Vec::new();
        let mut total = proto::msg::WireUsage::default();
        let mut last = String::new();
        for chunk in (0..args.requests).collect::<Vec<_>>().chunks(4) {
            let mut set = tokio::task::JoinSet::new();
            for &i in chunk {
                let s = session.clone();
                let request: Vec<String> = (0..16).map(|k| (((k * 5 + i) % 9) as f32 / 8.0).to_string()).collect();
                set.spawn(async move {
                    let t = Instant::now();
                    let answer = s.infer(request.join(",").as_bytes()).await;
                    (t.elapsed(), answer)
                });
            }
            for (elapsed, answer) in set.join_all().await {
                let answer = answer?;
                latencies.push(elapsed);
                total.inferences += answer.usage.inferences;
                total.fuel += answer.usage.fuel;
                total.dispatches += answer.usage.dispatches;
                total.invocations += answer.usage.invocations;
                total.gpu_time_ns += answer.usage.gpu_time_ns;
                total.gpu_time_source = answer.usage.gpu_time_source;
                last = String::from_utf8_lossy(&answer.response).into_owned();
            }
        }
        latencies.sort();
        let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default();
        say(format!(
            "{} inferences (4 in flight): p50 {:.1} ms, p99 {:.1} ms; {}",
            total.inferences,
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            usage_line(&total)
        ));
        say(format!("            -> last response: {last}"));
        let last_receipt = session.last_receipt().await;
        if let Some(r) = &last_receipt {
            say(format!(
                "            -> {} signed receipts checked; {} inferences x {} = {} due to {provider}",
                r.sequence, r.counts.inferences, r.price_per_inference, r.amount_due
            ));
        }
        say(format!("\ndemo done in {:.1} s", t0.elapsed().as_secs_f64()));
        Ok::<Value, anyhow::Error>(json!({
            "scheduler": { "http": listening.http.to_string(), "quic": listening.quic.to_string(), "key": listening.key.to_string() },
            "gpu": { "name": host.gpu().name, "backend": host.gpu().backend, "device_type": host.gpu().device_type },
            "providers": names.iter().map(|(k, n)| json!({ "name": n, "key": k.to_string() })).collect::<Vec<_>>(),
            "jobs": job_reports,
            "session": {
                "provider": session.provider().await.map(|p| p.to_string()),
                "provider_name": provider,
                "inferences": total.inferences,
                "failovers": session.failovers(),
                "price_per_inference": session.price_per_inference().await,
                // What the renter owes, from the provider's last signed receipt it checked.
                "amount_due": last_receipt.as_ref().map(|r| r.amount_due),
                "receipts_checked": last_receipt.as_ref().map(|r| r.sequence),
                "open_ms": opened.as_millis() as u64,
                "p50_us": pct(0.5).as_micros() as u64,
                "p99_us": pct(0.99).as_micros() as u64,
                "usage": total,
            },
            "elapsed_ms": t0.elapsed().as_millis() as u64,
        }))
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
    let summary = result.map_err(fail)?;
    if args.json {
        println!("{summary}");
    }
    Ok(exit::OK)
}
