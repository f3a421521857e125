//! Market benchmarks on loopback, each figure printed beside its baseline from the same run.
//!
//! - `session`: 64-byte requests over an open session to the `echo` sample: (a) the real path,
//!   `client::Session` -> provider daemon -> a pre-started worker process -> back, a receipt
//!   signed per inference and checked by the renter; (b) the same messages, receipts and checks
//!   served in the bench process (the same sandbox call on a thread of its own, the same QUIC
//!   link code, no daemon, no worker); (c) a plain QUIC echo. Then where the time goes: (b) with
//!   its steps taken away one at a time (the renter's check, the per-inference signature, the
//!   session messages), and alone: the daemon-worker pipe round trip (a `wasmgrid worker` child
//!   driven with `ToWorker::Infer` frames), the sandbox call, a receipt's signing and its check.
//! - `paid`: a paid inference's round trip (a voucher answering every receipt, through a payment
//!   channel on the in-process chain) against an unpaid one, the same daemon and sample.
//! - `job`: a batch job on a warm host (workers pre-started, the module in their disk cache)
//!   from the signed HTTPS submit to its result, and from it an upper bound on submit -> first
//!   dispatch; baseline: the job's own run time on the host.
//! - `workers`: a worker's start (spawn -> `Ready`) and replacement (kill -> a new one ready),
//!   directly and through `provider::pool`; baseline: opening the same host in the bench
//!   process.
//! - `memory`: resident memory of an idle `wasmgrid host` process and of each of its idle
//!   workers, read from `/proc`.
//! - `concurrent`: N sessions at once (200 requests each) on one `wasmgrid host` process with
//!   `--session-capacity N`, for N = 16, 32, 64 (or `WASMGRID_BENCH_SESSIONS=16,128`): whether all
//!   complete, how long, and the memory each session adds (its worker process, read from
//!   `/proc`).
//!
//! - `cluster`: a 2-member cluster job on two provider daemons on loopback (each rank in a
//!   worker process; frames worker -> daemon -> QUIC -> daemon -> worker), the `allreduce`
//!   sample's all-reduce bus bandwidth (2 (n - 1) / n x bytes / time, as NCCL defines it) at
//!   f32, f16 and int8; baseline: raw QUIC throughput between two endpoints of the same link
//!   code on loopback, both directions at once, as a ring of two uses its links. Then the
//!   `cluster-train` sample synchronous against DiLoCo-style: bytes each member moved per
//!   training step, as the daemons counted them.
//!
//! - `shaped`: the same 2-member cluster with each member's daemon reached through a UDP relay
//!   in the bench process that shapes its link to 100 Mbit/s each way with 25 ms one way (a
//!   token-bucket queue of 50 ms, dropping past it, as `tbf` does; the delay as a delay relay
//!   adds it): all-reduce bus bandwidth against raw QUIC through the same shaped link, and the
//!   share of each member's wall time spent waiting on the network (`net_wait_ns`, the time
//!   its collectives spent sending into the link and waiting for its peer), synchronous
//!   against DiLoCo-style.
//!
//! - `netns`: the same with the kernel shaping the link: one provider as a `wasmgrid host`
//!   process in a network namespace whose veth link `tbf` caps at 100 Mbit/s each way (50 ms of
//!   queue), and a delay relay adding the 25 ms one way (`netem` is not there). The raw QUIC
//!   baseline runs between the bench and a copy of itself in the namespace. Needs root and
//!   iproute2; skipped, saying why, without them.
//!
//! Run: `cargo bench -p cli --bench market [-- SECTION...]` (every section when none is named;
//! `RUST_LOG=info` shows the in-process scheduler's and daemon's logs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::Keypair;
use proto::msg::{BLOB_CAP, JobLimits, Requirements, SessionMsg, SessionReply, WireUsage};
use proto::receipt::{Checker, Counts, Signer, request_digest};
use proto::worker::{FromWorker, ToWorker};
use provider::WorkerCommand;
use provider::pool::{Pool, Worker};

const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
/// Requests before each timed round, not counted.
const WARM_UP: usize = 100;
/// Every wait for a process or a provider is bounded.
const WAIT: Duration = Duration::from_secs(120);

// ---- figures ----

#[derive(Clone, Copy, Debug)]
struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(samples: &[Duration]) -> Stats {
    let mut s = samples.to_vec();
    s.sort();
    let at = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
    let mean = s.iter().sum::<Duration>() / s.len().max(1) as u32;
    Stats { p50: at(0.5), p99: at(0.99), mean }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn line(label: &str, samples: &[Duration]) -> Stats {
    let s = stats(samples);
    println!(
        "  {label:<62} p50 {:>9.1} us  p99 {:>9.1} us  mean {:>9.1} us  ({} samples)",
        us(s.p50),
        us(s.p99),
        us(s.mean),
        samples.len()
    );
    s
}

fn line_ms(label: &str, samples: &[Duration]) -> Stats {
    let s = stats(samples);
    println!("  {label:<62} p50 {:>9.2} ms  p99 {:>9.2} ms  ({} samples)", ms(s.p50), ms(s.p99), samples.len());
    s
}

// ---- /proc ----

/// Resident memory of one process, in KiB: all of it, its anonymous part (not shared with
/// files: heap, stacks, driver allocations), and its proportional share (shared pages divided
/// among the processes that map them).
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss: u64,
    anon: u64,
    pss: u64,
}

impl std::ops::Add for Mem {
    type Output = Mem;
    fn add(self, o: Mem) -> Mem {
        Mem { rss: self.rss + o.rss, anon: self.anon + o.anon, pss: self.pss + o.pss }
    }
}

fn proc_kb(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn mem(pid: u32) -> Mem {
    Mem {
        rss: proc_kb(pid, "status", "VmRSS:"),
        anon: proc_kb(pid, "status", "RssAnon:"),
        pss: proc_kb(pid, "smaps_rollup", "Pss:"),
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn mem_line(label: &str, m: Mem) {
    println!(
        "  {label:<46} RSS {:>7.1} MiB  anonymous {:>7.1} MiB  PSS {:>7.1} MiB",
        mib(m.rss),
        mib(m.anon),
        mib(m.pss)
    );
}

// ---- clusters ----

/// Both ends of a raw QUIC stream: sends `bytes` as 1 MiB `PeerFrame`s while reading as many
/// from the other end; returns when it has read them all.
async fn raw_pump(mut send: quic::SendStream, mut recv: quic::RecvStream, bytes: usize) -> Instant {
    let cap = proto::cluster::PEER_FRAME_CAP;
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < bytes {
            match quic::read_msg::<proto::cluster::PeerFrame>(&mut recv, cap).await {
                Ok(Some(f)) => got += f.bytes.len(),
                _ => break,
            }
        }
        Instant::now()
    });
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        quic::write_msg(&mut send, &proto::cluster::PeerFrame { bytes: chunk.clone() }, cap).await.unwrap();
        sent += chunk.len();
    }
    let done = reader.await.unwrap();
    let _ = send.finish();
    done
}

/// The raw-QUIC end a benchmark dials: accepts one connection and one stream on `listen` and
/// pumps `bytes` each way on it.
async fn raw_server(server: quic::Endpoint, bytes: usize) {
    let conn = server.accept().await.unwrap().await.unwrap();
    conn.authenticated();
    let (send, recv) = conn.accept_bi().await.unwrap();
    raw_pump(send, recv, bytes).await;
    // Until the other end has read all of it.
    let _ = tokio::time::timeout(Duration::from_secs(60), conn.closed()).await;
}

fn raw_limits() -> quic::ServerLimits {
    let full = quic::Budget { bidi_streams: 4, receive_window: 16 << 20 };
    quic::ServerLimits::default().full(full).before_auth(full)
}

/// Plain QUIC between two endpoints of the same link code on loopback: each sends `bytes` to
/// the other on one stream at the same time, as the same 1 MiB frames the members' daemons
/// move (`PeerFrame`), with nothing else on the path. Returns the slower direction's rate in
/// bytes per second.
async fn raw_quic_both_ways(bytes: usize, shaped: Option<LinkShape>) -> f64 {
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let (ia, ib) = (quic::Identity::new(&a).unwrap(), quic::Identity::new(&b).unwrap());
    let server = quic::server_with(&ib, LOOPBACK, quic::Peers::Any, raw_limits()).unwrap();
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        conn.authenticated();
        let (send, recv) = conn.accept_bi().await.unwrap();
        (conn, send, recv)
    });
    let client = quic::client(LOOPBACK).unwrap();
    let dial = match shaped {
        Some(shape) => shaped_relay(LOOPBACK.ip(), addr, shape).await,
        None => addr,
    };
    let conn = quic::connect(&client, &ia, dial, b.public()).await.unwrap();
    let (send_a, recv_a) = conn.open_bi().await.unwrap();
    let start = Instant::now();
    // The first frame opens the stream on the other side.
    let a_side = tokio::spawn(raw_pump(send_a, recv_a, bytes));
    let (_conn_b, send_b, recv_b) = accept.await.unwrap();
    let b_side = tokio::spawn(raw_pump(send_b, recv_b, bytes));
    let (ta, tb) = (a_side.await.unwrap(), b_side.await.unwrap());
    let slowest = ta.max(tb).duration_since(start);
    bytes as f64 / slowest.as_secs_f64()
}

