//! The market commands: `keygen`, `scheduler`, `host`, `submit`, `job`.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::api::{JobState, JobView};
use proto::msg::{JobLimits, Outcome, Price, Requirements};
use proto::{Keypair, PublicKey};
use serde_json::{Value, json};

use crate::{Exit, bad_input, exit, units};

fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("wasmgrid")
}

/// Reads a keypair, or creates it when it does not exist yet (and says so).
fn key_or_create(path: &Path) -> anyhow::Result<Keypair> {
    if path.exists() {
        return Ok(Keypair::read(path)?);
    }
    let key = Keypair::generate();
    key.write_new(path)?;
    eprintln!("created a new keypair {} ({})", path.display(), key.public());
    Ok(key)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit { code: exit::HOST, error: anyhow!("starting the async runtime: {e}") })
}

pub(crate) fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).try_init();
}

#[derive(Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Where to write the keypair (Solana CLI JSON format). Never overwrites.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
}

pub(crate) fn keygen(args: &KeygenArgs) -> Result<u8, Exit> {
    let path = args.out.clone().unwrap_or_else(|| config_dir().join("id.json"));
    let key = Keypair::generate();
    key.write_new(&path).map_err(|e| bad_input(e.into()))?;
    println!("{}", key.public());
    eprintln!("wrote {}", path.display());
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub(crate) struct SchedulerArgs {
    /// Address of the HTTP API for renters.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Address of the QUIC endpoint providers connect to.
    #[arg(long, default_value = "0.0.0.0:7070")]
    quic: SocketAddr,
    /// The scheduler's keypair (created if missing); providers pin its public key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// File of provider public keys (base58, one per line, `#` comments) allowed to connect.
    /// Without it any key may register.
    #[arg(long, value_name = "FILE")]
    providers: Option<PathBuf>,
    /// The database file that keeps jobs, modules and providers across restarts.
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// A provider silent this long is offline and its running jobs run elsewhere.
    #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
    heartbeat_timeout: Duration,
    /// How often a job is started before it fails for good.
    #[arg(long, default_value_t = 3)]
    max_attempts: usize,
    /// Take payment for batch jobs on this chain and mint: a succeeded job's output is released
    /// once its renter paid the provider the amount on its signed receipt.
    #[command(flatten)]
    pay: crate::money::ChainArgs,
}

fn read_provider_keys(path: &Path) -> anyhow::Result<HashSet<PublicKey>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.parse::<PublicKey>().with_context(|| format!("in {}", path.display())))
        .collect()
}

pub(crate) fn scheduler(args: &SchedulerArgs) -> Result<u8, Exit> {
    init_logging();
    let keypair =
        key_or_create(&args.key.clone().unwrap_or_else(|| config_dir().join("scheduler.json"))).map_err(bad_input)?;
    let providers = args.providers.as_deref().map(read_provider_keys).transpose().map_err(bad_input)?;
    let db = args.db.clone().unwrap_or_else(|| config_dir().join("scheduler.redb"));
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())).map_err(bad_input)?;
    }
    let (chain, payments) = args.pay.job_payments()?.unzip();
    let config = scheduler::SchedulerConfig {
        chain,
        http: args.http,
        quic: args.quic,
        keypair,
        providers,
        db,
        state: scheduler::Config {
            heartbeat_timeout_ms: args.heartbeat_timeout.as_millis() as u64,
            max_attempts: args.max_attempts.max(1),
            payments,
            ..scheduler::Config::default()
        },
    };
    let rt = runtime()?;
    rt.block_on(async {
        let listening = scheduler::start(config).await.map_err(|e| bad_input(e.into()))?;
        // One line for people and scripts (tests read the addresses from it).
        println!("scheduler listening http={} quic={} key={}", listening.http, listening.quic, listening.key);
        let _ = std::io::stdout().flush();
        let _ = tokio::signal::ctrl_c().await;
        Ok(exit::OK)
    })
}

