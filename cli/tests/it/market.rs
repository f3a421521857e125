//! The market with real processes on loopback: a scheduler, provider hosts, renters' submits.
//! Processes are killed (some with SIGKILL) to test failure; every wait is bounded. The API is
//! HTTPS pinned to the scheduler's key, every request signed by a renter, as renters use it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A child process killed when dropped.
pub(super) struct Proc {
    pub(super) child: Child,
    first_line: String,
}

impl Proc {
    pub(super) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub(super) struct Market {
    dir: tempfile::TempDir,
    /// The renter every renter command of this market signs as (its default key file).
    pub(super) renter: proto::Keypair,
}

impl Market {
    pub(super) fn new() -> Market {
        let dir = tempfile::tempdir().unwrap();
        let renter = proto::Keypair::generate();
        renter.write_new(&dir.path().join("config/wasmgrid/renter.json")).unwrap();
        Market { dir, renter }
    }

    /// The default renter's key file, where `submit`, `job` and `session` find it.
    pub(super) fn renter_key(&self) -> PathBuf {
        self.path("config/wasmgrid/renter.json")
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(super) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wasmgrid"));
        c.args(args)
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    /// Starts a long-running command and waits for its first line of stdout.
    fn spawn(&self, args: &[&str], log: &str) -> Proc {
        let err = std::fs::File::create(self.path(log)).unwrap();
        let mut child = self.cmd(args).stdout(Stdio::piped()).stderr(err).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let first_line = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!("{args:?} printed nothing; its log: {}", std::fs::read_to_string(self.path(log)).unwrap_or_default())
        });
        Proc { child, first_line }
    }

    pub(super) fn scheduler(&self, extra: &[&str]) -> (Proc, Sched) {
        let db = self.path("sched.redb");
        let key = self.path("sched.json");
        let mut args = vec![
            "scheduler",
            "--http",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--heartbeat-interval",
            "250ms",
            "--heartbeat-timeout",
            "1500ms",
        ];
        args.extend_from_slice(extra);
        let p = self.spawn(&args, "scheduler.log");
        let field = |name: &str| {
            p.first_line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {:?}", p.first_line))
                .to_string()
        };
        let s = Sched {
            url: field("url"),
            quic: field("quic"),
            key: field("key"),
            renter: proto::Keypair::from_seed(self.renter.seed()),
        };
        (p, s)
    }

    /// Starts a provider; returns it with its public key.
    pub(super) fn host(&self, s: &Sched, name: &str, extra: &[&str]) -> (Proc, String) {
        let key = self.path(&format!("{name}.json"));
        let cache = self.path(&format!("{name}-cache"));
        let blobs = self.path(&format!("{name}-blobs"));
        let mut args = vec![
            "host",
            "--scheduler",
            &s.quic,
            "--scheduler-key",
            &s.key,
            "--key",
            key.to_str().unwrap(),
            "--name",
            name,
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        if !extra.contains(&"--capacity") {
            args.extend_from_slice(&["--capacity", "1"]);
        }
        if !extra.contains(&"--blob-cache") && !extra.contains(&"--no-blob-cache") {
            args.extend_from_slice(&["--blob-cache", blobs.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        let p = self.spawn(&args, &format!("{name}.log"));
        let provider = p.first_line.split_whitespace().nth(1).unwrap().to_string();
        (p, provider)
    }

    pub(super) fn submit(&self, s: &Sched, module: &str, extra: &[&str]) -> Value {
        let mut args = vec!["submit", module, "--scheduler", &s.url, "--scheduler-key", &s.key, "--json"];
        args.extend_from_slice(extra);
        let out = self.cmd(&args).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "submit printed no JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

pub(super) struct Sched {
    /// `https://127.0.0.1:PORT`.
    pub(super) url: String,
    pub(super) quic: String,
    pub(super) key: String,
    /// The market's renter, whom [`http`] signs as.
    renter: proto::Keypair,
}

impl Sched {
    pub(super) fn key(&self) -> proto::PublicKey {
        self.key.parse().unwrap()
    }

    /// The client library as `renter` sees this scheduler: pinned, signing.
    pub(super) fn client(&self, renter: &proto::Keypair) -> client::Scheduler {
        client::Scheduler::new(&self.url, Some(self.key()), proto::Keypair::from_seed(renter.seed())).unwrap()
    }
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(runtime)
}

/// A nonce no other request of this process has used.
fn nonce() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&n.to_le_bytes());
    out[8..].copy_from_slice(&(nanos ^ u64::from(std::process::id())).to_le_bytes());
    out
}

/// One HTTPS request to the scheduler, pinned to its key and signed by `signer` (unsigned
/// without): (status, body).
fn request(
    s: &Sched,
    signer: Option<&proto::Keypair>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    rt().block_on(async {
        let http = quic::https::pinned_client(s.key()).unwrap().timeout(WAIT).build().unwrap();
        let mut rb = http.request(method.parse().unwrap(), format!("{}{path}", s.url)).body(body.to_vec());
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        if let Some(key) = signer {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            for (name, value) in proto::httpsig::sign(key, method, path, body, now, nonce()) {
                rb = rb.header(name, value);
            }
        }
        let resp = rb.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    })
}

/// A request signed by the market's renter.
pub(super) fn http(s: &Sched, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
    request(s, Some(&s.renter), method, path, content_type, body)
}

fn get_json_as(s: &Sched, renter: &proto::Keypair, path: &str) -> Value {
    let (status, body) = request(s, Some(renter), "GET", path, None, b"");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

pub(super) fn get_json(s: &Sched, path: &str) -> Value {
    get_json_as(s, &s.renter, path)
}

/// Polls until `f` gives a value, for at most `WAIT`.
pub(super) fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn online(s: &Sched, n: usize) {
    until(&format!("{n} providers online"), || {
        let list = get_json(s, "/v1/providers");
        (list.as_array().unwrap().iter().filter(|p| p["online"] == true).count() >= n).then_some(())
    });
}

pub(super) fn log_of(m: &Market, name: &str) -> String {
    std::fs::read_to_string(m.path(name)).unwrap_or_default()
}

#[test]
fn submit_runs_on_a_provider_and_returns_output_and_usage() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_host, provider) = m.host(&s, "rig1", &[]);
    online(&s, 1);
    let providers = get_json(&s, "/v1/providers");
    let p = &providers[0];
    assert_eq!(p["key"], provider.as_str());
    assert!(p["gpus"][0]["score_gflops"].as_f64().unwrap() > 0.0, "the host measured its GPU: {p}");

    let job = m.submit(&s, sample_artifacts::MATMUL, &["--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["provider"], provider.as_str());
    assert!(job["output"].as_str().unwrap().contains("matches the CPU reference"), "{job}");
    assert_eq!(job["usage"]["dispatches"], 1);
    assert_eq!(job["usage"]["invocations"], 256 * 256);

    // The same job again: the provider has the module cached and is not sent it twice.
    let again = m.submit(&s, sample_artifacts::MATMUL, &["--wait"]);
    assert_eq!(again["state"], "succeeded");
    assert_eq!(again["output"], job["output"]);
}

#[test]
fn no_match_is_explained_at_once_and_the_job_runs_when_a_fitting_provider_joins() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_small, _) = m.host(&s, "small", &["--vram", "1GiB"]);
    online(&s, 1);
    let submitted = m.submit(&s, sample_artifacts::MATMUL, &["--min-vram", "4GiB"]);
    assert_eq!(submitted["state"], "queued");
    let no_match = &submitted["no_match"];
    assert_eq!(no_match["summary"], "0 of 1 providers match: 1 has too little VRAM", "{submitted}");
    assert_eq!(no_match["reasons"][0]["reason"], "vram");
    let id = submitted["id"].as_str().unwrap().to_string();

    // Still waiting, with the reason, a moment later.
    std::thread::sleep(Duration::from_millis(500));
    let view = get_json(&s, &format!("/v1/jobs/{id}"));
    assert_eq!(view["state"], "queued");
    assert_eq!(view["queue_position"], 1);

    let (_big, big) = m.host(&s, "big", &["--vram", "8GiB"]);
    let view = until("the job to finish", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        (v["state"] == "succeeded").then_some(v)
    });
    assert_eq!(view["provider"], big.as_str());
}

#[test]
fn a_killed_host_mid_job_and_the_job_completes_on_the_other_host() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (mut a, key_a) = m.host(&s, "a", &[]);
    let (mut b, key_b) = m.host(&s, "b", &[]);
    online(&s, 2);
    // A few seconds of training, so the kill lands mid-job.
    let input = m.path("train.txt");
    std::fs::write(&input, "epochs=6000 samples=2048").unwrap();
    let submitted = m.submit(&s, sample_artifacts::TRAIN, &["--input", input.to_str().unwrap()]);
    let id = submitted["id"].as_str().unwrap().to_string();
    let first = until("the job to start", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        (v["state"] == "running").then(|| v["provider"].as_str().unwrap().to_string())
    });
    let (victim, survivor) = if first == key_a { (&mut a, key_b) } else { (&mut b, key_a) };
    victim.kill9();
    let view = until("the job to finish elsewhere", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        v["state"].as_str().is_some_and(|st| st != "queued" && st != "running").then_some(v)
    });
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["provider"], survivor.as_str());
    let attempts = view["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{view}");
    assert_eq!(attempts[0]["provider"], first.as_str());
    let reason = attempts[0]["error"].as_str().unwrap();
    assert!(reason.contains("provider"), "the first try's reason is kept: {reason}");
}