async fn cluster_section() {
    println!("\ncluster: 2 members on two provider daemons on loopback, each rank in its own worker process");
    let dir = tempfile::tempdir().unwrap();
    let (_l, client) = two_providers(dir.path(), None).await;
    let allreduce = client.upload(std::fs::read(sample_artifacts::ALLREDUCE).unwrap()).await.unwrap().module;
    let bytes = 64usize << 20;
    let raw = raw_quic_both_ways(bytes, None).await;
    println!(
        "  {:<62} {:>9.3} GB/s per direction ({} MiB each way at once)",
        "baseline: raw QUIC, both directions, same link code",
        raw / 1e9,
        bytes >> 20
    );
    for compress in ["none", "f16", "int8"] {
        let (_, out) =
            run_pair(&client, &allreduce, format!("bytes={bytes} iters=4 warmup=1 compress={compress}")).await;
        let busbw = field(&out, "busbw_gbps") * 1e9;
        println!(
            "  {:<62} {:>9.3} GB/s bus bandwidth  ({:.2}x raw QUIC; {:.1} ms per all-reduce; max error {})",
            format!("all-reduce of {} MiB f32, 2 members, on the wire as {compress}", bytes >> 20),
            busbw / 1e9,
            busbw / raw,
            field(&out, "seconds") * 1e3,
            field(&out, "max_error"),
        );
    }
    let train = client.upload(std::fs::read(sample_artifacts::CLUSTER_TRAIN).unwrap()).await.unwrap().module;
    let steps = 400;
    let common = format!("steps={steps} samples=4096 features=64 lr=0.5 report={steps}");
    for (label, input) in [
        ("synchronous data parallel (all-reduce of the gradient every step)", format!("mode=sync {common}")),
        ("DiLoCo-style, h=100, int8 deltas", format!("mode=diloco h=100 compress=int8 {common}")),
    ] {
        let t = Instant::now();
        let (view, out) = run_pair(&client, &train, input).await;
        let members = view.cluster.unwrap().members;
        let moved: u64 =
            members.iter().map(|m| m.usage.as_ref().map_or(0, |u| u.net_bytes_sent + u.net_bytes_received)).sum();
        println!(
            "  {:<62} {:>9.1} B moved per member per step  ({} steps, {:.1} s; {})",
            label,
            moved as f64 / members.len() as f64 / f64::from(steps),
            steps,
            t.elapsed().as_secs_f64(),
            out.lines().find(|l| l.starts_with("final loss")).unwrap_or("")
        );
    }
}

// ---- shaped links ----

/// A link's shape: its rate each way, its one-way delay, and how much it queues (as `tbf`'s
/// limit does) before it drops.
#[derive(Clone, Copy, Debug)]
struct LinkShape {
    bits_per_second: f64,
    one_way: Duration,
    queue: Duration,
}

/// 100 Mbit/s each way, 25 ms one way, 50 ms of queue.
const WAN: LinkShape =
    LinkShape { bits_per_second: 100e6, one_way: Duration::from_millis(25), queue: Duration::from_millis(50) };

/// One direction of a shaped link: a datagram leaves once the ones before it have been
/// serialised at the link's rate, arrives the one-way delay later, and is dropped when the
/// queue ahead of it is longer than the link holds.
struct LinkPipe {
    shape: LinkShape,
    free_at: Instant,
    tx: tokio::sync::mpsc::UnboundedSender<(Instant, Vec<u8>, Option<SocketAddr>)>,
}

impl LinkPipe {
    fn new(
        shape: LinkShape,
        out: Arc<tokio::net::UdpSocket>,
        to: Option<SocketAddr>,
    ) -> Arc<std::sync::Mutex<LinkPipe>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>, Option<SocketAddr>)>();
        tokio::spawn(async move {
            // Arrival times only grow: one queue in order is the whole schedule.
            while let Some((due, bytes, dest)) = rx.recv().await {
                tokio::time::sleep_until(due.into()).await;
                let _ = match dest.or(to) {
                    Some(d) => out.send_to(&bytes, d).await,
                    None => out.send(&bytes).await,
                };
            }
        });
        Arc::new(std::sync::Mutex::new(LinkPipe { shape, free_at: Instant::now(), tx }))
    }

    fn push(&mut self, bytes: Vec<u8>, dest: Option<SocketAddr>) {
        let now = Instant::now();
        let start = self.free_at.max(now);
        if start.duration_since(now) > self.shape.queue {
            return;
        }
        let done = start + Duration::from_secs_f64(bytes.len() as f64 * 8.0 / self.shape.bits_per_second);
        self.free_at = done;
        let _ = self.tx.send((done + self.shape.one_way, bytes, dest));
    }
}

/// A UDP relay on `ip` in front of `target` that shapes what goes through it both ways as
/// `shape` says (each direction its own rate, the same delay): what the daemons see as a WAN
/// link. Every client gets a socket of its own towards `target`; all share the link. Returns
/// the address to dial instead of `target`.
async fn shaped_relay(ip: std::net::IpAddr, target: SocketAddr, shape: LinkShape) -> SocketAddr {
    let front = Arc::new(tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap());
    let addr = front.local_addr().unwrap();
    let down = LinkPipe::new(shape, front.clone(), None);
    tokio::spawn(async move {
        let mut clients: std::collections::HashMap<SocketAddr, Arc<std::sync::Mutex<LinkPipe>>> = Default::default();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
            let up = match clients.get(&from) {
                Some(up) => up.clone(),
                None => {
                    let back = Arc::new(tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap());
                    back.connect(target).await.unwrap();
                    let up = LinkPipe::new(shape, back.clone(), None);
                    let down = down.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            down.lock().unwrap().push(buf[..n].to_vec(), Some(from));
                        }
                    });
                    clients.insert(from, up.clone());
                    up
                }
            };
            up.lock().unwrap().push(buf[..n].to_vec(), None);
        }
    });
    addr
}

/// A free UDP port on loopback (for a daemon to listen on behind a relay).
fn free_udp_port() -> SocketAddr {
    std::net::UdpSocket::bind(LOOPBACK).unwrap().local_addr().unwrap()
}

async fn shaped_section() {
    println!(
        "\nshaped: 2 members on two provider daemons, each reached through a relay shaping its link to {} Mbit/s each way, {} ms one way ({} ms of queue)",
        WAN.bits_per_second / 1e6,
        WAN.one_way.as_millis(),
        WAN.queue.as_millis()
    );
    let dir = tempfile::tempdir().unwrap();
    let (_l, client) = two_providers(dir.path(), Some(WAN)).await;
    let bytes = 8usize << 20;
    let raw = raw_quic_both_ways(bytes, Some(WAN)).await;
    println!(
        "  {:<62} {:>9.4} GB/s per direction ({} MiB each way at once)",
        "baseline: raw QUIC through the same shaped link, both ways",
        raw / 1e9,
        bytes >> 20
    );
    shaped_runs(&client, raw, bytes).await;
}

/// All-reduce bus bandwidth against `raw` (QUIC through the same link), and the share of wall
/// time members wait on the network, synchronous against DiLoCo, on a shaped link.
async fn shaped_runs(client: &client::Scheduler, raw: f64, bytes: usize) {
    let allreduce = client.upload(std::fs::read(sample_artifacts::ALLREDUCE).unwrap()).await.unwrap().module;
    for compress in ["none", "int8"] {
        let (_, out) =
            run_pair(client, &allreduce, format!("bytes={bytes} iters=3 warmup=1 compress={compress}")).await;
        let busbw = field(&out, "busbw_gbps") * 1e9;
        println!(
            "  {:<62} {:>9.4} GB/s bus bandwidth  ({:.2}x raw QUIC; {:.0} ms per all-reduce)",
            format!("all-reduce of {} MiB f32, 2 members, on the wire as {compress}", bytes >> 20),
            busbw / 1e9,
            busbw / raw,
            field(&out, "seconds") * 1e3,
        );
    }
    let train = client.upload(std::fs::read(sample_artifacts::CLUSTER_TRAIN).unwrap()).await.unwrap().module;
    // Enough work per step (16,384 samples of 64 features) that a step is milliseconds of GPU
    // time here, as a real model's would be far more.
    let steps = 400;
    let common = format!("steps={steps} samples=16384 features=64 lr=0.5 report={steps}");
    for (label, input) in [
        ("synchronous data parallel (all-reduce of the gradient every step)", format!("mode=sync {common}")),
        ("DiLoCo-style, h=100, int8 deltas", format!("mode=diloco h=100 compress=int8 {common}")),
        (
            "DiLoCo-style, h=100, int8, outer all-reduce overlapped",
            format!("mode=diloco h=100 compress=int8 overlap=1 {common}"),
        ),
    ] {
        let (view, out) = run_pair(client, &train, input).await;
        let members = view.cluster.unwrap().members;
        let shares: Vec<f64> = members
            .iter()
            .map(|m| {
                let wait = m.usage.as_ref().map_or(0, |u| u.net_wait_ns) as f64 / 1e9;
                wait / (m.wall_time_ms.unwrap_or(0) as f64 / 1e3).max(1e-9)
            })
            .collect();
        let walls: Vec<String> = members.iter().map(|m| format!("{} ms", m.wall_time_ms.unwrap_or(0))).collect();
        println!(
            "  {:<62} {:>8.1} % of members' wall time waiting on the network (per member {}; wall {}; {})",
            label,
            100.0 * shares.iter().copied().fold(0.0, f64::max),
            shares.iter().map(|s| format!("{:.1} %", 100.0 * s)).collect::<Vec<_>>().join(", "),
            walls.join(", "),
            out.lines().find(|l| l.starts_with("final loss")).unwrap_or("")
        );
    }
}