#[derive(Args, Debug)]
pub(crate) struct HostDaemonArgs {
    /// The scheduler's QUIC address.
    #[arg(long, value_name = "ADDR")]
    scheduler: SocketAddr,
    /// The scheduler's public key (base58), as `GET /v1/info` shows it.
    #[arg(long, value_name = "KEY")]
    scheduler_key: PublicKey,
    /// This provider's keypair (created if missing).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// A name for people.
    #[arg(long, default_value = "provider")]
    name: String,
    #[arg(long, default_value = "local")]
    region: String,
    /// Price per GPU-second of batch jobs, in the payment token's smallest unit.
    #[arg(long, default_value_t = 1)]
    price_per_gpu_second: u64,
    /// Price per inference of sessions.
    #[arg(long, default_value_t = 1)]
    price_per_inference: u64,
    /// Jobs run at once.
    #[arg(long, default_value_t = 2)]
    capacity: u32,
    /// GPU memory offered (default: the adapter's largest buffer).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    vram: Option<u64>,
    /// Use the adapter whose name contains this text.
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Where compiled modules are cached (default: the user cache directory).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Where to listen for renters' inference sessions (QUIC).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    sessions: SocketAddr,
    /// Serve no inference sessions, batch jobs only.
    #[arg(long)]
    no_sessions: bool,
    /// The session address to give renters, when it is not the one seen from the scheduler.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    #[command(flatten)]
    pay: crate::money::HostPayArgs,
}

pub(crate) fn host_daemon(args: &HostDaemonArgs) -> Result<u8, Exit> {
    init_logging();
    let keypair =
        key_or_create(&args.key.clone().unwrap_or_else(|| config_dir().join("provider.json"))).map_err(bad_input)?;
    let host = host::Host::new(host::HostConfig {
        adapter: host::AdapterChoice { name: args.adapter.clone() },
        max_instances: args.capacity.max(1) * 2,
        cache_dir: args.cache_dir.clone().or_else(crate::cache_dir),
        ..host::HostConfig::default()
    })
    .map_err(|e| Exit { code: exit::HOST, error: anyhow!(e) })?;
    let config = host::daemon::DaemonConfig {
        scheduler: args.scheduler,
        scheduler_key: args.scheduler_key,
        keypair,
        name: args.name.clone(),
        region: args.region.clone(),
        price: Price { per_gpu_second: args.price_per_gpu_second, per_inference: args.price_per_inference },
        capacity: args.capacity.max(1),
        vram_bytes: args.vram,
        session_listen: (!args.no_sessions).then_some(args.sessions),
        advertise: args.advertise.clone(),
        payment: args.pay.payment()?,
    };
    println!("provider {} serving {} for {}", config.keypair.public(), host.gpu().name, args.scheduler);
    let _ = std::io::stdout().flush();
    runtime()?.block_on(host::daemon::run_forever(host, config));
    Ok(exit::OK)
}

/// What renters can ask of a provider, as flags.
#[derive(Args, Debug, Default)]
pub(crate) struct RequirementArgs {
    /// GPUs on one provider.
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// Least memory per GPU (e.g. 24GiB).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    min_vram: Option<u64>,
    /// Text the GPU vendor or name must contain (nvidia, H100, radeon).
    #[arg(long, value_name = "TEXT")]
    gpu: Option<String>,
    /// Graphics backend (vulkan, metal, dx12).
    #[arg(long)]
    backend: Option<String>,
    /// Highest price per GPU-second.
    #[arg(long, value_name = "N")]
    max_price: Option<u64>,
    #[arg(long)]
    region: Option<String>,
    /// Highest round trip between scheduler and provider, in milliseconds.
    #[arg(long, value_name = "MS")]
    max_rtt: Option<u32>,
}

impl RequirementArgs {
    fn requirements(&self) -> Requirements {
        Requirements {
            gpu_count: self.gpus,
            min_vram_bytes: self.min_vram,
            gpu: self.gpu.clone(),
            backend: self.backend.clone(),
            max_price_per_gpu_second: self.max_price,
            max_price_per_inference: None,
            region: self.region.clone(),
            max_rtt_ms: self.max_rtt,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    /// The job module.
    job: PathBuf,
    /// The scheduler's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "WASMGRID_SCHEDULER")]
    scheduler: String,
    /// File whose bytes are the job input.
    #[arg(long, short, value_name = "FILE")]
    input: Option<PathBuf>,
    /// With --wait, write the output here instead of printing it.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    requirements: RequirementArgs,
    /// How long the job may wait and run before it is given up (e.g. 10m).
    #[arg(long, value_parser = units::parse_duration)]
    deadline: Option<Duration>,
    /// Wait for the job to end, showing its progress, and print its output.
    #[arg(long)]
    wait: bool,
    /// Print JSON (the submission, or with --wait the finished job) instead of text.
    #[arg(long)]
    json: bool,
    /// Pay for the job when it is done (with --wait), where the scheduler takes payment.
    #[command(flatten)]
    pay: crate::money::ChainArgs,
    /// The paying renter's keypair (created if missing).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct JobArgs {
    /// The job id `submit` printed.
    id: String,
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "WASMGRID_SCHEDULER")]
    scheduler: String,
    #[arg(long)]
    json: bool,
}

