//! The provider's commands: `host` (the daemon, a supervisor of worker processes) and
//! `worker` (one worker, spoken to over its stdin and stdout; the daemon starts these).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use proto::PublicKey;
use proto::msg::Price;

use crate::market::{config_dir, init_logging, key_or_create, runtime};
use crate::{Exit, bad_input, exit, units};

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
    /// Price per GiB a cluster member sends to its peers (0: the bytes are free).
    #[arg(long, default_value_t = 0)]
    price_per_net_gib: u64,
    /// Batch jobs run at once (each in its own worker process).
    #[arg(long, default_value_t = 2)]
    capacity: u32,
    /// Inference sessions served at once (each in its own worker process).
    #[arg(long, default_value_t = 16)]
    session_capacity: u32,
    /// Workers kept started ahead of work, beyond one per job slot.
    #[arg(long, default_value_t = 2)]
    warm_workers: u32,
    /// End a session after this long without a request (e.g. 300s, 5m).
    #[arg(long, value_name = "TIME", default_value = "300s", value_parser = units::parse_duration)]
    session_idle: std::time::Duration,
    /// On an unpaid session, sign a receipt every this many inferences, and at its end (a paid
    /// session gets one after every inference, for the renter's vouchers).
    #[arg(long, value_name = "N", default_value_t = provider::daemon::DEFAULT_RECEIPT_EVERY,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    receipt_every: u32,
    /// The most memory all open sessions' workers may hold of their own together (e.g. 8GiB);
    /// a session that would not fit is turned away and the scheduler sends it elsewhere.
    /// Default: half of this machine's memory; `none` bounds sessions by their count alone.
    #[arg(long, value_name = "SIZE")]
    session_memory: Option<String>,
    /// How long a renter whose ticket was accepted has to send its init input or module.
    #[arg(long, value_name = "TIME", default_value = "120s", value_parser = units::parse_duration)]
    upload_timeout: std::time::Duration,
    /// GPU memory offered on each GPU (default: the adapter's largest buffer).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    vram: Option<u64>,
    /// A GPU to offer, again for each: its place in `wasmgrid gpus` (`--gpu 0 --gpu 1`), or a
    /// part of its name (every such GPU, through its best API). Default: every GPU this
    /// machine has, each once (a software adapter only when there is no GPU).
    #[arg(long = "gpu", visible_alias = "adapter", value_name = "PLACE|NAME")]
    gpus: Vec<String>,
    /// Where compiled modules are cached (default: the user cache directory).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Where renters' init inputs (weights) are kept by hash, so that a session with the same
    /// weights as an earlier one starts without sending them (default: `blobs` in the user
    /// cache directory).
    #[arg(long, value_name = "DIR")]
    blob_cache: Option<PathBuf>,
    /// The most bytes of init inputs kept; the least recently used go first.
    #[arg(long, value_name = "SIZE", default_value = "8GiB", value_parser = units::parse_size)]
    blob_cache_size: u64,
    /// Keep no init inputs: each session sends its own (up to 64 MiB).
    #[arg(long)]
    no_blob_cache: bool,
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

/// The worker's stdout for frames, unbuffered: each frame goes out whole in one write (the
/// process's own stdout is line-buffered, and would split a binary frame at every newline byte).
#[cfg(unix)]
fn frame_output() -> Result<Box<dyn Write + Send>, Exit> {
    use std::os::fd::AsFd;
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Exit { code: exit::HOST, error: anyhow!("opening stdout for frames: {e}") })?;
    Ok(Box::new(std::fs::File::from(out)))
}

#[cfg(not(unix))]
fn frame_output() -> Result<Box<dyn Write + Send>, Exit> {
    Ok(Box::new(std::io::stdout()))
}

pub(crate) fn host_daemon(args: &HostDaemonArgs) -> Result<u8, Exit> {
    init_logging();
    let keypair =
        key_or_create(&args.key.clone().unwrap_or_else(|| config_dir().join("provider.json"))).map_err(bad_input)?;
    if args.session_idle.is_zero() || args.upload_timeout.is_zero() {
        return Err(bad_input(anyhow!("--session-idle and --upload-timeout must be more than zero")));
    }
    let places = offered_gpus(&args.gpus, &adapters_listed_apart()?)?;
    let mut workers = Vec::with_capacity(places.len());
    for at in &places {
        let mut worker_args: Vec<std::ffi::OsString> = vec!["--adapter".into(), at.to_string().into()];
        match args.cache_dir.clone().or_else(crate::cache_dir) {
            Some(dir) => worker_args.extend(["--cache-dir".into(), dir.into_os_string()]),
            None => worker_args.push("--no-cache".into()),
        }
        let worker = provider::WorkerCommand::this_program(worker_args)
            .map_err(|e| Exit { code: exit::HOST, error: anyhow!("finding this program to start workers: {e}") })?;
        workers.push(worker);
    }
    let Some(first) = workers.first().cloned() else {
        return Err(Exit { code: exit::HOST, error: anyhow!("no GPU to offer") });
    };
    let mut config = provider::DaemonConfig::new(args.scheduler, args.scheduler_key, keypair, first);
    config.gpus = workers;
    config.name = args.name.clone();
    config.region = args.region.clone();
    config.price = Price {
        per_gpu_second: args.price_per_gpu_second,
        per_inference: args.price_per_inference,
        per_net_gib: args.price_per_net_gib,
    };
    config.capacity = args.capacity.max(1);
    config.session_capacity = args.session_capacity;
    config.warm_workers = args.warm_workers;
    config.vram_bytes = args.vram;
    config.session_listen = (!args.no_sessions).then_some(args.sessions);
    config.advertise = args.advertise.clone();
    config.payment = args.pay.payment()?;
    config.session_idle = args.session_idle;
    config.upload_timeout = args.upload_timeout;
    config.blobs = match args.blob_cache.clone().or_else(|| crate::cache_base().map(|b| b.join("blobs"))) {
        Some(dir) if !args.no_blob_cache => {
            let cache = provider::blobs::BlobCache::open(&dir, args.blob_cache_size)
                .map_err(|e| bad_input(anyhow!("--blob-cache {}: {e}", dir.display())))?;
            Some(std::sync::Arc::new(cache))
        }
        _ => None,
    };
    config.receipt_every = args.receipt_every;
    config.session_memory = match args.session_memory.as_deref() {
        Some("none") => None,
        Some(size) => Some(units::parse_size(size).map_err(|e| bad_input(anyhow!("--session-memory: {e}")))?),
        None => provider::memory::machine_bytes().map(|b| b / 2),
    };
    println!("provider {} connecting to {}", config.keypair.public(), args.scheduler);
    let _ = std::io::stdout().flush();
    match runtime()?.block_on(provider::run_forever(config)) {
        Ok(()) => Ok(exit::OK),
        Err(e) => Err(Exit { code: exit::HOST, error: anyhow!(e) }),
    }
}