// ---- links shaped by the kernel: a network namespace, a veth pair and tbf ----

/// A network namespace joined to this one by a veth pair, `tbf` on both ends capping each
/// direction: this side is `ROOT_IP`, the namespace's `NS_IP`. Removed (with its veth) when
/// dropped.
struct Netns {
    name: String,
}

const ROOT_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 213, 0, 1);
const NS_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 213, 0, 2);

fn sh(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Makes the namespace and its link, each direction capped at `shape`'s rate with its
    /// queue (`tbf ... latency`); its delay is not the kernel's (`netem` is not there).
    fn create(shape: LinkShape) -> Result<Netns, String> {
        let id = std::process::id() % 100_000;
        let ns = Netns { name: format!("wgbench{id}") };
        let (outer, inner) = (format!("wgb{id}a"), format!("wgb{id}b"));
        let rate = format!("{}kbit", (shape.bits_per_second / 1e3) as u64);
        let latency = format!("{}ms", shape.queue.as_millis());
        let (root_ip, ns_ip) = (format!("{ROOT_IP}/30"), format!("{NS_IP}/30"));
        sh(&["ip", "netns", "add", &ns.name])?;
        sh(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
        sh(&["ip", "link", "set", &inner, "netns", &ns.name])?;
        sh(&["ip", "addr", "add", &root_ip, "dev", &outer])?;
        sh(&["ip", "link", "set", &outer, "up"])?;
        sh(&["ip", "-n", &ns.name, "addr", "add", &ns_ip, "dev", &inner])?;
        sh(&["ip", "-n", &ns.name, "link", "set", &inner, "up"])?;
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        let tbf = ["root", "tbf", "rate", &rate, "burst", "64kb", "latency", &latency];
        let mut out = vec!["tc", "qdisc", "add", "dev", &outer];
        out.extend_from_slice(&tbf);
        sh(&out)?;
        let mut inside = vec!["ip", "netns", "exec", &ns.name, "tc", "qdisc", "add", "dev", &inner];
        inside.extend_from_slice(&tbf);
        sh(&inside)?;
        Ok(ns)
    }

    /// `program args` run inside the namespace.
    fn command(&self, program: &Path) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// The environment variables that make this bench binary the raw-QUIC end in a namespace:
/// where to listen, the key's seed (hex) and the bytes each way.
const RAW_PEER: &str = "WASMGRID_BENCH_RAW_PEER";

/// Run as the raw-QUIC end ([`RAW_PEER`] set): serves one benchmark stream and exits.
fn raw_peer_main(spec: &str) {
    let mut parts = spec.split(',');
    let (listen, seed, bytes) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    let listen: SocketAddr = listen.parse().unwrap();
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&seed[2 * i..2 * i + 2], 16).unwrap();
    }
    let bytes: usize = bytes.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let id = quic::Identity::new(&Keypair::from_seed(key)).unwrap();
        let server = quic::server_with(&id, listen, quic::Peers::Any, raw_limits()).unwrap();
        println!("listening");
        raw_server(server, bytes).await;
    });
}