#[test]
fn a_scheduler_restart_mid_queue_loses_nothing() {
    let m = Market::new();
    let (mut sched, s) = m.scheduler(&[]);
    let submitted = m.submit(&s, sample_artifacts::MATMUL, &[]);
    let id = submitted["id"].as_str().unwrap().to_string();
    assert_eq!(submitted["no_match"]["summary"], "0 of 0 providers match: no provider has registered yet");
    sched.kill9();

    // Same database and key, new ports.
    let (_sched2, s2) = m.scheduler(&[]);
    assert_eq!(s2.key, s.key);
    let view = get_json(&s2, &format!("/v1/jobs/{id}"));
    assert_eq!(view["state"], "queued", "{view}");
    let (_host, provider) = m.host(&s2, "late", &[]);
    let view = until("the queued job to run after the restart", || {
        let v = get_json(&s2, &format!("/v1/jobs/{id}"));
        (v["state"] == "succeeded").then_some(v)
    });
    assert_eq!(view["provider"], provider.as_str());
    let (status, output) = http(&s2, "GET", &format!("/v1/jobs/{id}/output"), None, b"");
    assert_eq!(status, 200);
    assert!(output.contains("matches the CPU reference"), "{output}");
}

#[test]
fn a_host_with_an_unknown_key_is_refused_before_any_work() {
    let m = Market::new();
    let allowed = proto::Keypair::generate();
    let list = m.path("providers.txt");
    std::fs::write(&list, format!("# the only provider allowed\n{}\n", allowed.public())).unwrap();
    let (_sched, s) = m.scheduler(&["--providers", list.to_str().unwrap()]);
    let (_stranger, _) = m.host(&s, "stranger", &[]);
    let submitted = m.submit(&s, sample_artifacts::MATMUL, &[]);
    let id = submitted["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get_json(&s, "/v1/providers"), serde_json::json!([]), "the stranger never registered");
    assert_eq!(get_json(&s, &format!("/v1/jobs/{id}"))["state"], "queued");
    until("the refusal in the host's log", || log_of(&m, "stranger.log").contains("allowed").then_some(()));
}

#[test]
fn malformed_http_bodies_get_4xx_with_a_json_error() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let unknown_module = format!("{{\"module\": \"{}\"}}", "ab".repeat(32));
    // (method, path, content type, body, expected status)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a [u8], u16);
    let cases: [Case<'_>; 7] = [
        ("POST", "/v1/jobs", Some("application/json"), b"{not json", 400),
        ("POST", "/v1/jobs", Some("application/json"), b"{\"module\": 7}", 422),
        ("POST", "/v1/jobs", Some("application/json"), b"{\"module\": \"abc\"}", 400),
        ("POST", "/v1/jobs", Some("application/json"), unknown_module.as_bytes(), 404),
        ("POST", "/v1/jobs", Some("text/plain"), b"{}", 415),
        ("POST", "/v1/modules", None, b"not wasm", 422),
        ("GET", "/v1/jobs/job-999999", None, b"", 404),
    ];
    for (method, path, ct, body, want) in cases {
        let (status, text) = http(&s, method, path, ct, body);
        assert_eq!(status, want, "{method} {path} {:?}: {text}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{text}");
    }
    let (status, text) =
        http(&s, "POST", "/v1/jobs", Some("application/json"), b"{\"module\":\"x\",\"requirements\":{\"gpus\":1}}");
    assert_eq!(status, 422, "unknown fields are refused, not ignored: {text}");
    // Unsigned, or signed by someone else over another body: refused before the body counts.
    let (status, text) = request(&s, None, "POST", "/v1/jobs", Some("application/json"), b"{}");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("not signed"), "{text}");
    // The scheduler still serves.
    let (status, _) = http(&s, "GET", "/openapi.json", None, b"");
    assert_eq!(status, 200);
}

