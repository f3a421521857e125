//! The market commands: `keygen`, `scheduler`, `submit`, `job`, `session`.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::api::{JobState, JobView};
use proto::msg::{FailureKind, Outcome, Requirements};
use proto::{Keypair, PublicKey};
use serde_json::{Value, json};

use crate::{Exit, bad_input, exit, units};

pub(crate) fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("wasmgrid")
}

/// Reads a keypair, or creates it when it does not exist yet (and says so).
pub(crate) fn key_or_create(path: &Path) -> anyhow::Result<Keypair> {
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
    /// Address of the API for renters: HTTPS, with a certificate made from the scheduler's key
    /// (renters pin that key).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Serve the API as plain HTTP instead of HTTPS; refused unless --http is a loopback
    /// address (for tests and a scheduler reached only from this machine).
    #[arg(long)]
    plain_http_loopback: bool,
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
    /// How often providers send a heartbeat.
    #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
    heartbeat_interval: Duration,
    /// A provider silent this long is offline and its running jobs run elsewhere; at least
    /// three heartbeat intervals.
    #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
    heartbeat_timeout: Duration,
    /// How often a job is started before it fails for good.
    #[arg(long, default_value_t = 3)]
    max_attempts: usize,
    /// Signed requests per second each renter may send on average (0: no limit); past it, 429
    /// with the time to wait.
    #[arg(long, value_name = "N", default_value_t = 50.0)]
    rate_limit: f64,
    /// Requests a renter may send at once after a quiet spell.
    #[arg(long, value_name = "N", default_value_t = 100)]
    rate_burst: u32,
    /// Jobs one renter may have queued or running at once; past it, 429 until one ends (a
    /// cluster job counts once).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_jobs_per_renter: usize,
    /// How long a placed cluster job's members have to start on their providers; past it, the
    /// whole cluster is placed again.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
    cluster_start_timeout: Duration,
    /// A queued cluster waiting this long has the free GPUs it could use held for it (jobs
    /// queued after it leave them alone), so smaller work never passes it over for ever.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    cluster_hold_after: Duration,
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
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let config = scheduler::SchedulerConfig {
        http: args.http,
        plain_http: args.plain_http_loopback,
        renter_limits: (args.rate_limit > 0.0)
            .then_some(scheduler::RenterLimits { requests_per_second: args.rate_limit, burst: args.rate_burst }),
        quic: args.quic,
        keypair,
        providers,
        db,
        state: scheduler::Config {
            heartbeat_interval_ms: ms(args.heartbeat_interval),
            heartbeat_timeout_ms: ms(args.heartbeat_timeout),
            max_attempts: args.max_attempts.max(1),
            max_jobs_per_renter: args.max_jobs_per_renter,
            cluster_start_timeout_ms: ms(args.cluster_start_timeout),
            cluster_hold_after_ms: ms(args.cluster_hold_after),
            ..scheduler::Config::default()
        },
    };
    let rt = runtime()?;
    rt.block_on(async {
        let listening = scheduler::start(config).await.map_err(|e| bad_input(e.into()))?;
        // One line for people and scripts (tests read the addresses from it).
        println!(
            "scheduler listening url={} http={} quic={} key={}",
            listening.url(),
            listening.http,
            listening.quic,
            listening.key
        );
        let _ = std::io::stdout().flush();
        eprintln!(
            "renters and providers pin this key: --scheduler {} --scheduler-key {} (or WASMGRID_SCHEDULER_KEY={})",
            listening.url(),
            listening.key,
            listening.key
        );
        let _ = tokio::signal::ctrl_c().await;
        Ok(exit::OK)
    })
}