/// Raw QUIC from here to the namespace through `ns`'s capped link and a delay relay: both
/// directions at once; the rate this side receives at, in bytes per second.
async fn raw_quic_through(ns: &Netns, shape: LinkShape, bytes: usize) -> f64 {
    let peer = Keypair::generate();
    let seed: String = peer.seed().iter().map(|b| format!("{b:02x}")).collect();
    let listen = SocketAddr::new(NS_IP.into(), 47_001);
    let mut child = ns
        .command(&std::env::current_exe().unwrap())
        .env(RAW_PEER, format!("{listen},{seed},{bytes}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || BufReader::new(stdout).lines().next());
    tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
    let delay = LinkShape { bits_per_second: f64::INFINITY, ..shape };
    let dial = shaped_relay(ROOT_IP.into(), listen, delay).await;
    let me = quic::Identity::new(&Keypair::generate()).unwrap();
    let client = quic::client(SocketAddr::new(ROOT_IP.into(), 0)).unwrap();
    let conn = quic::connect(&client, &me, dial, peer.public()).await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let start = Instant::now();
    let done = raw_pump(send, recv, bytes).await;
    conn.close(quic::CloseCode(0), b"done");
    let _ = child.wait();
    bytes as f64 / done.duration_since(start).as_secs_f64()
}

/// The shaped section again, on a link the kernel shapes: provider `right` runs as its own
/// `wasmgrid host` process in a network namespace whose veth link `tbf` caps at `WAN`'s rate
/// and queue each way, and a delay relay on each member's address adds `WAN`'s one-way delay.
async fn netns_section() {
    let ns = match Netns::create(WAN) {
        Ok(ns) => ns,
        Err(e) => {
            println!("\nnetns: skipped (needs root, iproute2 and tbf): {e}");
            return;
        }
    };
    println!(
        "\nnetns: 2 members, one provider in a network namespace; veth capped by tbf at {} Mbit/s each way ({} ms of queue), {} ms one way added by a delay relay",
        WAN.bits_per_second / 1e6,
        WAN.queue.as_millis(),
        WAN.one_way.as_millis()
    );
    let delay = LinkShape { bits_per_second: f64::INFINITY, ..WAN };
    let dir = tempfile::tempdir().unwrap();
    let l = start_scheduler_at(dir.path(), SocketAddr::new(ROOT_IP.into(), 0)).await;
    // Left: a daemon in the bench process, reached by its peer through a delay relay.
    let cache = dir.path().join("cache");
    let worker = worker_command(&["--cache-dir".as_ref(), cache.as_os_str()]);
    let mut config = provider::DaemonConfig::new(l.quic, l.key, Keypair::generate(), worker);
    config.name = "left".into();
    config.capacity = 1;
    let listen = SocketAddr::new(ROOT_IP.into(), free_udp_port().port());
    config.session_listen = Some(listen);
    config.advertise = Some(shaped_relay(ROOT_IP.into(), listen, delay).await.to_string());
    tokio::spawn(provider::run_forever(config));
    // Right: `wasmgrid host` in the namespace; its address seen from here is a delay relay.
    let inside = SocketAddr::new(NS_IP.into(), 47_000);
    let advertise = shaped_relay(ROOT_IP.into(), inside, delay).await;
    let log = std::fs::File::create(dir.path().join("right.log")).unwrap();
    let mut right = ns.command(Path::new(env!("CARGO_BIN_EXE_wasmgrid")));
    right
        .args(["host", "--scheduler", &l.quic.to_string(), "--scheduler-key", &l.key.to_string()])
        .arg("--key")
        .arg(dir.path().join("right.json"))
        .arg("--cache-dir")
        .arg(dir.path().join("right-cache"))
        .args(["--name", "right", "--capacity", "1", "--sessions", &inside.to_string()])
        .args(["--advertise", &advertise.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let right = HostProcess { child: right.spawn().unwrap() };
    let client = renter_client(&l, &Keypair::generate());
    wait_online(&client, "left").await;
    wait_online(&client, "right").await;
    let bytes = 8usize << 20;
    let raw = raw_quic_through(&ns, WAN, bytes).await;
    println!(
        "  {:<62} {:>9.4} GB/s per direction ({} MiB each way at once)",
        "baseline: raw QUIC across the same namespace link, both ways",
        raw / 1e9,
        bytes >> 20
    );
    shaped_runs(&client, raw, bytes).await;
    drop(right);
}

/// A scheduler and two provider daemons, `left` and `right` (one job slot each), in the bench/// A scheduler and two provider daemons, `left` and `right` (one job slot each), in the bench
/// process, online; with `shape`, each daemon is reached through a relay shaping its link.
async fn two_providers(dir: &Path, shape: Option<LinkShape>) -> (scheduler::Listening, client::Scheduler) {
    let l = start_scheduler(dir).await;
    let cache = dir.join("cache");
    for name in ["left", "right"] {
        let worker = worker_command(&["--cache-dir".as_ref(), cache.as_os_str()]);
        let mut config = provider::DaemonConfig::new(l.quic, l.key, Keypair::generate(), worker);
        config.name = name.into();
        config.capacity = 1;
        config.session_listen = Some(LOOPBACK);
        if let Some(shape) = shape {
            let listen = free_udp_port();
            config.session_listen = Some(listen);
            // Its peers dial the relay, which is the shaped link to it.
            config.advertise = Some(shaped_relay(LOOPBACK.ip(), listen, shape).await.to_string());
        }
        tokio::spawn(provider::run_forever(config));
    }
    let client = renter_client(&l, &Keypair::generate());
    wait_online(&client, "left").await;
    wait_online(&client, "right").await;
    (l, client)
}

/// Runs `module` as a 2-member cluster, one member per provider, to success; its record and
/// output.
async fn run_pair(client: &client::Scheduler, module: &str, input: String) -> (proto::api::JobView, String) {
    let two = proto::api::ClusterRequest { gpus: 2, max_per_provider: Some(1), ..Default::default() };
    let limits = JobLimits { wall_time_ms: 600_000, cpu_time_ms: 600_000, ..JobLimits::default() };
    let s =
        client.submit_job(module, input.as_bytes(), Requirements::default(), limits, None, Some(two)).await.unwrap();
    let view = client.wait(&s.id, |_| {}).await.unwrap();
    assert_eq!(view.state, proto::api::JobState::Succeeded, "{view:?}");
    let out = String::from_utf8(client.output(&view).await.unwrap()).unwrap();
    (view, out)
}

/// The number after `key` in a sample's `key value` output.
fn field(out: &str, key: &str) -> f64 {
    out.split_whitespace().skip_while(|w| *w != key).nth(1).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

// ---- a market in the bench process ----

async fn start_scheduler(dir: &Path) -> scheduler::Listening {
    start_scheduler_at(dir, LOOPBACK).await
}

/// A scheduler whose QUIC endpoint (for providers) is on `quic`.
async fn start_scheduler_at(dir: &Path, quic: SocketAddr) -> scheduler::Listening {
    scheduler::start(scheduler::SchedulerConfig {
        http: LOOPBACK,
        plain_http: false,
        // The benchmarks send far more than a renter would.
        renter_limits: None,
        quic,
        keypair: Keypair::generate(),
        providers: None,
        db: dir.join("bench.redb"),
        state: scheduler::Config::default(),
    })
    .await
    .unwrap()
}

/// The client library as a renter uses it: HTTPS pinned to the scheduler's key, every request
/// signed.
fn renter_client(l: &scheduler::Listening, renter: &Keypair) -> client::Scheduler {
    client::Scheduler::new(&l.url(), Some(l.key), Keypair::from_seed(renter.seed())).unwrap()
}

async fn wait_online(client: &client::Scheduler, name: &str) {
    let t = Instant::now();
    loop {
        if client.providers().await.unwrap().iter().any(|p| p.online && p.name == name) {
            return;
        }
        assert!(t.elapsed() < WAIT, "provider {name} did not come online within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `wasmgrid worker` of the built binary, with `args`.
fn worker_command(args: &[&std::ffi::OsStr]) -> WorkerCommand {
    let mut all = vec!["worker".into()];
    all.extend(args.iter().map(|&a| a.to_owned()));
    WorkerCommand { program: env!("CARGO_BIN_EXE_wasmgrid").into(), args: all }
}

/// A worker with no disk cache of compiled modules.
fn bare_worker() -> WorkerCommand {
    worker_command(&["--no-cache".as_ref()])
}

/// A `wasmgrid host` process, killed when dropped (its workers end when their pipes close).
struct HostProcess {
    child: std::process::Child,
}

impl HostProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a provider daemon as users run it and waits until the scheduler has it online
    /// and its pool is full (`capacity` 1 plus 2 warm workers).
    async fn start(l: &scheduler::Listening, dir: &Path, name: &str, session_capacity: u32) -> HostProcess {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgrid"))
            .args(["host", "--scheduler", &l.quic.to_string(), "--scheduler-key", &l.key.to_string()])
            .arg("--key")
            .arg(dir.join(format!("{name}.json")))
            .arg("--cache-dir")
            .arg(dir.join(format!("{name}-cache")))
            .args(["--name", name, "--capacity", "1", "--warm-workers", "2", "--sessions", "127.0.0.1:0"])
            .args(["--session-capacity", &session_capacity.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let host = HostProcess { child };
        let first = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            std::thread::spawn(move || for _ in lines {});
            first
        });
        let first = tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
        assert!(matches!(first, Some(Ok(ref l)) if l.starts_with("provider ")), "wasmgrid host printed {first:?}");
        let client = renter_client(l, &Keypair::generate());
        wait_online(&client, name).await;
        host.settle(3).await;
        host
    }

    /// Waits until the daemon has `workers` children and has been quiet for a moment.
    async fn settle(&self, workers: usize) {
        let t = Instant::now();
        while children(self.pid()).len() < workers {
            assert!(t.elapsed() < WAIT, "the daemon did not start its {workers} workers within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    fn workers_mem(&self) -> (usize, Mem) {
        let kids = children(self.pid());
        (kids.len(), kids.iter().map(|&p| mem(p)).fold(Mem::default(), |a, b| a + b))
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- session round trips ----

/// (a) The real path.
async fn real_round(session: &client::Session, n: usize, payload: &[u8]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let a = session.infer(payload).await.unwrap();
        out.push(t.elapsed());
        assert_eq!(a.response.len(), payload.len());
    }
    out
}

/// One request for the in-process sandbox thread, and where its answer goes.
type Call = (Vec<u8>, tokio::sync::oneshot::Sender<(Vec<u8>, WireUsage)>);

/// The echo service in the bench process, on a thread of its own (what a daemon without
/// workers does with `spawn_blocking`): requests in, responses and usage out. Before it serves,
/// it times the sandbox call alone (`Service::infer`, nothing around it).
async fn sandbox_thread(echo: Vec<u8>, n: usize, payload: Vec<u8>) -> (std::sync::mpsc::Sender<Call>, Vec<Duration>) {
    let (tx, rx) = std::sync::mpsc::channel::<Call>();
    let (ready, alone) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-sandbox".into())
        .spawn(move || {
            // As a worker sets its host up.
            let config = host::HostConfig { max_instances: 2, ..host::HostConfig::default() };
            let host = host::Host::new(config).unwrap();
            let module = host.load(&echo).unwrap();
            let limits = host::worker::limits_from(&JobLimits::default());
            let mut service = host.start_service(&module, Vec::new(), &limits).unwrap();
            let mut times = Vec::with_capacity(n);
            for i in 0..n + WARM_UP {
                let t = Instant::now();
                let inf = service.infer(&payload).unwrap();
                if i >= WARM_UP {
                    times.push(t.elapsed());
                }
                assert_eq!(inf.response.len(), payload.len());
            }
            let _ = ready.send(times);
            while let Ok((request, back)) = rx.recv() {
                let inf = service.infer(&request).unwrap();
                let _ = back.send((inf.response, host::worker::wire_usage(&inf.usage)));
            }
        })
        .unwrap();
    (tx, alone.await.unwrap())
}

async fn call(calls: &std::sync::mpsc::Sender<Call>, request: Vec<u8>) -> (Vec<u8>, WireUsage) {
    let (back, answer) = tokio::sync::oneshot::channel();
    calls.send((request, back)).unwrap();
    answer.await.unwrap()
}

/// What the in-process server does around the sandbox call: (b) is `Checked`, the rest take
/// its steps away one at a time to show what each costs, or (`EveryCall`) sign every call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Raw bytes in, raw bytes out: no session messages, no receipt.
    Raw,
    /// The session messages and the provider's chain, with no receipt signed: encoding only.
    Messages,
    /// A receipt signed every `RECEIPT_EVERY` calls; the renter does not follow or check it.
    Signed,
    /// A receipt signed every `RECEIPT_EVERY` calls; the renter follows every call and checks
    /// every receipt, as `client::Session` does.
    Checked,
    /// As `Checked`, with a receipt signed and checked after every call (what a paid session
    /// does, and what every session did before receipts were batched).
    EveryCall,
}

/// A signed receipt every this many calls, as the daemon signs by default.
const RECEIPT_EVERY: u64 = provider::daemon::DEFAULT_RECEIPT_EVERY as u64;

/// (b) and its variants: a QUIC server in the bench process in front of [`sandbox_thread`], and
/// the renter's connection to it.
struct InProcess {
    conn: quic::Connection,
    _endpoint: quic::Endpoint,
    mode: Mode,
    checker: Checker,
}

/// The server's side of one [`InProcess`].
struct Serving {
    calls: std::sync::mpsc::Sender<Call>,
    mode: Mode,
    key: Keypair,
    signer: tokio::sync::Mutex<Signer>,
}

impl InProcess {
    async fn start(calls: std::sync::mpsc::Sender<Call>, mode: Mode) -> InProcess {
        let server_key = Keypair::generate();
        let renter = Keypair::generate();
        let session_id = [9u8; 16];
        let server_id = quic::Identity::new(&server_key).unwrap();
        // The daemon's session endpoint limits, so both sides run the same link code alike.
        let limits = quic::ServerLimits::default().full(quic::Budget { bidi_streams: 17, receive_window: 16 << 20 });
        let server = quic::server_with(&server_id, LOOPBACK, quic::Peers::Any, limits).unwrap();
        let addr = server.local_addr().unwrap();
        let serving = Arc::new(Serving {
            calls,
            mode,
            key: Keypair::from_seed(server_key.seed()),
            signer: tokio::sync::Mutex::new(Signer::new(session_id, renter.public(), 1)),
        });
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let serving = serving.clone();
                tokio::spawn(async move {
                    let conn = incoming.await.unwrap();
                    // No ticket to check: the baseline trusts its one peer.
                    conn.authenticated();
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve_in_process(send, recv, serving.clone()));
                    }
                });
            }
        });
        let endpoint = quic::client(LOOPBACK).unwrap();
        let id = quic::Identity::new(&renter).unwrap();
        let conn = quic::connect(&endpoint, &id, addr, server_key.public()).await.unwrap();
        let checker = Checker::new(session_id, server_key.public(), renter.public(), 1);
        InProcess { conn, _endpoint: endpoint, mode, checker }
    }

    async fn round(&mut self, n: usize, payload: &[u8]) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
            if self.mode == Mode::Raw {
                quic::write_msg(&mut send, &payload.to_vec(), BLOB_CAP).await.unwrap();
                let _ = send.finish();
                let back: Option<Vec<u8>> = quic::read_msg(&mut recv, BLOB_CAP).await.unwrap();
                assert_eq!(back.unwrap().len(), payload.len());
            } else {
                let request = SessionMsg::Request { bytes: payload.to_vec(), voucher: None };
                quic::write_msg(&mut send, &request, BLOB_CAP).await.unwrap();
                let _ = send.finish();
                match quic::read_msg::<SessionReply>(&mut recv, BLOB_CAP).await.unwrap() {
                    Some(SessionReply::Response { bytes, usage, sequence, receipt, .. }) => {
                        assert_eq!(bytes.len(), payload.len());
                        if matches!(self.mode, Mode::Checked | Mode::EveryCall) {
                            self.checker.call(sequence, &Counts::of_call(&usage), payload, &bytes).unwrap();
                            if let Some(r) = receipt {
                                self.checker.signed(&r).unwrap();
                            }
                        }
                    }
                    other => panic!("the in-process server answered {other:?}"),
                }
            }
            out.push(t.elapsed());
        }
        out
    }
}

/// One stream of the in-process server: as the daemon serves a request (read it, call the
/// sandbox, follow the chain, sign when due, answer), with no worker between.
async fn serve_in_process(mut send: quic::SendStream, mut recv: quic::RecvStream, serving: Arc<Serving>) {
    if serving.mode == Mode::Raw {
        let request: Vec<u8> = quic::read_msg(&mut recv, BLOB_CAP).await.unwrap().unwrap();
        let (response, _) = call(&serving.calls, request).await;
        quic::write_msg(&mut send, &response, BLOB_CAP).await.unwrap();
    } else {
        let Some(SessionMsg::Request { bytes, .. }) = quic::read_msg(&mut recv, BLOB_CAP).await.unwrap() else {
            panic!("the bench sent something else than a request");
        };
        let digest = request_digest(&bytes);
        let (response, usage) = call(&serving.calls, bytes).await;
        let mut signer = serving.signer.lock().await;
        let sequence = signer.record(&Counts::of_call(&usage), &digest, &response);
        let due = match serving.mode {
            Mode::EveryCall => true,
            Mode::Messages => false,
            _ => sequence.is_multiple_of(RECEIPT_EVERY),
        };
        let receipt = due.then(|| Box::new(signer.sign(&serving.key)));
        drop(signer);
        let reply = SessionReply::Response { bytes: response, usage, sequence, receipt, claimed: None };
        quic::write_msg(&mut send, &reply, BLOB_CAP).await.unwrap();
    }
    let _ = send.finish();
}

/// (c) A plain QUIC echo over the same link code.
struct PlainEcho {
    conn: quic::Connection,
    _endpoint: quic::Endpoint,
}

impl PlainEcho {
    async fn start() -> PlainEcho {
        let server_key = Keypair::generate();
        let server_id = quic::Identity::new(&server_key).unwrap();
        let server = quic::server(&server_id, LOOPBACK, quic::Peers::Any).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    let conn = incoming.await.unwrap();
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
        let endpoint = quic::client(LOOPBACK).unwrap();
        let id = quic::Identity::new(&Keypair::generate()).unwrap();
        let conn = quic::connect(&endpoint, &id, addr, server_key.public()).await.unwrap();
        PlainEcho { conn, _endpoint: endpoint }
    }

    async fn round(&self, n: usize, payload: &[u8]) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
            quic::write_msg(&mut send, &payload.to_vec(), 1 << 20).await.unwrap();
            let _ = send.finish();
            let back: Option<Vec<u8>> = quic::read_msg(&mut recv, 1 << 20).await.unwrap();
            assert_eq!(back.unwrap().len(), payload.len());
            out.push(t.elapsed());
        }
        out
    }
}