#[test]
fn renter_commands_pin_the_scheduler_key_sign_as_their_renter_and_take_the_limit_flags() {
    let m = Market::new();
    // A provider timeout the heartbeats cannot meet is refused at start, saying why.
    let out = m
        .cmd(&["scheduler", "--http", "127.0.0.1:0", "--heartbeat-interval", "1s", "--heartbeat-timeout", "2s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 3 heartbeat intervals"));
    let (_sched, s) = m.scheduler(&[]);
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let submit = |key: &str, extra: &[&str]| {
        let mut args = vec!["submit", sample_artifacts::MATMUL, "--scheduler", &s.url, "--scheduler-key", key];
        args.extend_from_slice(extra);
        m.cmd(&args).output().unwrap()
    };
    // Pinned to another key: the connection is refused, nothing is sent.
    let stranger = proto::Keypair::generate().public().to_string();
    let out = submit(&stranger, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reaching the scheduler"));
    // No key for https://: told how to give one.
    let out = m.cmd(&["job", "job-1", "--scheduler", &s.url]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WASMGRID_SCHEDULER_KEY"));
    // The right key, with limit flags: they travel with the job.
    let out = submit(&s.key, &["--wall-time", "1500ms", "--gpu-memory", "64MiB", "--max-output", "1KiB", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("job-") && id.len() == 36, "{id}");
    let job = |key: &str| {
        m.cmd(&["job", &id, "--json", "--scheduler", &s.url, "--key", key])
            .env("WASMGRID_SCHEDULER_KEY", &s.key)
            .output()
            .unwrap()
    };
    let mine = job(m.renter_key().to_str().unwrap());
    assert_eq!(mine.status.code(), Some(0), "{}", String::from_utf8_lossy(&mine.stderr));
    let view: Value = serde_json::from_slice(&mine.stdout).unwrap();
    assert_eq!(view["renter"], m.renter.public().to_string());
    let limits = &view["limits"];
    assert_eq!((limits["wall_time_ms"].as_u64(), limits["gpu_bytes"].as_u64()), (Some(1500), Some(64 << 20)));
    assert_eq!(limits["output_bytes"], 1024);
    // Another renter's key: the job does not exist for it.
    let theirs = job(m.path("other.json").to_str().unwrap());
    assert_eq!(theirs.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&theirs.stderr).contains("404"), "{}", String::from_utf8_lossy(&theirs.stderr));
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn mlp_request(seed: u32) -> Vec<u8> {
    let values: Vec<String> = (0..16).map(|i| ((i * 7 + seed) % 11) as f32 / 10.0).map(|v| v.to_string()).collect();
    values.join(",").into_bytes()
}

#[test]
fn sessions_share_the_providers_memory_budget_and_the_scheduler_sends_none_past_it() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let args = ["--sessions", "127.0.0.1:0", "--session-capacity", "4", "--session-memory", "64MiB"];
    let (mut host, _key) = m.host(&s, "h", &args);
    online(&s, 1);
    let room = |s: &Sched| get_json(s, "/v1/providers")[0]["session_room"].as_u64();
    until("the provider to report room by memory", || room(&s).filter(|r| *r > 0));
    let rt = runtime();
    rt.block_on(async {
        let echo = std::fs::read(sample_artifacts::ECHO).unwrap();
        let open = |init: Vec<u8>| {
            let (renter, echo) = (proto::Keypair::generate(), echo.clone());
            let scheduler = s.client(&renter);
            async move { client::Session::open(&scheduler, renter, echo, init, Default::default()).await }
        };
        // A heavy session: its init input (60 MB) lands in its instance's linear memory.
        let heavy = open(vec![7; 60 << 20]).await.unwrap();
        assert_eq!(heavy.infer(b"abc").await.unwrap().response, b"cba");
        // Once its worker is measured, the provider says it has no room, and the scheduler
        // sends no other session there, with the reason.
        let wait = |what, want: fn(Option<u64>) -> bool| {
            tokio::task::block_in_place(|| until(what, || want(room(&s)).then_some(())));
        };
        wait("the provider to report no room", |r| r == Some(0));
        let why = open(Vec::new()).await.unwrap_err().to_string();
        assert!(why.contains("no room for another session"), "{why}");
        // When the heavy session ends its memory is free again, and the next session is served.
        heavy.close().await.unwrap();
        drop(heavy);
        wait("the provider to report room again", |r| r.is_some_and(|r| r > 0));
        let light = open(Vec::new()).await.unwrap();
        assert_eq!(light.infer(b"xyz").await.unwrap().response, b"zyx");
        light.close().await.unwrap();
    });
    assert!(host.child.try_wait().unwrap().is_none(), "the daemon is alive");
}

#[test]
fn a_session_serves_concurrent_requests_and_fails_over_when_its_provider_dies() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let host_args = |price| ["--sessions", "127.0.0.1:0", "--price-per-inference", price, "--receipt-every", "3"];
    let (mut a, key_a) = m.host(&s, "a", &host_args("2"));
    let (mut b, key_b) = m.host(&s, "b", &host_args("3"));
    online(&s, 2);
    let rt = runtime();
    rt.block_on(async {
        let renter = proto::Keypair::generate();
        let scheduler = s.client(&renter);
        let module = std::fs::read(sample_artifacts::MLP).unwrap();
        let session = std::sync::Arc::new(
            client::Session::open(&scheduler, renter, module, Vec::new(), Default::default()).await.unwrap(),
        );
        // The cheaper provider serves first.
        assert_eq!(session.provider().await.unwrap().to_string(), key_a);
        assert_eq!(session.price_per_inference().await, Some(2));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..8 {
            let s = session.clone();
            set.spawn(async move { (i, s.infer(&mlp_request(i)).await.unwrap()) });
        }
        let mut answers = set.join_all().await;
        answers.sort_by_key(|(i, _)| *i);
        for (_, a) in &answers {
            assert_eq!(String::from_utf8_lossy(&a.response).split(',').count(), 4);
            assert_eq!(a.usage.inferences, 1);
            assert_eq!(a.provider.to_string(), key_a);
        }
        // Same request, same answer: the instance keeps no state between requests.
        assert_eq!(session.infer(&mlp_request(3)).await.unwrap().response, answers[3].1.response);
        // Every third call came with a signed receipt of all calls so far; followed in order,
        // they add up.
        let signed = answers.iter().filter(|(_, a)| a.receipt.is_some()).count();
        assert_eq!(signed, 2, "receipts after calls 3 and 6 of the 8 concurrent ones");
        let receipt = session.last_receipt().await.unwrap();
        assert_eq!((receipt.sequence, receipt.counts.inferences, receipt.amount_due), (9, 9, 18));
        assert_eq!(receipt.provider.to_string(), key_a);

        let (victim, survivor) =
            if key_a == session.provider().await.unwrap().to_string() { (&mut a, &key_b) } else { (&mut b, &key_a) };
        victim.kill9();
        let after = session.infer(&mlp_request(3)).await.unwrap();
        assert_eq!(after.provider.to_string(), *survivor, "the session moved to the other provider");
        assert_eq!(after.response, answers[3].1.response, "and the other provider computes the same answer");
        assert_eq!(session.failovers(), 1);
        assert!(after.receipt.is_none() && session.last_receipt().await.is_none(), "no receipt due yet");
        // Closing gets the provider's receipt of every call it served.
        session.close().await.unwrap();
        let receipt = session.last_receipt().await.unwrap();
        assert_eq!(
            (receipt.sequence, receipt.amount_due),
            (1, 3),
            "the new provider's receipts start over at its price"
        );
    });
}

#[test]
fn forged_and_misissued_tickets_are_refused_before_any_work() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_host, key) = m.host(&s, "h", &["--sessions", "127.0.0.1:0"]);
    online(&s, 1);
    let providers = get_json(&s, "/v1/providers");
    let addr: std::net::SocketAddr = providers[0]["session_addr"].as_str().unwrap().parse().unwrap();
    let provider: proto::PublicKey = key.parse().unwrap();
    let scheduler_key: proto::PublicKey = s.key.parse().unwrap();
    let renter = proto::Keypair::generate();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let forger = proto::Keypair::generate();
    let mut forged =
        proto::ticket::Ticket::issue(&forger, [1; 16], renter.public(), provider, [2; 32], 0, now + 60_000);
    // Claiming the scheduler's key does not make the forger's signature the scheduler's.
    forged.scheduler = scheduler_key;
    let other_scheduler =
        proto::ticket::Ticket::issue(&forger, [1; 16], renter.public(), provider, [2; 32], 0, now + 60_000);
    let cases = [(forged, "signature does not verify"), (other_scheduler, "not signed by the scheduler")];
    let rt = runtime();
    rt.block_on(async {
        for (ticket, want) in cases {
            let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let id = quic::Identity::new(&renter).unwrap();
            let conn = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let open = proto::msg::SessionMsg::Open { ticket: Box::new(ticket), channel: None };
            quic::write_msg(&mut send, &open, proto::msg::OPEN_CAP).await.unwrap();
            let reply: Option<proto::msg::SessionReply> = quic::read_msg(&mut recv, 1 << 20).await.unwrap();
            match reply {
                Some(proto::msg::SessionReply::Refused { reason }) => assert!(reason.contains(want), "{reason}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        // Oversized and malformed frames close that connection only.
        for bad in [&u32::MAX.to_be_bytes()[..], &[0, 0, 0, 3, proto::PROTOCOL_VERSION, 0xc1, 0xc1][..]] {
            let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let id = quic::Identity::new(&renter).unwrap();
            let conn = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(bad).await.unwrap();
            let _ = send.finish();
            tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed())
                .await
                .expect("the provider closes it");
        }
        // A ticket the scheduler really issued, but to another renter, is refused too (and the
        // provider still serves after the bad frames above).
        let other = proto::Keypair::generate();
        let scheduler = s.client(&other);
        let uploaded = scheduler.upload(std::fs::read(sample_artifacts::MLP).unwrap()).await.unwrap();
        let grant = scheduler
            .open_session(&proto::api::OpenSession {
                module: uploaded.module,
                renter: other.public(),
                requirements: Default::default(),
                exclude: Vec::new(),
            })
            .await
            .unwrap();
        let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let id = quic::Identity::new(&renter).unwrap();
        let conn = quic::connect(&endpoint, &id, addr, provider).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        quic::write_msg(
            &mut send,
            &proto::msg::SessionMsg::Open { ticket: Box::new(grant.ticket), channel: None },
            proto::msg::OPEN_CAP,
        )
        .await
        .unwrap();
        let reply: Option<proto::msg::SessionReply> = quic::read_msg(&mut recv, 1 << 20).await.unwrap();
        assert!(
            matches!(&reply, Some(proto::msg::SessionReply::Refused { reason }) if reason.contains("another renter")),
            "{reply:?}"
        );
    });
    assert!(!log_of(&m, "h.log").contains("opened for"), "no session was opened");
}

#[test]
fn demo_runs_the_market_in_one_command_and_reports_it_as_json() {
    let m = Market::new();
    let samples = std::path::Path::new(sample_artifacts::MATMUL).parent().unwrap().to_str().unwrap().to_string();
    let out = m.cmd(&["demo", "--json", "--samples", &samples, "--requests", "8"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    let providers: Vec<&str> = v["providers"].as_array().unwrap().iter().map(|p| p["key"].as_str().unwrap()).collect();
    for job in jobs {
        assert_eq!(job["status"], "succeeded", "{job}");
        assert!(providers.contains(&job["provider"].as_str().unwrap()), "{job}");
        assert!(job["usage"]["dispatches"].as_u64().unwrap() >= 1);
    }
    // The cluster job: one rank on each provider, each paid through its own channel.
    let cluster = &v["cluster"];
    assert_eq!(cluster["state"], "succeeded", "{cluster}");
    let members = cluster["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    let mut ran_on: Vec<&str> = members.iter().map(|m| m["provider_name"].as_str().unwrap()).collect();
    ran_on.sort();
    assert_eq!(ran_on, vec!["alpha", "beta"], "{cluster}");
    for (rank, m) in members.iter().enumerate() {
        assert_eq!(m["rank"], rank);
        assert!(m["usage"]["net_bytes_sent"].as_u64() > Some(0), "{m}");
        assert!(m["paid"].as_u64() > Some(0), "{m}");
        assert_eq!(m["claims"].as_array().map(Vec::len), Some(1), "{m}");
        // Billed for its bytes too: exactly what its provider counted it sending, at its price
        // per GiB, on top of its GPU time; and paid exactly that.
        let b = &m["billed"];
        assert_eq!(b["net_bytes"], m["usage"]["net_bytes_sent"], "{m}");
        let per_gib = b["price_per_net_gib"].as_u64().unwrap();
        assert!(per_gib == 4_000_000 || per_gib == 6_000_000, "{m}");
        let time =
            (b["wall_time_us"].as_u64().unwrap() * b["price_per_gpu_second"].as_u64().unwrap()).div_ceil(1_000_000);
        let bytes = (b["net_bytes"].as_u64().unwrap() * per_gib).div_ceil(1 << 30);
        assert!(bytes > 0, "{m}");
        assert_eq!(b["amount_due"].as_u64(), Some(time + bytes), "{m}");
        assert_eq!(m["paid"], b["amount_due"], "{m}");
    }
    assert_eq!(cluster["link_plan"]["ring"], serde_json::json!([0, 1]));
    assert!(cluster["output"].as_str().unwrap().starts_with("final loss"), "{cluster}");
    let members_paid: u64 = members.iter().map(|m| m["paid"].as_u64().unwrap()).sum();
    assert_eq!(v["session"]["inferences"], 8);
    assert_eq!(v["session"]["receipts_checked"], 8);
    assert_eq!(v["session"]["amount_due"], 800, "8 inferences at alpha's price of 100");
    assert_eq!(v["session"]["provider_name"], "alpha", "the cheaper provider serves the session");
    // Every inference paid through the channel, claimed once at the session's end; the
    // balances read back from the chain agree.
    let settlement = &v["settlement"];
    assert_eq!((settlement["claims"].as_u64(), settlement["inferences"].as_u64()), (Some(1), Some(8)), "{settlement}");
    assert_eq!(settlement["policy"], "end");
    let fees = &settlement["fee_lamports"];
    assert_eq!(
        fees["saved"].as_u64().unwrap(),
        fees["per_inference_settlement"].as_u64().unwrap() - fees["claims"].as_u64().unwrap()
    );
    let parties = settlement["parties"].as_array().unwrap();
    let renter = parties.iter().find(|p| p["role"] == "renter").unwrap();
    // Each job paid through a channel with its provider, by the slice, what the provider's
    // signed receipts said, before its output came, and claimed once it ended.
    let jobs_paid: u64 = jobs.iter().map(|j| j["paid"].as_u64().unwrap()).sum::<u64>() + members_paid;
    assert!(jobs.iter().all(|j| j["paid"].as_u64() > Some(0) && j["claims"].as_array().is_some_and(|c| c.len() == 1)));
    assert_eq!(renter["jobs_paid"].as_u64(), Some(jobs_paid));
    assert_eq!(renter["paid"].as_u64(), Some(800 + jobs_paid));
    assert_eq!(renter["vouched"].as_u64(), Some(800 + jobs_paid));
    // The rest of the deposits stays in the channels, the renter's to close.
    assert_eq!(
        renter["balance"].as_u64().unwrap() + renter["in_channels"].as_u64().unwrap(),
        renter["balance_before"].as_u64().unwrap() - 800 - jobs_paid,
        "{renter}"
    );
    assert_eq!(renter["transactions"].as_array().unwrap().len(), 4 + 2 + 1, "4 job claims, 2 members', 1 session's");
    assert_eq!(
        renter["channels"].as_array().unwrap().len(),
        1 + 4 + 2,
        "the session's channel, one per job and member"
    );
    let alpha = parties.iter().find(|p| p["name"] == "alpha").unwrap();
    let beta = parties.iter().find(|p| p["name"] == "beta").unwrap();
    assert_eq!(alpha["inferences"].as_u64(), Some(8));
    assert_eq!(alpha["earned"].as_u64(), Some(800 + alpha["jobs_earned"].as_u64().unwrap()));
    let session_claim = &renter["claims"].as_array().unwrap()[0];
    assert!(alpha["claims"].as_array().unwrap().contains(session_claim), "both name the session's claim");
    assert_eq!(beta["earned"], beta["jobs_earned"]);
    for p in [alpha, beta] {
        assert_eq!(p["earned"], p["balance"], "{p}");
    }
    assert_eq!(alpha["jobs_earned"].as_u64().unwrap() + beta["jobs_earned"].as_u64().unwrap(), jobs_paid);
    // The weights are here (the test command fetches them): an embedding session ran, its
    // similarities those PyTorch gives.
    let e = &v["embeddings"];
    assert!(e["init_bytes_sent"].as_u64() > Some(90_000_000), "{e}");
    assert_eq!(e["dimensions"], 384);
    let pairs = e["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 4);
    for p in pairs {
        let (got, want) = (p["cosine"].as_f64().unwrap(), p["reference"].as_f64().unwrap());
        assert!((got - want).abs() < 1e-3, "{p}");
    }
}

#[test]
fn a_running_job_streams_its_log() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_host, _) = m.host(&s, "h", &[]);
    online(&s, 1);
    let input = m.path("train.txt");
    std::fs::write(&input, "epochs=6000 samples=2048").unwrap();
    let submitted = m.submit(&s, sample_artifacts::TRAIN, &["--input", input.to_str().unwrap()]);
    let id = submitted["id"].as_str().unwrap().to_string();
    // While it runs, the log already shows its progress.
    let partial = until("log lines from the running job", || {
        let state = get_json(&s, &format!("/v1/jobs/{id}"))["state"].as_str().unwrap().to_string();
        let (status, log) = http(&s, "GET", &format!("/v1/jobs/{id}/log"), None, b"");
        (state == "running" && status == 200 && log.contains("[info] epoch")).then_some(log)
    });
    let view = until("the job to end", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        (v["state"] == "succeeded").then_some(v)
    });
    let (status, full) = http(&s, "GET", &format!("/v1/jobs/{id}/log"), None, b"");
    assert_eq!(status, 200);
    assert!(full.starts_with(partial.lines().next().unwrap()), "the final log continues the streamed one");
    assert!(full.contains("epoch 5999"), "{view}");
}

#[test]
fn a_renter_cancels_a_running_job_and_a_cluster_from_the_cli_and_the_providers_take_work_again() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_a, _) = m.host(&s, "a", &["--sessions", "127.0.0.1:0"]);
    let (_b, _) = m.host(&s, "b", &["--sessions", "127.0.0.1:0"]);
    online(&s, 2);
    let renter = ["--scheduler", s.url.as_str(), "--scheduler-key", s.key.as_str()];
    let cancel = |id: &str| {
        let mut args = vec!["cancel", id, "--json"];
        args.extend_from_slice(&renter);
        m.cmd(&args).output().unwrap()
    };
    let running = |id: &str| {
        until(&format!("job {id} to run"), || {
            let v = get_json(&s, &format!("/v1/jobs/{id}"));
            let members = v["cluster"]["members"].as_array().cloned().unwrap_or_default();
            (v["state"] == "running" && members.iter().all(|m| m["state"] == "running")).then_some(v)
        })
    };
    let free = || {
        until("both providers to be free", || {
            let list = get_json(&s, "/v1/providers");
            list.as_array().unwrap().iter().all(|p| p["running"] == 0).then_some(())
        })
    };
    let input = m.path("train.txt");
    std::fs::write(&input, "epochs=60000 samples=2048").unwrap();
    let id = m.submit(&s, sample_artifacts::TRAIN, &["--input", input.to_str().unwrap()])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let on = running(&id)["provider"].as_str().unwrap().to_string();
    let out = cancel(&id);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["state"].as_str(), v["error"].as_str()), (Some("failed"), Some("cancelled by its renter")));
    assert_eq!(v["provider"], on.as_str());
    until("the provider to stop it", || {
        (log_of(&m, "a.log") + &log_of(&m, "b.log")).contains(&format!("cancelled job {id}")).then_some(())
    });
    free();
    // Cancelling it again, or a job that is not there, is bad input that says why.
    let again = cancel(&id);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"), "{again:?}");
    let nobody = cancel(&format!("job-{}", "0".repeat(32)));
    assert_eq!(nobody.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no job"), "{nobody:?}");
    // A cluster, cancelled through one of its members: every member stops.
    let long = m.path("cluster.txt");
    std::fs::write(&long, "mode=sync steps=100000 samples=256 features=4 report=1000").unwrap();
    let args = ["--input", long.to_str().unwrap(), "--gpus", "2", "--per-provider", "1"];
    let cluster = m.submit(&s, sample_artifacts::CLUSTER_TRAIN, &args)["id"].as_str().unwrap().to_string();
    let view = running(&cluster);
    let member = view["cluster"]["members"][1]["job_id"].as_str().unwrap().to_string();
    let out = cancel(&member);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["id"].as_str(), v["state"].as_str()), (Some(cluster.as_str()), Some("failed")), "{v}");
    for m in v["cluster"]["members"].as_array().unwrap() {
        assert_eq!(m["state"], "failed", "{v}");
    }
    free();
    // And the next job is served as if nothing had happened.
    let ok = m.submit(&s, sample_artifacts::TRAIN, &["--wait"]);
    assert_eq!(ok["state"], "succeeded", "{ok}");
    assert_eq!(get_json(&s, &format!("/v1/jobs/{cluster}"))["cluster"]["tries"], 1, "not run again");
}

