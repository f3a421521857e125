//! `wasmgrid demo`: a scheduler and two providers on loopback in one process, the sample jobs
//! submitted through the scheduler's HTTP API, and an inference session straight to a
//! provider; prints who ran what, with timings and usage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::Keypair;
use proto::api::JobState;
use proto::msg::{JobLimits, Price, Requirements};
use serde_json::{Value, json};
use settlement::ledger::{Book, Role};
use settlement::{Chain, Policy};
use solana_sdk::pubkey::Pubkey;

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
    /// all-MiniLM-L6-v2's folder (what `scripts/fetch-minilm.sh` fetches): when it is there
    /// and `minilm.wasm` is among the samples, an embedding session runs too. Default:
    /// `$WASMGRID_MINILM_DIR`, else `/var/tmp/wasmgrid-models/all-minilm-l6-v2`.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
}

/// Sentence pairs the embedding session compares, with the cosine similarity
/// sentence-transformers (PyTorch) gives each (`samples/minilm/fixtures/reference.json`).
const PAIRS: [(&str, &str, f32); 4] = [
    ("A man is eating food.", "A man is eating a piece of bread.", 0.7553371),
    ("The weather is lovely today.", "It's so sunny outside!", 0.6659554),
    ("The weather is lovely today.", "He drove to the stadium.", 0.104584),
    ("A man is eating food.", "A woman is playing violin.", -0.07038556),
];

