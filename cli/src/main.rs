//! `wasmgrid`: the one binary users run.

mod checkpoint_file;
mod demo;
mod market;
mod money;
mod provider;
mod units;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use host::{AdapterChoice, Failure, Host, HostConfig, Limits, LoadError, StartError, Usage};
use serde_json::{Value, json};

/// Exit statuses, so scripts can tell what happened without parsing output.
mod exit {
    /// The job ran and succeeded.
    pub(crate) const OK: u8 = 0;
    /// The job ran and failed by its own doing (error, crash, non-zero exit).
    pub(crate) const JOB_ERROR: u8 = 1;
    /// The command could not start the job: bad flags, unreadable files, a module this host
    /// refuses. clap uses 2 for usage errors too.
    pub(crate) const BAD_INPUT: u8 = 2;
    /// The job was ended by one of its limits.
    pub(crate) const LIMIT: u8 = 3;
    /// The host failed (no GPU, device lost), or the scheduler could not be reached.
    pub(crate) const HOST: u8 = 4;
    /// A submitted job's deadline passed before any provider could run it.
    pub(crate) const EXPIRED: u8 = 5;
}

#[derive(Parser, Debug)]
#[command(name = "wasmgrid", version, about = "Run GPU kernels in a WebAssembly sandbox, and rent GPUs out for them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the GPU adapters this machine offers to jobs, best first.
    Gpus {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a batch job (a module with `fn main`) on the local GPU and print its output and usage.
    Run(RunArgs),
    /// Start an inference service (a module exporting `wasmgrid_init`/`wasmgrid_infer`) locally
    /// and serve requests: one per line of stdin, or one per file given.
    Infer(InferArgs),
    /// Write a new keypair (Solana CLI format) and print its public key.
    Keygen(market::KeygenArgs),
    /// Run a scheduler: the HTTP API for renters and the QUIC endpoint for providers.
    Scheduler(market::SchedulerArgs),
    /// Run a provider host: connect to a scheduler and run the jobs it sends, each in a worker
    /// process.
    Host(provider::HostDaemonArgs),
    /// One worker process of a provider host, spoken to over stdin and stdout (the host starts
    /// these; not for people).
    #[command(hide = true)]
    Worker(provider::WorkerArgs),
    /// Submit a batch job to a scheduler; with --wait, follow it and print its output.
    Submit(market::SubmitArgs),
    /// Show where a cluster of GPUs (`--gpus N`) would be placed now and in what ring order,
    /// with the slowest link, or why none fits.
    Plan(market::PlanArgs),
    /// Show a submitted job.
    Job(market::JobArgs),
    /// Cancel a queued or running job (a cluster's member cancels its whole cluster).
    Cancel(market::CancelArgs),
    /// Open an inference session through a scheduler and send requests: one per line of stdin,
    /// or one per file given.
    Session(market::SessionArgs),
    /// Run a scheduler and two providers on loopback, submit the sample jobs and run an
    /// inference session, all paid on an in-process Solana chain, and show who ran what and
    /// who paid and earned what.
    Demo(demo::DemoArgs),
    /// Run a local chain (LiteSVM, with our payment-channel program and a new payment mint)
    /// behind JSON-RPC, for hosts and renters in separate processes to pay on; prints its URL
    /// and mint. `chain deploy` deploys the program to a cluster.
    Chain(money::ChainCmdArgs),
    /// A provider's earnings per device, session and payment channel: claimed (by the chain)
    /// and vouched for (by the renter's signatures).
    Earnings(money::LedgerArgs),
    /// A renter's spend per payment channel and session; `--close` closes its channels.
    Spend(money::SpendArgs),
}