fn job_exit(view: &JobView) -> u8 {
    match (&view.state, &view.outcome) {
        (JobState::Succeeded, _) => exit::OK,
        (_, Some(Outcome::Failed { kind, .. })) if kind == "limit" => exit::LIMIT,
        (_, Some(Outcome::Failed { kind, .. })) if kind == "host" => exit::HOST,
        (JobState::Expired, _) => exit::EXPIRED,
        _ => exit::JOB_ERROR,
    }
}

fn job_json(view: &JobView) -> Value {
    serde_json::to_value(view).unwrap_or(Value::Null)
}

pub(crate) fn submit(args: &SubmitArgs) -> Result<u8, Exit> {
    let module = std::fs::read(&args.job)
        .with_context(|| format!("reading the job {}", args.job.display()))
        .map_err(bad_input)?;
    let input = match &args.input {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())).map_err(bad_input)?,
        None => Vec::new(),
    };
    let client = client::Scheduler::new(&args.scheduler);
    let infra = |e: client::Error| Exit { code: exit::HOST, error: e.into() };
    let chain = args.pay.chain_and_mint()?;
    let payer = match &chain {
        Some(_) => {
            key_or_create(&args.key.clone().unwrap_or_else(|| config_dir().join("renter.json"))).map_err(bad_input)?
        }
        None => Keypair::generate(),
    };
    runtime()?.block_on(async {
        let started = Instant::now();
        let uploaded = client.upload(module).await.map_err(infra)?;
        if !args.json {
            eprintln!(
                "uploaded module {} ({})",
                &uploaded.module[..12.min(uploaded.module.len())],
                units::format_size(uploaded.bytes)
            );
        }
        let submitted = client
            .submit(&uploaded.module, &input, args.requirements.requirements(), JobLimits::default(), args.deadline)
            .await
            .map_err(|e| bad_input(e.into()))?;
        if !args.wait {
            if args.json {
                println!("{}", serde_json::to_value(&submitted).unwrap_or(Value::Null));
            } else {
                println!("{}", submitted.id);
                if let Some(n) = &submitted.no_match {
                    eprintln!("waiting: {}", n.summary);
                }
            }
            return Ok(exit::OK);
        }
        if !args.json {
            eprintln!("submitted {}", submitted.id);
        }
        let quiet = args.json;
        let view = client
            .wait(&submitted.id, |view| {
                if quiet {
                    return;
                }
                let line = match view.state {
                    JobState::Queued => match (&view.no_match, view.queue_position) {
                        (Some(n), _) => format!("queued: {}", n.summary),
                        (None, Some(p)) => format!("queued: position {p}"),
                        (None, None) => "queued".to_string(),
                    },
                    JobState::Running => {
                        let tries = view.attempts.len();
                        let on = view.provider.map(|p| p.to_string()).unwrap_or_default();
                        if tries > 1 { format!("running on {on} (try {tries})") } else { format!("running on {on}") }
                    }
                    _ => return,
                };
                eprintln!("{line}");
            })
            .await
            .map_err(infra)?;
        let mut paid = None;
        if let Some(terms) = view.payment.as_ref().filter(|p| p.transaction.is_none()) {
            let Some((chain, _)) = chain.clone() else {
                return Err(bad_input(anyhow!(
                    "job {} succeeded; its output is released once paid ({} to {}): run again with --rpc-url, --mint and --key, or pay with POST /v1/jobs/{}/payment",
                    view.id,
                    terms.amount,
                    terms.pay_to,
                    view.id
                )));
            };
            let sig = client.pay_job(&view.id, chain, &payer).await.map_err(infra)?;
            if !args.json {
                eprintln!("paid {} for job {} in transaction {sig}", terms.amount, view.id);
            }
            paid = Some(sig);
        }
        let output = if view.output_bytes.is_some() {
            client.bytes(&view.id, "output").await.map_err(infra)?
        } else {
            Vec::new()
        };
        // What came is what the provider signed for.
        if let (Some(r), Some(p)) = (&view.receipt, view.provider) {
            r.check(&view.id, &p, &output).map_err(|e| Exit { code: exit::HOST, error: anyhow!("job {}: {e}", view.id) })?;
        }
        let log =
            if view.output_bytes.is_some() { client.bytes(&view.id, "log").await.map_err(infra)? } else { Vec::new() };
        if let Some(path) = &args.output {
            std::fs::write(path, &output).with_context(|| format!("writing {}", path.display())).map_err(bad_input)?;
        }
        let code = job_exit(&view);
        if args.json {
            let mut v = job_json(&view);
            if let Value::Object(map) = &mut v {
                if args.output.is_none() {
                    let (k, val) = crate::bytes_json("output", &output);
                    map.insert(k, val);
                }
                let (k, val) = crate::bytes_json("log", &log);
                map.insert(k, val);
                map.insert("elapsed_ms".into(), json!(started.elapsed().as_millis() as u64));
                map.insert("payment_transaction".into(), json!(paid));
            }
            println!("{v}");
            return Ok(code);
        }
        if !log.is_empty() {
            eprintln!("--- log ---");
            let _ = std::io::stderr().write_all(&log);
        }
        if args.output.is_none() {
            let _ = std::io::stdout().write_all(&output);
        }
        match (&view.state, &view.outcome, &view.error) {
            (JobState::Succeeded, _, _) => eprintln!(
                "done in {:.1} s on {}",
                started.elapsed().as_secs_f64(),
                view.provider.map(|p| p.to_string()).unwrap_or_default()
            ),
            (_, Some(Outcome::Failed { message, .. }), _) => eprintln!("error: {message}"),
            (_, _, Some(e)) => eprintln!("error: {e}"),
            _ => eprintln!("error: the job ended {:?}", view.state),
        }
        Ok(code)
    })
}