/// What renters can ask of a provider, as flags.
#[derive(Args, Debug, Default)]
pub(crate) struct RequirementArgs {
    /// GPUs. For `submit` and `plan`: the cluster's size, one GPU per member, each GPU
    /// meeting the other requirements (1: a plain job). For a session: GPUs on one provider.
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

/// Which scheduler a renter command talks to, and as whom: every request is signed with the
/// renter's key, and HTTPS is pinned to the scheduler's.
#[derive(Args, Debug)]
pub(crate) struct RenterArgs {
    /// The scheduler's API: https://HOST:PORT, or http:// for a scheduler on this machine
    /// serving plain HTTP (--plain-http-loopback).
    #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:8080", env = "WASMGRID_SCHEDULER")]
    scheduler: String,
    /// The scheduler's public key (base58), as `wasmgrid scheduler` prints it at start: an HTTPS
    /// server holding any other key is refused. Needed for https://.
    #[arg(long, value_name = "KEY", env = "WASMGRID_SCHEDULER_KEY")]
    scheduler_key: Option<PublicKey>,
    /// The renter's keypair (created if missing): requests are signed with it, and the jobs and
    /// sessions they create belong to it (use the same key to read them later, and to pay).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

impl RenterArgs {
    fn keypair(&self) -> Result<Keypair, Exit> {
        key_or_create(&self.key.clone().unwrap_or_else(|| config_dir().join("renter.json"))).map_err(bad_input)
    }

