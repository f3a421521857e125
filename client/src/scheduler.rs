//! The scheduler's HTTP API, as a renter's program calls it: over HTTPS pinned to the
//! scheduler's key, every request signed with the renter's key ([`proto::httpsig`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use proto::api::{ClusterRequest, JobView, ModuleUploaded, OpenSession, SessionGrant, SubmitJob, Submitted};
use proto::msg::{JobLimits, Requirements};
use proto::receipt::JobReceiptError;
use proto::{Keypair, PublicKey};
use rand_core::RngCore;
use reqwest::Method;

use crate::Error;

/// Tries of a request the scheduler answered `429` with a short `Retry-After`.
const RATE_TRIES: usize = 3;
/// Longest `Retry-After` waited out here; a longer one is the caller's to handle.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

/// How long a paying client waits, after a job ended, for its last voucher to be taken.
const LAST_VOUCHER_WAIT: Duration = Duration::from_secs(90);

/// The scheduler's HTTP API, on behalf of one renter: every request is signed with its key,
/// and the jobs and sessions it creates are that key's (nobody else can read them).
#[derive(Clone, Debug)]
pub struct Scheduler {
    base: String,
    http: reqwest::Client,
    renter: Arc<Keypair>,
}

impl Scheduler {
    /// `base` is the scheduler's URL. `https://HOST:PORT` must prove it holds
    /// `scheduler_key` (the key `wasmgrid scheduler` prints; certificate authorities play no
    /// part), so nobody on the path can read or change what the scheduler says. Plain
    /// `http://` is accepted only for a loopback address (a scheduler started with
    /// `--plain-http-loopback`), where `scheduler_key` is not needed. Every request is signed
    /// with `renter`.
    pub fn new(base: &str, scheduler_key: Option<PublicKey>, renter: Keypair) -> Result<Scheduler, Error> {
        let base = base.trim_end_matches('/').to_string();
        let bad = |reason: String| Error::Unreachable { url: base.clone(), reason };
        let url = reqwest::Url::parse(&base).map_err(|e| bad(format!("not a URL: {e}")))?;
        let builder = match (url.scheme(), scheduler_key) {
            ("https", Some(key)) => quic::https::pinned_client(key).map_err(|e| bad(e.to_string()))?,
            ("https", None) => {
                return Err(bad(
                    "no scheduler key to pin: give the scheduler's public key (--scheduler-key or WASMGRID_SCHEDULER_KEY; `wasmgrid scheduler` prints it, and so does GET /v1/info)"
                        .into(),
                ));
            }
            ("http", _) if is_loopback(&url) => reqwest::Client::builder(),
            ("http", _) => {
                return Err(
                    bad("plain HTTP is used only on loopback: use https:// and pin the scheduler's key".into()),
                );
            }
            (other, _) => return Err(bad(format!("{other}:// is not a scheduler URL; use https://"))),
        };
        let http = builder.connect_timeout(Duration::from_secs(10)).build().map_err(|e| bad(e.to_string()))?;
        Ok(Scheduler { base, http, renter: Arc::new(renter) })
    }

    /// The renter this client signs for.
    pub fn renter(&self) -> PublicKey {
        self.renter.public()
    }

    fn unreachable(&self, e: reqwest::Error) -> Error {
        Error::Unreachable { url: self.base.clone(), reason: e.to_string() }
    }