/// The daemon-worker pipe alone: a `wasmgrid worker` child serving the echo sample, driven
/// with the daemon's own `Worker::send`/`recv`.
struct Pipe {
    worker: Worker,
}

impl Pipe {
    async fn start(command: &WorkerCommand, echo: &[u8], hash: [u8; 32]) -> Pipe {
        let mut worker = Worker::start(command).await.unwrap();
        let start = ToWorker::Service {
            module_hash: hash,
            init_input: Vec::new(),
            limits: JobLimits::default(),
            init_blob: None,
        };
        worker.send(&start).await.unwrap();
        loop {
            match worker.recv().await.unwrap() {
                FromWorker::Accepted => {}
                FromWorker::NeedModule { .. } => worker.send(&ToWorker::Module { bytes: echo.to_vec() }).await.unwrap(),
                FromWorker::ServiceStarted { result, .. } => {
                    result.unwrap();
                    break;
                }
                other => panic!("the worker said {other:?} while starting the service"),
            }
        }
        Pipe { worker }
    }

    async fn round(&mut self, n: usize, payload: &[u8]) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.worker.send(&ToWorker::Infer { bytes: payload.to_vec() }).await.unwrap();
            match self.worker.recv().await.unwrap() {
                FromWorker::Inferred { result: Ok(inf) } => assert_eq!(inf.response.len(), payload.len()),
                other => panic!("the worker said {other:?} for an inference"),
            }
            out.push(t.elapsed());
        }
        out
    }
}

/// The floor of a pipe round trip through another process: the same `Infer` frame written to
/// `cat` and read back, by the daemon's tokio pipes, no decoding.
struct PipeFloor {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl PipeFloor {
    fn start() -> PipeFloor {
        let mut child = tokio::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        PipeFloor { child, stdin, stdout }
    }

    async fn round(&mut self, n: usize, payload: &[u8]) -> Vec<Duration> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let frame =
            proto::frame::encode(&ToWorker::Infer { bytes: payload.to_vec() }, proto::worker::WORKER_CAP).unwrap();
        let mut back = vec![0u8; frame.len()];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.stdin.write_all(&frame).await.unwrap();
            self.stdin.flush().await.unwrap();
            self.stdout.read_exact(&mut back).await.unwrap();
            out.push(t.elapsed());
        }
        out
    }
}

/// Encoding and decoding the session messages of one request, as both sides do (no network).
/// Returns the times and the two frames' sizes in bytes.
fn codec_costs(n: usize, payload: &[u8]) -> (Vec<Duration>, usize) {
    let usage = WireUsage::default();
    let (mut out, mut size) = (Vec::with_capacity(n), 0);
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        let request = SessionMsg::Request { bytes: payload.to_vec(), voucher: None };
        let frame = proto::frame::encode(&request, BLOB_CAP).unwrap();
        let got: SessionMsg = proto::frame::decode_body(&frame[4..]).unwrap();
        let SessionMsg::Request { bytes, .. } = got else { panic!("decoded {got:?}") };
        let reply = SessionReply::Response { bytes, usage: usage.clone(), sequence: 1, receipt: None, claimed: None };
        let back = proto::frame::encode(&reply, BLOB_CAP).unwrap();
        let _: SessionReply = proto::frame::decode_body(&back[4..]).unwrap();
        if i >= WARM_UP {
            out.push(t.elapsed());
        }
        size = frame.len() + back.len();
    }
    (out, size)
}

/// A receipt's signing (the provider) and its check (the renter), alone, each with one call
/// followed before it; and following one call alone (both sides' chain and counts).
fn receipt_costs(n: usize, payload: &[u8]) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (provider, renter) = (Keypair::generate(), Keypair::generate());
    let mut signer = Signer::new([1; 16], renter.public(), 1);
    let mut checker = Checker::new([1; 16], provider.public(), renter.public(), 1);
    let call = Counts { inferences: 1, fuel: 2_000, invocations: 0, ..Counts::default() };
    let (mut sign, mut check) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        let r = signer.next(&provider, &call, payload, payload);
        let signed = t.elapsed();
        let t = Instant::now();
        checker.check(&r, payload, payload).unwrap();
        if i >= WARM_UP {
            sign.push(signed);
            check.push(t.elapsed());
        }
    }
    let mut follow = Vec::with_capacity(n);
    let digest = request_digest(payload);
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        let sequence = signer.record(&call, &digest, payload);
        checker.call(sequence, &call, payload, payload).unwrap();
        if i >= WARM_UP {
            follow.push(t.elapsed());
        }
    }
    (sign, check, follow)
}

