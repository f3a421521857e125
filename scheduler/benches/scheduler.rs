//! Scheduler benchmarks, each beside its baseline from the same run:
//! - match latency (placing one queued job) with 10k and 100k simulated providers, through the
//!   price index, against a full ranking scan of the same providers;
//! - submits per second of the state machine with those providers, in memory and on the redb
//!   file (every job durable before the answer);
//! - submits per second over HTTP on loopback with concurrent clients, against the same clients
//!   calling a no-op endpoint.
//!
//! Run: `cargo bench -p scheduler --bench scheduler`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::msg::{GpuInfo, JobLimits, Price, Requirements, hash_hex};
use proto::{Keypair, PublicKey};
use scheduler::{Config, MemoryStore, RedbStore, State, Store};

const MODELS: [(&str, &str, u64, &str); 8] = [
    ("RTX 3060", "NVIDIA", 12, "vulkan"),
    ("RTX 3090", "NVIDIA", 24, "vulkan"),
    ("RTX 4090", "NVIDIA", 24, "vulkan"),
    ("A100", "NVIDIA", 80, "vulkan"),
    ("H100", "NVIDIA", 80, "vulkan"),
    ("RX 6800", "AMD", 16, "vulkan"),
    ("RX 7900 XTX", "AMD", 24, "vulkan"),
    ("M2 Max", "Apple", 32, "metal"),
];
const REGIONS: [&str; 4] = ["eu-west", "us-east", "us-west", "ap-south"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn populate(state: &mut State, n: u32, rng: &mut Rng) {
    for i in 0..n {
        let (name, vendor, vram, backend) = MODELS[rng.below(8) as usize];
        let count = 1 + rng.below(4) as usize;
        let gpus = vec![
            GpuInfo {
                name: name.into(),
                vendor: vendor.into(),
                backend: backend.into(),
                device_type: "DiscreteGpu".into(),
                vram_bytes: vram << 30,
                score_gflops: 1000.0,
            };
            count
        ];
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        let key = PublicKey(key);
        let price = Price { per_gpu_second: 1 + rng.below(100), per_inference: 1 + rng.below(10), per_net_gib: 0 };
        let region = REGIONS[rng.below(4) as usize].to_string();
        state.register(key, format!("sim-{i}"), region, gpus, price, 1 + rng.below(8) as u32, None, 0, 0).unwrap();
        state.heartbeat(&key, 0, 0, Some(1 + rng.below(200) as u32), 0);
    }
}

/// A mix of what renters ask: most ask little, some name a model or region, a few ask the
/// impossible.
fn requirements(rng: &mut Rng) -> Requirements {
    match rng.below(10) {
        0..=4 => Requirements::default(),
        5 | 6 => {
            Requirements { min_vram_bytes: Some(24 << 30), max_price_per_gpu_second: Some(50), ..Default::default() }
        }
        7 => Requirements { gpu: Some("h100".into()), gpu_count: Some(2), ..Default::default() },
        8 => Requirements { region: Some("eu-west".into()), max_rtt_ms: Some(50), ..Default::default() },
        _ => Requirements { min_vram_bytes: Some(1 << 40), ..Default::default() },
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn bench_state(label: &str, store: Box<dyn Store>, providers: u32, jobs: u32) {
    // One renter submits them all: no per-renter cap here.
    let config = Config { max_jobs_per_renter: usize::MAX, ..Config::default() };
    let mut state = State::load(config, store, 0).unwrap();
    let renter = Keypair::generate().public();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    populate(&mut state, providers, &mut rng);
    let module = hash_hex(&state.put_module(b"\0asm\x01\0\0\0").unwrap());
    let reqs: Vec<Requirements> = (0..jobs).map(|_| requirements(&mut rng)).collect();

    // One job at a time, as renters submit them: accept (explaining when nothing fits) and
    // persist, then place it through the index. Jobs nothing fits stay queued and are not
    // checked again until a provider frees up or joins.
    let mut submits = Vec::with_capacity(jobs as usize);
    let mut latencies = Vec::with_capacity(jobs as usize);
    let mut placed = 0usize;
    let start = Instant::now();
    for r in &reqs {
        let t = Instant::now();
        state.submit(renter, &module, vec![0; 64], r.clone(), JobLimits::default(), Some(3600), 1).unwrap();
        // Durable before the answer, one job at a time: no group commit to share the flush.
        state.store().sync().unwrap();
        let t2 = Instant::now();
        placed += state.assign(2).unwrap().len();
        latencies.push(t2.elapsed());
        submits.push(t2 - t);
    }
    let submit = start.elapsed();
    submits.sort();
    // Baseline: ranking every provider for each of the same requirements.
    let views = state.providers();
    let owned: Vec<(Vec<String>, &proto::api::ProviderView)> =
        views.iter().map(|v| (v.gpus.iter().map(scheduler::matching::gpu_search).collect(), v)).collect();
    let candidates: Vec<scheduler::matching::Candidate<'_>> = owned
        .iter()
        .map(|(search, v)| scheduler::matching::Candidate {
            key: v.key,
            region: &v.region,
            gpus: &v.gpus,
            gpu_search: search,
            price: v.price,
            capacity: v.capacity,
            running: v.running,
            online: v.online,
            rtt_ms: v.rtt_ms,
        })
        .collect();
    let mut scans = Vec::new();
    for r in reqs.iter().take(200) {
        let t = Instant::now();
        std::hint::black_box(scheduler::matching::rank(&candidates, r, false));
        scans.push(t.elapsed());
    }
    latencies.sort();
    scans.sort();
    println!(
        "  {label:<7} {providers:>7} providers: {:>7.0} jobs/s submitted and placed; submit p50 {:>6.1} us p99 {:>7.1} us; \
         place p50 {:>6.1} us p99 {:>6.1} us ({placed} of {jobs} placed) | baseline full scan p50 {:>7.1} us p99 {:>7.1} us",
        f64::from(jobs) / submit.as_secs_f64(),
        us(pct(&submits, 0.5)),
        us(pct(&submits, 0.99)),
        us(pct(&latencies, 0.5)),
        us(pct(&latencies, 0.99)),
        us(pct(&scans, 0.5)),
        us(pct(&scans, 0.99)),
    );
}

/// `rb` with `key`'s signature over `method path` and `body`.
fn signed(
    rb: reqwest::RequestBuilder,
    key: &Keypair,
    method: &str,
    path: &str,
    body: &[u8],
) -> reqwest::RequestBuilder {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut nonce = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    proto::httpsig::sign(key, method, path, body, now, nonce).into_iter().fold(rb, |rb, (k, v)| rb.header(k, v))
}

fn main() {
    println!("scheduler benchmarks (state machine, no network)");
    for providers in [10_000, 100_000] {
        bench_state("memory", Box::new(MemoryStore::default()), providers, 20_000);
    }
    let dir = tempfile::tempdir().unwrap();
    for providers in [10_000, 100_000] {
        let store = RedbStore::open(&dir.path().join(format!("bench-{providers}.redb"))).unwrap();
        bench_state("redb", Box::new(store), providers, 2_000);
    }

    println!(
        "\nHTTPS submits on loopback (redb store, 0 providers), each request signed, 32 concurrent clients, 3 s each"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let l = scheduler::start(scheduler::SchedulerConfig {
            http: loopback,
            plain_http: false,
            renter_limits: None,
            quic: loopback,
            keypair: Keypair::generate(),
            providers: None,
            db: dir.path().join("http.redb"),
            state: Config { max_jobs_per_renter: usize::MAX, ..Config::default() },
        })
        .await
        .unwrap();
        let base = l.url();
        let http = quic::https::pinned_client(l.key).unwrap().build().unwrap();
        let renter = std::sync::Arc::new(Keypair::generate());
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        let module: serde_json::Value =
            signed(http.post(format!("{base}/v1/modules")), &renter, "POST", "/v1/modules", &wasm)
                .body(wasm)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        let body = serde_json::json!({ "module": module["module"], "input_base64": "AAAA" }).to_string();
        for (label, submit) in [("GET /v1/info (baseline)", false), ("POST /v1/jobs", true)] {
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let (http, base, body, renter) = (http.clone(), base.clone(), body.clone(), renter.clone());
                set.spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let resp = if submit {
                            let rb = http.post(format!("{base}/v1/jobs")).header("content-type", "application/json");
                            signed(rb, &renter, "POST", "/v1/jobs", body.as_bytes()).body(body.clone()).send().await
                        } else {
                            http.get(format!("{base}/v1/info")).send().await
                        };
                        assert!(resp.unwrap().status().is_success());
                        n += 1;
                    }
                    n
                });
            }
            let total: u64 = set.join_all().await.into_iter().sum();
            println!("  {label:<26} {:>9.0} requests/s", total as f64 / 3.0);
        }
    });
}