#[derive(Args, Debug)]
struct HostArgs {
    /// Use the adapter whose name contains this text (see `wasmgrid gpus`).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Do not read or write the compiled-module cache.
    #[arg(long)]
    no_cache: bool,
    /// Print one JSON object (per request, for `infer`) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct LimitArgs {
    /// Largest linear memory of the job (e.g. 512MiB).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    memory: Option<u64>,
    /// WebAssembly fuel: about one unit per executed instruction.
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// CPU time the guest may spend running WebAssembly, per call (e.g. 30s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    cpu_time: Option<Duration>,
    /// Wall time per call, GPU work included (e.g. 2m).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    wall_time: Option<Duration>,
    /// GPU memory the job may hold in buffers at once (e.g. 4GiB).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    gpu_memory: Option<u64>,
    /// GPU buffers the job may hold at once.
    #[arg(long, value_name = "N")]
    max_buffers: Option<u32>,
    /// Workgroups in one dispatch (x * y * z).
    #[arg(long, value_name = "N")]
    max_workgroups: Option<u64>,
    /// Dispatches over the life of the job.
    #[arg(long, value_name = "N")]
    max_dispatches: Option<u64>,
    /// Bytes of output (per request for `infer`).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    max_output: Option<u64>,
    /// Bytes of log kept (stdout, stderr and log lines).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    max_log: Option<u64>,
    /// Bytes a cluster job's member may send to and receive from its peers, together
    /// (a submitted cluster that names none gets 64 GiB per member).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    max_net_bytes: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        macro_rules! set {
            ($($flag:ident => $field:ident),*) => { $(if let Some(v) = self.$flag { l.$field = v; })* };
        }
        set!(memory => memory_bytes, fuel => fuel, cpu_time => cpu_time, wall_time => wall_time,
             gpu_memory => gpu_bytes, max_buffers => buffers, max_workgroups => workgroups_per_dispatch,
             max_dispatches => dispatches, max_output => output_bytes, max_log => log_bytes,
             max_net_bytes => net_bytes);
        l
    }

    /// The same limits on the wire, for a submitted job: what is not given is 0, the
    /// provider's default (a provider never gives a job more than its own limits).
    pub(crate) fn job_limits(&self) -> proto::msg::JobLimits {
        let ms = |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        proto::msg::JobLimits {
            memory_bytes: self.memory.unwrap_or(0),
            fuel: self.fuel.unwrap_or(0),
            cpu_time_ms: ms(self.cpu_time),
            wall_time_ms: ms(self.wall_time),
            gpu_bytes: self.gpu_memory.unwrap_or(0),
            dispatches: self.max_dispatches.unwrap_or(0),
            buffers: self.max_buffers.unwrap_or(0),
            workgroups_per_dispatch: self.max_workgroups.unwrap_or(0),
            output_bytes: self.max_output.unwrap_or(0),
            log_bytes: self.max_log.unwrap_or(0),
            net_bytes: self.max_net_bytes.unwrap_or(0),
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The job module (`.wasm`, built with `cargo build --target wasm32-wasip1`).
    job: PathBuf,
    /// File whose bytes are the job input (`-` for stdin); none means empty input.
    #[arg(long, short, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Write the job output to this file instead of printing it.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Run a cluster job here as this many members (each its own sandbox on this GPU, linked
    /// in a ring in this process), as `submit --gpus N` would across providers; the output is
    /// rank 0's.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=proto::cluster::MAX_MEMBERS as i64))]
    world: u32,
    /// Keep the job's checkpoints in this file: a run that finds it resumes from it, and the
    /// newest checkpoint the job saves replaces it (as a cluster job's next try would resume
    /// on the market).
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args, Debug)]
struct InferArgs {
    /// The inference service module (`.wasm`, a `cdylib` built for wasm32-wasip1).
    job: PathBuf,
    /// The input of `init`: a file's bytes (for example the weights), or a folder's files as
    /// one bundle (a model folder; see `abi::files` for the layout).
    #[arg(long, value_name = "FILE|DIR")]
    init: Option<PathBuf>,
    /// Request files, one request each; without any, each line of stdin is one request.
    requests: Vec<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// An error that maps to an exit status, with the message users see.
#[derive(Debug)]
struct Exit {
    code: u8,
    error: anyhow::Error,
}

fn bad_input(error: anyhow::Error) -> Exit {
    Exit { code: exit::BAD_INPUT, error }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gpus { json } => gpus(json),
        Command::Run(args) => run(&args),
        Command::Infer(args) => infer(&args),
        Command::Keygen(args) => market::keygen(&args),
        Command::Scheduler(args) => market::scheduler(&args),
        Command::Host(args) => provider::host_daemon(&args),
        Command::Worker(args) => provider::worker(&args),
        Command::Submit(args) => market::submit(&args),
        Command::Plan(args) => market::plan(&args),
        Command::Job(args) => market::job(&args),
        Command::Cancel(args) => market::cancel(&args),
        Command::Session(args) => market::session(&args),
        Command::Demo(args) => demo::demo(&args),
        Command::Chain(args) => money::chain(&args),
        Command::Earnings(args) => money::earnings(&args),
        Command::Spend(args) => money::spend(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Exit { code, error }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}

fn gpus(json: bool) -> Result<u8, Exit> {
    let adapters = host::list_adapters();
    if json {
        let list: Vec<Value> = adapters.iter().map(adapter_json).collect();
        println!("{}", Value::Array(list));
        return Ok(exit::OK);
    }
    if adapters.is_empty() {
        println!(
            "no GPU adapter with compute shaders found; install a Vulkan driver (apt-get install mesa-vulkan-drivers libvulkan1 for a CPU fallback)"
        );
        return Ok(exit::HOST);
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("{i}: {} ({}, {}, {})", a.name, a.vendor, a.backend, a.device_type);
        println!("   driver: {} {}", a.driver, a.driver_info);
        println!(
            "   max buffer {}, max storage binding {}, workgroups/dim {}, invocations/workgroup {}, timestamps {}",
            units::format_size(a.max_buffer_size),
            units::format_size(a.max_storage_buffer_binding_size),
            a.max_compute_workgroups_per_dimension,
            a.max_compute_invocations_per_workgroup,
            if a.timestamp_queries { "yes" } else { "no" },
        );
    }
    Ok(exit::OK)
}

fn adapter_json(a: &host::AdapterSummary) -> Value {
    json!({
        "name": a.name,
        "vendor": a.vendor,
        "vendor_id": a.vendor_id,
        "device_id": a.device_id,
        "backend": a.backend,
        "device_type": a.device_type,
        "driver": a.driver,
        "driver_info": a.driver_info,
        "limits": {
            "max_buffer_size": a.max_buffer_size,
            "max_storage_buffer_binding_size": a.max_storage_buffer_binding_size,
            "max_compute_workgroups_per_dimension": a.max_compute_workgroups_per_dimension,
            "max_compute_invocations_per_workgroup": a.max_compute_invocations_per_workgroup,
            "max_compute_workgroup_size": a.max_compute_workgroup_size,
            "max_compute_workgroup_storage_size": a.max_compute_workgroup_storage_size,
        },
        "timestamp_queries": a.timestamp_queries,
    })
}

/// wasmgrid's folder in the user cache directory.
pub(crate) fn cache_base() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasmgrid"))
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    cache_base().map(|b| b.join("modules"))
}

fn start_host(args: &HostArgs) -> Result<Host, Exit> {
    let config = HostConfig {
        adapter: AdapterChoice { name: args.adapter.clone() },
        max_instances: 4,
        cache_dir: if args.no_cache { None } else { cache_dir() },
        ..HostConfig::default()
    };
    Host::new(config).map_err(|e| Exit { code: exit::HOST, error: anyhow::anyhow!(e) })
}

fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
        return Ok(buf);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// An init input: a file's bytes, or a folder's files as one bundle ([`host::bundle_dir`]).
pub(crate) fn read_init(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.is_dir() {
        return host::bundle_dir(path).map_err(anyhow::Error::msg);
    }
    read_input(path)
}

fn load(host: &Host, path: &Path) -> Result<host::JobModule, Exit> {
    let wasm = std::fs::read(path).with_context(|| format!("reading the job {}", path.display())).map_err(bad_input)?;
    host.load(&wasm).map_err(|e| bad_input(anyhow::anyhow!(e).context(format!("cannot run {}", path.display()))))
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "inferences": u.inferences,
        "fuel": u.fuel,
        "dispatches": u.dispatches,
        "workgroups": u.workgroups,
        "invocations": u.invocations,
        "bytes_uploaded": u.bytes_uploaded,
        "bytes_downloaded": u.bytes_downloaded,
        "peak_gpu_bytes": u.peak_gpu_bytes,
        "gpu_time_ns": u.gpu_time_ns,
        "gpu_time_source": u.gpu_time_source.name(),
        "net_bytes_sent": u.net_bytes_sent,
        "net_bytes_received": u.net_bytes_received,
        "net_wait_ns": u.net_wait_ns,
    })
}