pub(crate) fn job(args: &JobArgs) -> Result<u8, Exit> {
    let client = client::Scheduler::new(&args.scheduler);
    runtime()?.block_on(async {
        let view = client.job(&args.id).await.map_err(|e| bad_input(e.into()))?;
        if args.json {
            println!("{}", job_json(&view));
        } else {
            println!("{} {:?}", view.id, view.state);
            if let Some(p) = view.queue_position {
                println!("queue position {p}");
            }
            if let Some(n) = &view.no_match {
                println!("waiting: {}", n.summary);
            }
            for (i, a) in view.attempts.iter().enumerate() {
                println!("try {}: {} {}", i + 1, a.provider, a.error.as_deref().unwrap_or(""));
            }
            if let Some(e) = &view.error {
                println!("error: {e}");
            }
        }
        Ok(if view.state.is_final() { job_exit(&view) } else { exit::OK })
    })
}

#[derive(Args, Debug)]
pub(crate) struct SessionArgs {
    /// The inference service module (a cdylib built for wasm32-wasip1).
    job: PathBuf,
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "WASMGRID_SCHEDULER")]
    scheduler: String,
    /// File whose bytes are the input of `init` (for example the weights).
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// The renter's keypair (created if missing); the provider sees this key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Highest price per inference.
    #[arg(long, value_name = "N")]
    max_price_per_inference: Option<u64>,
    #[command(flatten)]
    requirements: RequirementArgs,
    /// Request files, one request each; without any, each line of stdin is one request.
    requests: Vec<PathBuf>,
    /// One JSON object per request and a summary, instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pay: crate::money::SessionPayArgs,
}