    /// The scheduler's client, signing with `renter`.
    fn client(&self, renter: Keypair) -> Result<client::Scheduler, Exit> {
        client::Scheduler::new(&self.scheduler, self.scheduler_key, renter).map_err(|e| bad_input(e.into()))
    }
}

#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    renter: RenterArgs,
    /// What each GPU must be; `--gpus N` is the cluster's size.
    #[command(flatten)]
    requirements: RequirementArgs,
    /// Every GPU on one provider.
    #[arg(long)]
    one_provider: bool,
    /// The slowest round trip allowed between two members' providers, in milliseconds.
    #[arg(long, value_name = "MS")]
    max_link_rtt: Option<u32>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// `wasmgrid plan`: where a cluster of GPUs would be placed now, in ring order, or why none
/// fits (with counts).
pub(crate) fn plan(args: &PlanArgs) -> Result<u8, Exit> {
    let req = proto::api::PlanRequest {
        gpus: args.requirements.gpus.unwrap_or(1),
        one_provider: args.one_provider,
        max_link_rtt_ms: args.max_link_rtt,
        requirements: Requirements { gpu_count: None, ..args.requirements.requirements() },
    };
    let client = args.renter.client(args.renter.keypair()?)?;
    let plan = runtime()?.block_on(client.plan(&req)).map_err(|e| match e {
        client::Error::NoProvider(why) => Exit { code: exit::HOST, error: anyhow!("no cluster fits now: {why}") },
        e => Exit { code: exit::HOST, error: e.into() },
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan).map_err(|e| bad_input(e.into()))?);
        return Ok(exit::OK);
    }
    println!("{:>4}  {:<44}  {:<12}  {:<8}  {:>4}  {:>10}", "rank", "provider", "name", "region", "gpu", "price/s");
    for m in &plan.members {
        println!(
            "{:>4}  {:<44}  {:<12}  {:<8}  {:>4}  {:>10}",
            m.rank,
            m.provider.to_string(),
            m.name,
            m.region,
            m.gpu,
            m.price_per_gpu_second
        );
    }
    let slowest = plan.slowest_link_ms.map_or("not measured".to_string(), |ms| format!("{ms} ms"));
    println!(
        "{} GPU(s) in a ring; slowest link {slowest}; {} per second in all",
        plan.members.len(),
        plan.price_per_second
    );
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    /// The job module.
    job: PathBuf,
    #[command(flatten)]
    renter: RenterArgs,
    /// File whose bytes are the job input.
    #[arg(long, short, value_name = "FILE")]
    input: Option<PathBuf>,
    /// With --wait, write the output here instead of printing it.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    requirements: RequirementArgs,
    /// What the job may use (a provider gives it no more than its own limits).
    #[command(flatten)]
    limits: crate::LimitArgs,
    /// How long the job may wait and run before it is given up (e.g. 10m).
    #[arg(long, value_parser = units::parse_duration)]
    deadline: Option<Duration>,
    /// Wait for the job to end, showing its progress, and print its output.
    #[arg(long)]
    wait: bool,
    /// Print JSON (the submission, or with --wait the finished job) instead of text.
    #[arg(long)]
    json: bool,
    /// Pay for the job as it runs (with --wait), where its provider takes payment: through the
    /// renter's payment channel with that provider (opened, or topped up to hold what the job
    /// may cost at its wall-time limit), a voucher for every receipt the provider signs.
    #[command(flatten)]
    pay: crate::money::SessionPayArgs,
    /// With --gpus N (2 or more): every member on one provider.
    #[arg(long)]
    one_provider: bool,
    /// With --gpus N (2 or more): the slowest round trip allowed between two members'
    /// providers, in milliseconds, as they measured it (--max-rtt bounds the scheduler's to each
    /// provider).
    #[arg(long, value_name = "MS")]
    max_link_rtt: Option<u32>,
    /// With --gpus N (2 or more): the most members on any one provider (1: each on its own).
    #[arg(long, value_name = "N")]
    per_provider: Option<u32>,
}

impl SubmitArgs {
    /// The cluster `--gpus N` asks for (none for one GPU), and what each GPU must be.
    fn shape(&self) -> Result<(Requirements, Option<proto::api::ClusterRequest>), Exit> {
        let each = Requirements { gpu_count: None, ..self.requirements.requirements() };
        match self.requirements.gpus {
            Some(0) => Err(bad_input(anyhow!("--gpus must be at least 1"))),
            Some(gpus) if gpus > 1 => Ok((
                each,
                Some(proto::api::ClusterRequest {
                    gpus,
                    one_provider: self.one_provider,
                    max_link_rtt_ms: self.max_link_rtt,
                    max_per_provider: self.per_provider,
                }),
            )),
            _ if self.one_provider || self.max_link_rtt.is_some() || self.per_provider.is_some() => {
                Err(bad_input(anyhow!(
                    "--one-provider, --max-link-rtt and --per-provider shape a cluster: give its size too (--gpus N, 2 or more)"
                )))
            }
            _ => Ok((each, None)),
        }
    }
}

fn state_name(s: JobState) -> String {
    format!("{s:?}").to_lowercase()
}

/// Where a running job runs, on one line, for progress (a cluster job: each member).
fn running_line(view: &JobView) -> String {
    if let Some(c) = &view.cluster {
        let members: Vec<String> =
            c.members.iter().map(|m| format!("rank {} on {} {}", m.rank, m.name, state_name(m.state))).collect();
        return format!("running {} member(s) (try {}): {}", c.members.len(), c.tries, members.join(", "));
    }
    let tries = view.attempts.len();
    let on = view.provider.map(|p| p.to_string()).unwrap_or_default();
    if tries > 1 { format!("running on {on} (try {tries})") } else { format!("running on {on}") }
}

/// A cluster job's members, one line each, and its link plan.
fn print_cluster(c: &proto::api::ClusterView) {
    let slowest = c.slowest_link_ms.map_or("not measured".to_string(), |ms| format!("{ms} ms"));
    println!(
        "cluster of {} GPU(s), try {}; slowest link {slowest}{}",
        c.request.gpus,
        c.tries,
        if c.regions.len() > 1 { format!(", {} regions: {:?}", c.regions.len(), c.regions) } else { String::new() }
    );
    if c.members.is_empty() {
        return;
    }
    println!("{:>4}  {:<12}  {:<8}  {:>4}  {:<10}  job / provider", "rank", "name", "region", "gpu", "state");
    for m in &c.members {
        println!(
            "{:>4}  {:<12}  {:<8}  {:>4}  {:<10}  {} on {}{}",
            m.rank,
            m.name,
            m.region,
            m.gpu,
            state_name(m.state),
            m.job_id,
            m.provider,
            m.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
}

#[derive(Args, Debug)]
pub(crate) struct JobArgs {
    /// The job id `submit` printed.
    id: String,
    #[command(flatten)]
    renter: RenterArgs,
    #[arg(long)]
    json: bool,
}

fn job_exit(view: &JobView) -> u8 {
    match (&view.state, &view.outcome) {
        (JobState::Succeeded, _) => exit::OK,
        (_, Some(Outcome::Failed { kind: FailureKind::Limit, .. })) => exit::LIMIT,
        (_, Some(Outcome::Failed { kind: FailureKind::Host, .. })) => exit::HOST,
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
    let limits = args.limits.job_limits();
    let (requirements, cluster) = args.shape()?;
    let is_cluster = cluster.is_some();
    let payment = args.pay.job_payment()?;
    if payment.is_some() && !args.wait {
        return Err(bad_input(anyhow!(
            "paying for a job (--rpc-url) needs --wait: the client answers the provider's receipts as the job runs"
        )));
    }
    let payer = args.renter.keypair()?;
    let client = args.renter.client(Keypair::from_seed(payer.seed()))?;
    let infra = |e: client::Error| Exit { code: exit::HOST, error: e.into() };
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
            .submit_job(&uploaded.module, &input, requirements, limits, args.deadline, cluster)
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
        let progress = |view: &JobView| {
            if quiet {
                return;
            }
            let line = match view.state {
                JobState::Queued => match (&view.no_match, view.queue_position) {
                    (Some(n), _) => format!("queued: {}", n.summary),
                    (None, Some(p)) => format!("queued: position {p}"),
                    (None, None) => "queued".to_string(),
                },
                JobState::Running => running_line(view),
                _ => return,
            };
            eprintln!("{line}");
        };
        let (view, book, member_books) = match (&payment, is_cluster) {
            // A paid cluster pays each member's provider through a channel of its own: the
            // channel id given and those after it, one per member.
            (Some(base), true) => {
                let (view, books) =
                    client.wait_cluster_paying(&submitted.id, base, progress).await.map_err(infra)?;
                (view, None, books)
            }
            _ => {
                let (view, book) =
                    client.wait_paying(&submitted.id, payment.as_ref(), progress).await.map_err(infra)?;
                (view, book, Vec::new())
            }
        };
        if !view.paid() {
            let why = match (&view.channel, &payment) {
                (Some(c), None) => format!(
                    "its provider takes payment (mint {}, program {}): submit again with --rpc-url, --mint and --key",
                    c.mint, c.program
                ),
                (Some(c), Some(_)) => c.refused.clone().unwrap_or_else(|| "its last voucher was not taken".into()),
                (None, _) => String::new(),
            };
            return Err(Exit {
                code: exit::JOB_ERROR,
                error: anyhow!("job {} ended ({:?}), unpaid: its output and log are withheld; {why}", view.id, view.state),
            });
        }
        if let (Some(b), false) = (&book, args.json) {
            eprintln!(
                "vouched {} through payment channel {} ({} receipt(s))",
                b.vouched, b.channel, b.inferences
            );
        }
        // What comes is what the provider signed for (the client checks it against the receipt).
        let output = client.output(&view).await.map_err(infra)?;
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
                map.insert("paid".into(), book.as_ref().map_or(Value::Null, |b| json!({ "vouched": b.vouched, "channel": b.channel.to_string(), "receipts": b.inferences, "claims": view.channel.as_ref().map(|c| c.claims.clone()) })));
                if !member_books.is_empty() {
                    let members: Vec<Value> = member_books
                        .iter()
                        .map(|b| json!({ "job_id": b.session, "vouched": b.vouched, "channel": b.channel.to_string(), "receipts": b.inferences }))
                        .collect();
                    map.insert("members_paid".into(), Value::Array(members));
                }
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
            (JobState::Succeeded, _, _) => match &view.cluster {
                Some(c) => eprintln!(
                    "done in {:.1} s on {} member(s); the output is rank 0's, from {}",
                    started.elapsed().as_secs_f64(),
                    c.members.len(),
                    view.provider.map(|p| p.to_string()).unwrap_or_default()
                ),
                None => eprintln!(
                    "done in {:.1} s on {}",
                    started.elapsed().as_secs_f64(),
                    view.provider.map(|p| p.to_string()).unwrap_or_default()
                ),
            },
            (_, Some(Outcome::Failed { message, .. }), _) => eprintln!("error: {message}"),
            (_, _, Some(e)) => eprintln!("error: {e}"),
            _ => eprintln!("error: the job ended {:?}", view.state),
        }
        Ok(code)
    })
}

pub(crate) fn job(args: &JobArgs) -> Result<u8, Exit> {
    let client = args.renter.client(args.renter.keypair()?)?;
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
            if let Some(m) = &view.member_of {
                println!("rank of cluster job {m}");
            }
            for (i, a) in view.attempts.iter().enumerate() {
                println!("try {}: {} {}", i + 1, a.provider, a.error.as_deref().unwrap_or(""));
            }
            if let Some(c) = &view.cluster {
                print_cluster(c);
            }
            if let Some(e) = &view.error {
                println!("error: {e}");
            }
        }
        Ok(if view.state.is_final() { job_exit(&view) } else { exit::OK })
    })
}