#[test]
fn a_job_moved_off_a_frozen_host_is_cancelled_there_when_it_wakes() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (a, key_a) = m.host(&s, "a", &["--price-per-gpu-second", "1"]);
    let (_b, key_b) = m.host(&s, "b", &["--price-per-gpu-second", "2"]);
    online(&s, 2);
    let input = m.path("train.txt");
    std::fs::write(&input, "epochs=6000 samples=2048").unwrap();
    let submitted = m.submit(&s, sample_artifacts::TRAIN, &["--input", input.to_str().unwrap()]);
    let id = submitted["id"].as_str().unwrap().to_string();
    until("the job to run on the cheaper host", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        (v["state"] == "running" && v["provider"] == key_a.as_str()).then_some(())
    });
    // Freeze the host: it misses its heartbeats, and its job goes to the other one.
    let pid = a.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    until("the job to move", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        (v["provider"] == key_b.as_str()).then_some(())
    });
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    // Awake again, the first host hears that the job is no longer its own and stops it.
    until("the cancellation on the woken host", || {
        log_of(&m, "a.log").contains(&format!("cancelled job {id}")).then_some(())
    });
    let view = until("the job to finish on the other host", || {
        let v = get_json(&s, &format!("/v1/jobs/{id}"));
        v["state"].as_str().is_some_and(|st| st != "queued" && st != "running").then_some(v)
    });
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["provider"], key_b.as_str());
    assert!(view["attempts"][0]["error"].as_str().unwrap().contains("missed its heartbeats"), "{view}");
}

/// A local chain behind JSON-RPC (`wasmgrid chain`) funding the given keys; its URL and mint.
pub(super) fn local_chain(m: &Market, fund: &[&str]) -> (Proc, String, String) {
    let mut args = vec!["chain", "--listen", "127.0.0.1:0"];
    for k in fund {
        args.extend_from_slice(&["--fund", k]);
    }
    let p = m.spawn(&args, "chain.log");
    let v: Value = serde_json::from_str(&p.first_line).unwrap();
    let (url, mint) = (v["rpc_url"].as_str().unwrap().to_string(), v["mint"].as_str().unwrap().to_string());
    (p, url, mint)
}

/// A new keypair file; its public key.
pub(super) fn keygen(m: &Market, name: &str) -> String {
    let out = m.cmd(&["keygen", "--out", m.path(name).to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Moves the local chain's clock (`wasmgrid chain`'s own JSON-RPC method) past a dispute window.
fn advance_clock(url: &str, secs: i64) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"wasmgridAdvanceClock","params":[{secs}]}}"#);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("\"result\""), "{out}");
}