pub(crate) fn session(args: &SessionArgs) -> Result<u8, Exit> {
    use std::io::BufRead;
    let module = std::fs::read(&args.job)
        .with_context(|| format!("reading the job {}", args.job.display()))
        .map_err(bad_input)?;
    let init = match &args.init {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())).map_err(bad_input)?,
        None => Vec::new(),
    };
    let mut requests: Vec<(String, Vec<u8>)> = Vec::new();
    for p in &args.requests {
        requests.push((
            p.display().to_string(),
            std::fs::read(p).with_context(|| format!("reading {}", p.display())).map_err(bad_input)?,
        ));
    }
    if args.requests.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin").map_err(bad_input)?;
            if !line.trim().is_empty() {
                requests.push(("stdin".into(), line.into_bytes()));
            }
        }
    }
    let keypair =
        key_or_create(&args.key.clone().unwrap_or_else(|| config_dir().join("renter.json"))).map_err(bad_input)?;
    let mut requirements = args.requirements.requirements();
    requirements.max_price_per_inference = args.max_price_per_inference;
    let scheduler = client::Scheduler::new(&args.scheduler);
    let json = args.json;
    let payment = args.pay.payment()?;
    runtime()?.block_on(async {
        let started = Instant::now();
        let session = client::Session::open_paid(&scheduler, keypair, module, init, requirements, payment)
            .await
            .map_err(|e| Exit { code: exit::HOST, error: e.into() })?;
        let first = session.provider().await.map(|p| p.to_string()).unwrap_or_default();
        if !json {
            eprintln!("session open on {first} in {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
        }
        let session = std::sync::Arc::new(session);
        let mut worst = exit::OK;
        let (mut served, mut fuel, mut gpu_ns) = (0u64, 0u64, 0u64);
        for chunk in requests.chunks(args.concurrency.max(1)) {
            let mut set = tokio::task::JoinSet::new();
            for (i, (name, body)) in chunk.iter().cloned().enumerate() {
                let s = session.clone();
                set.spawn(async move { (i, name, s.infer(&body).await) });
            }
            let mut results = set.join_all().await;
            results.sort_by_key(|(i, _, _)| *i);
            for (_, name, result) in results {
                match result {
                    Ok(a) => {
                        served += 1;
                        fuel += a.usage.fuel;
                        gpu_ns += a.usage.gpu_time_ns;
                        if json {
                            let (k, v) = crate::bytes_json("response", &a.response);
                            let mut obj = serde_json::Map::new();
                            obj.insert("status".into(), json!("ok"));
                            obj.insert("source".into(), json!(name));
                            obj.insert(k, v);
                            obj.insert("provider".into(), json!(a.provider.to_string()));
                            obj.insert("usage".into(), serde_json::to_value(&a.usage).unwrap_or(Value::Null));
                            println!("{}", Value::Object(obj));
                        } else {
                            println!("{}", String::from_utf8_lossy(&a.response));
                        }
                    }
                    Err(e) => {
                        worst = worst.max(exit::JOB_ERROR);
                        if json {
                            println!("{}", json!({ "status": "failed", "source": name, "error": e.to_string() }));
                        } else {
                            println!();
                            eprintln!("request ({name}): {e}");
                        }
                    }
                }
            }
        }
        let provider = session.provider().await.map(|p| p.to_string()).unwrap_or_default();
        let price = session.price_per_inference().await;
        let amount_due = session.last_receipt().await.map(|r| r.amount_due);
        // Settle the last voucher and take back the rest of the escrow.
        let books = session.close().await.map_err(|e| Exit { code: exit::HOST, error: e.into() })?;
        let spent = crate::money::spend_summary(&books);
        if json {
            println!(
                "{}",
                json!({ "summary": true, "inferences": served, "provider": provider, "failovers": session.failovers(),
                        "fuel": fuel, "gpu_time_ns": gpu_ns, "price_per_inference": price,
                        "amount_due": amount_due, "payment": (!books.is_empty()).then_some(spent) })
            );
        } else {
            if !books.is_empty() {
                let paid: u64 = books.iter().map(|b| b.paid).sum();
                let refunded: u64 = books.iter().map(|b| b.refunded).sum();
                let settlements: usize = books.iter().map(|b| b.settlements.len()).sum();
                eprintln!("paid {paid} in {settlements} settlement(s); {refunded} refunded from escrow");
            }
            eprintln!(
                "{served} inferences on {provider} ({} failovers), fuel {fuel}, GPU time {:.3} ms",
                session.failovers(),
                gpu_ns as f64 / 1e6
            );
        }
        Ok(worst)
    })
}