fn usage_text(u: &Usage) -> String {
    format!(
        "fuel {}, dispatches {}, workgroups {}, invocations {}, uploaded {}, downloaded {}, peak GPU memory {}, GPU time {:.3} ms ({})",
        u.fuel,
        u.dispatches,
        u.workgroups,
        u.invocations,
        units::format_size(u.bytes_uploaded),
        units::format_size(u.bytes_downloaded),
        units::format_size(u.peak_gpu_bytes),
        u.gpu_time_ns as f64 / 1e6,
        u.gpu_time_source.name(),
    )
}

fn failure_json(f: &Failure) -> Value {
    let (kind, limit) = match f {
        Failure::Limit { limit, .. } => ("limit", Some(limit.name())),
        Failure::Trap(_) => ("trap", None),
        Failure::Exit(_) => ("exit", None),
        Failure::Guest(_) => ("guest", None),
        Failure::Host(_) => ("host", None),
    };
    json!({ "kind": kind, "limit": limit, "message": f.to_string() })
}

fn failure_code(f: &Failure) -> u8 {
    match f {
        Failure::Limit { .. } => exit::LIMIT,
        Failure::Host(_) => exit::HOST,
        _ => exit::JOB_ERROR,
    }
}

/// Bytes as JSON: a string when they are UTF-8, else base-16 under another key.
pub(crate) fn bytes_json(key: &str, bytes: &[u8]) -> (String, Value) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (key.to_string(), Value::String(s.to_string())),
        Err(_) => (format!("{key}_hex"), Value::String(bytes.iter().map(|b| format!("{b:02x}")).collect())),
    }
}