async fn session_section(l: &scheduler::Listening, renter: &Keypair) {
    let payload = vec![7u8; 64];
    let (rounds, n) = (2, 1_000);
    println!("\ninference round trip, echo sample, 64-byte request and response, sequential");
    println!(
        "  ({rounds} rounds of {n} after {WARM_UP} warm-up each, the variants alternating round by round; figures \
         pooled)"
    );
    let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
    let client = renter_client(l, renter);
    let renter = Keypair::from_seed(renter.seed());
    let real = client::Session::open(&client, renter, echo.clone(), Vec::new(), Requirements::default()).await.unwrap();
    let (calls, alone) = sandbox_thread(echo.clone(), n * rounds, payload.clone()).await;
    let modes = [Mode::Checked, Mode::Signed, Mode::Messages, Mode::Raw, Mode::EveryCall];
    let mut in_process = Vec::new();
    for mode in modes {
        in_process.push(InProcess::start(calls.clone(), mode).await);
    }
    let plain = PlainEcho::start().await;
    let hash = {
        let host = host::Host::new(host::HostConfig { max_instances: 1, ..host::HostConfig::default() }).unwrap();
        host.load(&echo).unwrap().hash()
    };
    let mut pipe = Pipe::start(&bare_worker(), &echo, hash).await;
    let mut floor = PipeFloor::start();
    let (mut a, mut c, mut p, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut b: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
    for _ in 0..rounds {
        real_round(&real, WARM_UP, &payload).await;
        a.extend(real_round(&real, n, &payload).await);
        for (server, times) in in_process.iter_mut().zip(&mut b) {
            server.round(WARM_UP, &payload).await;
            times.extend(server.round(n, &payload).await);
        }
        plain.round(WARM_UP, &payload).await;
        c.extend(plain.round(n, &payload).await);
        pipe.round(WARM_UP, &payload).await;
        p.extend(pipe.round(n, &payload).await);
        floor.round(WARM_UP, &payload).await;
        f.extend(floor.round(n, &payload).await);
    }
    let sa = line(&format!("(a) client::Session -> daemon -> worker, receipt every {RECEIPT_EVERY}"), &a);
    let sb = line("(b) in-process sandbox, same messages and receipts", &b[0]);
    let sc = line("(c) plain QUIC echo, same link code", &c);
    println!(
        "  (a)/(b) p50 {:.2}x (target <= 1.2x); (a)/(c) {:.2}x; (b)/(c) {:.2}x",
        us(sa.p50) / us(sb.p50),
        us(sa.p50) / us(sc.p50),
        us(sb.p50) / us(sc.p50)
    );
    println!("  the receipt batched against signed and checked after every call (a paid session's path):");
    let s_every = line("(b) with a receipt signed and checked after every call", &b[4]);
    println!("  where the time goes: (b) with its steps taken away one at a time");
    let s_signed = line("(b) without the renter following and checking", &b[1]);
    let s_msgs = line("(b) with no receipt signed (messages and chain only)", &b[2]);
    let s_raw = line("(b) raw bytes, no session messages, no receipt", &b[3]);
    println!("  and alone:");
    let sp = line("daemon -> worker pipe -> daemon, ToWorker::Infer", &p);
    let sf = line("the same frame through `cat` and back (a process hop's floor)", &f);
    let sx = line("the sandbox call (Service::infer, in-process)", &alone);
    let (codec, size) = codec_costs(n * rounds, &payload);
    let sm = line(&format!("session messages: encode + decode request and response ({size} B)"), &codec);
    let (sign, check, follow) = receipt_costs(n * rounds, &payload);
    let ss = line("receipt: provider signs (Signer::next)", &sign);
    let sk = line("receipt: renter checks (Checker::check)", &check);
    let sf2 = line("one call followed by both sides (record + Checker::call)", &follow);
    let d = |x: Stats, y: Stats| us(x.p50) - us(y.p50);
    let dm = |x: Stats, y: Stats| us(x.mean) - us(y.mean);
    println!("  p50 steps (mean in brackets where batching makes the p50 hide a cost):");
    println!(
        "    sandbox call + hop to its thread (raw - plain echo)    {:>7.1} us (the call alone {:.1})",
        d(s_raw, sc),
        us(sx.p50)
    );
    println!(
        "    session messages and chain (messages - raw)            {:>7.1} us (codec alone {:.1}, chain {:.1})",
        d(s_msgs, s_raw),
        us(sm.p50),
        us(sf2.p50)
    );
    println!(
        "    provider signs every {RECEIPT_EVERY} (signed - messages)           {:>7.1} us (mean {:.1}; one signature alone \
         {:.1})",
        d(s_signed, s_msgs),
        dm(s_signed, s_msgs),
        us(ss.p50)
    );
    println!(
        "    renter follows and checks (b - signed)                 {:>7.1} us (mean {:.1}; one check alone {:.1})",
        d(sb, s_signed),
        dm(sb, s_signed),
        us(sk.p50)
    );
    println!(
        "    batching saves (every call - b)                        {:>7.1} us (mean {:.1})",
        d(s_every, sb),
        dm(s_every, sb)
    );
    println!(
        "    worker and daemon (a - b)                              {:>7.1} us (the pipe round trip alone {:.1}, \
         of which `cat` {:.1})",
        d(sa, sb),
        us(sp.p50),
        us(sf.p50)
    );
    floor.child.kill().await.unwrap();
    pipe.worker.kill().await;
}

// ---- batch jobs ----

async fn job_section(l: &scheduler::Listening, renter: &Keypair) {
    println!("\nbatch job on a warm host: workers pre-started, the module in their disk cache (16x16x16 matmul)");
    let client = renter_client(l, renter);
    let matmul = std::fs::read(sample_artifacts::MATMUL).unwrap();
    let uploaded = client.upload(matmul).await.unwrap();
    let mut input: Vec<u8> = [16u32, 16, 16].iter().flat_map(|w| w.to_le_bytes()).collect();
    input.extend((0..512).flat_map(|i| (i as f32).to_le_bytes()));
    let (mut submit, mut end_to_end, mut on_host, mut to_dispatch) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut read, mut public) = (Vec::new(), Vec::new());
    for i in 0..60 {
        let t = Instant::now();
        let s =
            client.submit(&uploaded.module, &input, Requirements::default(), JobLimits::default(), None).await.unwrap();
        let accepted = t.elapsed();
        let view = client.wait(&s.id, |_| {}).await.unwrap();
        let elapsed = t.elapsed();
        assert_eq!(view.state, proto::api::JobState::Succeeded);
        if i >= 10 {
            let run = Duration::from_micros(view.wall_time_us.unwrap_or(0));
            let first = Duration::from_micros(view.first_dispatch_us.unwrap_or(0));
            submit.push(accepted);
            end_to_end.push(elapsed);
            on_host.push(run);
            // Everything but the job's time after its first dispatch: an upper bound on
            // submit to first dispatch (it still includes returning the result).
            to_dispatch.push(elapsed.saturating_sub(run.saturating_sub(first)));
            // For scale, over the same connection: a signed read (no write), a public read.
            let t = Instant::now();
            client.job(&s.id).await.unwrap();
            read.push(t.elapsed());
            let t = Instant::now();
            client.providers().await.unwrap();
            public.push(t.elapsed());
        }
    }
    line("signed HTTPS submit, until accepted (durable in redb)", &submit);
    line("submit -> result (signed HTTPS, QUIC to the host, worker, back)", &end_to_end);
    line("submit -> first dispatch (upper bound: includes the way back)", &to_dispatch);
    line("baseline: the job's run time on the host (in the worker)", &on_host);
    line("for scale: signed HTTPS GET of the job (a read, no write)", &read);
    line("for scale: public HTTPS GET /v1/providers (no signature)", &public);
}

// ---- workers ----

async fn workers_section() {
    println!("\nworker processes (`wasmgrid worker --no-cache`), one at a time");
    let command = bare_worker();
    let (rounds, mut start, mut replace) = (10, Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let w = Worker::start(&command).await.unwrap();
        start.push(t.elapsed());
        let t = Instant::now();
        w.kill().await;
        let w = Worker::start(&command).await.unwrap();
        replace.push(t.elapsed());
        w.kill().await;
    }
    line_ms("start: spawn -> Ready (Worker::start)", &start);
    line_ms("replacement: SIGKILL and reap -> a new one Ready", &replace);
    let mut in_process = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let host = tokio::task::spawn_blocking(|| {
            host::Host::new(host::HostConfig { max_instances: 2, ..host::HostConfig::default() }).unwrap()
        })
        .await
        .unwrap();
        in_process.push(t.elapsed());
        drop(host);
    }
    line_ms("baseline: the same host opened in-process (Host::new)", &in_process);

    let warm = 2;
    let pool = Pool::new(command, warm);
    let t = Instant::now();
    pool.fill().await.unwrap();
    let filled = t.elapsed();
    let (mut take, mut whole, mut give_back) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let w = pool.take().await.unwrap();
        take.push(t.elapsed());
        // The take started a replacement in the background: until when is the pool short?
        while pool.stats().idle < warm {
            assert!(t.elapsed() < WAIT, "the pool did not refill");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        whole.push(t.elapsed());
        // As after a tenant that crashed its worker: killed and reaped on the daemon's path.
        let t = Instant::now();
        pool.give_back(w, false).await;
        give_back.push(t.elapsed());
    }
    println!("  pool of {warm} warm workers:");
    println!("  {:<62} {:>9.2} ms", "fill from empty (2 starts, one after the other)", ms(filled));
    line("take: a pre-started worker handed out", &take);
    line_ms("take -> pool whole again (its replacement started and Ready)", &whole);
    line_ms("give back a broken worker (kill and reap)", &give_back);
    let s = pool.stats();
    println!("  pool stats: {} started, {} replaced, {} idle", s.started, s.replaced, s.idle);
    // Dropping the pool kills its idle workers.
}

// ---- memory, concurrency: a real `wasmgrid host` process ----

async fn memory_section() {
    println!("\nresident memory, a `wasmgrid host` process (capacity 1, 2 warm workers) idle after start");
    let dir = tempfile::tempdir().unwrap();
    let l = start_scheduler(dir.path()).await;
    let host = HostProcess::start(&l, dir.path(), "idle", 16).await;
    mem_line("daemon (the `wasmgrid host` process)", mem(host.pid()));
    for pid in children(host.pid()) {
        mem_line(&format!("idle worker {pid}"), mem(pid));
    }
}