fn json_out(out: std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn paid_sessions_across_processes_pay_through_one_channel_claim_once_each_and_close_from_spend() {
    let m = Market::new();
    let (renter, provider) = (keygen(&m, "renter.json"), keygen(&m, "p.json"));
    let (_chain, url, mint) = local_chain(&m, &[&renter, &provider]);
    let (_sched, s) = m.scheduler(&[]);
    let (pledger, rledger) = (m.path("earnings"), m.path("spend"));
    let pay = ["--rpc-url", url.as_str(), "--mint", mint.as_str()];
    let mut host_args = vec!["--sessions", "127.0.0.1:0", "--price-per-inference", "7", "--ledger"];
    host_args.push(pledger.to_str().unwrap());
    host_args.extend_from_slice(&pay);
    let (_host, key) = m.host(&s, "p", &host_args);
    assert_eq!(key, provider);
    online(&s, 1);
    let renter_key = m.path("renter.json");
    let session = |n: u32| {
        let mut args = vec!["session", sample_artifacts::MLP, "--scheduler", &s.url, "--scheduler-key", &s.key];
        args.extend_from_slice(&["--json", "--deposit", "1000", "--key", renter_key.to_str().unwrap()]);
        args.extend_from_slice(&["--ledger", rledger.to_str().unwrap()]);
        args.extend_from_slice(&pay);
        let files: Vec<String> = (0..n)
            .map(|i| {
                let p = m.path(&format!("req{i}.txt"));
                std::fs::write(&p, mlp_request(i)).unwrap();
                p.to_str().unwrap().to_string()
            })
            .collect();
        args.extend(files.iter().map(String::as_str));
        let out = m.cmd(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\nthe provider's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            log_of(&m, "p.log")
        );
        let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
        serde_json::from_str::<Value>(&last).unwrap()
    };
    let summary = session(5);
    assert_eq!(summary["inferences"], 5);
    assert_eq!(summary["payment"]["vouched"], 35, "{summary}");
    assert_eq!(summary["payment"]["claims"].as_array().unwrap().len(), 1, "one claim, at the end: {summary}");

    let earnings = || {
        json_out(
            m.cmd(&["earnings", "--json", "--ledger", pledger.to_str().unwrap(), "--rpc-url", &url]).output().unwrap(),
        )
    };
    let spend = || {
        json_out(
            m.cmd(&["spend", "--json", "--ledger", rledger.to_str().unwrap(), "--rpc-url", &url]).output().unwrap(),
        )
    };
    let e = earnings();
    assert_eq!((e["claimed"].as_u64(), e["unclaimed"].as_u64()), (Some(35), Some(0)), "{e}");
    assert_eq!(e["channels"][0]["source"], "chain");
    assert_eq!(e["devices"][0]["inferences"], 5);
    let sp = spend();
    assert_eq!(
        (sp["vouched"].as_u64(), sp["claimed"].as_u64(), sp["in_channels"].as_u64()),
        (Some(35), Some(35), Some(965)),
        "{sp}"
    );
    assert_eq!(sp["channels"][0]["channel"], e["channels"][0]["channel"], "both sides name the same channel");
    assert_eq!(sp["sessions"][0]["claims"], e["sessions"][0]["claims"], "and the same claim");
    // The scheduler's record of the session shows its usage and the same claim.
    let id = sp["sessions"][0]["session"].as_str().unwrap().to_string();
    // It is the renter's record: read with its key, and nobody else's.
    let renter_kp = proto::Keypair::read(&renter_key).unwrap();
    let record = until("the provider's final session report", || {
        let v = get_json_as(&s, &renter_kp, &format!("/v1/sessions/{id}"));
        (v["closed"] == true).then_some(v)
    });
    let (status, _) = http(&s, "GET", &format!("/v1/sessions/{id}"), None, b"");
    assert_eq!(status, 404, "another renter cannot tell the session exists");
    // What it paid for is the renter's own voucher, checked by the scheduler, on the channel
    // both sides name.
    assert_eq!((record["usage"]["inferences"].as_u64(), record["vouched"].as_u64()), (Some(5), Some(35)), "{record}");
    assert_eq!(record["amount_due"], 35);
    assert_eq!(record["channel"], e["channels"][0]["channel"]);
    assert_eq!(record["settlements"], e["sessions"][0]["claims"]);

    // The next session reuses the channel: nothing on the chain to start, one claim at its end.
    let second = session(2);
    assert_eq!(second["payment"]["vouched"], 14, "{second}");
    let sp = spend();
    // The scheduler's record of it shows what the renter vouched for in this session, not on
    // the whole channel.
    let id2 = sp["sessions"].as_array().unwrap().iter().find(|b| b["session"] != id).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_string();
    let record2 = until("the second session's final report", || {
        let v = get_json_as(&s, &renter_kp, &format!("/v1/sessions/{id2}"));
        (v["closed"] == true).then_some(v)
    });
    assert_eq!((record2["amount_due"].as_u64(), record2["vouched"].as_u64()), (Some(14), Some(14)), "{record2}");
    assert_eq!(sp["channels"].as_array().unwrap().len(), 1);
    assert_eq!(sp["channels"][0]["transactions"].as_array().unwrap().len(), 1, "only the open: {sp}");
    assert_eq!((sp["vouched"].as_u64(), sp["claimed"].as_u64()), (Some(49), Some(49)), "{sp}");
    assert_eq!(earnings()["claimed"], 49);
    // And as tables for people.
    let table = m.cmd(&["earnings", "--ledger", pledger.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("claimed"));

    // The renter closes its channel: started now, finalized once the window has passed, and
    // everything not claimed comes back.
    let close = |m: &Market| {
        let args = [
            "spend",
            "--close",
            "--ledger",
            rledger.to_str().unwrap(),
            "--rpc-url",
            &url,
            "--key",
            renter_key.to_str().unwrap(),
        ];
        let out = m.cmd(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(close(&m).contains("close started"));
    assert_eq!(spend()["channels"][0]["state"], "closing");
    assert!(close(&m).contains("finalize after"), "not before the window ends");
    advance_clock(&url, 3601);
    let finalized = close(&m);
    assert!(finalized.contains("finalized: 951 came back"), "{finalized}");
    let sp = spend();
    assert_eq!((sp["channels"][0]["state"].as_str(), sp["in_channels"].as_u64()), (Some("closed"), Some(0)), "{sp}");
    let chain = settlement::rpc::RpcChain::new(&url);
    let mine = settlement::token::token_account(&settlement::address(&renter_kp.public()), &mint.parse().unwrap());
    assert_eq!(settlement::token::token_balance(&chain, &mine).unwrap(), 100_000_000 - 49);

    // Bad payment flags are refused before anything happens.
    let out = m.cmd(&["session", sample_artifacts::MLP, "--rpc-url", &url, "--deposit", "5"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mint"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = m.cmd(&["session", sample_artifacts::MLP, "--rpc-url", &url, "--mint", &mint]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--deposit"));
    let out = m.cmd(&["spend", "--close", "--ledger", rledger.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rpc-url"));
}

#[test]
fn the_program_deployed_with_chain_deploy_pays_a_session_named_by_its_program_id() {
    let m = Market::new();
    let (renter, provider, deployer) = (keygen(&m, "renter.json"), keygen(&m, "p.json"), keygen(&m, "deployer.json"));
    let (_chain, url, mint) = local_chain(&m, &[&renter, &provider, &deployer]);
    let deployer_key = m.path("deployer.json");
    let program_key = m.path("program.json");
    let args = ["chain", "deploy", "--rpc-url", &url, "--key", deployer_key.to_str().unwrap()];
    let mut with_program = args.to_vec();
    with_program.extend_from_slice(&["--program-key", program_key.to_str().unwrap()]);
    let deployed = json_out(m.cmd(&with_program).output().unwrap());
    let program = deployed["program_id"].as_str().unwrap().to_string();
    assert!(deployed["transactions"].as_u64().unwrap() > 50, "{deployed}");
    assert_eq!(program, proto::Keypair::read(&program_key).unwrap().public().to_string());
    // The same program keypair again is refused, with the reason.
    let again = m.cmd(&with_program).output().unwrap();
    assert_eq!(again.status.code(), Some(4), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // Bad input gets a clear error and sends nothing.
    let bad =
        m.cmd(&["chain", "deploy", "--rpc-url", "nope", "--key", deployer_key.to_str().unwrap()]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let none = m.path("none.json");
    let missing = m.cmd(&["chain", "deploy", "--rpc-url", &url, "--key", none.to_str().unwrap()]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));

    let (_sched, s) = m.scheduler(&[]);
    let pledger = m.path("earnings");
    let pay = ["--rpc-url", url.as_str(), "--mint", mint.as_str(), "--program-id", program.as_str()];
    // Vouchers every 4 calls: the session's 2 calls are vouched for with the close alone.
    let mut host_args = vec!["--sessions", "127.0.0.1:0", "--price-per-inference", "5", "--max-unvouched", "4"];
    host_args.extend_from_slice(&["--ledger", pledger.to_str().unwrap()]);
    host_args.extend_from_slice(&pay);
    let (_host, _) = m.host(&s, "p", &host_args);
    online(&s, 1);
    let req = m.path("req.txt");
    std::fs::write(&req, mlp_request(3)).unwrap();
    let renter_key = m.path("renter.json");
    let mut args = vec!["session", sample_artifacts::MLP, "--scheduler", &s.url, "--scheduler-key", &s.key, "--json"];
    args.extend_from_slice(&["--deposit", "100", "--key", renter_key.to_str().unwrap()]);
    let rledger = m.path("spend");
    args.extend_from_slice(&["--ledger", rledger.to_str().unwrap()]);
    args.extend_from_slice(&pay);
    args.extend_from_slice(&[req.to_str().unwrap(), req.to_str().unwrap()]);
    let out = m.cmd(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}\n{}", String::from_utf8_lossy(&out.stderr), log_of(&m, "p.log"));
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["payment"]["vouched"], 10, "{summary}");
    let e = json_out(
        m.cmd(&["earnings", "--json", "--ledger", pledger.to_str().unwrap(), "--rpc-url", &url]).output().unwrap(),
    );
    assert_eq!((e["claimed"].as_u64(), e["channels"][0]["source"].as_str()), (Some(10), Some("chain")), "{e}");
}

/// Opens a session straight to the granted provider with a hand-made `Open`: the renter's side
/// of the wire, so a test can send what an honest client never would.
fn open_raw(
    rt: &tokio::runtime::Runtime,
    renter: &proto::Keypair,
    grant: proto::api::SessionGrant,
    module: &[u8],
    channel: Option<proto::voucher::ChannelTerms>,
) -> (Result<Option<Box<proto::voucher::Voucher>>, String>, quic::Connection, quic::Endpoint) {
    use proto::msg::{SessionMsg, SessionReply};
    let addr: std::net::SocketAddr = grant.addr.parse().unwrap();
    rt.block_on(async {
        let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let id = quic::Identity::new(renter).unwrap();
        let conn = quic::connect(&endpoint, &id, addr, grant.provider).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let open = SessionMsg::Open { ticket: Box::new(grant.ticket), channel: channel.map(Box::new) };
        quic::write_msg(&mut send, &open, proto::msg::OPEN_CAP).await.unwrap();
        let init = SessionMsg::Init { init_input: Vec::new() };
        quic::write_msg(&mut send, &init, proto::msg::BLOB_CAP).await.unwrap();
        let opened = loop {
            match quic::read_msg::<SessionReply>(&mut recv, 1 << 20).await.unwrap() {
                Some(SessionReply::NeedModule) => {
                    let bytes = module.to_vec();
                    quic::write_msg(&mut send, &SessionMsg::Module { bytes }, proto::msg::BLOB_CAP).await.unwrap();
                }
                Some(SessionReply::Opened { newest, .. }) => break Ok(newest),
                Some(SessionReply::Refused { reason }) => break Err(reason),
                other => panic!("expected the session to open or be refused, got {other:?}"),
            }
        };
        (opened, conn, endpoint)
    })
}

/// One request on a session opened with [`open_raw`], with the voucher given (or none).
fn request_raw(
    rt: &tokio::runtime::Runtime,
    conn: &quic::Connection,
    bytes: Vec<u8>,
    voucher: Option<proto::voucher::Voucher>,
) -> proto::msg::SessionReply {
    use proto::msg::{SessionMsg, SessionReply};
    rt.block_on(async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let msg = SessionMsg::Request { bytes, voucher: voucher.map(Box::new) };
        quic::write_msg(&mut send, &msg, proto::msg::BLOB_CAP).await.unwrap();
        let _ = send.finish();
        quic::read_msg::<SessionReply>(&mut recv, 1 << 20).await.unwrap().unwrap()
    })
}

#[test]
fn a_paid_provider_refuses_unpaid_sessions_bad_channels_and_a_renter_that_stops_paying() {
    use proto::msg::SessionReply;
    let m = Market::new();
    let renter = proto::Keypair::generate();
    let provider = keygen(&m, "p.json");
    let (_chain, url, mint) = local_chain(&m, &[&renter.public().to_string(), &provider]);
    let (_sched, s) = m.scheduler(&[]);
    // A voucher every call: the provider's exposure is one inference.
    let host_args = ["--sessions", "127.0.0.1:0", "--rpc-url", &url, "--mint", &mint, "--max-unvouched", "1"];
    let (_host, _) = m.host(&s, "p", &host_args);
    online(&s, 1);
    let module = std::fs::read(sample_artifacts::MLP).unwrap();
    let scheduler = s.client(&renter);
    let rt = runtime();
    // A renter without a channel is refused, with the reason.
    let unpaid = rt.block_on(client::Session::open(
        &scheduler,
        proto::Keypair::from_seed(renter.seed()),
        module.clone(),
        Vec::new(),
        Default::default(),
    ));
    let err = unpaid.expect_err("refused").to_string();
    assert!(err.contains("takes payment"), "{err}");

    let grant = || {
        rt.block_on(async {
            let uploaded = scheduler.upload(module.clone()).await.unwrap();
            scheduler
                .open_session(&proto::api::OpenSession {
                    module: uploaded.module,
                    renter: renter.public(),
                    requirements: Default::default(),
                    exclude: Vec::new(),
                })
                .await
        })
        .unwrap()
    };
    let chain = settlement::rpc::RpcChain::new(&url);
    let program = settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID);
    let g = grant();
    let ids =
        settlement::Ids { program, renter: renter.public(), provider: g.provider, mint: mint.parse().unwrap(), id: 0 };
    // A channel that does not exist, or in another program, or another mint: refused before
    // anything runs.
    let terms = |program, mint, id| proto::voucher::ChannelTerms { program, mint, id, newest: None };
    let (r, ..) = open_raw(&rt, &renter, g, &module, Some(terms(program, ids.mint, 0)));
    assert!(r.unwrap_err().contains("does not exist"));
    let other = proto::Keypair::generate().public();
    let (r, ..) = open_raw(&rt, &renter, grant(), &module, Some(terms(other.into(), ids.mint, 0)));
    assert!(r.unwrap_err().contains("program"));
    let (r, ..) = open_raw(&rt, &renter, grant(), &module, Some(terms(program, other, 0)));
    assert!(r.unwrap_err().contains("mint"));

    // A renter that opens a channel, is served once, then sends no voucher: the provider
    // serves no second inference (its exposure is one) and says why.
    let mut payer = settlement::Payer::ensure(&chain, &renter, ids, None, 500, 0).unwrap();
    // A forged copy of the "newest voucher" is refused at the open.
    let forged =
        proto::voucher::Voucher { cumulative: 400, receipt_digest: [0; 32], signature: proto::Signature([7; 64]) };
    let mut bad = payer.terms();
    bad.newest = Some(forged);
    let (r, ..) = open_raw(&rt, &renter, grant(), &module, Some(bad));
    assert!(r.unwrap_err().contains("voucher"));
    let (opened, conn, _endpoint) = open_raw(&rt, &renter, grant(), &module, Some(payer.terms()));
    assert_eq!(opened.unwrap(), None, "no voucher yet on this channel");
    let ask = |voucher| request_raw(&rt, &conn, mlp_request(1), voucher);
    let payment_failure = |reply: SessionReply| match reply {
        SessionReply::Failed { kind: proto::msg::FailureKind::Payment, message, .. } => message,
        other => panic!("expected a payment failure, got {other:?}"),
    };
    let first = match ask(None) {
        SessionReply::Response { receipt: Some(receipt), .. } => receipt,
        other => panic!("expected an answer with its receipt, got {other:?}"),
    };
    assert_eq!(first.amount_due, 1);
    // No voucher for it: no second inference, and a clear reason; later vouchers do not
    // restart it.
    let why = payment_failure(ask(None));
    assert!(why.contains("stopped paying"), "{why}");
    let late = payer.sign(&renter, first.amount_due, first.digest()).unwrap();
    assert!(payment_failure(ask(Some(late))).contains("stopped paying"));
    drop(conn);

    // A voucher for more than the receipt, or for another receipt, stops the session too.
    let (_, conn, _endpoint) = open_raw(&rt, &renter, grant(), &module, Some(payer.terms()));
    let ask2 = |voucher| request_raw(&rt, &conn, mlp_request(2), voucher);
    let SessionReply::Response { receipt: Some(r1), .. } = ask2(Some(late)) else { panic!("served") };
    let base = late.cumulative;
    let too_much = payer.sign(&renter, base + r1.amount_due + 5, r1.digest()).unwrap();
    let why = payment_failure(ask2(Some(too_much)));
    assert!(why.contains("voucher refused"), "{why}");
    drop(conn);

    // The renter closes its channel alone; after the window all but what the provider could
    // claim (nothing: the provider claims at a session's end, and took the one voucher it had)
    // comes back.
    payer.refresh(&chain).unwrap();
    payer.start_close(&chain, &renter).unwrap();
    advance_clock(&url, 3601);
    payer.finalize(&chain, &renter).unwrap();
    let mine = settlement::token::token_account(&settlement::address(&renter.public()), &mint.parse().unwrap());
    let back = settlement::token::token_balance(&chain, &mine).unwrap();
    assert!(back == 100_000_000 - 1 || back == 100_000_000, "{back}");
}

/// Submits `module` with `input` and `limits` as `renter` over the raw API; the job id.
fn submit_raw(s: &Sched, renter: &proto::Keypair, module: &str, input: &[u8], limits: Value) -> String {
    use base64::Engine;
    let (status, body) = request(s, Some(renter), "POST", "/v1/modules", None, &std::fs::read(module).unwrap());
    assert_eq!(status, 201, "{body}");
    let hash = serde_json::from_str::<Value>(&body).unwrap()["module"].as_str().unwrap().to_string();
    let job = serde_json::json!({ "module": hash, "input_base64": base64::engine::general_purpose::STANDARD.encode(input), "limits": limits });
    let (status, body) =
        request(s, Some(renter), "POST", "/v1/jobs", Some("application/json"), job.to_string().as_bytes());
    assert_eq!(status, 201, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_string()
}

#[test]
fn a_paid_job_pays_by_the_slice_stops_when_its_vouchers_stop_and_releases_nothing_unpaid() {
    let m = Market::new();
    let renter = m.renter.public().to_string();
    let provider = keygen(&m, "p.json");
    let (_chain, url, mint) = local_chain(&m, &[&renter, &provider]);
    let (_sched, s) = m.scheduler(&[]);
    let ledger = m.path("p-earnings");
    let host_args = [
        "--price-per-gpu-second",
        "200000",
        "--no-sessions",
        "--rpc-url",
        &url,
        "--mint",
        &mint,
        "--job-slice",
        "1s",
        "--ledger",
        ledger.to_str().unwrap(),
    ];
    let (_host, _) = m.host(&s, "p", &host_args);
    online(&s, 1);
    let chain = settlement::rpc::RpcChain::new(&url);
    let mint_key: proto::PublicKey = mint.parse().unwrap();
    let provider_key: proto::PublicKey = provider.parse().unwrap();
    let provider_tokens =
        settlement::token::token_account(&settlement::address(&provider_key), &settlement::address(&mint_key));
    let earned = || settlement::token::token_balance(&chain, &provider_tokens).unwrap();
    let before = earned();

    // Paid through the CLI: the output comes, checked, with what was vouched, and the
    // provider's claim lands for exactly that.
    let renter_key = m.renter_key();
    let spend = m.path("spend");
    let submit_paying = |module: &str, extra: &[&str]| {
        let mut args = vec!["submit", module, "--scheduler", &s.url, "--scheduler-key", &s.key, "--wait", "--json"];
        args.extend_from_slice(&["--rpc-url", &url, "--mint", &mint, "--key", renter_key.to_str().unwrap()]);
        args.extend_from_slice(&["--ledger", spend.to_str().unwrap()]);
        args.extend_from_slice(extra);
        m.cmd(&args).output().unwrap()
    };
    let out = submit_paying(sample_artifacts::MATMUL, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        log_of(&m, "p.log")
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["output"].as_str().unwrap().contains("matches the CPU reference"), "{v}");
    let vouched = v["paid"]["vouched"].as_u64().unwrap();
    assert!(vouched > 0, "{v}");
    assert_eq!(v["receipt"]["amount_due"].as_u64(), Some(vouched), "the last receipt is what was vouched");
    let job1 = v["id"].as_str().unwrap().to_string();
    until("the provider's claim for job 1", || (earned() == before + vouched).then_some(()));
    let view = get_json(&s, &format!("/v1/jobs/{job1}"));
    assert_eq!(view["channel"]["claims"].as_array().map(Vec::len), Some(1), "{view}");

    // A job whose kernel fails is billed for the time it ran, like one that succeeds: paid,
    // then its log and error come.
    let input = m.path("panic.txt");
    std::fs::write(&input, "panic").unwrap();
    let out = submit_paying(sample_artifacts::HOSTILE, &["--input", input.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "the job failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["paid"]["vouched"].as_u64().unwrap() > 0, "billed and paid: {v}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("panicked on purpose"), "its log came: {v}");

    // A renter that names its channel and then sends no voucher: the job is stopped after one
    // slice with the reason, billed for the time it ran, and neither output nor log comes.
    let hostile = &m.renter;
    let job =
        submit_raw(&s, hostile, sample_artifacts::HOSTILE, b"loop", serde_json::json!({ "wall_time_ms": 20_000 }));
    let asked = until("the provider to ask for a channel", || {
        let v = get_json(&s, &format!("/v1/jobs/{job}"));
        (!v["channel"].is_null()).then_some(v)
    });
    assert_eq!(asked["channel"]["need"].as_u64(), Some(4_000_000), "20 s at 200000 per second: {asked}");
    assert_eq!(asked["channel"]["slice_ms"].as_u64(), Some(1000));
    let ids = settlement::Ids {
        program: settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID),
        renter: hostile.public(),
        provider: provider_key,
        mint: mint_key,
        id: 7,
    };
    let mut payer = settlement::Payer::ensure(&chain, hostile, ids, None, 4_000_000, 4_000_000).unwrap();
    let post = |path: &str, body: &Value| {
        http(&s, "POST", &format!("/v1/jobs/{job}/{path}"), Some("application/json"), body.to_string().as_bytes())
    };
    // Another renter cannot name a channel for it, nor can a channel in another mint.
    let stranger = proto::Keypair::generate();
    let terms = serde_json::to_value(payer.terms()).unwrap();
    let (status, _) = request(
        &s,
        Some(&stranger),
        "POST",
        &format!("/v1/jobs/{job}/channel"),
        Some("application/json"),
        terms.to_string().as_bytes(),
    );
    assert_eq!(status, 404);
    let mut other_mint = payer.terms();
    other_mint.mint = stranger.public();
    let (status, body) = post("channel", &serde_json::to_value(&other_mint).unwrap());
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("mint"), "{body}");
    assert_eq!(post("channel", &serde_json::json!({ "program": 5 })).0, 422, "not channel terms");
    let (status, body) = post("channel", &terms);
    assert_eq!(status, 202, "{body}");
    let (status, body) = post("channel", &terms);
    assert_eq!(status, 409, "named once: {body}");
    let first = until("the first slice's receipt", || {
        let v = get_json(&s, &format!("/v1/jobs/{job}"));
        (!v["channel"]["receipt"].is_null()).then_some(v)
    });
    assert_eq!(first["channel"]["base"].as_u64(), Some(0), "{first}");
    let receipt: proto::receipt::JobReceipt = serde_json::from_value(first["channel"]["receipt"].clone()).unwrap();
    assert!(!receipt.done && receipt.sequence == 1 && receipt.amount_due > 0, "{receipt:?}");
    // A voucher for another receipt is refused by the scheduler; one for too much, or signed
    // by someone else, by the provider, which says why.
    let mut elsewhere = payer.sign(hostile, receipt.amount_due, [9; 32]).unwrap();
    let (status, body) = post("voucher", &serde_json::to_value(elsewhere).unwrap());
    assert_eq!(status, 400, "{body}");
    elsewhere = payer.sign(hostile, receipt.amount_due + 1, receipt.digest()).unwrap();
    let (status, body) = post("voucher", &serde_json::to_value(elsewhere).unwrap());
    assert_eq!(status, 202, "relayed: {body}");
    let stopped = until("the job to stop for want of payment", || {
        let v = get_json(&s, &format!("/v1/jobs/{job}"));
        (v["state"] == "failed").then_some(v)
    });
    assert_eq!(stopped["outcome"]["Failed"]["kind"], "payment", "{stopped}");
    let why = stopped["outcome"]["Failed"]["message"].as_str().unwrap();
    assert!(why.contains("vouchers stopped"), "{why}");
    assert!(stopped["channel"]["refused"].as_str().unwrap_or("").contains("voucher refused"), "{stopped}");
    let billed: proto::receipt::JobReceipt = serde_json::from_value(stopped["receipt"].clone()).unwrap();
    assert!(billed.done && billed.sequence >= 2, "billed for what it ran: {billed:?}");
    assert!(billed.wall_time_us < 5_000_000, "stopped after a slice or two, not at its limit: {billed:?}");
    for what in ["output", "log"] {
        let (status, body) = http(&s, "GET", &format!("/v1/jobs/{job}/{what}"), None, b"");
        assert_eq!(status, 402, "{what}: {body}");
    }
    // Paying the last receipt late still releases it (the provider waits a minute for it).
    let last = payer.sign(hostile, billed.amount_due, billed.digest()).unwrap();
    let (status, body) = post("voucher", &serde_json::to_value(last).unwrap());
    assert_eq!(status, 202, "{body}");
    until("the late voucher to be taken", || {
        (http(&s, "GET", &format!("/v1/jobs/{job}/log"), None, b"").0 == 200).then_some(())
    });
    payer.refresh(&chain).unwrap();

    // A channel that is not on the chain is refused by the provider with the reason, before
    // anything runs: the job fails unbilled.
    let job = submit_raw(&s, hostile, sample_artifacts::MATMUL, b"", serde_json::json!({ "wall_time_ms": 20_000 }));
    until("the provider to ask for a channel", || {
        (!get_json(&s, &format!("/v1/jobs/{job}"))["channel"].is_null()).then_some(())
    });
    let mut missing = payer.terms();
    missing.id = 8;
    let (status, body) = http(
        &s,
        "POST",
        &format!("/v1/jobs/{job}/channel"),
        Some("application/json"),
        serde_json::to_string(&missing).unwrap().as_bytes(),
    );
    assert_eq!(status, 202, "{body}");
    let refused = until("the channel's refusal", || {
        let v = get_json(&s, &format!("/v1/jobs/{job}"));
        (v["state"] == "failed").then_some(v)
    });
    assert!(refused["channel"]["refused"].as_str().unwrap().contains("does not exist"), "{refused}");
    assert_eq!(refused["outcome"]["Failed"]["kind"], "payment");
    assert!(refused["receipt"].is_null(), "nothing ran, nothing billed: {refused}");

    // And the next paid job right after is served and paid as the first was.
    let out = submit_paying(sample_artifacts::MATMUL, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The provider's earnings come from the chain, and its ledger books each job.
    let out = m.cmd(&["earnings", "--ledger", ledger.to_str().unwrap(), "--rpc-url", &url, "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_paid_session_whose_provider_dies_moves_on_and_the_restarted_provider_still_claims_its_vouchers() {
    let m = Market::new();
    let renter = proto::Keypair::generate();
    let (a_key, b_key) = (keygen(&m, "a.json"), keygen(&m, "b.json"));
    let (_chain, url, mint) = local_chain(&m, &[&renter.public().to_string(), &a_key, &b_key]);
    let (_sched, s) = m.scheduler(&[]);
    let paid_host = |name: &str, price: &str| {
        let ledger = m.path(&format!("{name}-earnings"));
        let args = [
            "--sessions",
            "127.0.0.1:0",
            "--price-per-inference",
            price,
            "--rpc-url",
            &url,
            "--mint",
            &mint,
            "--max-unvouched",
            "1",
            "--ledger",
        ];
        let mut args: Vec<&str> = args.to_vec();
        let ledger = ledger.to_str().unwrap().to_string();
        args.push(&ledger);
        m.host(&s, name, &args).0
    };
    let mut a = paid_host("a", "2");
    let _b = paid_host("b", "3");
    online(&s, 2);
    let chain: std::sync::Arc<dyn settlement::Chain> = std::sync::Arc::new(settlement::rpc::RpcChain::new(&url));
    let mint_key: proto::PublicKey = mint.parse().unwrap();
    let program = settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID);
    let rt = runtime();
    let books = rt.block_on(async {
        let scheduler = s.client(&renter);
        let payment = client::Payment {
            chain: chain.clone(),
            program,
            mint: mint_key,
            deposit: 1_000,
            channel_id: 0,
            ledger: None,
        };
        let session = client::Session::open_paid(
            &scheduler,
            proto::Keypair::from_seed(renter.seed()),
            std::fs::read(sample_artifacts::MLP).unwrap(),
            Vec::new(),
            Default::default(),
            Some(payment),
        )
        .await
        .unwrap();
        assert_eq!(session.provider().await.unwrap().to_string(), a_key);
        for i in 0..3 {
            session.infer(&mlp_request(i)).await.unwrap();
        }
        // The ledger writer trails the newest voucher by up to 50 ms (a daemon killed within
        // that loses it, by design); what this test checks is that a restarted provider claims
        // what its ledger holds, so the kill comes once the ledger holds the voucher for 4.
        let a_ledger = m.path("a-earnings");
        until("a's ledger to hold the voucher for its second inference", || {
            let (payees, _) = settlement::ledger::load_channels::<settlement::Payee>(&a_ledger).ok()?;
            payees.iter().any(|p| p.newest.as_ref().is_some_and(|v| v.cumulative == 4)).then_some(())
        });
        a.kill9();
        // The next call moves to b, through the renter's channel with b.
        let after = session.infer(&mlp_request(9)).await.unwrap();
        assert_eq!(after.provider.to_string(), b_key);
        session.infer(&mlp_request(10)).await.unwrap();
        session.close().await.unwrap()
    });
    assert_eq!(books.len(), 2, "{books:?}");
    let (with_a, with_b) = (&books[0], &books[1]);
    assert_eq!(with_a.provider.to_string(), a_key);
    // The renter signed for all three of a's inferences, but the third voucher goes with the
    // next request, which went to b: a holds vouchers for two (its exposure of one inference).
    assert_eq!((with_a.inferences, with_a.vouched), (3, 3 * 2));
    assert_eq!((with_b.inferences, with_b.vouched), (2, 2 * 3));
    let claimed = |provider: &str| {
        let ids = settlement::Ids {
            program,
            renter: renter.public(),
            provider: provider.parse().unwrap(),
            mint: mint_key,
            id: 0,
        };
        settlement::channel::read(chain.as_ref(), &ids.channel()).unwrap().map_or(0, |on| on.state.claimed)
    };
    assert_eq!(claimed(&b_key), 6, "b claimed at the session's end");
    assert_eq!(claimed(&a_key), 0, "a died before it could");
    // a, restarted on its ledger, finds the vouchers it saved and its watcher claims them.
    let _a = paid_host("a", "2");
    until("the restarted provider's claim", || (claimed(&a_key) == 4).then_some(()));
    let mine =
        settlement::token::token_account(&settlement::address(&renter.public()), &settlement::address(&mint_key));
    let balance = settlement::token::token_balance(chain.as_ref(), &mine).unwrap();
    assert_eq!(balance, 100_000_000 - 2 * 1_000, "the rest stays in the two channels, the renter's to close");
}

#[test]
fn providers_measure_their_round_trips_to_each_other_at_the_schedulers_request() {
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_a, a) = m.host(&s, "a", &["--sessions", "127.0.0.1:0"]);
    online(&s, 1);
    // The newcomer measures its link to the provider already there (a QUIC handshake pinned
    // to a's key), and both show it.
    let (_b, b) = m.host(&s, "b", &["--sessions", "127.0.0.1:0"]);
    let link_of = |who: &str, to: &str| {
        let list = get_json(&s, "/v1/providers");
        let p = list.as_array()?.iter().find(|p| p["key"] == who)?.clone();
        p["links"].as_array()?.iter().find(|l| l["peer"] == to).cloned()
    };
    let link = until("b's measured round trip to a", || link_of(&b, &a));
    let ms = link["rtt_ms"].as_u64().unwrap();
    assert!((1..1000).contains(&ms), "a loopback round trip: {link}");
    assert_eq!(link_of(&a, &b).map(|l| l["rtt_ms"].clone()), Some(link["rtt_ms"].clone()));

    // A cluster is planned from those links: two GPUs, one on each (each has one job slot).
    let renter_key = m.path("renter.json");
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "--scheduler", &s.url, "--scheduler-key", &s.key, "--json"];
        args.extend_from_slice(&["--key", renter_key.to_str().unwrap()]);
        args.extend_from_slice(extra);
        m.cmd(&args).output().unwrap()
    };
    let refused = |extra: &[&str], why: &str| {
        let out = plan(extra);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_ne!(out.status.code(), Some(0), "{extra:?}");
        assert!(stderr.contains(why), "{extra:?}: {stderr}");
    };
    // Too many, all on one provider, links faster than any, none at all: refused with the
    // reason and counts, nothing held.
    refused(&["--gpus", "3"], "3 GPUs wanted: 2 free that fit, on 2 provider(s)");
    refused(&["--gpus", "2", "--one-provider"], "the most any fitting provider has free is 1");
    refused(&["--gpus", "2", "--max-link-rtt", "0"], "the most within 0 ms of each other is 1");
    refused(&["--gpus", "0"], "at least one GPU");
    refused(&["--gpus", "2", "--min-vram", "4096GiB"], "vram: 2");
    let out = plan(&["--gpus", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut on: Vec<&str> = v["members"].as_array().unwrap().iter().map(|m| m["provider"].as_str().unwrap()).collect();
    on.sort();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort();
    assert_eq!(on, want, "{v}");
    assert_eq!((v["members"][0]["rank"].as_u64(), v["members"][1]["rank"].as_u64()), (Some(0), Some(1)));
    assert_eq!(v["slowest_link_ms"], link["rtt_ms"], "the ring's one link is the measured one: {v}");
}

#[test]
fn a_sessions_weights_go_once_as_a_checked_blob_and_the_next_session_starts_without_them() {
    use proto::msg::{SessionMsg, SessionReply};
    let model = sample_artifacts::minilm_dir();
    let m = Market::new();
    let (_sched, s) = m.scheduler(&[]);
    let (_host, key) = m.host(&s, "h", &["--sessions", "127.0.0.1:0"]);
    online(&s, 1);
    let request = m.path("request.txt");
    std::fs::write(&request, "GPUs sit idle in old mining farms.\n").unwrap();
    let run = || {
        let args = [
            "session",
            sample_artifacts::MINILM,
            "--scheduler",
            &s.url,
            "--scheduler-key",
            &s.key,
            "--init",
            model.to_str().unwrap(),
            "--json",
            request.to_str().unwrap(),
        ];
        m.cmd(&args).output().unwrap()
    };
    let session = || {
        let out = run();
        assert_eq!(out.status.code(), Some(0), "{}\n{}", String::from_utf8_lossy(&out.stderr), log_of(&m, "h.log"));
        let lines: Vec<Value> =
            String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let embedding: Vec<f64> = serde_json::from_str(lines[0]["response"].as_str().unwrap()).unwrap();
        assert_eq!(embedding.len(), 384);
        (embedding, lines[1].clone())
    };
    // The first session sends the model folder (91 MB) in chunks; the provider keeps it.
    let (first, summary) = session();
    let total = summary["init_bytes"].as_u64().unwrap();
    assert!(total > 90_000_000, "{summary}");
    assert_eq!(summary["init_bytes_sent"].as_u64(), Some(total), "{summary}");
    let bundle = host::bundle_dir(&model).unwrap();
    let kept = m.path("h-blobs").join(proto::msg::hash_hex(&proto::msg::sha256(&bundle)));
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), total, "kept by its hash");

    // A renter whose chunks do not hash to what it announced, or that announces more than any
    // provider takes, is refused, and nothing of it is kept.
    let rt = runtime();
    let renter = proto::Keypair::generate();
    let scheduler = s.client(&renter);
    let provider: proto::PublicKey = key.parse().unwrap();
    rt.block_on(async {
        let uploaded = scheduler.upload(std::fs::read(sample_artifacts::MINILM).unwrap()).await.unwrap();
        let lies = [
            (proto::msg::sha256(b"what was announced"), 3u64 << 20, "announced"),
            ([7; 32], proto::msg::MAX_INIT_BLOB + 1, "over the"),
        ];
        for (hash, len, why) in lies {
            let grant = scheduler
                .open_session(&proto::api::OpenSession {
                    module: uploaded.module.clone(),
                    renter: renter.public(),
                    requirements: Default::default(),
                    exclude: Vec::new(),
                })
                .await
                .unwrap();
            let endpoint = quic::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let id = quic::Identity::new(&renter).unwrap();
            let conn = quic::connect(&endpoint, &id, grant.addr.parse().unwrap(), provider).await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let open = SessionMsg::Open { ticket: Box::new(grant.ticket), channel: None };
            quic::write_msg(&mut send, &open, proto::msg::OPEN_CAP).await.unwrap();
            quic::write_msg(&mut send, &SessionMsg::InitBlob { hash, len }, proto::msg::OPEN_CAP).await.unwrap();
            let reason = loop {
                match quic::read_msg::<SessionReply>(&mut recv, 1 << 20).await.unwrap() {
                    Some(SessionReply::NeedBlob) => {
                        for _ in 0..len >> 20 {
                            let bytes = vec![0xab; 1 << 20];
                            let chunk = SessionMsg::BlobChunk { bytes };
                            quic::write_msg(&mut send, &chunk, proto::msg::BLOB_CHUNK_CAP).await.unwrap();
                        }
                    }
                    // Too large for this provider: turned away as busy, so that the renter's
                    // client asks the scheduler for another.
                    Some(SessionReply::Refused { reason } | SessionReply::Busy { reason }) => break reason,
                    other => panic!("expected a refusal, got {other:?}"),
                }
            };
            assert!(reason.contains(why), "{reason}");
        }
    });
    let names: Vec<String> = std::fs::read_dir(m.path("h-blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "only the good blob is kept: {names:?}");

    // The next session with the same weights sends none of them, and gets the same embedding.
    let (again, summary) = session();
    assert_eq!(summary["init_bytes_sent"].as_u64(), Some(0), "{summary}");
    assert_eq!(again, first);

    // A kept blob that no longer holds what its name says (a disk fault, a hand in the folder)
    // is caught by the worker before init sees it and forgotten, and the renter is sent on;
    // the next session sends it again.
    let mut bytes = std::fs::read(&kept).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&kept, bytes).unwrap();
    let out = run();
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(log_of(&m, "h.log").contains("no longer holds what the renter sent"), "{}", log_of(&m, "h.log"));
    assert!(!kept.exists(), "the damaged blob is forgotten");
    let (third, summary) = session();
    assert_eq!(summary["init_bytes_sent"].as_u64(), Some(total), "sent again: {summary}");
    assert_eq!(third, first);
}