fn run(args: &RunArgs) -> Result<u8, Exit> {
    let input = match &args.input {
        Some(p) => read_input(p).map_err(bad_input)?,
        None => Vec::new(),
    };
    let host = start_host(&args.host)?;
    let module = load(&host, &args.job)?;
    let limits = args.limits.limits();
    let cannot =
        |e: host::LoadError| bad_input(anyhow::anyhow!(e).context(format!("cannot run {}", args.job.display())));
    let resume = match &args.checkpoint {
        Some(path) => checkpoint_file::read(path).map_err(bad_input)?,
        None => None,
    };
    let resumed_from = resume.as_ref().map(|c| c.step);
    let saves = checkpoint_file::Saves::new(args.checkpoint.clone());
    let context = |member: host::collective::Member| host::JobContext {
        cancel: None,
        member,
        checkpoints: host::checkpoint::Checkpoints::new(resume.clone(), saves.sink()),
    };
    let (report, members) = if args.world > 1 {
        // Every member at once, each on a thread of its own; the job's report is rank 0's,
        // or the first failing rank's.
        let reports: Vec<Result<host::JobReport, host::LoadError>> = std::thread::scope(|s| {
            let runs: Vec<_> = host::collective::local_ring(args.world)
                .into_iter()
                .zip(0..)
                .map(|(link, rank)| {
                    let (host, module, limits, input) = (&host, &module, &limits, input.clone());
                    let context = context(host::collective::Member::new(rank, args.world, link, limits.net_bytes));
                    s.spawn(move || host.run_job(module, input, limits, |_| {}, context))
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap_or_else(|_| Err(host::LoadError::Host("a member's thread panicked".into()))))
                .collect()
        });
        let reports = reports.into_iter().collect::<Result<Vec<_>, _>>().map_err(cannot)?;
        let members: Vec<Value> = reports
            .iter()
            .zip(0u32..)
            .map(|(r, rank)| {
                json!({
                    "rank": rank,
                    "status": if r.outcome.is_ok() { "ok" } else { "failed" },
                    "error": r.outcome.as_ref().err().map(failure_json),
                    "usage": usage_json(&r.usage),
                })
            })
            .collect();
        let shown = reports.iter().position(|r| r.outcome.is_err()).unwrap_or(0);
        let report = reports.into_iter().nth(shown).ok_or_else(|| bad_input(anyhow::anyhow!("no member ran")))?;
        (report, Some(members))
    } else {
        let context = context(host::collective::Member::solo());
        (host.run_job(&module, input, &limits, |_| {}, context).map_err(cannot)?, None)
    };
    saves.finish().map_err(bad_input)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &report.output)
            .with_context(|| format!("writing {}", path.display()))
            .map_err(bad_input)?;
    }
    let code = report.outcome.as_ref().map_or_else(failure_code, |()| exit::OK);

    if args.host.json {
        let mut obj = serde_json::Map::new();
        obj.insert("status".into(), json!(if code == exit::OK { "ok" } else { "failed" }));
        obj.insert("module".into(), json!(module.hash_hex()));
        obj.insert("gpu".into(), json!(host.gpu().name));
        if let Err(f) = &report.outcome {
            obj.insert("error".into(), failure_json(f));
        }
        obj.insert("usage".into(), usage_json(&report.usage));
        if let Some(m) = &members {
            obj.insert("members".into(), json!(m));
        }
        if args.checkpoint.is_some() {
            obj.insert(
                "checkpoint".into(),
                json!({
                    "resumed_from_step": resumed_from,
                    "saved": report.checkpoints_saved,
                    "newest_step": report.newest_checkpoint_step,
                }),
            );
        }
        obj.insert("wall_time_ms".into(), json!(report.wall_time.as_secs_f64() * 1e3));
        match &args.output {
            Some(path) => {
                obj.insert("output_file".into(), json!(path.display().to_string()));
                obj.insert("output_bytes".into(), json!(report.output.len()));
            }
            None => {
                let (k, v) = bytes_json("output", &report.output);
                obj.insert(k, v);
            }
        }
        let (k, v) = bytes_json("log", &report.log);
        obj.insert(k, v);
        println!("{}", Value::Object(obj));
        return Ok(code);
    }

    let mut stderr = std::io::stderr();
    if !report.log.is_empty() {
        let _ = writeln!(stderr, "--- log ---");
        let _ = stderr.write_all(&report.log);
        if !report.log.ends_with(b"\n") {
            let _ = writeln!(stderr);
        }
    }
    if args.output.is_none() {
        let mut stdout = std::io::stdout();
        if std::str::from_utf8(&report.output).is_err() && stdout.is_terminal() {
            let _ =
                writeln!(stderr, "(output is {} bytes of binary; use --output FILE to save it)", report.output.len());
        } else {
            let _ = stdout.write_all(&report.output);
            let _ = stdout.flush();
        }
    }
    let _ = writeln!(stderr, "--- usage ---\n{} on {}", usage_text(&report.usage), host.gpu().name);
    let _ = writeln!(stderr, "wall time {:.1} ms", report.wall_time.as_secs_f64() * 1e3);
    match &report.outcome {
        Ok(()) => {}
        Err(f) => {
            let _ = writeln!(stderr, "error: {f}");
        }
    }
    Ok(code)
}