async fn concurrent_section() {
    println!("\nconcurrent sessions on one `wasmgrid host` process, echo sample, 200 requests of 64 bytes each");
    println!("  (all N sessions opened at once; once all are open, all send their requests at once)");
    let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
    // `WASMGRID_BENCH_SESSIONS=16,64,128` tries other counts.
    let counts: Vec<u32> = std::env::var("WASMGRID_BENCH_SESSIONS")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![16, 32, 64]);
    for n in counts {
        let dir = tempfile::tempdir().unwrap();
        let l = start_scheduler(dir.path()).await;
        let host = HostProcess::start(&l, dir.path(), "concurrent", n).await;
        let idle_daemon = mem(host.pid());
        let (idle_count, idle_workers) = host.workers_mem();
        // A renter per session, each with its own client (a session belongs to the key that
        // signed its request).
        let renters: Vec<Keypair> = (0..n).map(|_| Keypair::generate()).collect();
        let clients: Vec<client::Scheduler> = renters.iter().map(|r| renter_client(&l, r)).collect();
        let t = Instant::now();
        let opening: Vec<_> = renters
            .into_iter()
            .zip(clients)
            .map(|(renter, client)| {
                let echo = echo.clone();
                tokio::spawn(async move {
                    let open = client::Session::open(&client, renter, echo, Vec::new(), Requirements::default());
                    tokio::time::timeout(WAIT, open).await
                })
            })
            .collect();
        let mut sessions = Vec::new();
        let mut failed = Vec::new();
        for o in opening {
            match o.await.unwrap() {
                Ok(Ok(s)) => sessions.push(Arc::new(s)),
                Ok(Err(e)) => failed.push(e.to_string()),
                Err(_) => failed.push(format!("not open within {WAIT:?}")),
            }
        }
        let opened = t.elapsed();
        let t = Instant::now();
        let serving: Vec<_> = sessions
            .iter()
            .map(|s| {
                let s = s.clone();
                tokio::spawn(async move {
                    let payload = vec![7u8; 64];
                    let mut times = Vec::with_capacity(200);
                    for _ in 0..200 {
                        let t = Instant::now();
                        match tokio::time::timeout(WAIT, s.infer(&payload)).await {
                            Ok(Ok(a)) if a.response.len() == payload.len() => times.push(t.elapsed()),
                            Ok(Ok(_)) => return Err("a response of the wrong length".to_string()),
                            Ok(Err(e)) => return Err(e.to_string()),
                            Err(_) => return Err(format!("a request not answered within {WAIT:?}")),
                        }
                    }
                    Ok(times)
                })
            })
            .collect();
        let mut times = Vec::new();
        for s in serving {
            match s.await.unwrap() {
                Ok(t) => times.extend(t),
                Err(e) => failed.push(e),
            }
        }
        let served = t.elapsed();
        // Measured with every session still open, each holding its worker.
        let busy_daemon = mem(host.pid());
        let (busy_count, busy_workers) = host.workers_mem();
        for s in &sessions {
            let _ = s.close().await;
        }
        drop(sessions);
        let complete = failed.is_empty();
        println!(
            "  N = {n}: {} {}; open all {:.2} s, then {} requests in {:.2} s ({:.0}/s)",
            if complete { "all complete" } else { "NOT all complete" },
            if complete { String::new() } else { format!("({} failed: {:?})", failed.len(), failed.first()) },
            opened.as_secs_f64(),
            times.len(),
            served.as_secs_f64(),
            times.len() as f64 / served.as_secs_f64()
        );
        if !times.is_empty() {
            line("    request round trip, all sessions at once", &times);
        }
        mem_line(&format!("    daemon idle, {idle_count} idle workers together"), idle_workers);
        mem_line("    daemon idle", idle_daemon);
        mem_line(&format!("    {n} sessions open: {busy_count} workers together"), busy_workers);
        mem_line(&format!("    {n} sessions open: daemon"), busy_daemon);
        let per = |busy: u64, idle: u64| mib(busy.saturating_sub(idle)) / f64::from(n);
        println!(
            "    memory a session adds (workers and daemon, open minus idle, / N): RSS {:.1} MiB  anonymous {:.1} MiB  \
             PSS {:.1} MiB",
            per(busy_workers.rss + busy_daemon.rss, idle_workers.rss + idle_daemon.rss),
            per(busy_workers.anon + busy_daemon.anon, idle_workers.anon + idle_daemon.anon),
            per(busy_workers.pss + busy_daemon.pss, idle_workers.pss + idle_daemon.pss),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        mem_line("    daemon after the sessions closed", mem(host.pid()));
        drop(host);
    }
}

// ---- paid sessions ----

/// A mint on `chain` (6 decimals) and 10^12 of it, with SOL, for `renter`; SOL for `provider`.
fn fund(chain: &settlement::LocalChain, renter: &Keypair, provider: &Keypair) -> proto::PublicKey {
    use settlement::Chain;
    use solana_sdk::signature::Signer as _;
    let issuer = solana_sdk::signature::Keypair::new();
    for k in [issuer.pubkey(), settlement::signer(renter).pubkey(), settlement::signer(provider).pubkey()] {
        chain.airdrop(&k, 1_000_000_000_000).unwrap();
    }
    let mint = settlement::token::create_mint(chain, &issuer, &issuer.pubkey(), 6).unwrap();
    let r = settlement::signer(renter);
    let account = settlement::token::ensure_token_account(chain, &r, &r.pubkey(), &mint).unwrap();
    settlement::token::mint_to(chain, &issuer, &mint, &account, 1_000_000_000_000).unwrap();
    settlement::wire_key(&mint)
}

/// A paid inference's round trip through a payment channel against an unpaid one: the same
/// daemon code, the same echo sample, one scheduler and provider each (the paid one on the
/// in-process chain, claiming at the session's end), the two sessions alternating round by
/// round.
async fn paid_section() {
    let payload = vec![7u8; 64];
    let (rounds, n) = (3, 1_000);
    println!(
        "
paid against unpaid inference round trip, echo sample, 64-byte request and response, sequential"
    );
    println!("  ({rounds} rounds of {n} after {WARM_UP} warm-up each, alternating; figures pooled)");
    let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
    let chain = Arc::new(settlement::LocalChain::new());
    let (renter, provider) = (Keypair::generate(), Keypair::generate());
    let mint = {
        let (c, r, p) = (chain.clone(), Keypair::from_seed(renter.seed()), Keypair::from_seed(provider.seed()));
        tokio::task::spawn_blocking(move || fund(&c, &r, &p)).await.unwrap()
    };
    let program = settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID);
    let mut sessions = Vec::new();
    let mut dirs = Vec::new();
    // Unpaid; paid with a voucher every call; paid with a voucher every 16 calls.
    for (paid, every) in [(false, 1), (true, 1), (true, 16)] {
        let dir = tempfile::tempdir().unwrap();
        let l = start_scheduler(dir.path()).await;
        let cache = dir.path().join("cache");
        let worker = worker_command(&["--cache-dir".as_ref(), cache.as_os_str()]);
        let key = if paid && every == 1 { Keypair::from_seed(provider.seed()) } else { Keypair::generate() };
        if paid && every > 1 {
            let (c, k) = (chain.clone(), settlement::signer(&key));
            tokio::task::spawn_blocking(move || {
                use settlement::Chain;
                use solana_sdk::signature::Signer as _;
                c.airdrop(&k.pubkey(), 1_000_000_000_000).unwrap()
            })
            .await
            .unwrap();
        }
        let mut config = provider::DaemonConfig::new(l.quic, l.key, key, worker);
        let name = match (paid, every) {
            (false, _) => "unpaid".to_string(),
            (true, 1) => "paid".to_string(),
            (true, n) => format!("paid{n}"),
        };
        config.name = name.clone();
        config.session_listen = Some(LOOPBACK);
        config.price = proto::msg::Price { per_gpu_second: 0, per_inference: 100, per_net_gib: 0 };
        let payment = paid.then(|| client::Payment {
            chain: chain.clone(),
            program,
            mint,
            deposit: 1_000_000_000,
            channel_id: 0,
            ledger: Some(dir.path().join("renter-ledger")),
        });
        if paid {
            config.payment = Some(provider::payment::PaymentConfig {
                chain: chain.clone(),
                program,
                mint,
                policy: settlement::Policy::End,
                max_unvouched: every,
                ledger: Some(dir.path().join("provider-ledger")),
                channels: Default::default(),
                job_slice: provider::payment::DEFAULT_JOB_SLICE,
            });
        }
        tokio::spawn(provider::run_forever(config));
        let client = renter_client(&l, &renter);
        wait_online(&client, &name).await;
        let r = Keypair::from_seed(renter.seed());
        let session =
            client::Session::open_paid(&client, r, echo.clone(), Vec::new(), Requirements::default(), payment)
                .await
                .unwrap();
        sessions.push(session);
        dirs.push((dir, l));
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); sessions.len()];
    for _ in 0..rounds {
        for (s, t) in sessions.iter().zip(&mut times) {
            real_round(s, WARM_UP, &payload).await;
            t.extend(real_round(s, n, &payload).await);
        }
    }
    let su = line(&format!("unpaid session (baseline), receipt every {RECEIPT_EVERY}"), &times[0]);
    let sp = line("paid: receipt + voucher every call (--max-unvouched 1)", &times[1]);
    let s16 = line("paid: receipt + voucher every 16 calls (--max-unvouched 16)", &times[2]);
    for (what, s) in [("every call", sp), ("every 16 calls", s16)] {
        println!(
            "  paid, vouched {what}: p50 {:.1} us (target <= 300 us), {:.1} us over unpaid; {:.2}x",
            us(s.p50),
            us(s.p50) - us(su.p50),
            us(s.p50) / us(su.p50)
        );
    }
    for s in &sessions {
        s.close().await.unwrap();
    }
}