#[derive(Args, Debug)]
pub(crate) struct CancelArgs {
    /// The job id `submit` printed (a cluster's member cancels its whole cluster).
    id: String,
    #[command(flatten)]
    renter: RenterArgs,
    #[arg(long)]
    json: bool,
}

/// Stops a queued or running job. A job that already ended is bad input (exit 2), with its
/// state in the message.
pub(crate) fn cancel(args: &CancelArgs) -> Result<u8, Exit> {
    let client = args.renter.client(args.renter.keypair()?)?;
    runtime()?.block_on(async {
        let view = client.cancel(&args.id).await.map_err(|e| bad_input(e.into()))?;
        if args.json {
            println!("{}", job_json(&view));
        } else {
            println!("{} {:?}: {}", view.id, view.state, view.error.as_deref().unwrap_or(""));
        }
        Ok(exit::OK)
    })
}

#[derive(Args, Debug)]
pub(crate) struct SessionArgs {
    /// The inference service module (a cdylib built for wasm32-wasip1).
    job: PathBuf,
    /// The scheduler, and the renter's key (the provider sees this key too).
    #[command(flatten)]
    renter: RenterArgs,
    /// The input of `init`: a file's bytes (for example the weights), or a folder's files as
    /// one bundle (a model folder).
    #[arg(long, value_name = "FILE|DIR")]
    init: Option<PathBuf>,
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

/// A progress line on the terminal for an init blob's upload: rewritten in place, ended when
/// the last byte is sent.
fn init_progress() -> client::Progress {
    std::sync::Arc::new(|sent: u64, total: u64| {
        let pct = if total == 0 { 100.0 } else { sent as f64 * 100.0 / total as f64 };
        let width = 30usize;
        let filled = ((pct / 100.0) * width as f64) as usize;
        let bar: String = "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
        eprint!("\rsending the init input [{bar}] {:.1} / {:.1} MB", sent as f64 / 1e6, total as f64 / 1e6);
        if sent >= total {
            eprintln!();
        }
    })
}

pub(crate) fn session(args: &SessionArgs) -> Result<u8, Exit> {
    use std::io::BufRead;
    let module = std::fs::read(&args.job)
        .with_context(|| format!("reading the job {}", args.job.display()))
        .map_err(bad_input)?;
    let init = match &args.init {
        Some(p) => crate::read_init(p).map_err(bad_input)?,
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
    let payment = args.pay.payment()?;
    let keypair = args.renter.keypair()?;
    let init_len = init.len();
    let mut requirements = args.requirements.requirements();
    requirements.max_price_per_inference = args.max_price_per_inference;
    let scheduler = args.renter.client(Keypair::from_seed(keypair.seed()))?;
    let json = args.json;
    runtime()?.block_on(async {
        let started = Instant::now();
        let progress = (!json && std::io::stderr().is_terminal()).then(init_progress);
        let session = client::Session::open_with(&scheduler, keypair, module, init, requirements, payment, progress)
            .await
            .map_err(|e| Exit { code: exit::HOST, error: e.into() })?;
        let first = session.provider().await.map(|p| p.to_string()).unwrap_or_default();
        if !json {
            let sent = match session.init_bytes_sent() {
                0 if init_len > proto::msg::INIT_INLINE_MAX => ", the provider had the init input already".to_string(),
                0 => String::new(),
                n => format!(", {:.1} MB of init input sent", n as f64 / 1e6),
            };
            eprintln!("session open on {first} in {:.0} ms{sent}", started.elapsed().as_secs_f64() * 1e3);
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
        // Hand over the last voucher; the channel stays open for the next session.
        let books = session.close().await.map_err(|e| Exit { code: exit::HOST, error: e.into() })?;
        let spent = crate::money::spend_summary(&books);
        if json {
            println!(
                "{}",
                json!({ "summary": true, "inferences": served, "provider": provider, "failovers": session.failovers(),
                        "init_bytes": init_len, "init_bytes_sent": session.init_bytes_sent(),
                        "fuel": fuel, "gpu_time_ns": gpu_ns, "price_per_inference": price,
                        "amount_due": amount_due, "payment": (!books.is_empty()).then_some(spent) })
            );
        } else {
            if !books.is_empty() {
                let vouched: u64 = books.iter().map(|b| b.vouched).sum();
                let claims: usize = books.iter().map(|b| b.claims.len()).sum();
                eprintln!(
                    "vouched {vouched} through the payment channel; the provider claimed {claims} time(s) this session (the channel stays open: `wasmgrid spend`)"
                );
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