fn infer(args: &InferArgs) -> Result<u8, Exit> {
    let init = match &args.init {
        Some(p) => read_init(p).map_err(bad_input)?,
        None => Vec::new(),
    };
    // Read request files before starting anything, so a missing file fails fast.
    let files: Vec<(String, Vec<u8>)> = args
        .requests
        .iter()
        .map(|p| read_input(p).map(|b| (p.display().to_string(), b)))
        .collect::<anyhow::Result<_>>()
        .map_err(bad_input)?;
    let host = start_host(&args.host)?;
    let module = load(&host, &args.job)?;
    let limits = args.limits.limits();
    let mut service = match host.start_service(&module, init, &limits) {
        Ok(s) => s,
        Err(StartError::Load(e @ (LoadError::NotService | LoadError::NotBatch))) => {
            return Err(bad_input(anyhow::anyhow!(e)));
        }
        Err(StartError::Load(e)) => return Err(bad_input(anyhow::anyhow!(e))),
        Err(StartError::Failed(f)) => {
            let _ = std::io::stderr().write_all(&f.log);
            if args.host.json {
                println!(
                    "{}",
                    json!({ "status": "failed", "stage": "init", "error": failure_json(&f.failure), "usage": usage_json(&f.usage) })
                );
            } else {
                eprintln!("error: init failed: {}", f.failure);
            }
            return Ok(failure_code(&f.failure));
        }
    };

    let mut worst = exit::OK;
    let mut serve = |n: usize, name: &str, request: &[u8]| -> bool {
        let result = service.infer(request);
        let mut stdout = std::io::stdout().lock();
        match &result {
            Ok(inf) => {
                if args.host.json {
                    let mut obj = serde_json::Map::new();
                    obj.insert("request".into(), json!(n));
                    obj.insert("source".into(), json!(name));
                    obj.insert("status".into(), json!("ok"));
                    let (k, v) = bytes_json("response", &inf.response);
                    obj.insert(k, v);
                    obj.insert("usage".into(), usage_json(&inf.usage));
                    let _ = writeln!(stdout, "{}", Value::Object(obj));
                } else {
                    let _ = stdout.write_all(&inf.response);
                    let _ = writeln!(stdout);
                }
            }
            Err(f) => {
                worst = worst.max(failure_code(f));
                if args.host.json {
                    let _ = writeln!(
                        stdout,
                        "{}",
                        json!({ "request": n, "source": name, "status": "failed", "error": failure_json(f) })
                    );
                } else {
                    let _ = writeln!(stdout);
                    eprintln!("request {n} ({name}): {f}");
                }
            }
        }
        let _ = stdout.flush();
        // A limit or crash ends the service: stop reading requests.
        !matches!(result, Err(ref f) if !matches!(f, Failure::Guest(_)))
    };

    let mut count = 0usize;
    if files.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin").map_err(bad_input)?;
            if line.trim().is_empty() {
                continue;
            }
            count += 1;
            if !serve(count, "stdin", line.as_bytes()) {
                break;
            }
        }
    } else {
        for (name, body) in &files {
            count += 1;
            if !serve(count, name, body) {
                break;
            }
        }
    }
    let total = service.usage();
    if args.host.json {
        println!("{}", json!({ "summary": true, "requests": count, "usage": usage_json(&total) }));
    } else {
        eprintln!("--- usage ({count} requests, init included) ---\n{} on {}", usage_text(&total), host.gpu().name);
    }
    Ok(worst)
}