/// The model folder and the sample the embedding session needs, when both are there.
fn embedding_inputs(args: &DemoArgs) -> Option<(PathBuf, Vec<u8>)> {
    let model = args.model.clone().or_else(|| std::env::var_os("WASMGRID_MINILM_DIR").map(PathBuf::from));
    let model = model.unwrap_or_else(|| PathBuf::from("/var/tmp/wasmgrid-models/all-minilm-l6-v2"));
    let wasm = std::fs::read(args.samples.join("minilm.wasm")).ok()?;
    model.join("model.safetensors").is_file().then_some((model, wasm))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

fn read_sample(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (build the samples: cargo build --release --target wasm32-wasip1 -p matmul -p train -p mlp -p cluster-train)",
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

/// What the renter's payment channel with a provider holds: $0.01 in a mint of 6 decimals.
const DEPOSIT: u64 = 10_000;

/// How the demo's providers claim: once, when the session ends.
const POLICY: Policy = Policy::End;

/// A job's slice of time between receipts in the demo: short, so that its jobs (a second or
/// so each) show a few, and long enough for a voucher's round trip through the scheduler on a
/// machine busy with the jobs themselves.
const JOB_SLICE: Duration = Duration::from_secs(2);

/// The claims a job's provider made after its last voucher, once they show (within 30 s).
async fn job_claims(client: &client::Scheduler, id: &str) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = client.job(id).await?;
        let claims = view.channel.map(|c| c.claims).unwrap_or_default();
        if !claims.is_empty() {
            return Ok(claims);
        }
        if Instant::now() > deadline {
            return Err(anyhow!("job {id}: its provider made no claim within 30 s of its last voucher"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new mint, 100 of it (6 decimals) in the renter's token account, and SOL for the renter.
fn stablecoin(chain: &dyn Chain, renter: &Keypair) -> anyhow::Result<Pubkey> {
    use solana_sdk::signature::Signer;
    let issuer = solana_sdk::signature::Keypair::new();
    let r = settlement::signer(renter);
    chain.airdrop(&issuer.pubkey(), 1_000_000_000)?;
    chain.airdrop(&r.pubkey(), 1_000_000_000)?;
    let mint = settlement::token::create_mint(chain, &issuer, &issuer.pubkey(), 6)?;
    let account = settlement::token::ensure_token_account(chain, &r, &r.pubkey(), &mint)?;
    settlement::token::mint_to(chain, &issuer, &mint, &account, 100_000_000)?;
    Ok(mint)
}

async fn token_balance(chain: &Arc<dyn Chain>, account: Pubkey) -> anyhow::Result<u64> {
    let chain = chain.clone();
    Ok(tokio::task::spawn_blocking(move || settlement::token::token_balance(chain.as_ref(), &account)).await??)
}

/// Who paid and earned what, from each party's own ledger, checked against the chain: every
/// figure is the chain's (balances, the channels' deposits and claims) or a signature the other
/// party made (the renter's vouchers, the provider's receipts).
#[allow(clippy::too_many_arguments)]
async fn settlement_table(
    chain: &Arc<dyn Chain>,
    mint: &Pubkey,
    (renter, renter_before): (&Keypair, u64),
    renter_books: &[Book],
    ledgers: &HashMap<proto::PublicKey, PathBuf>,
    names: &HashMap<proto::PublicKey, String>,
    policy: Policy,
) -> anyhow::Result<Value> {
    let dollars = |units: u64| format!("${:.6}", units as f64 / 1e6);
    let mut rows = Vec::new();
    let mut parties = Vec::new();
    let renter_balance =
        token_balance(chain, settlement::token::token_account(&settlement::address(&renter.public()), mint)).await?;
    let jobs: Vec<&Book> = renter_books.iter().filter(|b| b.job).collect();
    let jobs_paid: u64 = jobs.iter().map(|b| b.vouched).sum();
    // The renter's channels, as the chain shows them.
    let mut channels = Vec::new();
    for address in renter_books.iter().map(|b| b.channel).collect::<std::collections::BTreeSet<_>>() {
        let (c, a) = (chain.clone(), settlement::address_of(&address));
        let program = settlement::channel::LOCAL_PROGRAM_ID;
        let on = tokio::task::spawn_blocking(move || settlement::channel::read_at(c.as_ref(), &program, &a)).await??;
        let on = on.ok_or_else(|| anyhow!("payment channel {address} is not on the chain"))?;
        channels.push((address, on.state));
    }
    let claimed: u64 = channels.iter().map(|(_, c)| c.claimed).sum();
    let in_channels: u64 = channels.iter().map(|(_, c)| c.deposited.saturating_sub(c.claimed)).sum();
    let vouched: u64 = renter_books.iter().map(|b| b.vouched).sum();
    let inferences: u64 = renter_books.iter().filter(|b| !b.job).map(|b| b.inferences).sum();
    let paid = claimed;
    if Some(renter_balance + in_channels) != renter_before.checked_sub(paid) {
        return Err(anyhow!(
            "the renter paid {paid} by the chain and holds {in_channels} in channels, but its balance went from {renter_before} to {renter_balance}"
        ));
    }
    if vouched != claimed {
        return Err(anyhow!("the renter vouched {vouched} this session, the providers claimed {claimed}"));
    }
    let claims: Vec<String> = renter_books.iter().filter(|b| !b.job).flat_map(|b| b.claims.clone()).collect();
    let job_claims: Vec<String> = jobs.iter().flat_map(|b| b.claims.clone()).collect();
    let transactions: Vec<String> = job_claims.iter().chain(claims.iter()).cloned().collect();
    let price = renter_books.iter().rfind(|b| !b.job).map_or(0, |b| b.price_per_inference);
    rows.push(format!(
        "  {:<16} {:>5} {:>10} {:>10} {:>12} {:>14} {:>8}",
        "renter",
        jobs.len(),
        inferences,
        dollars(price),
        format!("-{}", dollars(paid)),
        dollars(renter_balance),
        "ok"
    ));
    parties.push(json!({
        "role": "renter",
        "key": renter.public().to_string(),
        "inferences": inferences,
        "price_per_inference": price,
        "jobs": jobs.len(),
        "jobs_paid": jobs_paid,
        "paid": paid,
        "vouched": vouched,
        "in_channels": in_channels,
        "balance": renter_balance,
        "balance_before": renter_before,
        "claims": claims,
        "channels": channels.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>(),
        "transactions": transactions,
    }));
    let mut ledgers: Vec<(&proto::PublicKey, &PathBuf)> = ledgers.iter().collect();
    ledgers.sort_by_key(|(k, _)| names.get(k).cloned());
    for (key, dir) in ledgers {
        let (books, _) = settlement::ledger::load(dir)?;
        let (mine, books): (Vec<&Book>, Vec<&Book>) =
            books.iter().filter(|b| b.role == Role::Provider).partition(|b| b.job);
        let from_jobs: u64 = mine.iter().map(|b| b.vouched).sum();
        let from_channels: u64 = channels.iter().filter(|(_, c)| c.provider == key.0).map(|(_, c)| c.claimed).sum();
        let earned = from_channels;
        let inferences: u64 = books.iter().map(|b| b.inferences).sum();
        let balance = token_balance(chain, settlement::token::token_account(&settlement::address(key), mint)).await?;
        if balance != earned {
            return Err(anyhow!(
                "provider {key}: the chain shows {earned} earned by jobs and claims, and a balance of {balance}"
            ));
        }
        let name = names.get(key).cloned().unwrap_or_default();
        let price = books.last().map_or(0, |b| b.price_per_inference);
        let shown_price = if books.is_empty() { "-".to_string() } else { dollars(price) };
        rows.push(format!(
            "  {:<16} {:>5} {:>10} {:>10} {:>12} {:>14} {:>8}",
            format!("provider {name}"),
            mine.len(),
            inferences,
            shown_price,
            format!("+{}", dollars(earned)),
            dollars(balance),
            "ok"
        ));
        let my_claims: Vec<String> = books.iter().chain(mine.iter()).flat_map(|b| b.claims.clone()).collect();
        parties.push(json!({
            "role": "provider",
            "name": name,
            "key": key.to_string(),
            "jobs": mine.len(),
            "jobs_earned": from_jobs,
            "inferences": inferences,
            "price_per_inference": price,
            "earned": earned,
            "claimed": from_channels,
            "balance": balance,
            "claims": my_claims,
            "channels": channels.iter().filter(|(_, c)| c.provider == key.0).map(|(a, _)| a.to_string()).collect::<Vec<_>>(),
            "transactions": my_claims,
        }));
    }
    // Each claim is one transaction with two signatures (the fee payer's and the Ed25519
    // check's); settling every inference on the chain would have been one per inference.
    let fee = 2 * chain.fee_per_signature();
    let saved = inferences.saturating_sub(claims.len() as u64) * fee;
    let table = format!(
        "\nsettlement on the in-process chain (every job and the session paid through payment channels: the jobs by the slice, {} claim(s) in all for them; the session with claim policy `{policy}`: {} claim(s) for {inferences} inferences, {} lamports in claim fees where settling each inference would cost {}, {saved} saved)\n  {:<16} {:>5} {:>10} {:>10} {:>12} {:>14} {:>8}\n{}",
        job_claims.len(),
        claims.len(),
        claims.len() as u64 * fee,
        inferences * fee,
        "party",
        "jobs",
        "inferences",
        "price/inf",
        "paid/earned",
        "chain balance",
        "checked",
        rows.join("\n")
    );
    Ok(json!({
        "chain": "in-process (LiteSVM)",
        "program": settlement::channel::LOCAL_PROGRAM_ID.to_string(),
        "mint": mint.to_string(),
        "decimals": 6,
        "policy": policy.to_string(),
        "claims": claims.len(),
        "inferences": inferences,
        "fee_lamports": { "claims": claims.len() as u64 * fee, "per_inference_settlement": inferences * fee, "saved": saved },
        "parties": parties,
        "table": table,
    }))
}

pub(crate) fn demo(args: &DemoArgs) -> Result<u8, Exit> {
    let fail = |e: anyhow::Error| Exit { code: exit::HOST, error: e };
    let bad = |e: anyhow::Error| Exit { code: exit::BAD_INPUT, error: e };
    let matmul = read_sample(&args.samples, "matmul").map_err(bad)?;
    let train = read_sample(&args.samples, "train").map_err(bad)?;
    let mlp = read_sample(&args.samples, "mlp").map_err(bad)?;
    let cluster_train = read_sample(&args.samples, "cluster-train").map_err(bad)?;
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
        // The in-process chain: a stablecoin-like mint (6 decimals: 1 unit = $0.000001), a renter
        // holding 100 of it, and SOL for everyone's fees and rent.
        let chain: Arc<dyn Chain> = Arc::new(settlement::LocalChain::new());
        let renter = Keypair::generate();
        let mint = {
            let (chain, renter) = (chain.clone(), Keypair::from_seed(renter.seed()));
            tokio::task::spawn_blocking(move || stablecoin(chain.as_ref(), &renter)).await??
        };
        say(format!("chain       in-process (LiteSVM), mint {mint} (6 decimals), renter {}", renter.public()));
        let renter_tokens = settlement::token::token_account(&settlement::address(&renter.public()), &mint);
        let renter_before = token_balance(&chain, renter_tokens).await?;
        let listening = scheduler::start(scheduler::SchedulerConfig {
            http: loopback,
            plain_http: false,
            renter_limits: Some(scheduler::RenterLimits::default()),
            quic: loopback,
            keypair: Keypair::from_seed(scheduler_key.seed()),
            providers: None,
            db: dir.join("scheduler.redb"),
            state: scheduler::Config::default(),
        })
        .await?;
        say(format!("scheduler   {}  quic {}  key {}", listening.url(), listening.quic, listening.key));


        // Both providers share this machine's GPU, each with its own key, price and pool of
        // worker processes (this program, as `wasmgrid worker`).
        let gpu = tokio::task::spawn_blocking(host::list_adapters).await?.into_iter().next();
        let gpu = gpu.ok_or_else(|| anyhow!("no GPU adapter (install mesa-vulkan-drivers for lavapipe)"))?;
        let worker = provider::WorkerCommand::this_program(vec![])?;
        say(format!("GPU         {} ({}, {})", gpu.name, gpu.backend, gpu.device_type));
        let mut names = HashMap::new();
        let mut ledgers = HashMap::new();
        for (name, per_second, per_inference, per_net_gib) in
            [("alpha", 110, 100, 4_000_000), ("beta", 150, 150, 6_000_000)]
        {
            let key = Keypair::generate();
            names.insert(key.public(), name.to_string());
            let k = settlement::address(&key.public());
            let c = chain.clone();
            tokio::task::spawn_blocking(move || c.airdrop(&k, 1_000_000_000)).await??;
            let ledger = dir.join(format!("{name}-ledger"));
            ledgers.insert(key.public(), ledger.clone());
            let payment = provider::payment::PaymentConfig {
                chain: chain.clone(),
                program: settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID),
                mint: settlement::wire_key(&mint),
                policy: POLICY,
                max_unvouched: provider::payment::DEFAULT_MAX_UNVOUCHED,
                ledger: Some(ledger),
                channels: Default::default(),
                job_slice: JOB_SLICE,
            };
            let mut config = provider::DaemonConfig::new(listening.quic, listening.key, key, worker.clone());
            config.name = name.to_string();
            config.price = Price { per_gpu_second: per_second, per_inference, per_net_gib };
            config.session_listen = Some(loopback);
            config.payment = Some(payment);
            // Renters' weights kept by hash: the embedding session's model goes once.
            config.blobs = Some(Arc::new(
                provider::blobs::BlobCache::open(&dir.join(format!("{name}-blobs")), 1 << 30)
                    .with_context(|| format!("opening {name}'s blob cache"))?,
            ));
            tokio::spawn(async move {
                if let Err(e) = provider::run_forever(config).await {
                    log::error!("provider stopped: {e}");
                }
            });
            say(format!(
                "provider    {name:<6} {per_second}/GPU-second, {per_inference}/inference, {per_net_gib}/GiB to cluster peers"
            ));
        }
        // The renter's client pins the scheduler's key and signs every request with its own.
        let client = client::Scheduler::new(&listening.url(), Some(listening.key), Keypair::from_seed(renter.seed()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let providers: Vec<proto::api::ProviderView> =
                client.providers().await?;
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
        // Each job pays its provider as it runs, through the renter's payment channel with that
        // provider: a receipt every slice of its time, answered by a voucher. Jobs running at
        // once on one provider each need a channel of their own (ids 1, 2, ...; the session
        // uses 0).
        let payment = |channel_id: u64| client::Payment {
            chain: chain.clone(),
            program: settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID),
            mint: settlement::wire_key(&mint),
            deposit: 0,
            channel_id,
            ledger: Some(dir.join("renter-ledger")),
        };
        let mut following = tokio::task::JoinSet::new();
        for (n, (label, id, t)) in submitted.into_iter().enumerate() {
            let (client, payment) = (client.clone(), payment(n as u64 + 1));
            following.spawn(async move {
                let followed = client.wait_paying(&id, Some(&payment), |_| {}).await;
                (n, label, id, t.elapsed(), followed)
            });
        }
        let mut followed = following.join_all().await;
        followed.sort_by_key(|f| f.0);
        let mut job_reports = Vec::new();
        let mut job_books = Vec::new();
        for (_, label, id, elapsed, f) in followed {
            let (view, book) = f?;
            if view.state != JobState::Succeeded {
                return Err(anyhow!("job {id} ({label}) ended {:?}: {:?} {:?}", view.state, view.outcome, view.error));
            }
            // The output comes once the provider took the voucher for its last receipt; it is
            // checked against that receipt.
            let output = client.output(&view).await?;
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
            // The provider claims once the last voucher is in: wait for its claim to show.
            let claims = job_claims(&client, &id).await?;
            let mut book = book.ok_or_else(|| anyhow!("job {id} was not paid through a channel"))?;
            book.claims = claims.clone();
            say(format!(
                "            -> vouched {} to {provider} over {} receipt(s), claimed in {}",
                book.vouched,
                book.inferences,
                claims.join(", ")
            ));
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
                "paid": book.vouched,
                "receipts": book.inferences,
                "channel": book.channel.to_string(),
                "claims": claims,
            }));
            job_books.push(book);
        }

        // A cluster job: the same training on two GPUs, one on each provider, linked directly
        // (QUIC, pinned keys) under the roster the scheduler signed; each member pays its own
        // provider through its own channel.
        let uploaded = client.upload(cluster_train.clone()).await?;
        let t = Instant::now();
        let shape = proto::api::ClusterRequest { gpus: 2, max_per_provider: Some(1), ..Default::default() };
        let input = b"mode=sync steps=60 samples=1024 features=8".to_vec();
        // Bytes to peers are billed, so the renter bounds them: a channel must hold what the
        // job may cost at its limits, 16 MiB sent at the provider's price per GiB included.
        let limits = JobLimits { net_bytes: 16 << 20, ..JobLimits::default() };
        let s = client.submit_job(&uploaded.module, &input, Requirements::default(), limits, None, Some(shape)).await?;
        let (view, member_books) =
            client.wait_cluster_paying(&s.id, &payment(10), |_| {}).await?;
        if view.state != JobState::Succeeded {
            return Err(anyhow!("cluster job {} ended {:?}: {:?} {:?}", s.id, view.state, view.outcome, view.error));
        }
        let output = client.output(&view).await?;
        let output = String::from_utf8_lossy(&output).into_owned();
        let loss = output.lines().find(|l| l.starts_with("final loss")).unwrap_or("").to_string();
        let cluster = view.cluster.clone().ok_or_else(|| anyhow!("cluster job {} has no members", s.id))?;
        say(format!(
            "\ncluster job {}  cluster-train on {} GPUs, synchronous data parallel, in {:.0} ms; ring's slowest link {}",
            view.id,
            cluster.members.len(),
            t.elapsed().as_secs_f64() * 1e3,
            cluster.slowest_link_ms.map_or("not measured".to_string(), |ms| format!("{ms} ms"))
        ));
        let mut members_json = Vec::new();
        for m in &cluster.members {
            let usage = m.usage.clone().unwrap_or_default();
            let name = names.get(&m.provider).cloned().unwrap_or_default();
            say(format!(
                "            rank {} on {name:<5} ({}): sent {} B, received {} B to and from its peer; {}",
                m.rank,
                m.job_id,
                usage.net_bytes_sent,
                usage.net_bytes_received,
                usage_line(&usage)
            ));
            let claims = job_claims(&client, &m.job_id).await.unwrap_or_default();
            // What its provider billed it: GPU time and bytes sent, each at its price.
            let receipt = client.job(&m.job_id).await?.receipt;
            if let Some(r) = &receipt {
                say(format!(
                    "            -> billed {} us x {}/s + {} B x {}/GiB = {}",
                    r.wall_time_us, r.price_per_gpu_second, r.net_bytes, r.price_per_net_gib, r.amount_due
                ));
            }
            let billed = receipt.map(|r| {
                json!({
                    "wall_time_us": r.wall_time_us,
                    "price_per_gpu_second": r.price_per_gpu_second,
                    "net_bytes": r.net_bytes,
                    "price_per_net_gib": r.price_per_net_gib,
                    "amount_due": r.amount_due,
                })
            });
            members_json.push(json!({
                "billed": billed,
                "rank": m.rank,
                "job_id": m.job_id,
                "provider": m.provider.to_string(),
                "provider_name": name,
                "gpu": m.gpu,
                "state": m.state,
                "usage": usage,
                "claims": claims,
            }));
        }
        say(format!("            -> {loss} (rank 0's output; every member holds the same weights)"));
        for mut book in member_books {
            if let Some(m) = cluster.members.iter().find(|m| m.job_id == book.session) {
                book.claims = job_claims(&client, &m.job_id).await.unwrap_or_default();
            }
            if let Some(entry) = members_json.iter_mut().find(|e| e["job_id"] == book.session.as_str()) {
                entry["paid"] = json!(book.vouched);
                entry["claims"] = json!(book.claims);
            }
            job_books.push(book);
        }
        let cluster_report = json!({
            "id": view.id,
            "state": view.state,
            "elapsed_ms": t.elapsed().as_millis() as u64,
            "members": members_json,
            "link_plan": {
                "ring": cluster.members.iter().map(|m| m.rank).collect::<Vec<_>>(),
                "slowest_link_ms": cluster.slowest_link_ms,
                "regions": cluster.regions,
            },
            "tries": cluster.tries,
            "usage": view.usage,
            "output": loss,
        });

        // An inference session, straight to the provider the scheduler picks, paid through a
        // payment channel: a voucher per inference, off the chain.
        let t = Instant::now();
        // Sessions pay through channel 0 with their provider, reused from one to the next.
        let session_payment = || client::Payment {
            chain: chain.clone(),
            program: settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID),
            mint: settlement::wire_key(&mint),
            deposit: DEPOSIT,
            channel_id: 0,
            ledger: Some(dir.join("renter-ledger")),
        };
        let payment = session_payment();
        let session = Arc::new(
            client::Session::open_paid(
                &client,
                Keypair::from_seed(renter.seed()),
                mlp.clone(),
                Vec::new(),
                Requirements::default(),
                Some(payment),
            )
            .await?,
        );
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
            "{} inferences (4 sent at a time; a receipt and its voucher every 16 calls and at the close): p50 {:.1} ms, p99 {:.1} ms; {}",
            total.inferences,
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            usage_line(&total)
        ));
        say(format!("            -> last response: {last}"));
        let session_provider = session.provider().await;
        let price_per_inference = session.price_per_inference().await;
        let mut books = session.close().await?;
        // The receipt the provider signed at the close covers every call, checked against each.
        let last_receipt = session.last_receipt().await;
        if let Some(r) = &last_receipt {
            say(format!(
                "            -> closing receipt checked against all {} calls; {} inferences x {} = {} due to {provider}",
                r.sequence, r.counts.inferences, r.price_per_inference, r.amount_due
            ));
        }
        books.extend(job_books);
        let settlement =
            settlement_table(&chain, &mint, (&renter, renter_before), &books, &ledgers, &names, POLICY).await?;
        if text {
            eprintln!("{}", settlement.get("table").and_then(Value::as_str).unwrap_or(""));
        }
        // Sentence embeddings from a real model (all-MiniLM-L6-v2), when its weights are here:
        // the folder goes to the provider once as a blob, then one request embeds the pairs.
        let embeddings = match embedding_inputs(args) {
            None => {
                say("\nno all-MiniLM-L6-v2 weights (scripts/fetch-minilm.sh): the embedding session is skipped".into());
                Value::Null
            }
            Some((model, wasm)) => {
                let init = host::bundle_dir(&model).map_err(anyhow::Error::msg)?;
                let t = Instant::now();
                let payment = session_payment();
                let session = client::Session::open_paid(
                    &client,
                    Keypair::from_seed(renter.seed()),
                    wasm,
                    init,
                    Requirements::default(),
                    Some(payment),
                )
                .await?;
                let opened = t.elapsed();
                let on = session.provider().await.map(|p| names.get(&p).cloned().unwrap_or_default()).unwrap_or_default();
                say(format!(
                    "\nembedding session (all-MiniLM-L6-v2) on {on}: {:.1} MB of weights sent as a blob, opened in {:.0} ms",
                    session.init_bytes_sent() as f64 / 1e6,
                    opened.as_secs_f64() * 1e3
                ));
                let sentences: Vec<&str> = PAIRS.iter().flat_map(|(a, b, _)| [*a, *b]).collect();
                let t = Instant::now();
                let answer = session.infer(&serde_json::to_vec(&sentences)?).await?;
                let took = t.elapsed();
                let text = String::from_utf8(answer.response).context("the embeddings are not text")?;
                let vectors: Vec<Vec<f32>> =
                    text.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("reading the embeddings")?;
                anyhow::ensure!(vectors.len() == sentences.len(), "{} embeddings for {} sentences", vectors.len(), sentences.len());
                let mut pairs = Vec::new();
                for ((a, b, reference), two) in PAIRS.iter().zip(vectors.chunks_exact(2)) {
                    let [va, vb] = two else { continue };
                    let sim = cosine(va, vb);
                    say(format!("            {sim:>7.4} (PyTorch {reference:>7.4})  {a:?} ~ {b:?}"));
                    pairs.push(json!({ "a": a, "b": b, "cosine": sim, "reference": reference }));
                }
                say(format!(
                    "            {} sentences in one request, {:.0} ms, {} dispatches in one submission",
                    sentences.len(),
                    took.as_secs_f64() * 1e3,
                    answer.usage.dispatches
                ));
                let _ = session.close().await?;
                json!({
                    "provider_name": on,
                    "init_bytes_sent": session.init_bytes_sent(),
                    "open_ms": opened.as_millis() as u64,
                    "request_ms": took.as_millis() as u64,
                    "dimensions": vectors.first().map_or(0, Vec::len),
                    "pairs": pairs,
                })
            }
        };
        say(format!("\ndemo done in {:.1} s", t0.elapsed().as_secs_f64()));
        Ok::<Value, anyhow::Error>(json!({
            "scheduler": { "http": listening.http.to_string(), "quic": listening.quic.to_string(), "key": listening.key.to_string() },
            "gpu": { "name": gpu.name, "backend": gpu.backend, "device_type": gpu.device_type },
            "providers": names.iter().map(|(k, n)| json!({ "name": n, "key": k.to_string() })).collect::<Vec<_>>(),
            "jobs": job_reports,
            "cluster": cluster_report,
            "session": {
                "provider": session_provider.map(|p| p.to_string()),
                "provider_name": provider,
                "inferences": total.inferences,
                "failovers": session.failovers(),
                "price_per_inference": price_per_inference,
                // What the renter owes, from the provider's last signed receipt it checked.
                "amount_due": last_receipt.as_ref().map(|r| r.amount_due),
                "receipts_checked": last_receipt.as_ref().map(|r| r.sequence),
                "open_ms": opened.as_millis() as u64,
                "p50_us": pct(0.5).as_micros() as u64,
                "p99_us": pct(0.99).as_micros() as u64,
                "usage": total,
            },
            "settlement": settlement,
            "embeddings": embeddings,
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