/// The machine's adapters as `wasmgrid gpus --json` lists them, asked of a child process: the
/// daemon never loads a GPU driver itself (one that crashes takes a worker, not the daemon).
fn adapters_listed_apart() -> Result<Vec<host::AdapterSummary>, Exit> {
    let fail = |e: String| Exit { code: exit::HOST, error: anyhow!("listing the GPU adapters: {e}") };
    let program = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let out = std::process::Command::new(program).args(["gpus", "--json"]).output().map_err(|e| fail(e.to_string()))?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("{e}: {}", String::from_utf8_lossy(&out.stderr).trim())))?;
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    let wide = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let number = |v: &serde_json::Value, k: &str| u32::try_from(wide(v, k)).unwrap_or(0);
    let none = serde_json::Value::Null;
    Ok(list
        .iter()
        .map(|v| (v, v.get("limits").unwrap_or(&none)))
        .map(|(v, limits)| host::AdapterSummary {
            name: text(v, "name"),
            vendor: text(v, "vendor"),
            vendor_id: number(v, "vendor_id"),
            device_id: number(v, "device_id"),
            backend: text(v, "backend"),
            device_type: text(v, "device_type"),
            driver: text(v, "driver"),
            driver_info: text(v, "driver_info"),
            max_buffer_size: wide(limits, "max_buffer_size"),
            max_storage_buffer_binding_size: wide(limits, "max_storage_buffer_binding_size"),
            max_compute_workgroups_per_dimension: number(limits, "max_compute_workgroups_per_dimension"),
            max_compute_invocations_per_workgroup: number(limits, "max_compute_invocations_per_workgroup"),
            max_compute_workgroup_size: [0; 3],
            max_compute_workgroup_storage_size: number(limits, "max_compute_workgroup_storage_size"),
            timestamp_queries: v.get("timestamp_queries").and_then(serde_json::Value::as_bool).unwrap_or(false),
        })
        .collect())
}

/// The adapters a host offers ([`host::select_adapters`]); a selection that matches nothing is
/// bad input, and no adapter at all a host failure.
fn offered_gpus(named: &[String], adapters: &[host::AdapterSummary]) -> Result<Vec<usize>, Exit> {
    match host::select_adapters(named, adapters) {
        Ok(places) if places.is_empty() => Err(Exit {
            code: exit::HOST,
            error: anyhow!(
                "no GPU adapter with compute shaders found; install a Vulkan driver (for a CPU fallback: apt-get install mesa-vulkan-drivers libvulkan1)"
            ),
        }),
        Ok(places) => Ok(places),
        Err(e) => Err(bad_input(anyhow!(e))),
    }
}

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// Use the adapter whose name contains this text.
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Where compiled modules are cached, shared with the other workers.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Keep compiled modules in memory only.
    #[arg(long)]
    no_cache: bool,
}

/// One worker: opens the GPU, then serves the daemon over stdin and stdout until the daemon
/// closes stdin. Logs go to stderr, which the daemon reads.
pub(crate) fn worker(args: &WorkerArgs) -> Result<u8, Exit> {
    init_logging();
    let config = host::HostConfig {
        adapter: host::AdapterChoice { name: args.adapter.clone() },
        // One tenant at a time; a spare slot for the instance being torn down.
        max_instances: 2,
        cache_dir: if args.no_cache { None } else { args.cache_dir.clone() },
        ..host::HostConfig::default()
    };
    let host = match host::Host::new(config) {
        Ok(h) => h,
        Err(e) => {
            host::worker::refuse(std::io::stdout(), &e.to_string());
            return Err(Exit { code: exit::HOST, error: anyhow!(e) });
        }
    };
    match host::worker::serve(&host, std::io::stdin(), frame_output()?) {
        Ok(()) => Ok(exit::OK),
        Err(e) => Err(Exit { code: exit::HOST, error: anyhow!(e) }),
    }
}