/// The benchmark's sentences, as `samples/minilm/fixtures/bench_torch.py` builds them for
/// PyTorch: `n` of exactly 126 word pieces ([CLS] and [SEP] make 128 tokens) from the distinct
/// plain ASCII words of the corpus, sentence `i` starting at word `7 i`.
fn bench_sentences(tokenizer: &minilm::tokenizer::Tokenizer, n: usize) -> Vec<String> {
    const PIECES: usize = 126;
    let corpus =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/minilm/fixtures/corpus.txt")).unwrap();
    let mut words: Vec<&str> = Vec::new();
    for w in corpus.split('\n').flat_map(|l| l.split(' ')) {
        let w = w.trim_matches(['.', ',', ';', ':', '!', '?', '"', '\'', '(', ')']);
        if !w.is_empty() && w.len() < 20 && w.bytes().all(|b| b.is_ascii_alphabetic()) && !words.contains(&w) {
            words.push(w);
        }
    }
    let pieces = |w: &str| tokenizer.encode(w, 1 << 20).len() - 2;
    (0..n)
        .map(|i| {
            let (mut k, mut count, mut taken) = (7 * i, 0, Vec::new());
            while count < PIECES {
                let w = words[k % words.len()];
                k += 1;
                if count + pieces(w) <= PIECES {
                    taken.push(w);
                    count += pieces(w);
                }
            }
            taken.join(" ")
        })
        .collect()
}

/// Calls `call` until `seconds` have passed and it ran twice (once is enough past a minute):
/// the latency of each call.
async fn timed_calls<F, Fut>(seconds: f64, mut call: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let mut times = Vec::new();
    loop {
        let t = Instant::now();
        call().await;
        times.push(t.elapsed());
        let spent = start.elapsed().as_secs_f64();
        if (spent >= seconds && times.len() >= 2) || spent >= 60.0 {
            return times;
        }
    }
}

/// all-MiniLM-L6-v2 embeddings, sentences of 128 tokens at batch 1, 32 and 256: in the
/// process as `wasmgrid infer` runs them, and through a session (scheduler, provider daemon,
/// worker process), beside PyTorch (sentence-transformers, `bench_torch.py`) on this machine
/// when a Python with it is found (`WASMGRID_TORCH_PYTHON`, default the reference venv).
async fn minilm_section() {
    let model = sample_artifacts::minilm_dir();
    let batches: Vec<usize> = std::env::var("WASMGRID_BENCH_MINILM_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 32, 256]);
    let seconds: f64 = std::env::var("WASMGRID_BENCH_MINILM_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let tokenizer =
        minilm::tokenizer::Tokenizer::from_vocab(&std::fs::read_to_string(model.join("vocab.txt")).unwrap()).unwrap();
    let sentences = bench_sentences(&tokenizer, batches.iter().copied().max().unwrap_or(1));
    let request = |b: usize| serde_json::to_vec(&sentences[..b]).unwrap();
    let bundle = host::bundle_dir(&model).unwrap();
    let wasm = std::fs::read(sample_artifacts::MINILM).unwrap();
    println!("\nall-MiniLM-L6-v2 sentence embeddings, sentences of 128 tokens, f32 (at least {seconds} s per figure)");

    // (a) In this process, as `wasmgrid infer` runs it.
    let host = host::Host::new(host::HostConfig { max_instances: 2, ..host::HostConfig::default() }).unwrap();
    let module = host.load(&wasm).unwrap();
    let limits = host::Limits {
        wall_time: Duration::from_secs(600),
        cpu_time: Duration::from_secs(600),
        ..host::Limits::default()
    };
    let mut service = host.start_service(&module, bundle.clone(), &limits).unwrap();
    let mut local = Vec::new();
    for &b in &batches {
        let req = request(b);
        service.infer(&req).unwrap();
        let service = &mut service;
        let times = timed_calls(seconds, || {
            let out = service.infer(&req).unwrap();
            assert_eq!(out.response.iter().filter(|&&c| c == b'\n').count() + 1, b);
            std::future::ready(())
        })
        .await;
        local.push(times);
    }
    drop(service);

    // (b) Through a session: the client library, a provider daemon and its worker process.
    let dir = tempfile::tempdir().unwrap();
    let l = start_scheduler(dir.path()).await;
    let worker = worker_command(&["--cache-dir".as_ref(), dir.path().join("cache").as_os_str()]);
    let mut config = provider::DaemonConfig::new(l.quic, l.key, Keypair::generate(), worker);
    config.name = "minilm".into();
    config.session_listen = Some(LOOPBACK);
    config.blobs = Some(Arc::new(provider::blobs::BlobCache::open(&dir.path().join("blobs"), 1 << 30).unwrap()));
    tokio::spawn(provider::run_forever(config));
    let renter = Keypair::generate();
    let client = renter_client(&l, &renter);
    wait_online(&client, "minilm").await;
    let started = Instant::now();
    let session = client::Session::open(&client, renter, wasm, bundle, Requirements::default()).await.unwrap();
    let open_ms = ms(started.elapsed());
    let mut remote = Vec::new();
    for &b in &batches {
        let req = request(b);
        session.infer(&req).await.unwrap();
        remote.push(timed_calls(seconds, || async { drop(session.infer(&req).await.unwrap()) }).await);
    }
    let _ = session.close().await;

    // (c) PyTorch on the same machine.
    let python =
        std::env::var("WASMGRID_TORCH_PYTHON").unwrap_or_else(|_| "/var/tmp/minilm-ref-venv/bin/python".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/minilm/fixtures/bench_torch.py");
    let list: Vec<String> = batches.iter().map(ToString::to_string).collect();
    let torch: Option<serde_json::Value> = std::process::Command::new(&python)
        .arg(script)
        .arg(&model)
        .args(["--batches", &list.join(","), "--seconds", &seconds.to_string()])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let torch_run = |device: &str, b: usize| {
        torch.as_ref()?["runs"].as_array()?.iter().find(|r| r["device"] == device && r["batch"] == b).cloned()
    };
    println!("  session opened in {open_ms:.0} ms, the 91 MB folder sent as a blob");
    println!(
        "  {:>5}  {:>22}  {:>22}  {:>22}  {:>22}",
        "batch", "(a) in-process", "(b) session", "PyTorch CPU", "PyTorch CUDA"
    );
    let cell = |sps: f64, p50: f64| format!("{sps:>8.1}/s {p50:>9.1} ms");
    for (i, &b) in batches.iter().enumerate() {
        let figure = |t: &[Duration]| {
            let total: f64 = t.iter().map(Duration::as_secs_f64).sum();
            cell(b as f64 * t.len() as f64 / total, ms(stats(t).p50))
        };
        let torch_cell = |device: &str| {
            torch_run(device, b).map_or_else(
                || format!("{:>22}", "-"),
                |r| cell(r["sentences_per_s"].as_f64().unwrap_or(0.0), r["latency_ms_median"].as_f64().unwrap_or(0.0)),
            )
        };
        println!(
            "  {b:>5}  {}  {}  {}  {}",
            figure(&local[i]),
            figure(&remote[i]),
            torch_cell("cpu"),
            torch_cell("cuda")
        );
    }
    match &torch {
        Some(t) => println!(
            "  (sentences/s and median latency; PyTorch {} via sentence-transformers {}, {} threads)",
            t["library"]["torch"].as_str().unwrap_or("?"),
            t["library"]["sentence_transformers"].as_str().unwrap_or("?"),
            t["machine"]["cpus"]
        ),
        None => println!(
            "  (PyTorch: not found at {python}; `pip install torch sentence-transformers` and set WASMGRID_TORCH_PYTHON)"
        ),
    }
}

fn main() {
    if let Ok(spec) = std::env::var(RAW_PEER) {
        raw_peer_main(&spec);
        return;
    }
    // Quiet unless asked: `RUST_LOG=info` shows the in-process scheduler's and daemon's logs.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
        .format_timestamp_micros()
        .try_init();
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |s: &str| named.is_empty() || named.iter().any(|n| n == s);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let gpu = host::list_adapters().into_iter().next().unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    println!(
        "market benchmarks on loopback; {} cores ({cpu}); GPU {} ({}, {} {})",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        gpu.name,
        gpu.device_type,
        gpu.driver,
        gpu.driver_info
    );
    rt.block_on(async {
        if wants("session") || wants("job") {
            // One scheduler and one provider daemon in the bench process; tenants run in worker
            // processes of the real binary, as on a provider.
            let dir = tempfile::tempdir().unwrap();
            let l = start_scheduler(dir.path()).await;
            // Workers as `wasmgrid host` starts them: sharing a disk cache of compiled modules.
            let cache = dir.path().join("cache");
            let worker = worker_command(&["--cache-dir".as_ref(), cache.as_os_str()]);
            let mut config = provider::DaemonConfig::new(l.quic, l.key, Keypair::generate(), worker);
            config.name = "bench".into();
            config.capacity = 4;
            config.session_listen = Some(LOOPBACK);
            tokio::spawn(provider::run_forever(config));
            let renter = Keypair::generate();
            wait_online(&renter_client(&l, &renter), "bench").await;
            if wants("session") {
                session_section(&l, &renter).await;
            }
            if wants("job") {
                job_section(&l, &renter).await;
            }
        }
        if wants("paid") {
            paid_section().await;
        }
        if wants("minilm") {
            minilm_section().await;
        }
        if wants("workers") {
            workers_section().await;
        }
        if wants("memory") {
            memory_section().await;
        }
        if wants("concurrent") {
            concurrent_section().await;
        }
        if wants("cluster") {
            cluster_section().await;
        }
        if wants("shaped") {
            shaped_section().await;
        }
        if wants("netns") {
            netns_section().await;
        }
    });
}