    /// Sends `method path_and_query` with `body`, signed; a short `429` is waited out.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        json: bool,
    ) -> Result<reqwest::Response, Error> {
        let mut tries = 0;
        loop {
            tries += 1;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let mut nonce = [0u8; 16];
            rand_core::OsRng.fill_bytes(&mut nonce);
            let headers = proto::httpsig::sign(&self.renter, method.as_str(), path_and_query, &body, now, nonce);
            let mut rb = self.http.request(method.clone(), format!("{}{path_and_query}", self.base));
            for (name, value) in headers {
                rb = rb.header(name, value);
            }
            if json {
                rb = rb.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            let resp = rb.body(body.clone()).send().await.map_err(|e| self.unreachable(e))?;
            let wait = (resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS)
                .then(|| resp.headers().get(reqwest::header::RETRY_AFTER))
                .flatten()
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(Duration::from_secs)
                .filter(|w| *w <= MAX_RETRY_WAIT && tries < RATE_TRIES);
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => return Ok(resp),
            }
        }
    }

    async fn get(&self, path_and_query: &str) -> Result<reqwest::Response, Error> {
        self.send(Method::GET, path_and_query, Vec::new(), false).await
    }

    async fn post_json<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<reqwest::Response, Error> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Api {
            what: format!("encoding the request to {path}"),
            status: 0,
            message: e.to_string(),
        })?;
        self.send(Method::POST, path, bytes, true).await
    }

    async fn check(&self, resp: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<proto::api::ApiError>(&body).map(|e| e.error).unwrap_or(body);
        Err(Error::Api { what: what.to_string(), status, message })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, resp: reqwest::Response, what: &str) -> Result<T, Error> {
        self.check(resp, what).await?.json().await.map_err(|e| self.unreachable(e))
    }

    /// Uploads a module (once; the scheduler keeps it by hash).
    pub async fn upload(&self, module: Vec<u8>) -> Result<ModuleUploaded, Error> {
        let resp = self.send(Method::POST, "/v1/modules", module, false).await?;
        self.json(resp, "uploading the module").await
    }

    /// Submits a batch job for an uploaded module.
    pub async fn submit(
        &self,
        module: &str,
        input: &[u8],
        requirements: Requirements,
        limits: JobLimits,
        deadline: Option<Duration>,
    ) -> Result<Submitted, Error> {
        self.submit_job(module, input, requirements, limits, deadline, None).await
    }

    /// Submits a batch job like [`Scheduler::submit`], as a cluster when `cluster` says so:
    /// `cluster.gpus` members, one GPU each (each meeting `requirements`), placed together or
    /// not at all. The job's view then shows its members ([`proto::api::ClusterView`]), each a
    /// job of this renter's of its own; the cluster's output is rank 0's.
    pub async fn submit_job(
        &self,
        module: &str,
        input: &[u8],
        requirements: Requirements,
        limits: JobLimits,
        deadline: Option<Duration>,
        cluster: Option<ClusterRequest>,
    ) -> Result<Submitted, Error> {
        let job = SubmitJob {
            module: module.to_string(),
            input_base64: base64::engine::general_purpose::STANDARD.encode(input),
            requirements,
            limits,
            deadline_secs: deadline.map(|d| d.as_secs().max(1)),
            cluster,
        };
        let resp = self.post_json("/v1/jobs", &job).await?;
        self.json(resp, "submitting the job").await
    }

    /// One of this renter's jobs (anyone else's reads as not found).
    pub async fn job(&self, id: &str) -> Result<JobView, Error> {
        let resp = self.get(&format!("/v1/jobs/{id}")).await?;
        self.json(resp, "reading the job").await
    }

    /// Follows a job until it ends, calling `progress` whenever its view changes. Uses the
    /// scheduler's long poll, so a change is seen as soon as it happens. Pays nothing: a job on
    /// a provider that takes payment fails, with the reason ([`Scheduler::wait_paying`] pays).
    pub async fn wait(&self, id: &str, progress: impl FnMut(&JobView)) -> Result<JobView, Error> {
        Ok(self.wait_paying(id, None, progress).await?.0)
    }

    /// A finished job's output or log (`what` is `output` or `log`), as the scheduler sends
    /// it; [`Scheduler::output`] checks the output against the provider's receipt.
    pub async fn bytes(&self, id: &str, what: &str) -> Result<Vec<u8>, Error> {
        let resp = self.get(&format!("/v1/jobs/{id}/{what}")).await?;
        let resp = self.check(resp, &format!("reading the job's {what}")).await?;
        Ok(resp.bytes().await.map_err(|e| self.unreachable(e))?.to_vec())
    }

    /// A finished job's output, checked against the receipt its provider signed when there is
    /// one ([`check_output`]): what comes is what the provider signed for, or an error. Empty
    /// when the job has no output.
    pub async fn output(&self, view: &JobView) -> Result<Vec<u8>, Error> {
        if view.output_bytes.is_none() {
            return Ok(Vec::new());
        }
        let output = self.bytes(&view.id, "output").await?;
        check_output(view, &output).map_err(|e| {
            Error::Payment(format!("job {}: {e}: the output is not what the provider signed for", view.id))
        })?;
        Ok(output)
    }

    /// Stops one of this renter's jobs (a cluster's member stands for its whole cluster): a
    /// queued job never runs, a running one ends now. Returns the job's view; a job that
    /// already ended is an [`Error::Api`] with status 409.
    pub async fn cancel(&self, id: &str) -> Result<JobView, Error> {
        let resp = self.post_json(&format!("/v1/jobs/{id}/cancel"), &serde_json::json!({})).await?;
        self.json(resp, "cancelling the job").await
    }

    /// Follows a cluster job until it ends, paying each member as it runs: every member is a
    /// job of its own with its own provider, followed and paid like [`Scheduler::wait_paying`]
    /// through a channel of its own. Members take channel ids from `payment.channel_id` up, the
    /// lowest one no member still paying holds: ranks 0..N-1 take base..base+N-1, and a retry's
    /// member never shares a channel with an earlier try's member still settling (so the
    /// cluster may take up to N more while a retry overlaps). Keep that range for this
    /// cluster alone. A member whose channel cannot be opened or funded fails the whole
    /// cluster at once: it is cancelled, the other members' payments settle, and the error
    /// says why. Any other member's payment trouble (a receipt refused) is logged and the
    /// cluster goes on as the scheduler decides. Returns the cluster job's view and the books
    /// of every member paid.
    pub async fn wait_cluster_paying(
        &self,
        id: &str,
        payment: &crate::Payment,
        mut progress: impl FnMut(&JobView),
    ) -> Result<(JobView, Vec<settlement::ledger::Book>), Error> {
        type Paid = Result<(JobView, Option<settlement::ledger::Book>), Error>;
        struct Paying {
            job: String,
            slot: u64,
            task: tokio::task::JoinHandle<Paid>,
        }
        let mut paying: Vec<Paying> = Vec::new();
        // Members whose payment ended, and what it came to.
        let mut done_jobs: Vec<String> = Vec::new();
        let mut books: Vec<settlement::ledger::Book> = Vec::new();
        let mut last = None;
        // Why the cluster was given up, once it was.
        let mut abandoned: Option<Error> = None;
        loop {
            let view = self.job(id).await?;
            let mut members: Vec<&proto::api::MemberView> = view.cluster.iter().flat_map(|c| &c.members).collect();
            members.sort_by_key(|m| m.rank);
            let states: Vec<(String, proto::api::JobState)> =
                members.iter().map(|m| (m.job_id.clone(), m.state)).collect();
            if last.as_ref() != Some(&(view.state, states.clone())) {
                progress(&view);
                last = Some((view.state, states));
            }
            for m in members.iter().filter(|_| abandoned.is_none()) {
                if paying.iter().any(|p| p.job == m.job_id) || done_jobs.contains(&m.job_id) || m.state.is_final() {
                    continue;
                }
                let slot = (0..).find(|k| !paying.iter().any(|p| p.slot == *k)).unwrap_or(0);
                let Some(channel_id) = payment.channel_id.checked_add(slot) else {
                    abandoned = Some(Error::Payment(format!(
                        "cluster {id}: no channel id for member {} past {}: give a lower --channel-id",
                        m.job_id, payment.channel_id
                    )));
                    break;
                };
                let (client, job) = (self.clone(), m.job_id.clone());
                let pay = crate::Payment { channel_id, ..payment.clone() };
                let task = tokio::spawn(async move { client.wait_paying(&job, Some(&pay), |_| {}).await });
                paying.push(Paying { job: m.job_id.clone(), slot, task });
            }
            while let Some(at) = paying.iter().position(|p| p.task.is_finished()) {
                let p = paying.swap_remove(at);
                match p.task.await {
                    Ok(Ok((_, book))) => books.extend(book),
                    Ok(Err(e @ Error::Payment(_))) if abandoned.is_none() && self.never_funded(&p.job).await => {
                        // A member its renter cannot pay never runs: say so now, not when the
                        // cluster fails for it a minute later.
                        abandoned = Some(Error::Payment(format!("cluster {id}: paying member {}: {e}", p.job)));
                    }
                    Ok(Err(e)) => log::warn!("cluster {id}: paying member {}: {e}", p.job),
                    Err(e) => log::warn!("cluster {id}: paying member {}: {e}", p.job),
                }
                done_jobs.push(p.job);
            }
            if abandoned.is_some() && !view.state.is_final() {
                match self.cancel(id).await {
                    Ok(_) | Err(Error::Api { status: 409, .. }) => {}
                    Err(e) => log::warn!("cluster {id}: cancelling it: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if view.state.is_final() {
                // Every member's payment settles (its last voucher, or the minute its provider
                // waits for one) before the answer.
                for p in paying {
                    match p.task.await {
                        Ok(Ok((_, book))) => books.extend(book),
                        Ok(Err(e)) => log::warn!("cluster {id}: paying member {}: {e}", p.job),
                        Err(e) => log::warn!("cluster {id}: paying member {}: {e}", p.job),
                    }
                }
                if let Some(e) = abandoned {
                    return Err(e);
                }
                // The output is released once the member it comes from is paid: read the job
                // once more.
                return Ok((self.job(id).await?, books));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether member `job` asked for a channel that its renter never named: its payment
    /// failed at opening or funding the channel, not on a receipt.
    async fn never_funded(&self, job: &str) -> bool {
        match self.job(job).await {
            Ok(v) => v.channel.is_some_and(|c| c.id.is_none()),
            Err(_) => false,
        }
    }

    /// Follows a job until it ends, paying for it as it runs when its provider takes payment:
    /// names this renter's channel with the provider when it asks (opened, or topped up to hold
    /// what the job may cost at its wall-time limit), checks every receipt the provider signs
    /// (its signature, the job, the price it asked, its time against the job's limit and what
    /// the scheduler saw, each one after the one before) and answers it with a voucher, the
    /// last one included, after which the output and log are released. Without `payment`, a
    /// provider that asks to be paid gets nothing and the job fails with the reason.
    pub async fn wait_paying(
        &self,
        id: &str,
        payment: Option<&crate::Payment>,
        mut progress: impl FnMut(&JobView),
    ) -> Result<(JobView, Option<settlement::ledger::Book>), Error> {
        // What the caller hears of: the job's state, place and tries, and a cluster's members'.
        type Seen = (proto::api::JobState, Option<u32>, usize, Vec<proto::api::JobState>);
        let mut last: Option<Seen> = None;
        let mut state: Option<proto::api::JobState> = None;
        let mut pay: Option<crate::pay::JobPayer> = None;
        let mut seen = 0;
        let mut ended_at: Option<std::time::Instant> = None;
        loop {
            let path = match state {
                Some(s) => format!("/v1/jobs/{id}?wait_ms=10000&state={}&pay={seen}", state_name(s)),
                None => format!("/v1/jobs/{id}"),
            };
            let resp = self.get(&path).await?;
            let view: JobView = self.json(resp, "reading the job").await?;
            let members =
                view.cluster.as_ref().map(|c| c.members.iter().map(|m| m.state).collect()).unwrap_or_default();
            let now = (view.state, view.queue_position, view.attempts.len(), members);
            if last.as_ref() != Some(&now) {
                progress(&view);
                last = Some(now);
            }
            // A try on another provider pays that provider, through its own channel.
            if pay.as_ref().is_some_and(|p| Some(p.provider()) != view.provider || view.channel.is_none())
                && let Some(p) = pay.take()
            {
                p.ended();
            }
            if let (Some(c), Some(payment), Some(provider)) = (&view.channel, payment, view.provider) {
                seen = c.updates;
                if pay.is_none() && c.id.is_none() && c.refused.is_none() && view.state == proto::api::JobState::Running
                {
                    let p = crate::pay::JobPayer::create(payment, self.renter.clone(), id, provider, c).await?;
                    let resp = self.post_json(&format!("/v1/jobs/{id}/channel"), &p.terms()).await?;
                    self.check(resp, "naming the payment channel").await?;
                    pay = Some(p);
                }
                if let Some(p) = pay.as_mut()
                    && let Some(voucher) = p.follow(&view)?
                {
                    let resp = self.post_json(&format!("/v1/jobs/{id}/voucher"), &voucher).await?;
                    // A voucher the scheduler did not take (its provider busy, say) is sent
                    // again on the next turn while its receipt still waits.
                    match self.check(resp, "sending a voucher").await {
                        Ok(_) => p.sent(),
                        Err(e) => log::warn!("job {id}: {e}"),
                    }
                }
            }
            let settled = match &view.channel {
                None => true,
                // A last receipt held for the scheduler's cross-check is still to come.
                Some(c) if c.held.is_some() => false,
                Some(c) => view.paid() || c.receipt.is_none() || c.refused.is_some() && c.unvouched().is_none(),
            };
            // The provider waits a minute for the last voucher; past that, nothing more comes.
            let given_up = ended_at.is_some_and(|t| t.elapsed() > LAST_VOUCHER_WAIT);
            if view.state.is_final() && (settled || payment.is_none() || given_up) {
                let book = pay.take().map(|p| p.ended());
                return Ok((view, book));
            }
            if view.state.is_final() {
                ended_at.get_or_insert_with(std::time::Instant::now);
            }
            state = Some(view.state);
        }
    }

    /// Asks for a provider to serve an inference session. `req.renter` must be this client's
    /// renter (the key that signs the request).
    pub async fn open_session(&self, req: &OpenSession) -> Result<SessionGrant, Error> {
        let resp = self.post_json("/v1/sessions", req).await?;
        if resp.status().as_u16() == 503 {
            let body: serde_json::Value = resp.json().await.map_err(|e| self.unreachable(e))?;
            return Err(Error::NoProvider(body.get("error").and_then(|e| e.as_str()).unwrap_or("").to_string()));
        }
        self.json(resp, "opening a session").await
    }

    /// Where a cluster of GPUs would be placed now, in ring order; `Error::NoProvider` with the
    /// reason and counts when none fits.
    pub async fn plan(&self, req: &proto::api::PlanRequest) -> Result<proto::api::GangPlan, Error> {
        let resp = self.post_json("/v1/plan", req).await?;
        if resp.status().as_u16() == 409 {
            let body: proto::api::NoPlan = resp.json().await.map_err(|e| self.unreachable(e))?;
            return Err(Error::NoProvider(body.error));
        }
        self.json(resp, "planning a cluster").await
    }

    /// One of this renter's session records.
    pub async fn session(&self, id: &str) -> Result<proto::api::SessionView, Error> {
        let resp = self.get(&format!("/v1/sessions/{id}")).await?;
        self.json(resp, "reading the session").await
    }

    /// Every provider the scheduler knows (public: not signed).
    pub async fn providers(&self) -> Result<Vec<proto::api::ProviderView>, Error> {
        let resp =
            self.http.get(format!("{}/v1/providers", self.base)).send().await.map_err(|e| self.unreachable(e))?;
        self.json(resp, "listing providers").await
    }
}

/// Whether a job's output is the one its provider's signed receipt covers: the receipt's
/// signature, job and provider, and the output's digest. A job without a receipt (nothing to
/// bill: a failure, a scheduler that takes no payment) passes. A cluster job's output is one
/// member's (rank 0's when it succeeded), and so is its receipt: signed for that member's job,
/// which must be one of the cluster's members on that provider.
pub fn check_output(view: &JobView, output: &[u8]) -> Result<(), JobReceiptError> {
    match (&view.receipt, view.provider) {
        (Some(r), Some(p)) => {
            let member = view
                .cluster
                .as_ref()
                .and_then(|c| c.members.iter().find(|m| m.job_id == r.job_id && m.provider == p))
                .map(|m| m.job_id.as_str());
            r.check(member.unwrap_or(&view.id), &p, output)
        }
        _ => Ok(()),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

fn state_name(s: proto::api::JobState) -> &'static str {
    match s {
        proto::api::JobState::Queued => "queued",
        proto::api::JobState::Running => "running",
        proto::api::JobState::Succeeded => "succeeded",
        proto::api::JobState::Failed => "failed",
        proto::api::JobState::Expired => "expired",
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    async fn start(dir: &tempfile::TempDir, plain_http: bool) -> scheduler::Listening {
        scheduler::start(scheduler::SchedulerConfig {
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            plain_http,
            renter_limits: None,
            quic: SocketAddr::from(([127, 0, 0, 1], 0)),
            keypair: Keypair::generate(),
            providers: None,
            db: dir.path().join("db"),
            state: scheduler::Config::default(),
        })
        .await
        .unwrap()
    }

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn urls_that_cannot_be_trusted_are_refused_with_what_to_do() {
        let key = Some(Keypair::generate().public());
        let err = Scheduler::new("https://sched:8080", None, Keypair::generate()).unwrap_err().to_string();
        assert!(err.contains("--scheduler-key or WASMGRID_SCHEDULER_KEY"), "{err}");
        let err = Scheduler::new("http://10.0.0.1:8080", key, Keypair::generate()).unwrap_err().to_string();
        assert!(err.contains("only on loopback"), "{err}");
        assert!(Scheduler::new("ftp://127.0.0.1", key, Keypair::generate()).is_err());
        for ok in ["http://127.0.0.1:8080", "http://[::1]:8080/", "http://localhost:1", "https://sched:8080"] {
            Scheduler::new(ok, key, Keypair::generate()).unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_renter_reaches_only_the_pinned_scheduler_and_reads_only_its_own_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let l = start(&dir, false).await;
        // Pinned to another key: refused in the handshake, nothing sent.
        let wrong = Scheduler::new(&l.url(), Some(Keypair::generate().public()), Keypair::generate()).unwrap();
        let err = wrong.upload(WASM.to_vec()).await.unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
        // The right key: upload, submit, read back, signed all the way.
        let me = Scheduler::new(&l.url(), Some(l.key), Keypair::generate()).unwrap();
        let module = me.upload(WASM.to_vec()).await.unwrap().module;
        let submitted = me.submit(&module, b"in", Requirements::default(), JobLimits::default(), None).await.unwrap();
        assert_eq!(me.job(&submitted.id).await.unwrap().renter, Some(me.renter()));
        assert!(me.providers().await.unwrap().is_empty());
        // Another renter cannot tell the job exists.
        let other = Scheduler::new(&l.url(), Some(l.key), Keypair::generate()).unwrap();
        let err = other.job(&submitted.id).await.unwrap_err();
        assert!(matches!(err, Error::Api { status: 404, .. }), "{err}");
        // A session for someone else's key is refused.
        let req =
            OpenSession { module, renter: other.renter(), requirements: Requirements::default(), exclude: Vec::new() };
        assert!(matches!(me.open_session(&req).await, Err(Error::Api { status: 400, .. })));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn plain_http_on_loopback_needs_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let l = start(&dir, true).await;
        let me = Scheduler::new(&l.url(), None, Keypair::generate()).unwrap();
        me.upload(WASM.to_vec()).await.unwrap();
    }

    #[test]
    fn an_output_is_checked_against_the_providers_receipt() {
        let provider = Keypair::generate();
        let receipt =
            proto::receipt::JobReceipt::sign(&provider, "job-1", [0; 32], 1, b"out", Default::default(), 5, 1);
        let view: JobView = serde_json::from_value(serde_json::json!({
            "id": "job-1", "module": "00", "state": "succeeded", "requirements": {}, "limits": {},
            "submitted_at_ms": 0, "deadline_ms": 0, "attempts": [],
            "provider": provider.public(), "output_bytes": 3, "receipt": receipt,
        }))
        .unwrap();
        check_output(&view, b"out").unwrap();
        assert!(matches!(check_output(&view, b"bad"), Err(JobReceiptError::Output)));
        let mut other = view.clone();
        other.provider = Some(Keypair::generate().public());
        assert!(check_output(&other, b"out").is_err(), "signed by another provider than the one that ran it");
        let mut unbilled = view;
        unbilled.receipt = None;
        check_output(&unbilled, b"anything").unwrap();
    }

    #[test]
    fn a_cluster_jobs_output_is_checked_against_the_receipt_of_the_member_it_came_from() {
        let (provider, other) = (Keypair::generate(), Keypair::generate());
        let sign = |by: &Keypair, job: &str| {
            proto::receipt::JobReceipt::sign(by, job, [0; 32], 1, b"out", Default::default(), 5, 1)
        };
        let member = |rank: u32, job: &str, on: &Keypair| {
            serde_json::json!({
                "rank": rank, "job_id": job, "provider": on.public(), "name": "p", "region": "eu", "gpu": 0,
                "gpu_name": "g", "state": "succeeded", "usage": null, "wall_time_ms": 5, "error": null,
            })
        };
        let view = |receipt: &proto::receipt::JobReceipt| -> JobView {
            serde_json::from_value(serde_json::json!({
                "id": "job-c", "module": "00", "state": "succeeded", "requirements": {}, "limits": {},
                "submitted_at_ms": 0, "deadline_ms": 0, "attempts": [],
                "provider": provider.public(), "output_bytes": 3, "receipt": receipt,
                "cluster": { "request": { "gpus": 2 }, "slowest_link_ms": 1, "regions": [[0, 1]], "tries": 1,
                             "members": [member(0, "job-c-t1-r0", &provider), member(1, "job-c-t1-r1", &other)] },
            }))
            .unwrap()
        };
        // Rank 0's receipt for rank 0's output: checked.
        check_output(&view(&sign(&provider, "job-c-t1-r0")), b"out").unwrap();
        assert!(matches!(check_output(&view(&sign(&provider, "job-c-t1-r0")), b"bad"), Err(JobReceiptError::Output)));
        // A receipt for a job that is no member, or for a member on another provider: refused.
        assert!(check_output(&view(&sign(&provider, "job-elsewhere")), b"out").is_err());
        assert!(check_output(&view(&sign(&provider, "job-c-t1-r1")), b"out").is_err());
    }
}
