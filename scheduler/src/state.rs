//! The scheduler's state machine: jobs, the queue, providers and their liveness. No IO but the
//! store it writes through, no clock: every call takes `now_ms`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proto::PublicKey;
use proto::api::{Attempt, JobRecord, JobState, JobView, NoMatch, ProviderView, SessionView, Submitted};
use proto::msg::{
    GpuInfo, JobLimits, JobReply, JobResult, ModuleHash, Outcome, Price, Requirements, hash_hex, parse_hash,
};
use rand_core::RngCore;

use crate::matching::{Candidate, Query, explain, gpu_search, rank};
use crate::store::{Store, StoreError};

mod cluster;

pub use cluster::{MAX_CLUSTER_INPUT_BYTES, member_id};

/// Tunables of the state machine.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often providers are asked to send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A provider silent this long is offline, and its running jobs go back to the queue. At
    /// least [`MIN_TIMEOUT_HEARTBEATS`] heartbeat intervals (see [`Config::validate`]).
    pub heartbeat_timeout_ms: u64,
    /// How often a job may be started before it fails for good.
    pub max_attempts: usize,
    /// Deadline of a job that names none.
    pub default_deadline_ms: u64,
    /// Jobs one renter may have queued or running at once; past it, submissions are refused
    /// until one ends.
    pub max_jobs_per_renter: usize,
    /// How long a placed cluster job's members have to start (their providers' `Started`);
    /// past it, the whole cluster goes back to the queue. At least [`MIN_CLUSTER_START_MS`].
    pub cluster_start_timeout_ms: u64,
    /// A queued cluster that has waited this long, and would fit on the providers there are
    /// if they were free, has the free slots it could use held for it: jobs queued after it
    /// no longer take them, so it is not passed over for ever by smaller work.
    pub cluster_hold_after_ms: u64,
}

/// Heartbeat intervals a provider may miss before it is offline: one late heartbeat (a busy
/// host, a lost packet) must not take a provider and its jobs away.
pub const MIN_TIMEOUT_HEARTBEATS: u64 = 3;

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "the provider timeout ({timeout_ms} ms) must be at least {MIN_TIMEOUT_HEARTBEATS} heartbeat intervals ({interval_ms} ms each): raise --heartbeat-timeout to {} ms or lower --heartbeat-interval",
        interval_ms.saturating_mul(MIN_TIMEOUT_HEARTBEATS)
    )]
    Timeout { timeout_ms: u64, interval_ms: u64 },
    #[error("the heartbeat interval must be at least {MIN_HEARTBEAT_MS} ms (it is {0} ms)")]
    Interval(u64),
    #[error("max_attempts must be at least 1")]
    Attempts,
    #[error("the cluster start timeout must be at least {MIN_CLUSTER_START_MS} ms (it is {0} ms)")]
    ClusterStart(u64),
}

/// Shortest time a cluster's members get to start: each has to take a slot on its provider.
pub const MIN_CLUSTER_START_MS: u64 = 1_000;

/// Shortest heartbeat interval: each heartbeat costs every provider a message.
pub const MIN_HEARTBEAT_MS: u64 = 50;

impl Config {
    /// Checks the timing knobs against each other: a timeout shorter than a few heartbeat
    /// intervals would take every provider offline between two heartbeats.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms < MIN_HEARTBEAT_MS {
            return Err(ConfigError::Interval(self.heartbeat_interval_ms));
        }
        if self.heartbeat_timeout_ms < self.heartbeat_interval_ms.saturating_mul(MIN_TIMEOUT_HEARTBEATS) {
            return Err(ConfigError::Timeout {
                timeout_ms: self.heartbeat_timeout_ms,
                interval_ms: self.heartbeat_interval_ms,
            });
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::Attempts);
        }
        if self.cluster_start_timeout_ms < MIN_CLUSTER_START_MS {
            return Err(ConfigError::ClusterStart(self.cluster_start_timeout_ms));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 3_000,
            max_attempts: 3,
            default_deadline_ms: 3_600_000,
            max_jobs_per_renter: 1_000,
            cluster_start_timeout_ms: 60_000,
            cluster_hold_after_ms: 30_000,
        }
    }
}

/// How often a provider measures its links again.
pub const LINK_REMEASURE_MS: u64 = 10 * 60 * 1000;

/// Providers asked to measure their links in one scheduler tick, at most.
const LINKS_PER_TICK: usize = 8;

/// Claims kept in a paid job's record.
const MAX_JOB_CLAIMS: usize = 16;

/// Vouchers a job keeps that its renter sent and its provider has not yet said it took.
const MAX_SENT_VOUCHERS: usize = 8;

/// Whether a receipt charges the provider's registered prices (any, when it is not known).
fn priced(r: &proto::receipt::JobReceipt, registered: Option<Price>) -> Result<(), proto::receipt::JobReceiptError> {
    use proto::receipt::JobReceiptError::{NetPrice, Price as TimePrice};
    match registered {
        Some(p) if p.per_gpu_second != r.price_per_gpu_second => {
            Err(TimePrice { want: p.per_gpu_second, got: r.price_per_gpu_second })
        }
        Some(p) if p.per_net_gib != r.price_per_net_gib => {
            Err(NetPrice { want: p.per_net_gib, got: r.price_per_net_gib })
        }
        _ => Ok(()),
    }
}

/// A provider sends a job's checkpoints a second apart at most; one that comes much sooner
/// after the last it sent is dropped.
const MIN_CHECKPOINT_GAP_MS: u64 = 500;

/// Jobs whose last checkpoint time is kept before those of jobs no longer running are dropped.
const CHECKPOINT_PACE_KEPT: usize = 1024;

/// Most bytes of a running job's streamed log kept.
const LIVE_LOG_CAP: usize = 4 << 20;

/// A job to send to a provider now: what goes in its `JobMsg::Run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub job_id: String,
    pub provider: PublicKey,
    pub module: ModuleHash,
    pub input: Vec<u8>,
    pub limits: JobLimits,
    pub renter: Option<PublicKey>,
    /// For one rank of a cluster job: its rank and the roster the scheduler signed (the
    /// roster's job id is the cluster job's, `job_id` the member's own).
    pub member: Option<Box<proto::cluster::MemberAssign>>,
    /// The checkpoint an earlier try saved, to resume from.
    pub checkpoint: Option<Box<proto::msg::Checkpoint>>,
}

#[derive(Debug)]
struct Provider {
    view: ProviderView,
    /// Per GPU, lower-case name and vendor, for matching without allocating.
    gpu_search: Vec<String>,
    /// Jobs this scheduler has sent and not yet heard the end of: the load matching uses (the
    /// heartbeat's count is shown, not trusted).
    assigned: HashSet<String>,
    connected: bool,
    /// Sessions open as of its last heartbeat, and sessions granted to it since: a session
    /// granted counts before the renter has even connected.
    sessions_reported: u32,
    sessions_granted: u32,
    /// Sessions it could still open by its memory, as of its last heartbeat.
    session_room: Option<u32>,
}

impl Provider {
    fn new(view: ProviderView, connected: bool) -> Provider {
        let gpu_search = view.gpus.iter().map(gpu_search).collect();
        Provider {
            view,
            gpu_search,
            assigned: HashSet::new(),
            connected,
            sessions_reported: 0,
            sessions_granted: 0,
            session_room: None,
        }
    }

    fn sessions(&self) -> u32 {
        self.sessions_reported.saturating_add(self.sessions_granted)
    }

    /// Sessions it serves at once. A provider that did not say (an older daemon) gets as
    /// many as it runs batch jobs.
    fn session_capacity(&self) -> u32 {
        if self.view.session_capacity == 0 { self.view.capacity.max(1) } else { self.view.session_capacity }
    }

    /// Sessions it may hold at once now: its slots, or fewer when it said its memory for
    /// sessions has room for fewer.
    fn session_limit(&self) -> u32 {
        let slots = self.session_capacity();
        match self.session_room {
            Some(room) => slots.min(self.sessions_reported.saturating_add(room)),
            None => slots,
        }
    }

    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            key: self.view.key,
            region: &self.view.region,
            gpus: &self.view.gpus,
            gpu_search: &self.gpu_search,
            price: self.view.price,
            capacity: self.view.capacity,
            running: self.assigned.len() as u32,
            online: self.view.online,
            rtt_ms: self.view.rtt_ms,
        }
    }

    /// Where the provider sits in the batch price index: cheapest, then least loaded, then
    /// nearest. `None` when it cannot take a job now (offline, or at capacity): not indexed.
    fn index_key(&self) -> Option<IndexKey> {
        if self.assigned.len() as u64 >= u64::from(self.view.capacity) {
            return None;
        }
        let load =
            (self.assigned.len() as u64 * 1000 / u64::from(self.view.capacity.max(1))).min(u64::from(u16::MAX)) as u16;
        // Round trips in 5 ms steps: jitter between heartbeats should not reorder the index.
        let rtt = self.view.rtt_ms.map_or(u32::MAX, |r| r / 5 * 5);
        self.view.online.then_some((self.view.price.per_gpu_second, load, rtt, self.view.key))
    }
}

/// Order of the batch price index: price per GPU-second, load in permille, round trip, key.
type IndexKey = (u64, u16, u32, PublicKey);

/// The scheduler's state.
pub struct State {
    config: Config,
    store: std::sync::Arc<dyn Store>,
    jobs: BTreeMap<String, JobRecord>,
    /// Queued job ids, oldest first.
    queue: Vec<String>,
    providers: HashMap<PublicKey, Provider>,
    /// Online providers in ranking order, so placing a job walks from the best provider and
    /// usually stops at the first.
    index: BTreeSet<IndexKey>,
    /// Bumped whenever a provider may have become able to take a job it could not before (it
    /// joined, came online, freed capacity, got nearer).
    availability: u64,
    /// Queued jobs found unplaceable, with the `availability` they were checked at: they are
    /// not checked again until it moves.
    unplaceable: HashMap<String, u64>,
    /// Whether anything fits a set of requirements, load aside, and why not: valid until a
    /// provider registers or goes on or offline, which clears it. Renters repeat requirements,
    /// and the full explanation is a scan of every provider.
    explained: std::cell::RefCell<HashMap<String, Option<NoMatch>>>,
    /// Logs of running jobs as their providers stream them (kept in memory; the full log comes
    /// with the result).
    live_logs: HashMap<String, Vec<u8>>,
    /// Jobs taken away from a provider that may still be running them, to cancel there.
    revoked: HashMap<PublicKey, Vec<String>>,
    /// When each running job (a cluster's member on its own) last had a checkpoint kept.
    checkpoints_at: HashMap<String, u64>,
    /// Inference sessions the scheduler granted, by hex id.
    sessions: HashMap<String, SessionView>,
    /// Round trips providers measured to each other (in memory: measured again after a
    /// restart), and the peers each was asked to measure and has not answered for yet.
    links: crate::gang::Links,
    asked_links: HashMap<PublicKey, HashSet<PublicKey>>,
    /// When each provider was last asked to measure its links.
    links_asked_at: HashMap<PublicKey, u64>,
    /// Per renter, jobs that may still be queued or running (ended ones are dropped when the
    /// renter next submits): what the per-renter cap counts.
    unfinished: HashMap<PublicKey, BTreeSet<String>>,
    /// The next job's place in the order of submission.
    next_seq: u64,
    /// Cluster jobs: what signs their rosters, their running members, their start timeouts,
    /// why queued ones found no gang, which providers to avoid on a retry.
    clusters: cluster::Clusters,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("jobs", &self.jobs.len()).field("providers", &self.providers.len()).finish()
    }
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job {0:?}")]
    NoJob(String),
    #[error("job {0} already ended ({1:?})")]
    Ended(String, JobState),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a submission was refused outright.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("unknown module {0}: upload it with POST /v1/modules first")]
    UnknownModule(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "renter {renter} has {count} jobs queued or running, the most one renter may have: submit again once one of them ends"
    )]
    TooManyJobs { renter: PublicKey, count: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl State {
    /// Loads what the store holds: jobs that were running when the scheduler stopped go back to
    /// the queue (their provider will not report to a new process), providers start offline
    /// until they reconnect.
    pub fn load(config: Config, store: Box<dyn Store>, now_ms: u64) -> Result<State, StoreError> {
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::from(store);
        let mut jobs = BTreeMap::new();
        let mut unfinished: HashMap<PublicKey, BTreeSet<String>> = HashMap::new();
        let mut next_seq = 0;
        for mut job in store.jobs()? {
            next_seq = next_seq.max(job.seq.saturating_add(1));
            // The newest checkpoint is written without the record: the record shows it again.
            if !job.view.state.is_final() && job.view.member_of.is_none() {
                match store.checkpoint(&job.view.id) {
                    Ok(Some(kept)) => job.view.checkpoint = Some(kept.view),
                    Ok(None) => {}
                    Err(e) => log::error!("job {}: reading its checkpoint: {e}", job.view.id),
                }
            }
            // A cluster's member ran under a roster of the process that stopped: it ends here,
            // and its cluster (queued again below, like any running job) is placed again whole.
            let member = job.view.member_of.is_some();
            if job.view.state == JobState::Running {
                let why = if member {
                    "the scheduler restarted while the cluster ran"
                } else {
                    "the scheduler restarted while the job ran"
                };
                if let Some(a) = job.view.attempts.last_mut().filter(|a| a.ended_at_ms.is_none()) {
                    a.ended_at_ms = Some(now_ms);
                    a.error = Some(why.into());
                }
                if member {
                    job.view.state = JobState::Failed;
                    job.view.error = Some(why.into());
                } else {
                    job.view.state = JobState::Queued;
                    job.view.provider = None;
                }
                store.put_job(&job)?;
            }
            // A member is its cluster's: only the cluster counts against the renter's cap.
            if let Some(renter) = job.view.renter.filter(|_| !job.view.state.is_final() && !member) {
                unfinished.entry(renter).or_default().insert(job.view.id.clone());
            }
            jobs.insert(job.view.id.clone(), job);
        }
        let mut queue: Vec<&JobRecord> =
            jobs.values().filter(|j| j.view.state == JobState::Queued && j.view.member_of.is_none()).collect();
        queue.sort_by_key(|j| (j.view.submitted_at_ms, j.seq, j.view.id.clone()));
        let queue = queue.into_iter().map(|j| j.view.id.clone()).collect();
        let mut providers = HashMap::new();
        for mut view in store.providers()? {
            view.online = false;
            view.running = 0;
            providers.insert(view.key, Provider::new(view, false));
        }
        let sessions = store.sessions()?.into_iter().map(|s| (s.id.clone(), s)).collect();
        let mut state = State {
            config,
            store,
            jobs,
            queue,
            providers,
            index: BTreeSet::new(),
            availability: 0,
            unplaceable: HashMap::new(),
            explained: std::cell::RefCell::new(HashMap::new()),
            live_logs: HashMap::new(),
            revoked: HashMap::new(),
            checkpoints_at: HashMap::new(),
            sessions,
            links: crate::gang::Links::default(),
            asked_links: HashMap::new(),
            links_asked_at: HashMap::new(),
            unfinished,
            next_seq,
            clusters: cluster::Clusters::default(),
        };
        state.park_again(now_ms)?;
        Ok(state)
    }

    /// The renter named its payment channel for a job whose provider waits for one.
    pub fn channel_named(&mut self, id: &str, terms: &proto::voucher::ChannelTerms) -> Result<(), String> {
        let job = self.jobs.get_mut(id).ok_or_else(|| format!("no job {id:?}"))?;
        let c = job
            .view
            .channel
            .as_mut()
            .filter(|_| job.view.state == JobState::Running)
            .ok_or_else(|| format!("job {id} is not waiting for a payment channel (it is {:?})", job.view.state))?;
        if c.base.is_some() || c.id.is_some() {
            return Err(format!("job {id} already has its payment channel"));
        }
        if terms.program != c.program || terms.mint != c.mint {
            return Err(format!(
                "job {id}'s provider takes payment through program {} in mint {}, not the channel named",
                c.program, c.mint
            ));
        }
        c.id = Some(terms.id);
        c.updates += 1;
        Ok(())
    }

    /// Notes the renter's voucher for receipt `sequence` of job `id`, about to be relayed to its
    /// provider (the newest few are kept until the provider says it took one).
    pub fn voucher_sent(&mut self, id: &str, sequence: u64, voucher: proto::voucher::Voucher) {
        if let Some(c) = self.jobs.get_mut(id).and_then(|j| j.view.channel.as_mut()) {
            if c.sent.len() >= MAX_SENT_VOUCHERS {
                c.sent.remove(0);
            }
            c.sent.push((sequence, voucher));
        }
    }

    /// A provider's payment message for a job it runs: its terms, its receipts (checked before
    /// the renter sees them) and its answers to the renter's channel and vouchers.
    pub fn job_payment(&mut self, id: &str, provider: &PublicKey, msg: JobReply, now_ms: u64) -> Result<(), String> {
        let registered = self.providers.get(provider).map(|p| p.view.price);
        let price = registered.map(|p| p.per_gpu_second);
        let job = self.jobs.get_mut(id).ok_or_else(|| format!("no job {id:?}"))?;
        if job.view.provider.as_ref() != Some(provider) {
            return Err("a payment message from a provider not running the job".into());
        }
        let started = job.view.attempts.last().map(|a| a.started_at_ms);
        let limit = job.view.limits.wall_time_ms;
        if let JobReply::AwaitingChannel { program, mint, need, slice_ms } = msg {
            if job.view.channel.is_some() {
                return Err("the provider asked for a payment channel twice".into());
            }
            // The renter locks `need` in the channel: never more than the job can cost, its
            // wall-time limit at the provider's registered price (when the job names a limit)
            // and, for a cluster member, its net-bytes limit at the price per GiB.
            // A member always has a byte limit (a cluster without one gets
            // `proto::cluster::DEFAULT_NET_BYTES` when submitted).
            let net_bytes = match job.view.net_limit() {
                None => 0,
                Some(0) => proto::cluster::DEFAULT_NET_BYTES,
                Some(n) => n,
            };
            let most = proto::receipt::JobBill {
                wall_time_us: limit.saturating_mul(1000),
                price_per_gpu_second: price.unwrap_or(0),
                net_bytes,
                price_per_net_gib: registered.map_or(0, |p| p.per_net_gib),
            }
            .amount();
            if limit > 0 && need > most {
                return Err(format!(
                    "the provider asked for a channel holding {need}, more than the job's {most} at its wall-time limit"
                ));
            }
            job.view.channel = Some(proto::api::JobChannel {
                program,
                mint,
                need,
                slice_ms,
                id: None,
                base: None,
                newest: None,
                receipt: None,
                vouched: None,
                vouched_sequence: 0,
                sent: Vec::new(),
                claims: Vec::new(),
                refused: None,
                held: None,
                updates: 1,
            });
            return Ok(());
        }
        let net_limit = job.view.net_limit();
        let c = job.view.channel.as_mut().ok_or("a payment message for a job its provider runs unpaid")?;
        c.updates += 1;
        match msg {
            JobReply::ChannelTaken { newest, base } => {
                c.base = Some(base);
                c.newest = newest.map(|v| *v);
            }
            JobReply::ChannelRefused { reason } | JobReply::VoucherRefused { reason } => c.refused = Some(reason),
            JobReply::Slice(r) => {
                // What the renter is asked to vouch for is checked here first: the provider's
                // signature, the job, its registered price, the time against the job's limit and
                // what this scheduler saw, and its order after the one before.
                let observed = started.map(|t| now_ms.saturating_sub(t));
                let priced = priced(&r, registered);
                let checked = r
                    .check_terms(id, provider)
                    .and(priced)
                    .and_then(|()| r.check_time(limit, observed))
                    .and_then(|()| r.check_net(net_limit, None))
                    .and_then(|()| c.receipt.as_ref().map_or(Ok(()), |before| r.follows(before)));
                if r.done {
                    return Err("a last receipt sent as a slice's".into());
                }
                if let Err(e) = checked {
                    c.refused = Some(format!("the provider's receipt was refused: {e}"));
                    return Err(format!("its slice receipt was refused: {e}"));
                }
                c.receipt = Some(*r);
            }
            JobReply::Vouched { sequence, voucher } => {
                // Believed only for a voucher the renter sent for that receipt: what the job's
                // record says was paid is the renter's own signature.
                if !c.sent.iter().any(|(at, v)| *at == sequence && v == voucher.as_ref()) {
                    return Err(format!("it took a voucher for receipt {sequence} that the renter did not send"));
                }
                if sequence > c.vouched_sequence {
                    c.vouched_sequence = sequence;
                    c.vouched = Some(*voucher);
                    c.refused = None;
                }
                c.sent.retain(|(at, _)| *at > sequence);
            }
            // A job's claims are few (one at its end); a provider's flood is not kept.
            JobReply::Claimed(claimed) if c.claims.len() < MAX_JOB_CLAIMS => {
                c.claims.push(claimed.transaction.to_string());
            }
            JobReply::Claimed(_) => return Err("more claims reported for the job than are kept".into()),
            other => return Err(format!("{other:?} is not a payment message")),
        }
        let job = job.clone();
        self.store.put_job(&job).map_err(|e| e.to_string())
    }

    /// Records a session just granted; it takes one of its provider's session slots until the
    /// provider's next heartbeat counts it.
    pub fn open_session(&mut self, view: SessionView) -> Result<(), StoreError> {
        self.store.put_session(&view)?;
        if let Some(p) = self.providers.get_mut(&view.provider) {
            p.sessions_granted = p.sessions_granted.saturating_add(1);
            p.view.sessions = p.sessions();
        }
        self.sessions.insert(view.id.clone(), view);
        Ok(())
    }

    /// A session record, to its renter only: anyone else is told it does not exist.
    pub fn session(&self, id: &str, renter: &PublicKey) -> Option<&SessionView> {
        self.sessions.get(id).filter(|s| s.renter == *renter)
    }

    /// A provider's report on one of its sessions. Only the session's provider may report,
    /// with a receipt it signed for that session and renter; counts and payments only grow.
    pub fn session_report(
        &mut self,
        provider: &PublicKey,
        report: &proto::msg::SessionReport,
        now_ms: u64,
    ) -> Result<(), String> {
        let proto::msg::SessionReport { session_id, receipt, vouched, settlements, closed } = report;
        let closed = *closed;
        let id = hash_hex_16(session_id);
        let s = self.sessions.get_mut(&id).ok_or_else(|| format!("no session {id}"))?;
        if s.provider != *provider {
            return Err(format!("session {id} is not served by {provider}"));
        }
        // Everything is checked before anything is taken: a report that fails one check changes
        // nothing.
        if let Some(r) = receipt.as_ref() {
            let signed = r.provider.verify(&r.signing_bytes(), &r.signature);
            if !signed || r.provider != *provider || r.session_id != *session_id || r.renter != s.renter {
                return Err(format!("the receipt for session {id} does not check"));
            }
        }
        // What the renter paid for is its own signature, checked here: never the provider's
        // word.
        let vouched = match vouched.as_deref() {
            Some(v) => Some(v.check(session_id, &s.renter, provider).map_err(|e| format!("session {id}: {e}"))?),
            None => None,
        };
        if let Some(r) = receipt.as_ref()
            && r.sequence >= s.receipts
        {
            s.usage = Some(r.counts);
            s.receipts = r.sequence;
            s.amount_due = r.amount_due;
        }
        if let Some((amount, channel)) = vouched
            && amount >= s.vouched
        {
            s.vouched = amount;
            s.channel = Some(channel);
        }
        if !settlements.is_empty() {
            // Reports carry the newest claims only: add the ones not seen yet, keep the newest
            // thousand.
            let window = settlements.len().saturating_mul(2);
            for sig in settlements.iter().map(ToString::to_string) {
                if !s.settlements.iter().rev().take(window).any(|seen| *seen == sig) {
                    s.settlements.push(sig);
                }
            }
            let extra = s.settlements.len().saturating_sub(proto::api::SESSION_SETTLEMENTS_KEPT);
            s.settlements.drain(..extra);
        }
        s.closed |= closed;
        s.updated_ms = now_ms;
        let view = s.clone();
        self.store.put_session(&view).map_err(|e| e.to_string())
    }

    /// Changes a provider and keeps the index in step.
    fn update_provider<T>(&mut self, key: &PublicKey, f: impl FnOnce(&mut Provider) -> T) -> Option<T> {
        let p = self.providers.get_mut(key)?;
        let before = p.index_key();
        if let Some(k) = before {
            self.index.remove(&k);
        }
        let out = f(p);
        let after = p.index_key();
        if let Some(k) = after {
            self.index.insert(k);
        }
        let more = match (before, after) {
            (None, Some(_)) => true,
            (Some((_, load_b, rtt_b, _)), Some((_, load_a, rtt_a, _))) => load_a < load_b || rtt_a < rtt_b,
            _ => false,
        };
        if more {
            self.availability += 1;
        }
        Some(out)
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store, for making writes durable outside the state's lock (see [`Store::sync`]).
    pub fn store_handle(&self) -> std::sync::Arc<dyn Store> {
        self.store.clone()
    }

    /// A provider as placement sees it now: the slots held for a waiting cluster count as
    /// taken.
    fn candidate_of<'a>(&'a self, p: &'a Provider) -> Candidate<'a> {
        let mut c = p.candidate();
        c.running = c.running.saturating_add(self.clusters.held.get(&p.view.key).copied().unwrap_or(0));
        c
    }

    fn candidates(&self) -> impl Iterator<Item = Candidate<'_>> {
        self.providers.values().map(Provider::candidate)
    }

    /// The best provider for `query` with room for a job, skipping `avoid` unless it is the only
    /// one. Walks the price index from the cheapest.
    fn best_fit(&self, query: &Query, avoid: Option<PublicKey>) -> Option<PublicKey> {
        let mut fallback = None;
        for (_, _, _, key) in &self.index {
            let Some(p) = self.providers.get(key) else { continue };
            if query.reject(&self.candidate_of(p), false).is_none() {
                if Some(*key) != avoid {
                    return Some(*key);
                }
                fallback = Some(*key);
            }
        }
        fallback
    }

    /// Why nothing matches `req` right now, or `None` if something does (busy providers count
    /// as matching for this purpose: the job only has to wait its turn).
    pub fn explain(&self, req: &Requirements) -> Option<NoMatch> {
        let key = format!("{req:?}");
        if let Some(cached) = self.explained.borrow().get(&key) {
            return cached.clone();
        }
        let query = Query::new(req, false);
        // Usually something fits, and the scan stops at it.
        let fits = self.candidates().any(|c| query.reject(&c, true).is_none());
        let answer = if fits { None } else { Some(explain(self.candidates(), &query, true)) };
        let mut cache = self.explained.borrow_mut();
        // Bounded: a renter inventing endless requirement sets costs scans, not memory.
        if cache.len() >= 10_000 {
            cache.clear();
        }
        cache.insert(key, answer.clone());
        answer
    }

    /// The roster changed (a provider registered or went on or offline): explanations are stale.
    fn roster_changed(&mut self) {
        self.explained.get_mut().clear();
    }

    /// Accepts `renter`'s job for a module already uploaded. The job gets an id nobody can
    /// guess (128 random bits) and belongs to `renter`.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        renter: PublicKey,
        module: &str,
        input: Vec<u8>,
        requirements: Requirements,
        limits: JobLimits,
        deadline_secs: Option<u64>,
        now_ms: u64,
    ) -> Result<Submitted, SubmitError> {
        self.submit_job(renter, module, input, requirements, limits, deadline_secs, None, now_ms)
    }

    /// Accepts a job like [`State::submit`], as a cluster when `cluster` says so: `gpus`
    /// members (2 to [`proto::cluster::MAX_MEMBERS`]), one GPU each, each GPU meeting
    /// `requirements`, placed together or not at all (a cluster of 1 is a plain job). The
    /// cluster job is one job in the queue and against the renter's cap; its members get job
    /// records of their own when it is placed.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_job(
        &mut self,
        renter: PublicKey,
        module: &str,
        input: Vec<u8>,
        requirements: Requirements,
        limits: JobLimits,
        deadline_secs: Option<u64>,
        cluster: Option<proto::api::ClusterRequest>,
        now_ms: u64,
    ) -> Result<Submitted, SubmitError> {
        let cluster = cluster::check_request(cluster, &requirements, input.len()).map_err(SubmitError::Invalid)?;
        let mut limits = limits;
        if cluster.is_some() && limits.net_bytes == 0 {
            // Every member's bytes are bounded by the scheduler, not by what its provider says:
            // a provider pricing bytes can then never ask for an unbounded deposit.
            limits.net_bytes = proto::cluster::DEFAULT_NET_BYTES;
        }
        let hash =
            parse_hash(module).ok_or_else(|| SubmitError::Invalid(format!("{module:?} is not a hex SHA-256")))?;
        if !self.store.has_module(&hash)? {
            return Err(SubmitError::UnknownModule(module.to_string()));
        }
        if requirements.gpu_count == Some(0) {
            return Err(SubmitError::Invalid("gpu_count must be at least 1".into()));
        }
        let deadline = deadline_secs.map_or(self.config.default_deadline_ms, |s| s.saturating_mul(1000));
        let jobs = &self.jobs;
        let mine = self.unfinished.entry(renter).or_default();
        if mine.len() >= self.config.max_jobs_per_renter {
            // Only now drop the ones that ended: a scan per cap's worth of submissions.
            mine.retain(|id| jobs.get(id).is_some_and(|j| !j.view.state.is_final()));
        }
        if mine.len() >= self.config.max_jobs_per_renter {
            return Err(SubmitError::TooManyJobs { renter, count: mine.len() });
        }
        let id = loop {
            let mut bits = [0u8; 16];
            rand_core::OsRng.fill_bytes(&mut bits);
            let id = format!("job-{}", hash_hex_16(&bits));
            if !self.jobs.contains_key(&id) {
                break id;
            }
        };
        let no_match = match &cluster {
            Some(c) => self.cluster_fit(&requirements, c, &HashSet::new()).err(),
            None => self.explain(&requirements),
        };
        if let (Some(why), Some(_)) = (&no_match, &cluster) {
            self.clusters.why.insert(id.clone(), why.clone());
        }
        let cluster = cluster.map(|request| proto::api::ClusterView {
            request,
            members: Vec::new(),
            slowest_link_ms: None,
            regions: Vec::new(),
            tries: 0,
        });
        let record = JobRecord {
            view: JobView {
                id: id.clone(),
                renter: Some(renter),
                module: hash_hex(&hash),
                state: JobState::Queued,
                requirements,
                limits,
                submitted_at_ms: now_ms,
                deadline_ms: now_ms.saturating_add(deadline),
                queue_position: None,
                no_match: None,
                attempts: Vec::new(),
                provider: None,
                usage: None,
                outcome: None,
                output_bytes: None,
                wall_time_ms: None,
                wall_time_us: None,
                first_dispatch_us: None,
                error: None,
                receipt: None,
                channel: None,
                cluster,
                member_of: None,
                checkpoint: None,
            },
            input,
            result: None,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.store.put_job(&record)?;
        self.jobs.insert(id.clone(), record);
        self.unfinished.entry(renter).or_default().insert(id.clone());
        self.queue.push(id.clone());
        let queue_position = Some(self.queue.len() as u32);
        Ok(Submitted { id, state: JobState::Queued, no_match, queue_position })
    }

    fn queue_position(&self, id: &str) -> Option<u32> {
        self.queue.iter().position(|q| q == id).map(|p| p as u32 + 1)
    }

    /// Whether `renter` submitted job `id`. Everyone else is told the job does not exist.
    pub fn owns(&self, id: &str, renter: &PublicKey) -> bool {
        self.jobs.get(id).is_some_and(|j| j.view.renter.as_ref() == Some(renter))
    }

    /// A job as the API shows it, with its live queue position and no-match explanation.
    pub fn job(&self, id: &str) -> Option<JobView> {
        let job = self.jobs.get(id)?;
        let mut view = job.view.clone();
        if view.state == JobState::Queued {
            view.queue_position = self.queue_position(id);
            view.no_match = match &view.cluster {
                // Why no gang fitted at its last placement (counts as of then).
                Some(_) => self.clusters.why.get(id).cloned(),
                None => self.explain(&view.requirements),
            };
        }
        self.refresh_members(&mut view);
        Some(view)
    }

    /// A finished job's output.
    pub fn output(&self, id: &str) -> Option<&[u8]> {
        self.jobs.get(id)?.result.as_ref().map(|r| r.output.as_slice())
    }

    /// A job's log: the whole of it once the job has ended, what has streamed in while it runs.
    pub fn log(&self, id: &str) -> Option<&[u8]> {
        let job = self.jobs.get(id)?;
        match &job.result {
            Some(r) => Some(r.log.as_slice()),
            None => self.live_logs.get(id).map(Vec::as_slice),
        }
    }

    /// The checkpoint job `id` saved, when it `saved` one. A store that cannot read it costs
    /// the job its progress, not its try.
    fn saved_checkpoint(&self, id: &str, saved: bool) -> Option<proto::msg::Checkpoint> {
        if !saved {
            return None;
        }
        self.store.checkpoint(id).map(|k| k.map(|k| k.checkpoint)).unwrap_or_else(|e| {
            log::error!("job {id}: reading its checkpoint: {e}");
            None
        })
    }

    /// A checkpoint a provider sent for a job it runs, `sha256` its bytes' digest (taken
    /// outside the state's lock): kept (for a cluster member, as its cluster's) when it is no
    /// older than the one kept, for the job's next try to resume from. From anyone else, or
    /// faster than a provider sends a job's checkpoints, it is refused. Only the checkpoint
    /// is written, never the job's record.
    pub fn checkpoint_saved(
        &mut self,
        id: &str,
        provider: &PublicKey,
        checkpoint: proto::msg::Checkpoint,
        sha256: [u8; 32],
        now_ms: u64,
    ) -> Result<(), String> {
        let Some(job) = self.jobs.get(id) else { return Err("no such job".into()) };
        if job.view.state != JobState::Running || job.view.provider.as_ref() != Some(provider) {
            return Err("the job is not running on this provider".into());
        }
        if checkpoint.bytes.len() > proto::msg::CHECKPOINT_CAP {
            return Err(format!(
                "{} bytes is over the {} a checkpoint may hold",
                checkpoint.bytes.len(),
                proto::msg::CHECKPOINT_CAP
            ));
        }
        // Each sender's pace is its own: ranks saving in turn neither escape the gap nor
        // drop each other's newer steps.
        if let Some(&at) = self.checkpoints_at.get(id)
            && now_ms < at.saturating_add(MIN_CHECKPOINT_GAP_MS)
        {
            return Err(format!("a second checkpoint within {MIN_CHECKPOINT_GAP_MS} ms: dropped"));
        }
        let rank = self.clusters.running.get(id).map(|m| m.rank);
        let parent = job.view.member_of.clone().unwrap_or_else(|| id.to_string());
        let Some(owner) = self.jobs.get(&parent).filter(|p| p.view.state == JobState::Running) else {
            return Err("its cluster is not running".into());
        };
        if owner.view.checkpoint.as_ref().is_some_and(|kept| checkpoint.step < kept.step) {
            return Ok(());
        }
        let view = proto::api::CheckpointView {
            step: checkpoint.step,
            bytes: checkpoint.bytes.len() as u64,
            sha256: hash_hex(&sha256),
            saved_at_ms: now_ms,
            provider: *provider,
            rank,
        };
        let kept = crate::store::KeptCheckpoint { checkpoint, view: view.clone() };
        self.store.put_checkpoint(&parent, &kept).map_err(|e| e.to_string())?;
        if self.checkpoints_at.len() >= CHECKPOINT_PACE_KEPT {
            let jobs = &self.jobs;
            self.checkpoints_at.retain(|j, _| jobs.get(j).is_some_and(|j| j.view.state == JobState::Running));
        }
        self.checkpoints_at.insert(id.to_string(), now_ms);
        if let Some(owner) = self.jobs.get_mut(&parent) {
            owner.view.checkpoint = Some(view);
        }
        Ok(())
    }

    /// Log bytes a provider streamed for a job it runs; ignored from anyone else.
    pub fn append_log(&mut self, id: &str, provider: &PublicKey, bytes: &[u8]) {
        let runs_it = self
            .jobs
            .get(id)
            .is_some_and(|j| j.view.state == JobState::Running && j.view.provider.as_ref() == Some(provider));
        if runs_it {
            let log = self.live_logs.entry(id.to_string()).or_default();
            // A provider caps its jobs' logs too; this bounds what a misbehaving one can make us keep.
            let room = LIVE_LOG_CAP.saturating_sub(log.len());
            log.extend_from_slice(bytes.get(..bytes.len().min(room)).unwrap_or_default());
        }
    }

    pub fn providers(&self) -> Vec<ProviderView> {
        let mut out: Vec<ProviderView> = self
            .providers
            .values()
            .map(|p| {
                let mut v = p.view.clone();
                v.running = v.running.max(p.assigned.len() as u32);
                v.session_capacity = if v.session_addr.is_some() { p.session_capacity() } else { 0 };
                v.sessions = p.sessions();
                v.links = self
                    .links
                    .of(&v.key)
                    .into_iter()
                    .map(|(peer, rtt_ms)| proto::api::LinkView { peer, rtt_ms })
                    .collect();
                v
            })
            .collect();
        out.sort_by_key(|v| v.key);
        out
    }

    /// The providers `key` is to measure its round trips to: the other online ones that take
    /// connections (a session address), the most recently seen first, at most
    /// `MAX_LINK_PEERS`. Noted, so that only they are taken from its answer.
    pub fn link_peers(&mut self, key: &PublicKey, now_ms: u64) -> Vec<proto::msg::LinkPeer> {
        self.links_asked_at.insert(*key, now_ms);
        let mut peers: Vec<&Provider> = self
            .providers
            .values()
            .filter(|p| p.view.key != *key && p.view.online && p.view.session_addr.is_some())
            .collect();
        peers.sort_by_key(|p| std::cmp::Reverse(p.view.last_seen_ms));
        let peers: Vec<proto::msg::LinkPeer> = peers
            .into_iter()
            .take(proto::msg::MAX_LINK_PEERS)
            .filter_map(|p| Some(proto::msg::LinkPeer { key: p.view.key, addr: p.view.session_addr.clone()? }))
            .collect();
        if !peers.is_empty() {
            self.asked_links.entry(*key).or_default().extend(peers.iter().map(|p| p.key));
        }
        peers
    }

    /// The online providers due to measure their links again (asked longest ago, at most
    /// `LINKS_PER_TICK` at a time, each at most every `LINK_REMEASURE_MS`), each with its peers:
    /// links change, and a provider that joined since is measured from both ends.
    pub fn links_due(&mut self, now_ms: u64) -> Vec<(PublicKey, Vec<proto::msg::LinkPeer>)> {
        let mut due: Vec<(u64, PublicKey)> = self
            .providers
            .values()
            .filter(|p| p.view.online)
            .filter_map(|p| match self.links_asked_at.get(&p.view.key) {
                None => Some((0, p.view.key)),
                Some(&at) => (now_ms.saturating_sub(at) >= LINK_REMEASURE_MS).then_some((at, p.view.key)),
            })
            .collect();
        due.sort();
        due.into_iter()
            .take(LINKS_PER_TICK)
            .map(|(_, key)| (key, self.link_peers(&key, now_ms)))
            .filter(|(_, peers)| !peers.is_empty())
            .collect()
    }

    /// A provider's measured round trips, to peers it was asked about only; a report with any
    /// other peer, a peer twice, or a round trip over a minute is refused whole.
    pub fn links_measured(&mut self, key: &PublicKey, measured: &[proto::msg::LinkRtt]) -> Result<usize, String> {
        const MOST_US: u32 = 60_000_000;
        let asked = self.asked_links.get(key).ok_or("no round trips were asked of it")?;
        let mut seen = HashSet::new();
        for m in measured {
            if !asked.contains(&m.peer) {
                return Err(format!("it measured {}, which it was not asked to", m.peer));
            }
            if !seen.insert(m.peer) {
                return Err(format!("it measured {} twice", m.peer));
            }
            if m.rtt_us.is_some_and(|us| us > MOST_US) {
                return Err(format!("a round trip of {} us to {} is past any link's", m.rtt_us.unwrap_or(0), m.peer));
            }
        }
        let mut taken = 0;
        let asked = self.asked_links.entry(*key).or_default();
        for m in measured {
            asked.remove(&m.peer);
            match m.rtt_us {
                // Whole milliseconds, rounded up: a link under one is one.
                Some(us) => {
                    self.links.set(*key, m.peer, us.div_ceil(1000).max(1));
                    taken += 1;
                }
                None => self.links.forget_link(key, &m.peer),
            }
        }
        if asked.is_empty() {
            self.asked_links.remove(key);
        }
        if taken > 0 {
            // A cluster waiting for links within its limit may fit now.
            self.availability += 1;
        }
        Ok(taken)
    }

    /// The round trips measured between providers.
    pub fn links(&self) -> &crate::gang::Links {
        &self.links
    }

    /// Where a cluster would be placed now, in ring order, or why none fits. A provider offers
    /// as many of its GPUs as it has free job slots (each member runs in its own worker).
    pub fn plan_gang(&self, req: &proto::api::PlanRequest) -> Result<proto::api::GangPlan, NoMatch> {
        let request = proto::api::ClusterRequest {
            gpus: req.gpus,
            one_provider: req.one_provider,
            max_link_rtt_ms: req.max_link_rtt_ms,
            max_per_provider: None,
        };
        let fit = self.cluster_fit(&req.requirements, &request, &HashSet::new())?;
        let planned: Vec<proto::api::PlanMember> = fit
            .members
            .iter()
            .zip(0u32..)
            .filter_map(|(m, rank)| {
                let p = self.providers.get(&m.provider)?;
                Some(proto::api::PlanMember {
                    rank,
                    provider: m.provider,
                    name: p.view.name.clone(),
                    region: p.view.region.clone(),
                    gpu: m.gpu,
                    gpu_name: p.view.gpus.get(m.gpu as usize).map(|g| g.name.clone()).unwrap_or_default(),
                    price_per_gpu_second: p.view.price.per_gpu_second,
                })
            })
            .collect();
        let price_per_second = planned.iter().map(|m| m.price_per_gpu_second).fold(0u64, u64::saturating_add);
        Ok(proto::api::GangPlan {
            members: planned,
            slowest_link_ms: fit.slowest_ms,
            regions: fit.regions,
            price_per_second,
        })
    }

    /// A provider connected and registered.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        key: PublicKey,
        name: String,
        region: String,
        gpus: Vec<GpuInfo>,
        price: Price,
        capacity: u32,
        session_addr: Option<String>,
        session_capacity: u32,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let view = ProviderView {
            session_addr,
            session_capacity,
            sessions: 0,
            session_room: None,
            key,
            name,
            region,
            gpus,
            price,
            capacity: capacity.max(1),
            running: 0,
            online: true,
            rtt_ms: None,
            last_seen_ms: now_ms,
            links: Vec::new(),
        };
        self.store.put_provider(&view)?;
        // A re-registration means a new connection: whatever it ran before is gone.
        let lost: Vec<String> =
            self.providers.get(&key).map(|p| p.assigned.iter().cloned().collect()).unwrap_or_default();
        if let Some(k) = self.providers.get(&key).and_then(Provider::index_key) {
            self.index.remove(&k);
        }
        let provider = Provider::new(view, true);
        if let Some(k) = provider.index_key() {
            self.index.insert(k);
        }
        self.providers.insert(key, provider);
        self.availability += 1;
        self.roster_changed();
        for job in lost {
            self.attempt_failed(&job, &key, "the provider reconnected and lost the job", now_ms)?;
            self.revoked.entry(key).or_default().push(job);
        }
        Ok(())
    }

    /// A provider's heartbeat: it is alive, runs `running` jobs and serves `sessions` sessions
    /// (which from now on stand for the sessions granted to it before).
    /// A provider's word on how many more sessions its memory has room for (`None`: its slots
    /// alone decide), from the same heartbeat as [`State::heartbeat`].
    pub fn session_room(&mut self, key: &PublicKey, room: Option<u32>) {
        self.update_provider(key, |p| {
            p.session_room = room;
            p.view.session_room = room;
        });
    }

    pub fn heartbeat(&mut self, key: &PublicKey, running: u32, sessions: u32, rtt_ms: Option<u32>, now_ms: u64) {
        let flipped = self.update_provider(key, |p| {
            let was = p.view.online;
            p.view.running = running;
            p.sessions_reported = sessions;
            p.sessions_granted = 0;
            p.view.sessions = sessions;
            p.view.last_seen_ms = now_ms;
            p.view.rtt_ms = rtt_ms;
            p.view.online = p.connected;
            was != p.view.online
        });
        if flipped == Some(true) {
            self.roster_changed();
        }
    }

    /// The provider's connection closed.
    pub fn disconnected(&mut self, key: &PublicKey, now_ms: u64) -> Result<(), StoreError> {
        let lost: Vec<String> = match self.update_provider(key, |p| {
            p.connected = false;
            p.view.online = false;
            p.assigned.drain().collect()
        }) {
            Some(lost) => lost,
            None => return Ok(()),
        };
        self.roster_changed();
        // Its links are measured again when it comes back.
        self.links.forget(key);
        self.asked_links.remove(key);
        self.links_asked_at.remove(key);
        for job in lost {
            self.attempt_failed(&job, key, "the provider disconnected", now_ms)?;
            self.revoked.entry(*key).or_default().push(job);
        }
        Ok(())
    }

    /// Marks silent providers offline (re-queueing their jobs) and expires jobs past their
    /// deadline.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let silent: Vec<PublicKey> = self
            .providers
            .values()
            .filter(|p| p.view.online && now_ms.saturating_sub(p.view.last_seen_ms) > self.config.heartbeat_timeout_ms)
            .map(|p| p.view.key)
            .collect();
        for key in silent {
            let lost: Vec<String> = match self.update_provider(&key, |p| {
                p.view.online = false;
                p.assigned.drain().collect()
            }) {
                Some(lost) => lost,
                None => continue,
            };
            self.roster_changed();
            for job in lost {
                self.attempt_failed(&job, &key, "the provider missed its heartbeats", now_ms)?;
                self.revoked.entry(key).or_default().push(job);
            }
        }
        let expired: Vec<String> = self
            .queue
            .iter()
            .filter(|id| self.jobs.get(*id).is_some_and(|j| now_ms > j.view.deadline_ms))
            .cloned()
            .collect();
        for id in expired {
            let why = self.job(&id).and_then(|v| v.no_match).map(|n| n.summary);
            self.finish_unplaced(
                &id,
                JobState::Expired,
                why.unwrap_or_else(|| "the deadline passed in the queue".into()),
            )?;
        }
        self.cluster_starts_expired(now_ms)?;
        self.settle_overdue(now_ms)
    }

    /// The renter's cancel of job `id`: a queued job ends without running, a running one ends
    /// now and its provider is told to stop it (its slot is free once the provider says so). A
    /// cluster's member stands for its cluster: the whole cluster is cancelled, every running
    /// member stopped. The provider keeps what the renter vouched for; the time since its last
    /// slice is the renter's to settle through the receipts already shown.
    pub fn cancel(&mut self, id: &str, now_ms: u64) -> Result<JobView, CancelError> {
        let id = match self.jobs.get(id) {
            None => return Err(CancelError::NoJob(id.to_string())),
            Some(j) => j.view.member_of.clone().unwrap_or_else(|| id.to_string()),
        };
        let why = "cancelled by its renter";
        let state = self.jobs.get(&id).map(|j| j.view.state).ok_or_else(|| CancelError::NoJob(id.clone()))?;
        match state {
            s if s.is_final() => return Err(CancelError::Ended(id, s)),
            JobState::Queued => self.finish_unplaced(&id, JobState::Failed, why.to_string())?,
            _ => {
                let cluster = self.jobs.get(&id).is_some_and(|j| j.view.cluster.is_some());
                if cluster {
                    self.clusters.holds.release(&id);
                    self.clusters.avoid.remove(&id);
                    self.clusters.why.remove(&id);
                    self.stop_members(&id, &format!("the cluster was {why}"), now_ms)?;
                }
                let Some(job) = self.jobs.get_mut(&id) else { return Err(CancelError::NoJob(id)) };
                job.view.state = JobState::Failed;
                job.view.error = Some(why.to_string());
                if let Some(a) = job.view.attempts.last_mut() {
                    a.ended_at_ms = Some(now_ms);
                    a.error = Some(why.to_string());
                }
                let provider = job.view.provider.filter(|_| !cluster);
                let mut view = job.view.clone();
                self.refresh_members(&mut view);
                let Some(job) = self.jobs.get_mut(&id) else { return Err(CancelError::NoJob(id)) };
                job.view = view;
                let job = job.clone();
                self.live_logs.remove(&id);
                self.store.put_job(&job)?;
                if let Some(p) = provider {
                    self.revoked.entry(p).or_default().push(id.clone());
                }
            }
        }
        self.job(&id).ok_or(CancelError::NoJob(id))
    }

    fn finish_unplaced(&mut self, id: &str, state: JobState, error: String) -> Result<(), StoreError> {
        self.queue.retain(|q| q != id);
        self.unplaceable.remove(id);
        self.clusters.why.remove(id);
        self.clusters.avoid.remove(id);
        if let Some(job) = self.jobs.get_mut(id) {
            job.view.state = state;
            job.view.error = Some(error);
            job.view.queue_position = None;
            self.store.put_job(job)?;
        }
        Ok(())
    }

    /// Matches queued jobs, oldest first, to providers with room.
    pub fn assign(&mut self, now_ms: u64) -> Result<Vec<Assignment>, StoreError> {
        let mut out = Vec::new();
        // Holds are made again on every pass, by the clusters still waiting.
        let held_before = std::mem::take(&mut self.clusters.held);
        let queue = std::mem::take(&mut self.queue);
        let mut waiting = Vec::with_capacity(queue.len());
        let mut queue = queue.into_iter();
        while let Some(id) = queue.next() {
            if self.unplaceable.get(&id) == Some(&self.availability) {
                // A cluster that still cannot be placed keeps its hold.
                if self.jobs.get(&id).is_some_and(|j| j.view.cluster.is_some()) {
                    self.hold_for(&id, now_ms);
                }
                waiting.push(id);
                continue;
            }
            let Some(job) = self.jobs.get(&id) else { continue };
            if job.view.cluster.is_some() {
                // A cluster is placed whole or stays queued.
                match self.place_cluster(&id, now_ms) {
                    Ok(Some(mut members)) => {
                        self.unplaceable.remove(&id);
                        out.append(&mut members);
                    }
                    Ok(None) => {
                        self.hold_for(&id, now_ms);
                        self.unplaceable.insert(id.clone(), self.availability);
                        waiting.push(id);
                    }
                    Err(e) => {
                        waiting.push(id);
                        waiting.extend(queue);
                        waiting.append(&mut self.queue);
                        self.queue = waiting;
                        return Err(e);
                    }
                }
                continue;
            }
            if self.explain(&job.view.requirements).is_some() {
                // Nothing fits even when idle: no need to walk the index.
                self.unplaceable.insert(id.clone(), self.availability);
                waiting.push(id);
                continue;
            }
            let Some(job) = self.jobs.get(&id) else { continue };
            let query = Query::new(&job.view.requirements, false);
            // Never the same provider twice in a row for one job: a retry goes elsewhere when
            // it can.
            let last = job.view.attempts.last().map(|a| a.provider);
            let (Some(choice), Some(module)) = (self.best_fit(&query, last), parse_hash(&job.view.module)) else {
                self.unplaceable.insert(id.clone(), self.availability);
                waiting.push(id);
                continue;
            };
            self.unplaceable.remove(&id);
            let Some(job) = self.jobs.get_mut(&id) else { continue };
            job.view.state = JobState::Running;
            job.view.provider = Some(choice);
            job.view.queue_position = None;
            // A try elsewhere pays its own provider through its own channel.
            job.view.channel = None;
            // A try after one that saved a checkpoint resumes from it. A store that cannot
            // read it costs the job its progress, not the try.
            let saved = job.view.checkpoint.is_some();
            let checkpoint = self.saved_checkpoint(&id, saved);
            let Some(job) = self.jobs.get_mut(&id) else { continue };
            job.view.attempts.push(Attempt {
                provider: choice,
                started_at_ms: now_ms,
                ended_at_ms: None,
                error: None,
                resumed_from_step: checkpoint.as_ref().map(|c| c.step),
            });
            if let Err(e) = self.store.put_job(job) {
                // Not placed after all: the job stays queued and the error goes up.
                job.view.state = JobState::Queued;
                job.view.provider = None;
                job.view.attempts.pop();
                waiting.push(id);
                // The jobs not looked at yet stay queued too.
                waiting.extend(queue);
                waiting.append(&mut self.queue);
                self.queue = waiting;
                return Err(e);
            }
            out.push(Assignment {
                job_id: id.clone(),
                provider: choice,
                module,
                input: job.input.clone(),
                limits: job.view.limits.clone(),
                renter: job.view.renter,
                member: None,
                checkpoint: checkpoint.map(Box::new),
            });
            self.update_provider(&choice, |p| p.assigned.insert(id.clone()));
        }
        // Jobs re-queued while this ran (none today: `&mut self`) would go first.
        waiting.append(&mut self.queue);
        self.queue = waiting;
        // Jobs passed over for a hold that is gone (or new) are looked at again.
        if self.clusters.held != held_before {
            self.availability += 1;
        }
        Ok(out)
    }

    /// A provider reported a job's end.
    pub fn finished(
        &mut self,
        id: &str,
        provider: &PublicKey,
        result: JobResult,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if self.clusters.running.contains_key(id) {
            return self.member_finished(id, provider, result, now_ms);
        }
        if let Outcome::Failed { kind, message, .. } = &result.outcome
            && !kind.is_kernel_fault()
        {
            // The provider could not serve it (not the kernel's doing): another provider may.
            let reason = format!("the provider failed ({kind}): {message}");
            return self.end_attempt(id, provider, &reason, Some(result), now_ms);
        }
        self.record_result(id, provider, result, now_ms).map(|_| ())
    }

    /// Ends job `id` with its result (a success or the kernel's own failure), its receipt
    /// checked; false when it is not running on `provider` (a late report: nothing changes).
    fn record_result(
        &mut self,
        id: &str,
        provider: &PublicKey,
        result: JobResult,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let registered = self.providers.get(provider).map(|p| p.view.price);
        // A cluster member's last receipt bills bytes its next rank must have received.
        let member = self.clusters.running.get(id).map(|m| (m.parent.clone(), m.rank));
        let net_check = member.as_ref().map(|(parent, rank)| self.next_rank_received(parent, *rank, provider));
        let mut held = None;
        let Some(job) = self.running_on(id, provider) else { return Ok(false) };
        job.view.state = if result.outcome == Outcome::Succeeded { JobState::Succeeded } else { JobState::Failed };
        job.view.receipt = None;
        // The time this scheduler saw the job run: from this try's assignment to its result.
        let observed = job.view.attempts.last().map(|a| now_ms.saturating_sub(a.started_at_ms));
        let limit = job.view.limits.wall_time_ms;
        // A failed job is billed like a succeeded one (the kernel ran): its output and log are
        // withheld until paid, like any output.
        if let Some(r) = result.receipt.as_ref() {
            let checked = r
                .check(id, provider, &result.output)
                .and_then(|()| r.check_time(limit, observed))
                .and_then(|()| r.check_net(job.view.net_limit(), Some(result.usage.net_bytes_sent)));
            match checked {
                Ok(()) if priced(r, registered).is_err() => {
                    log::warn!("job {id}: the receipt's price is not the provider's registered price; not billed");
                }
                Ok(()) => match job.view.channel.as_mut() {
                    // A paid job's last receipt follows its slices' and is what the renter's
                    // last voucher answers.
                    Some(c) => match c.receipt.as_ref().map_or(Ok(()), |before| r.follows(before)) {
                        Ok(()) if r.done => {
                            job.view.receipt = Some(r.clone());
                            c.updates += 1;
                            match net_check {
                                Some(cluster::NetCheck::Wait { next }) => {
                                    c.held = Some(format!(
                                        "its last receipt waits for rank {next} to report the bytes it received"
                                    ));
                                    held = Some(r.clone());
                                }
                                Some(check) => cluster::show_last_receipt(c, r.clone(), check),
                                None => c.receipt = Some(r.clone()),
                            }
                        }
                        Ok(()) => log::warn!("job {id}: the provider's last receipt is not marked as the last"),
                        Err(e) => {
                            c.refused = Some(format!("the provider's last receipt was refused: {e}"));
                            log::warn!("job {id}: the provider's last receipt was refused: {e}");
                        }
                    },
                    None => job.view.receipt = Some(r.clone()),
                },
                Err(e) => log::warn!("job {id}: the provider's receipt was refused: {e}; not billed"),
            }
        }
        job.view.usage = Some(result.usage.clone());
        job.view.outcome = Some(result.outcome.clone());
        job.view.output_bytes = Some(result.output.len() as u64);
        job.view.wall_time_ms = Some(result.wall_time_ms);
        job.view.wall_time_us = Some(result.wall_time_us);
        job.view.first_dispatch_us = result.first_dispatch_us;
        if let Some(a) = job.view.attempts.last_mut() {
            a.ended_at_ms = Some(now_ms);
        }
        job.result = Some(result);
        let job = job.clone();
        self.live_logs.remove(id);
        self.store.put_job(&job)?;
        if let (Some(receipt), Some((parent, rank))) = (held, member) {
            let parked = cluster::Parked { parent, rank, provider: *provider, receipt, since_ms: now_ms };
            self.clusters.parked.insert(id.to_string(), parked);
        }
        Ok(true)
    }

    /// A try ended without a result; the job is queued again unless it has had its tries (a
    /// cluster's member: its cluster is, whole).
    pub fn attempt_failed(
        &mut self,
        id: &str,
        provider: &PublicKey,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if self.clusters.running.contains_key(id) {
            return self.member_lost(id, provider, reason, None, now_ms);
        }
        self.end_attempt(id, provider, reason, None, now_ms)
    }

    /// A try ended for a reason another provider may not have: the job is queued again unless
    /// it has had its tries. `result` is the provider's report of a failure on its side, kept
    /// (outcome, usage, log) when the job fails for good.
    fn end_attempt(
        &mut self,
        id: &str,
        provider: &PublicKey,
        reason: &str,
        result: Option<JobResult>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let max_attempts = self.config.max_attempts;
        let Some(job) = self.running_on(id, provider) else { return Ok(()) };
        if let Some(a) = job.view.attempts.last_mut() {
            a.ended_at_ms = Some(now_ms);
            a.error = Some(reason.to_string());
        }
        job.view.provider = None;
        let requeue = job.view.attempts.len() < max_attempts;
        if requeue {
            job.view.state = JobState::Queued;
        } else {
            job.view.state = JobState::Failed;
            let reasons: Vec<String> = job.view.attempts.iter().filter_map(|a| a.error.clone()).collect();
            job.view.error = Some(format!("gave up after {} tries: {}", job.view.attempts.len(), reasons.join("; ")));
            if let Some(r) = result {
                job.view.provider = Some(*provider);
                job.view.outcome = Some(r.outcome.clone());
                job.view.usage = Some(r.usage.clone());
                job.view.output_bytes = Some(r.output.len() as u64);
                job.view.wall_time_ms = Some(r.wall_time_ms);
                job.view.wall_time_us = Some(r.wall_time_us);
                job.result = Some(r);
            }
        }
        let job = job.clone();
        // A new try starts a new log.
        self.live_logs.remove(id);
        self.store.put_job(&job)?;
        if requeue {
            // A job that lost its provider goes to the front: it has waited longest.
            self.queue.insert(0, id.to_string());
        }
        Ok(())
    }

    /// The job `id` if it is running on `provider`, which stops counting it as assigned. A late
    /// report from a provider the job was taken away from finds nothing and changes nothing.
    fn running_on(&mut self, id: &str, provider: &PublicKey) -> Option<&mut JobRecord> {
        self.update_provider(provider, |p| p.assigned.remove(id));
        self.jobs
            .get_mut(id)
            .filter(|j| j.view.provider.as_ref() == Some(provider) && j.view.state == JobState::Running)
    }

    /// Picks a provider for an inference session: online, serving sessions, with a free
    /// session slot, fitting the requirements, not excluded; cheapest per inference, then
    /// least loaded, then nearest. When none fits, the reasons with counts (`sessions_full`
    /// for those whose slots are all taken).
    pub fn pick_session_provider(
        &self,
        req: &Requirements,
        exclude: &[PublicKey],
    ) -> Result<(PublicKey, String, Price), NoMatch> {
        let candidates: Vec<Candidate<'_>> = self
            .providers
            .values()
            .filter(|p| !exclude.contains(&p.view.key) && p.view.session_addr.is_some())
            .map(|p| {
                // Sessions have slots of their own, apart from batch jobs.
                let mut c = p.candidate();
                c.capacity = p.session_limit();
                c.running = p.sessions();
                c
            })
            .collect();
        let (fits, why) = rank(&candidates, req, true);
        let Some(best) = fits.first() else {
            return Err(why.unwrap_or(NoMatch {
                total: 0,
                matching: 0,
                reasons: Vec::new(),
                summary: "no provider serves inference sessions".into(),
            }));
        };
        let addr = self.providers.get(&best.key).and_then(|p| p.view.session_addr.clone()).unwrap_or_default();
        Ok((best.key, addr, best.price))
    }

    /// Jobs to cancel on providers that may still run them, by provider; the caller sends what
    /// it can and gives back the rest with [`State::keep_revoked`].
    pub fn take_revoked(&mut self) -> Vec<(PublicKey, Vec<String>)> {
        self.revoked.drain().collect()
    }

    /// Jobs to cancel on a provider that cannot be told now (it is not connected).
    pub fn keep_revoked(&mut self, provider: PublicKey, jobs: Vec<String>) {
        // Bounded: a provider that never comes back does not grow this forever.
        let list = self.revoked.entry(provider).or_default();
        list.extend(jobs);
        let excess = list.len().saturating_sub(1024);
        list.drain(..excess);
    }

    /// Stores a module and returns its hash.
    pub fn put_module(&self, bytes: &[u8]) -> Result<ModuleHash, StoreError> {
        use sha2::{Digest, Sha256};
        let hash: ModuleHash = Sha256::digest(bytes).into();
        if !self.store.has_module(&hash)? {
            self.store.put_module(&hash, bytes)?;
        }
        Ok(hash)
    }

    pub fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.module(hash)
    }
}

fn hash_hex_16(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;
    use sha2::Digest;

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    fn gpu() -> GpuInfo {
        GpuInfo {
            name: "RTX 4090".into(),
            vendor: "NVIDIA".into(),
            backend: "vulkan".into(),
            device_type: "DiscreteGpu".into(),
            vram_bytes: 24 << 30,
            score_gflops: 50_000.0,
        }
    }

    fn state(dir: &tempfile::TempDir, config: Config) -> State {
        State::load(config, Box::new(RedbStore::open(&dir.path().join("db")).unwrap()), 0).unwrap()
    }

    fn register(s: &mut State, n: u8, now: u64) -> PublicKey {
        let key = PublicKey([n; 32]);
        s.register(
            key,
            format!("p{n}"),
            "eu".into(),
            vec![gpu()],
            Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 },
            1,
            None,
            0,
            now,
        )
        .unwrap();
        key
    }

    /// A renter key that is a real curve point (stored records are read back as keys).
    fn renter(n: u8) -> PublicKey {
        proto::Keypair::from_seed([n; 32]).public()
    }

    const R: u8 = 42;

    fn submit(s: &mut State, now: u64) -> String {
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        s.submit(renter(R), &hash, b"in".to_vec(), Requirements::default(), JobLimits::default(), Some(10), now)
            .unwrap()
            .id
    }

    fn done() -> JobResult {
        JobResult {
            outcome: Outcome::Succeeded,
            output: b"out".to_vec(),
            log: Vec::new(),
            usage: Default::default(),
            wall_time_ms: 1,
            wall_time_us: 1000,
            first_dispatch_us: None,
            receipt: None,
        }
    }

    /// A provider with a real key (to sign receipts), priced at 1 token unit per GPU-microsecond.
    fn billing_provider(s: &mut State) -> proto::Keypair {
        let kp = proto::Keypair::from_seed([77; 32]);
        let price = Price { per_gpu_second: 1_000_000, per_inference: 1, per_net_gib: 0 };
        s.register(kp.public(), "billed".into(), "eu".into(), vec![gpu()], price, 1, None, 0, 0).unwrap();
        kp
    }

    fn billed_result(kp: &proto::Keypair, id: &str, module: ModuleHash, outcome: Outcome, wall_us: u64) -> JobResult {
        let receipt =
            proto::receipt::JobReceipt::sign(kp, id, module, 1, b"partial", Default::default(), wall_us, 1_000_000);
        JobResult {
            outcome,
            output: b"partial".to_vec(),
            log: b"the result, printed".to_vec(),
            usage: Default::default(),
            wall_time_ms: wall_us / 1000,
            wall_time_us: wall_us,
            first_dispatch_us: None,
            receipt: Some(receipt),
        }
    }

    /// The provider asks for the renter's channel and takes it.
    fn paid_through_a_channel(s: &mut State, id: &str, kp: &proto::Keypair, now: u64) {
        let ask = JobReply::AwaitingChannel {
            program: proto::Address([1; 32]),
            mint: proto::Keypair::from_seed([5; 32]).public(),
            need: 100_000,
            slice_ms: 100,
        };
        s.job_payment(id, &kp.public(), ask, now).unwrap();
        s.job_payment(id, &kp.public(), JobReply::ChannelTaken { newest: None, base: 0 }, now).unwrap();
    }

    fn voucher(cumulative: u64, digest: [u8; 32]) -> Box<proto::voucher::Voucher> {
        Box::new(proto::voucher::Voucher { cumulative, receipt_digest: digest, signature: proto::Signature([0; 64]) })
    }

    #[test]
    fn a_job_that_fails_in_its_kernel_is_billed_for_what_it_used_like_one_that_succeeds() {
        // Finding: a failed job was billed nothing, yet its output was released.
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let kp = billing_provider(&mut s);
        let id = submit(&mut s, 0);
        let a = s.assign(1_000).unwrap().remove(0);
        paid_through_a_channel(&mut s, &id, &kp, 1_000);
        let failed = Outcome::Failed { kind: proto::msg::FailureKind::Guest, limit: None, message: "bad".into() };
        s.finished(&id, &kp.public(), billed_result(&kp, &id, a.module, failed, 40_000), 1_050).unwrap();
        let v = s.job(&id).unwrap();
        assert_eq!(v.state, JobState::Failed);
        let last = v.channel.as_ref().and_then(|c| c.unvouched()).cloned().expect("billed, waiting for a voucher");
        assert_eq!(last.amount_due, 40_000);
        assert!(!v.paid(), "unpaid: its output and log are withheld");
        // The provider's word that it took a voucher the renter never sent is refused: the
        // record's payment is the renter's own signature.
        let vouched = JobReply::Vouched { sequence: last.sequence, voucher: voucher(40_000, last.digest()) };
        let err = s.job_payment(&id, &kp.public(), vouched.clone(), 1_055).unwrap_err();
        assert!(err.contains("did not send"), "{err}");
        assert!(!s.job(&id).unwrap().paid());
        s.voucher_sent(&id, last.sequence, *voucher(40_000, last.digest()));
        s.job_payment(&id, &kp.public(), vouched, 1_060).unwrap();
        assert!(s.job(&id).unwrap().paid(), "the last receipt's voucher was taken");
        assert!(s.job(&id).unwrap().channel.unwrap().sent.is_empty(), "taken, no longer waiting");
    }

    #[test]
    fn billed_time_never_exceeds_the_jobs_wall_limit_nor_what_the_scheduler_saw() {
        // Finding: the wall time on a job receipt was never capped.
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let kp = billing_provider(&mut s);
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        let limits = JobLimits { wall_time_ms: 100, ..JobLimits::default() };
        let submit_limited = |s: &mut State| {
            s.submit(renter(R), &hash, vec![], Requirements::default(), limits.clone(), None, 0).unwrap().id
        };
        let billed = |s: &State, id: &str| s.job(id).unwrap().channel.and_then(|c| c.receipt).map(|r| r.amount_due);
        // Over the limit: not billed.
        let id = submit_limited(&mut s);
        let a = s.assign(1_000).unwrap().remove(0);
        // Nor may a provider ask the renter to lock more than the job can cost (100 ms at 1 per
        // microsecond).
        let greedy = JobReply::AwaitingChannel {
            program: proto::Address([1; 32]),
            mint: proto::Keypair::from_seed([5; 32]).public(),
            need: 100_001,
            slice_ms: 100,
        };
        assert!(s.job_payment(&id, &kp.public(), greedy, 1_000).unwrap_err().contains("more than"));
        paid_through_a_channel(&mut s, &id, &kp, 1_000);
        s.finished(&id, &kp.public(), billed_result(&kp, &id, a.module, Outcome::Succeeded, 150_000), 10_000).unwrap();
        assert_eq!(billed(&s, &id), None);
        // Within the limit, but longer than the scheduler saw it run (30 ms): not billed.
        let id = submit_limited(&mut s);
        let a = s.assign(20_000).unwrap().remove(0);
        paid_through_a_channel(&mut s, &id, &kp, 20_000);
        s.finished(&id, &kp.public(), billed_result(&kp, &id, a.module, Outcome::Succeeded, 90_000), 20_030).unwrap();
        assert_eq!(billed(&s, &id), None);
        // Within both: billed.
        let id = submit_limited(&mut s);
        let a = s.assign(30_000).unwrap().remove(0);
        paid_through_a_channel(&mut s, &id, &kp, 30_000);
        s.finished(&id, &kp.public(), billed_result(&kp, &id, a.module, Outcome::Succeeded, 60_000), 30_080).unwrap();
        assert_eq!(billed(&s, &id), Some(60_000));
    }

    #[test]
    fn a_slices_receipt_reaches_the_renter_only_when_signed_priced_timed_and_ordered_right() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let kp = billing_provider(&mut s);
        let id = submit(&mut s, 0);
        let a = s.assign(1_000).unwrap().remove(0);
        // Before the provider asked for a channel, no payment message is taken.
        let early = JobReply::ChannelTaken { newest: None, base: 0 };
        assert!(s.job_payment(&id, &kp.public(), early, 1_000).is_err());

        paid_through_a_channel(&mut s, &id, &kp, 1_000);
        let slice =
            |seq, us, price| Box::new(proto::receipt::JobReceipt::sign_slice(&kp, &id, a.module, seq, us, price));
        let shown = |s: &State| s.job(&id).unwrap().channel.unwrap();
        // Another provider's word, another price, more time than the scheduler saw: refused.
        let stranger = proto::Keypair::from_seed([78; 32]);
        assert!(s.job_payment(&id, &stranger.public(), JobReply::Slice(slice(1, 100_000, 1_000_000)), 1_200).is_err());
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(slice(1, 100_000, 2_000_000)), 1_200).is_err());
        assert!(shown(&s).refused.unwrap().contains("price"));
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(slice(1, 300_000, 1_000_000)), 1_200).is_err());
        assert_eq!(shown(&s).receipt, None, "none of them shown to the renter");
        let mut forged = slice(1, 100_000, 1_000_000);
        forged.amount_due = 1;
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(forged), 1_200).is_err());
        // Bytes at a price per GiB the provider did not register: refused.
        let bill = proto::receipt::JobBill {
            wall_time_us: 100_000,
            price_per_gpu_second: 1_000_000,
            net_bytes: 1 << 20,
            price_per_net_gib: 7,
        };
        let priced_bytes = Box::new(proto::receipt::JobReceipt::sign_slice_billed(&kp, &id, a.module, 1, bill));
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(priced_bytes), 1_200).is_err());
        assert!(shown(&s).refused.unwrap().contains("per GiB"));
        // A plain job has no peers: a receipt billing bytes for it is refused, even at no price.
        let bytes_free = proto::receipt::JobBill { price_per_net_gib: 0, ..bill };
        let no_peers = Box::new(proto::receipt::JobReceipt::sign_slice_billed(&kp, &id, a.module, 1, bytes_free));
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(no_peers), 1_200).is_err());
        assert!(shown(&s).refused.unwrap().contains("no cluster's member"));
        // A good one is shown; one that does not follow it is not.
        s.job_payment(&id, &kp.public(), JobReply::Slice(slice(1, 100_000, 1_000_000)), 1_200).unwrap();
        assert_eq!(shown(&s).unvouched().map(|r| r.amount_due), Some(100_000));
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(slice(1, 150_000, 1_000_000)), 1_300).is_err());
        assert!(s.job_payment(&id, &kp.public(), JobReply::Slice(slice(2, 50_000, 1_000_000)), 1_300).is_err());
        s.job_payment(&id, &kp.public(), JobReply::Slice(slice(2, 200_000, 1_000_000)), 1_300).unwrap();
        assert_eq!(shown(&s).unvouched().map(|r| r.sequence), Some(2));
        // Naming a channel twice, or for a job that waits for none, is refused.
        let terms = proto::voucher::ChannelTerms {
            program: proto::Address([1; 32]),
            mint: proto::Keypair::from_seed([5; 32]).public(),
            id: 0,
            newest: None,
        };
        assert!(s.channel_named(&id, &terms).unwrap_err().contains("already"));
        let other = submit(&mut s, 0);
        assert!(s.channel_named(&other, &terms).is_err());
    }

    #[test]
    fn a_job_runs_once_and_keeps_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let id = submit(&mut s, 0);
        assert!(s.assign(1).unwrap().is_empty(), "nobody to run it");
        let p = register(&mut s, 1, 2);
        let a = s.assign(3).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].job_id.as_str(), a[0].provider, a[0].input.as_slice()), (id.as_str(), p, &b"in"[..]));
        assert!(s.assign(4).unwrap().is_empty(), "not twice");
        s.finished(&id, &p, done(), 5).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Succeeded);
        assert_eq!(s.output(&id), Some(&b"out"[..]));
        // A late duplicate report changes nothing.
        s.finished(&id, &PublicKey([9; 32]), done(), 6).unwrap();
        assert_eq!(s.job(&id).unwrap().attempts.len(), 1);
    }

    #[test]
    fn silent_providers_lose_their_jobs_to_others_and_tries_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config { heartbeat_timeout_ms: 100, max_attempts: 2, ..Config::default() });
        let id = submit(&mut s, 0);
        let p1 = register(&mut s, 1, 0);
        let p2 = register(&mut s, 2, 0);
        let first = s.assign(1).unwrap()[0].provider;
        let other = if first == p1 { p2 } else { p1 };
        s.heartbeat(&other, 0, 0, Some(1), 150);
        s.tick(200).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued);
        assert_eq!(view.attempts[0].error.as_deref(), Some("the provider missed its heartbeats"));
        let again = s.assign(201).unwrap();
        assert_eq!(again[0].provider, other, "the retry goes to the provider still alive");
        s.attempt_failed(&id, &other, "the provider declined: at capacity", 202).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Failed);
        let error = view.error.unwrap();
        assert!(
            error.contains("gave up after 2 tries")
                && error.contains("missed its heartbeats")
                && error.contains("declined"),
            "{error}"
        );
    }

    #[test]
    fn queued_jobs_expire_at_their_deadline_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let id = submit(&mut s, 0);
        s.tick(5_000).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Queued);
        s.tick(10_001).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Expired);
        assert_eq!(view.error.as_deref(), Some("0 of 0 providers match: no provider has registered yet"));
    }

    #[test]
    fn a_restart_requeues_running_jobs_and_keeps_ids_unique() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let mut s = state(&dir, Config::default());
            let id = submit(&mut s, 0);
            register(&mut s, 1, 0);
            assert_eq!(s.assign(1).unwrap().len(), 1);
            id
        };
        let mut s = state(&dir, Config::default());
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued);
        assert_eq!(view.attempts[0].error.as_deref(), Some("the scheduler restarted while the job ran"));
        assert!(!s.providers()[0].online, "providers are offline until they reconnect");
        let next = submit(&mut s, 2);
        assert_ne!(next, id);
        assert_eq!(s.job(&next).unwrap().queue_position, Some(2));
    }

    #[test]
    fn submissions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let unknown = hash_hex(&[1; 32]);
        assert!(matches!(
            s.submit(renter(R), &unknown, vec![], Requirements::default(), JobLimits::default(), None, 0),
            Err(SubmitError::UnknownModule(_))
        ));
        assert!(matches!(
            s.submit(renter(R), "xyz", vec![], Requirements::default(), JobLimits::default(), None, 0),
            Err(SubmitError::Invalid(_))
        ));
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        let zero = Requirements { gpu_count: Some(0), ..Default::default() };
        assert!(matches!(
            s.submit(renter(R), &hash, vec![], zero, JobLimits::default(), None, 0),
            Err(SubmitError::Invalid(_))
        ));
    }

    #[test]
    fn measured_links_are_taken_only_for_the_peers_asked_about_and_show_in_the_provider_list() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
        let keys: Vec<PublicKey> = (1..=4u8).map(|i| PublicKey([i; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            // The fourth takes no connections (no session address): nobody can measure it.
            let addr = (i < 3).then(|| format!("127.0.0.1:{}", 1000 + i));
            s.register(*k, format!("p{i}"), "eu".into(), vec![gpu()], price, 1, addr, 2, 0).unwrap();
        }
        let rtt = |peer: PublicKey, us: Option<u32>| proto::msg::LinkRtt { peer, rtt_us: us };
        // Nothing asked yet: nothing taken.
        assert!(s.links_measured(&keys[0], &[rtt(keys[1], Some(900))]).unwrap_err().contains("no round trips"));
        let asked: Vec<PublicKey> = s.link_peers(&keys[0], 0).iter().map(|p| p.key).collect();
        assert_eq!(asked.len(), 2, "the others that take connections: {asked:?}");
        assert!(!asked.contains(&keys[3]) && !asked.contains(&keys[0]));
        // A peer it was not asked about, one twice, a round trip past a minute: refused whole.
        for lie in [
            vec![rtt(keys[1], Some(900)), rtt(keys[3], Some(1))],
            vec![rtt(keys[1], Some(900)), rtt(keys[1], Some(800))],
            vec![rtt(keys[2], Some(61_000_000))],
        ] {
            assert!(s.links_measured(&keys[0], &lie).is_err(), "{lie:?}");
        }
        assert_eq!(s.links().get(&keys[0], &keys[1]), None, "a refused report changes nothing");
        // The honest answer: one reached (900 us is 1 ms), one not.
        assert_eq!(s.links_measured(&keys[0], &[rtt(keys[1], Some(900)), rtt(keys[2], None)]), Ok(1));
        assert_eq!((s.links().get(&keys[1], &keys[0]), s.links().get(&keys[0], &keys[2])), (Some(1), None));
        let list = s.providers();
        let of = |k: &PublicKey| list.iter().find(|p| p.key == *k).unwrap().links.clone();
        assert_eq!(of(&keys[0]), vec![proto::api::LinkView { peer: keys[1], rtt_ms: 1 }]);
        assert_eq!(of(&keys[1]), vec![proto::api::LinkView { peer: keys[0], rtt_ms: 1 }], "both ends show it");
        // Answered: asking is over, and a second answer is refused.
        assert!(s.links_measured(&keys[0], &[rtt(keys[1], Some(5_000))]).is_err());

        // Links are measured again every LINK_REMEASURE_MS: not before (keys[0] was asked at
        // 0; the others never were, so they are due at once), a few providers per tick.
        let due: Vec<PublicKey> = s.links_due(1).into_iter().map(|(k, _)| k).collect();
        assert!(!due.contains(&keys[0]) && due.contains(&keys[1]), "{due:?}");
        assert!(s.links_due(2).is_empty(), "just asked");
        let due: Vec<PublicKey> = s.links_due(LINK_REMEASURE_MS).into_iter().map(|(k, _)| k).collect();
        assert_eq!(due, vec![keys[0]]);
        // A provider that goes away loses its links (measured again when it is back).
        s.disconnected(&keys[1], LINK_REMEASURE_MS).unwrap();
        assert_eq!(s.links().get(&keys[0], &keys[1]), None);
        assert!(s.providers().iter().all(|p| p.links.is_empty()));
    }

    #[test]
    fn session_reports_come_only_from_the_sessions_provider_with_its_receipts_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let (renter, provider, other) =
            (proto::Keypair::generate(), proto::Keypair::generate(), proto::Keypair::generate());
        let id = [9u8; 16];
        s.open_session(SessionView::granted(hash_hex_16(&id), renter.public(), provider.public(), "ab".into(), 5, 0))
            .unwrap();
        let mut signer = proto::receipt::Signer::new(id, renter.public(), 5);
        let call = proto::receipt::Counts { inferences: 1, ..Default::default() };
        let r = signer.next(&provider, &call, b"q", b"a");
        let report = |receipt: Option<proto::receipt::Receipt>| proto::msg::SessionReport {
            session_id: id,
            receipt,
            vouched: None,
            settlements: vec![proto::Signature([1; 64])],
            closed: true,
        };
        let err = s.session_report(&other.public(), &report(Some(r.clone())), 1).unwrap_err();
        assert!(err.contains("not served by"), "{err}");
        let mut forged = r.clone();
        forged.amount_due = 500;
        let err = s.session_report(&provider.public(), &report(Some(forged)), 1).unwrap_err();
        assert!(err.contains("does not check"), "{err}");
        assert!(s.session_report(&provider.public(), &report(None), 1).is_ok());
        assert!(
            s.session_report(&provider.public(), &proto::msg::SessionReport { session_id: [1; 16], ..report(None) }, 1)
                .is_err()
        );
        s.session_report(&provider.public(), &report(Some(r.clone())), 2).unwrap();
        s.store_handle().sync().unwrap();
        drop(s);
        let s = state(&dir, Config::default());
        assert!(s.session(&hash_hex_16(&id), &other.public()).is_none(), "only its renter sees it");
        let v = s.session(&hash_hex_16(&id), &renter.public()).unwrap();
        assert_eq!((v.receipts, v.amount_due, v.vouched, v.closed), (1, 5, 0, true), "nothing vouched yet");
        assert_eq!(v.settlements, vec![proto::Signature([1; 64]).to_string()]);
        // Reports carry the newest settlements: the record adds only the ones it has not seen.
        let mut s = s;
        let newer = proto::msg::SessionReport {
            settlements: vec![proto::Signature([1; 64]), proto::Signature([2; 64])],
            ..report(None)
        };
        s.session_report(&provider.public(), &newer, 3).unwrap();
        let v = s.session(&hash_hex_16(&id), &renter.public()).unwrap();
        assert_eq!(v.settlements, vec![proto::Signature([1; 64]).to_string(), proto::Signature([2; 64]).to_string()]);

        // What the renter paid for is its voucher, checked here against its key and the
        // channel between the two: the provider's own word (a voucher it signed, one for
        // another receipt or another channel) is refused and changes nothing.
        let channel = proto::voucher::ChannelRef {
            program: proto::Address([3; 32]),
            mint: proto::Keypair::generate().public(),
            id: 0,
            generation: 1,
        };
        let voucher = |by: &proto::Keypair, c: &proto::voucher::ChannelRef, digest: [u8; 32]| proto::voucher::Voucher {
            cumulative: 105,
            receipt_digest: digest,
            signature: by.sign(&c.message(&renter.public(), &provider.public(), 105, &digest)),
        };
        let vouched = |receipt: &proto::receipt::Receipt, v: proto::voucher::Voucher| proto::msg::SessionReport {
            vouched: Some(Box::new(proto::msg::SessionVouched { channel, receipt: receipt.clone(), voucher: v })),
            ..report(None)
        };
        let r2 = signer.next(&provider, &call, b"q2", b"a2");
        let by_provider = vouched(&r2, voucher(&provider, &channel, r2.digest()));
        let err = s.session_report(&provider.public(), &by_provider, 4).unwrap_err();
        assert!(err.contains("not the renter's signature"), "{err}");
        let for_another_receipt = vouched(&r2, voucher(&renter, &channel, r.digest()));
        let err = s.session_report(&provider.public(), &for_another_receipt, 4).unwrap_err();
        assert!(err.contains("another receipt"), "{err}");
        let elsewhere = proto::voucher::ChannelRef { id: 1, ..channel };
        let err = s.session_report(&provider.public(), &vouched(&r2, voucher(&renter, &elsewhere, r2.digest())), 4);
        assert!(err.unwrap_err().contains("not the renter's signature"));
        assert_eq!(s.session(&hash_hex_16(&id), &renter.public()).unwrap().vouched, 0);
        s.session_report(&provider.public(), &vouched(&r2, voucher(&renter, &channel, r2.digest())), 5).unwrap();
        let v = s.session(&hash_hex_16(&id), &renter.public()).unwrap();
        assert_eq!(v.vouched, 10, "the amount due on the receipt the renter's voucher answers");
        assert_eq!(v.channel, Some(channel.address(&renter.public(), &provider.public())));
        assert_eq!((v.receipts, v.amount_due), (1, 5), "a vouched receipt is not taken for the newest usage");
    }

    fn failed(kind: proto::msg::FailureKind) -> JobResult {
        JobResult {
            outcome: Outcome::Failed { kind, limit: None, message: format!("{kind} on purpose") },
            output: Vec::new(),
            ..done()
        }
    }

    #[test]
    fn job_ids_are_unguessable_and_jobs_belong_to_their_renter() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let (a, b) = (submit(&mut s, 0), submit(&mut s, 0));
        for id in [&a, &b] {
            let hex = id.strip_prefix("job-").unwrap();
            assert!(hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(a, b);
        assert!(s.owns(&a, &renter(R)));
        assert!(!s.owns(&a, &PublicKey([7; 32])));
        assert!(!s.owns("job-000001", &renter(R)));
        assert_eq!(s.job(&a).unwrap().renter, Some(renter(R)));
    }

    #[test]
    fn a_renter_at_its_job_cap_is_refused_until_one_ends() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { max_jobs_per_renter: 2, ..Config::default() };
        let mut s = state(&dir, config.clone());
        let first = submit(&mut s, 0);
        submit(&mut s, 0);
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        let third = |s: &mut State, renter| {
            s.submit(renter, &hash, vec![], Requirements::default(), JobLimits::default(), None, 1)
        };
        let err = third(&mut s, renter(R)).unwrap_err();
        assert!(matches!(err, SubmitError::TooManyJobs { count: 2, .. }), "{err}");
        assert!(err.to_string().contains("once one of them ends"), "{err}");
        // Another renter is not held back, and the count survives a restart.
        third(&mut s, renter(8)).unwrap();
        drop(s);
        let mut s = state(&dir, config);
        assert!(matches!(third(&mut s, renter(R)), Err(SubmitError::TooManyJobs { .. })));
        let p = register(&mut s, 1, 1);
        let a = s.assign(2).unwrap();
        assert_eq!(a[0].job_id, first, "oldest first");
        s.finished(&first, &p, done(), 3).unwrap();
        third(&mut s, renter(R)).unwrap();
    }

    #[test]
    fn a_provider_side_failure_runs_again_elsewhere_and_a_kernel_fault_is_final() {
        use proto::msg::FailureKind;
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let id = submit(&mut s, 0);
        let (p1, p2) = (register(&mut s, 1, 0), register(&mut s, 2, 0));
        let first = s.assign(1).unwrap()[0].provider;
        s.finished(&id, &first, failed(FailureKind::Host), 2).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued, "{view:?}");
        let why = view.attempts[0].error.clone().unwrap();
        assert!(why.contains("the provider failed (host): host on purpose"), "{why}");
        let second = s.assign(3).unwrap()[0].provider;
        assert_ne!(second, first, "the re-run goes to the other provider");
        assert!([p1, p2].contains(&second));
        // The kernel's own fault would fail the same way anywhere: it is final.
        s.finished(&id, &second, failed(FailureKind::Trap), 4).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Failed);
        assert_eq!(view.attempts.len(), 2);
        assert!(matches!(view.outcome, Some(Outcome::Failed { kind: FailureKind::Trap, .. })));
        assert!(s.assign(5).unwrap().is_empty());
    }

    #[test]
    fn provider_side_failures_are_bounded_by_the_tries_and_keep_the_last_report() {
        use proto::msg::FailureKind;
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config { max_attempts: 2, ..Config::default() });
        let id = submit(&mut s, 0);
        register(&mut s, 1, 0);
        for now in [1, 3] {
            let p = s.assign(now).unwrap()[0].provider;
            s.finished(&id, &p, failed(FailureKind::Host), now + 1).unwrap();
        }
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Failed);
        assert!(view.error.as_deref().unwrap().starts_with("gave up after 2 tries"), "{view:?}");
        assert!(matches!(view.outcome, Some(Outcome::Failed { kind: FailureKind::Host, .. })));
    }

    fn session_view(n: u8, provider: PublicKey) -> SessionView {
        SessionView::granted(hash_hex_16(&[n; 16]), renter(R), provider, "ab".into(), 1, 0)
    }

    #[test]
    fn sessions_take_slots_and_a_full_provider_gets_none_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let key = PublicKey([1; 32]);
        let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
        s.register(key, "p".into(), "eu".into(), vec![gpu()], price, 1, Some("127.0.0.1:1".into()), 2, 0).unwrap();
        let none = Requirements::default();
        for n in 0..2 {
            let (picked, _, _) = s.pick_session_provider(&none, &[]).unwrap();
            assert_eq!(picked, key);
            s.open_session(session_view(n, key)).unwrap();
        }
        // Both slots granted, though the provider has not heartbeat since: none is left.
        let full = s.pick_session_provider(&none, &[]).unwrap_err();
        assert_eq!(
            full.summary,
            "0 of 1 providers match: 1 has no room for another session (its slots or its memory for sessions)"
        );
        assert_eq!(full.reasons[0].reason, "sessions_full");
        assert_eq!((s.providers()[0].sessions, s.providers()[0].session_capacity), (2, 2));
        // Its heartbeat says one session ended.
        s.heartbeat(&key, 0, 1, None, 10);
        assert_eq!(s.pick_session_provider(&none, &[]).unwrap().0, key);
        // Batch jobs do not take session slots, nor sessions job slots.
        submit(&mut s, 11);
        assert_eq!(s.assign(12).unwrap().len(), 1);
        assert_eq!(s.pick_session_provider(&none, &[]).unwrap().0, key);
    }

    #[test]
    fn a_provider_whose_memory_has_no_room_gets_no_session_though_it_has_slots() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, Config::default());
        let key = PublicKey([1; 32]);
        let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
        s.register(key, "p".into(), "eu".into(), vec![gpu()], price, 1, Some("127.0.0.1:1".into()), 8, 0).unwrap();
        let none = Requirements::default();
        // One session open, and room for one more by its memory: one is granted, then none.
        s.heartbeat(&key, 0, 1, None, 10);
        s.session_room(&key, Some(1));
        assert_eq!(s.providers()[0].session_room, Some(1));
        assert_eq!(s.pick_session_provider(&none, &[]).unwrap().0, key);
        s.open_session(session_view(0, key)).unwrap();
        let full = s.pick_session_provider(&none, &[]).unwrap_err();
        assert_eq!(full.reasons[0].reason, "sessions_full");
        // Its next heartbeat has room again (a heavy session ended).
        s.heartbeat(&key, 0, 1, None, 20);
        s.session_room(&key, Some(5));
        assert_eq!(s.pick_session_provider(&none, &[]).unwrap().0, key);
        // A provider that says nothing of memory is bounded by its slots alone.
        s.session_room(&key, None);
        for n in 1..8 {
            assert!(s.pick_session_provider(&none, &[]).is_ok(), "slot {n}");
            s.open_session(session_view(n, key)).unwrap();
        }
        assert!(s.pick_session_provider(&none, &[]).is_err(), "all 8 slots taken");
    }

    // ---- cluster jobs ----

    /// The scheduler's key in these tests: it signs the rosters.
    fn scheduler_key() -> proto::Keypair {
        proto::Keypair::from_seed([99; 32])
    }

    fn cluster_state(dir: &tempfile::TempDir, config: Config) -> State {
        let mut s = state(dir, config);
        s.set_signer(std::sync::Arc::new(scheduler_key()));
        s
    }

    /// A provider with a real key (it signs receipts), one GPU, one job slot, taking peers'
    /// connections at a session address.
    fn member_provider(s: &mut State, n: u8, now: u64) -> proto::Keypair {
        let kp = proto::Keypair::from_seed([n; 32]);
        let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
        let addr = Some(format!("10.0.0.{n}:7000"));
        s.register(kp.public(), format!("p{n}"), "eu".into(), vec![gpu()], price, 1, addr, 1, now).unwrap();
        kp
    }

    /// `n` member providers (seeds 1..=n) at `price`, reachable by peers.
    fn priced_providers(s: &mut State, n: u8, price: Price) -> Vec<proto::Keypair> {
        (1..=n)
            .map(|n| {
                let kp = proto::Keypair::from_seed([n; 32]);
                let addr = Some(format!("10.0.0.{n}:7000"));
                s.register(kp.public(), format!("p{n}"), "eu".into(), vec![gpu()], price, 1, addr, 1, 0).unwrap();
                kp
            })
            .collect()
    }

    fn submit_cluster(s: &mut State, gpus: u32, now: u64) -> Result<Submitted, SubmitError> {
        submit_shaped(s, proto::api::ClusterRequest { gpus, ..Default::default() }, now)
    }

    fn submit_shaped(s: &mut State, c: proto::api::ClusterRequest, now: u64) -> Result<Submitted, SubmitError> {
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        s.submit_job(
            renter(R),
            &hash,
            b"in".to_vec(),
            Requirements::default(),
            JobLimits::default(),
            Some(100),
            Some(c),
            now,
        )
    }

    /// Three member providers and a cluster of `gpus` submitted to them.
    fn cluster_on_three(dir: &tempfile::TempDir, gpus: u32) -> (State, String) {
        let mut s = cluster_state(dir, Config::default());
        for n in 1..=3 {
            member_provider(&mut s, n, 0);
        }
        let id = submit_cluster(&mut s, gpus, 0).unwrap().id;
        (s, id)
    }

    fn members_of(s: &State, id: &str) -> Vec<proto::api::MemberView> {
        s.job(id).unwrap().cluster.unwrap().members
    }

    fn output(out: &[u8], fuel: u64, wall_ms: u64) -> JobResult {
        JobResult {
            output: out.to_vec(),
            usage: proto::msg::WireUsage { fuel, net_bytes_sent: 10, ..Default::default() },
            wall_time_ms: wall_ms,
            wall_time_us: wall_ms * 1000,
            ..done()
        }
    }

    #[test]
    fn a_cluster_is_placed_all_or_nothing_and_each_rank_gets_a_signed_roster() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        let keys: Vec<proto::Keypair> = (1..=3).map(|n| member_provider(&mut s, n, 0)).collect();
        // Three free GPUs, four wanted: queued, saying why with counts, nothing placed.
        let submitted = submit_cluster(&mut s, 4, 1).unwrap();
        let id = submitted.id.clone();
        assert_eq!(submitted.no_match.unwrap().summary, "4 GPUs wanted: 3 free that fit, on 3 provider(s)");
        assert!(s.assign(2).unwrap().is_empty());
        let view = s.job(&id).unwrap();
        assert_eq!((view.state, view.queue_position), (JobState::Queued, Some(1)));
        assert_eq!(view.no_match.as_ref().unwrap().summary, "4 GPUs wanted: 3 free that fit, on 3 provider(s)");
        assert_eq!((view.no_match.as_ref().unwrap().total, view.no_match.as_ref().unwrap().matching), (3, 3));
        let c = view.cluster.unwrap();
        assert_eq!((c.request.gpus, c.tries, c.members.len()), (4, 0, 0));
        // A plain job is not held back by it, and takes one of the three.
        let single = submit(&mut s, 3);
        let a = s.assign(4).unwrap();
        assert_eq!((a.len(), a[0].job_id.as_str(), a[0].member.is_none()), (1, single.as_str(), true));
        let busy = a[0].provider;
        s.finished(&single, &busy, done(), 5).unwrap();
        assert!(s.assign(6).unwrap().is_empty(), "three free again: still not four");
        // A fourth frees: the whole gang is placed at once.
        let mut keys = keys;
        keys.push(member_provider(&mut s, 4, 7));
        let a = s.assign(8).unwrap();
        assert_eq!(a.len(), 4, "{a:?}");
        let sched = scheduler_key().public();
        let mut seen = HashSet::new();
        for (rank, a) in a.iter().enumerate() {
            let m = a.member.as_ref().expect("a member's assignment carries its rank and roster");
            assert_eq!(m.rank as usize, rank);
            assert_eq!(a.job_id, member_id(&id, 1, rank as u32));
            assert_eq!((m.roster.job_id.as_str(), m.roster.world()), (id.as_str(), 4));
            assert_eq!(m.roster.members[rank].provider, a.provider, "the roster names the rank's provider");
            let n = keys.iter().position(|k| k.public() == a.provider).unwrap() + 1;
            assert_eq!(m.roster.members[rank].addr.as_deref(), Some(format!("10.0.0.{n}:7000").as_str()));
            assert_eq!(m.roster.check(&sched, &a.provider, 8), Ok(vec![rank as u32]));
            assert_eq!(m.roster.module_hash, a.module);
            assert!(m.roster.expires_at_ms > 8 + Config::default().default_deadline_ms);
            assert_eq!(a.input, b"in");
            assert!(seen.insert(a.provider), "one member per one-GPU provider");
        }
        // The cluster runs; each member is a job of the renter's own, never queued.
        let view = s.job(&id).unwrap();
        let c = view.cluster.clone().unwrap();
        assert_eq!((view.state, c.tries, c.members.len()), (JobState::Running, 1, 4));
        assert_eq!(view.provider, Some(a[0].provider));
        for (m, a) in c.members.iter().zip(&a) {
            assert_eq!((m.job_id.as_str(), m.provider, m.state), (a.job_id.as_str(), a.provider, JobState::Running));
            assert_eq!((m.gpu, m.gpu_name.as_str(), m.region.as_str()), (0, "RTX 4090", "eu"));
            let child = s.job(&m.job_id).unwrap();
            assert_eq!(
                (child.member_of.as_deref(), child.renter, child.state),
                (Some(id.as_str()), Some(renter(R)), JobState::Running)
            );
            assert_eq!(child.queue_position, None);
            assert!(s.owns(&m.job_id, &renter(R)) && !s.owns(&m.job_id, &renter(8)));
        }
        assert!(!s.owns(&id, &renter(8)));
        // Every slot is taken by the members: a plain job waits.
        let waiting = submit(&mut s, 9);
        assert!(s.assign(10).unwrap().is_empty());
        assert_eq!(s.job(&waiting).unwrap().state, JobState::Queued);
        assert_eq!(s.providers().iter().map(|p| p.running).sum::<u32>(), 4);
    }

    #[test]
    fn a_members_deposit_and_billed_bytes_are_bounded_by_the_clusters_byte_limit_named_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        let price = Price { per_gpu_second: 0, per_inference: 0, per_net_gib: 1_000 };
        let keys = priced_providers(&mut s, 2, price);
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        let limits = JobLimits { wall_time_ms: 60_000, ..JobLimits::default() };
        let request = proto::api::ClusterRequest { gpus: 2, ..Default::default() };
        let id = s
            .submit_job(renter(R), &hash, b"in".to_vec(), Requirements::default(), limits, Some(100), Some(request), 0)
            .unwrap()
            .id;
        // No limit named: the cluster gets the default, and so does each member.
        assert_eq!(s.job(&id).unwrap().limits.net_bytes, proto::cluster::DEFAULT_NET_BYTES);
        let a = s.assign(1).unwrap();
        assert_eq!(a.len(), 2);
        let member = a[0].job_id.clone();
        let kp = keys.iter().find(|k| k.public() == a[0].provider).unwrap();
        let view = s.job(&member).unwrap();
        assert_eq!(view.net_limit(), Some(proto::cluster::DEFAULT_NET_BYTES));
        // The most a member can cost: 64 GiB at 1,000 per GiB. A deposit past it is refused.
        let most = 64 * 1_000;
        let ask = |need| JobReply::AwaitingChannel {
            program: proto::Address([1; 32]),
            mint: proto::Keypair::from_seed([5; 32]).public(),
            need,
            slice_ms: 100,
        };
        let why = s.job_payment(&member, &kp.public(), ask(u64::MAX), 2).unwrap_err();
        assert!(why.contains(&format!("more than the job's {most}")), "{why}");
        s.job_payment(&member, &kp.public(), ask(most), 2).unwrap();
        s.job_payment(&member, &kp.public(), JobReply::ChannelTaken { newest: None, base: 0 }, 2).unwrap();
        // A slice billing more bytes than the limit is refused; one within it is shown.
        let bill = |net_bytes| proto::receipt::JobBill {
            wall_time_us: 1_000,
            price_per_gpu_second: 0,
            net_bytes,
            price_per_net_gib: 1_000,
        };
        let slice =
            |seq, n| Box::new(proto::receipt::JobReceipt::sign_slice_billed(kp, &member, a[0].module, seq, bill(n)));
        let over = slice(1, proto::cluster::DEFAULT_NET_BYTES + 1);
        assert!(s.job_payment(&member, &kp.public(), JobReply::Slice(over), 3).is_err());
        let refused = s.job(&member).unwrap().channel.unwrap().refused.unwrap();
        assert!(refused.contains("net-bytes limit"), "{refused}");
        s.job_payment(&member, &kp.public(), JobReply::Slice(slice(1, 1 << 30)), 3).unwrap();
        assert_eq!(s.job(&member).unwrap().channel.unwrap().unvouched().map(|r| r.amount_due), Some(1_000));
    }

    #[test]
    fn a_members_last_receipt_waits_for_the_next_ranks_count_and_is_refused_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        let price = Price { per_gpu_second: 0, per_inference: 0, per_net_gib: 1 << 30 };
        let keys = priced_providers(&mut s, 2, price);
        let id = submit_cluster(&mut s, 2, 0).unwrap().id;
        let a = s.assign(1).unwrap();
        let key = |p: &PublicKey| keys.iter().find(|k| k.public() == *p).unwrap();
        for m in &a {
            let ask = JobReply::AwaitingChannel {
                program: proto::Address([1; 32]),
                mint: proto::Keypair::from_seed([5; 32]).public(),
                need: 1 << 40,
                slice_ms: 100,
            };
            s.job_payment(&m.job_id, &m.provider, ask, 2).unwrap();
            s.job_payment(&m.job_id, &m.provider, JobReply::ChannelTaken { newest: None, base: 0 }, 2).unwrap();
        }
        // Each rank bills `billed` bytes sent and reports `received` from the rank before.
        let result = |m: &Assignment, billed: u64, received: u64| {
            let bill = proto::receipt::JobBill {
                wall_time_us: 1_000,
                price_per_gpu_second: 0,
                net_bytes: billed,
                price_per_net_gib: 1 << 30,
            };
            let r = proto::receipt::JobReceipt::sign_billed(
                key(&m.provider),
                &m.job_id,
                m.module,
                1,
                b"out",
                Default::default(),
                bill,
            );
            JobResult {
                receipt: Some(r),
                usage: proto::msg::WireUsage {
                    net_bytes_sent: billed,
                    net_bytes_received: received,
                    ..Default::default()
                },
                ..done()
            }
        };
        let channel = |s: &State, m: &Assignment| s.job(&m.job_id).unwrap().channel.unwrap();
        // Rank 0 ends first, billing 100 MiB: held until rank 1 says what it received, and its
        // output is not released meanwhile.
        let mib = 1u64 << 20;
        s.finished(&a[0].job_id, &a[0].provider, result(&a[0], 100 * mib, 900), 3).unwrap();
        let c = channel(&s, &a[0]);
        assert!(c.held.as_deref().unwrap().contains("rank 1"), "{c:?}");
        assert_eq!(c.receipt, None, "not shown to the renter yet");
        assert!(!s.job(&a[0].job_id).unwrap().paid() && !s.released(&a[0].job_id), "held is not paid");
        // Rank 1 received only 10 MiB of them (past what could still have been on its way): rank
        // 0's bill is refused. Rank 1 billed 900 bytes and rank 0 received 900: shown.
        s.finished(&a[1].job_id, &a[1].provider, result(&a[1], 900, 10 * mib), 4).unwrap();
        let c = channel(&s, &a[0]);
        assert_eq!((c.held.as_ref(), c.receipt.as_ref()), (None, None));
        let why = c.refused.unwrap();
        assert!(why.contains(&format!("bills {} bytes sent to rank 1", 100 * mib)), "{why}");
        assert!(why.contains(&format!("receiving {}", 10 * mib)), "{why}");
        let c = channel(&s, &a[1]);
        assert_eq!((c.held, c.refused), (None, None));
        assert_eq!(c.receipt.map(|r| (r.done, r.net_bytes)), Some((true, 900)));
        assert_eq!(s.job(&id).unwrap().state, JobState::Succeeded);

        // A next rank that takes its time: the receipt is shown unchecked once it has waited
        // the most a hold lasts, inside the minute its provider waits for the last voucher.
        let pay = |s: &mut State, a: &[Assignment], now: u64| {
            for m in a {
                let ask = JobReply::AwaitingChannel {
                    program: proto::Address([1; 32]),
                    mint: proto::Keypair::from_seed([5; 32]).public(),
                    need: 1 << 40,
                    slice_ms: 100,
                };
                s.job_payment(&m.job_id, &m.provider, ask, now).unwrap();
                s.job_payment(&m.job_id, &m.provider, JobReply::ChannelTaken { newest: None, base: 0 }, now).unwrap();
            }
        };
        submit_cluster(&mut s, 2, 10).unwrap();
        let a = s.assign(11).unwrap();
        pay(&mut s, &a, 12);
        s.finished(&a[0].job_id, &a[0].provider, result(&a[0], 5 * mib, 0), 13).unwrap();
        let later = 13 + cluster::MAX_HELD_MS;
        for k in &keys {
            s.heartbeat(&k.public(), 1, 0, None, later);
        }
        s.tick(later - 1).unwrap();
        assert!(channel(&s, &a[0]).held.is_some(), "not yet");
        s.tick(later).unwrap();
        let c = channel(&s, &a[0]);
        assert_eq!((c.held, c.receipt.map(|r| r.net_bytes)), (None, Some(5 * mib)));
        s.finished(&a[1].job_id, &a[1].provider, result(&a[1], 0, 5 * mib), later + 1).unwrap();

        // A scheduler that restarts with a receipt held holds it again, and shows it once the
        // next rank's record settles it (here: stopped by the restart, so unchecked).
        submit_cluster(&mut s, 2, later + 10).unwrap();
        let a = s.assign(later + 11).unwrap();
        pay(&mut s, &a, later + 12);
        s.finished(&a[0].job_id, &a[0].provider, result(&a[0], 5 * mib, 0), later + 13).unwrap();
        assert!(channel(&s, &a[0]).held.is_some());
        s.store.sync().unwrap();
        drop(s);
        let s = cluster_state(&dir, Config::default());
        let c = channel(&s, &a[0]);
        assert_eq!((c.held, c.receipt.map(|r| r.net_bytes)), (None, Some(5 * mib)), "not lost");
    }

    #[test]
    fn a_cluster_that_waited_holds_the_free_gpus_it_could_use_and_is_not_passed_over_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config { cluster_hold_after_ms: 1_000, ..Config::default() });
        let keys: Vec<PublicKey> = (1..=3).map(|n| member_provider(&mut s, n, 0).public()).collect();
        // Two of three GPUs busy with single jobs; a cluster of 3 waits.
        let singles = [submit(&mut s, 0), submit(&mut s, 0)];
        let busy: Vec<Assignment> = s.assign(1).unwrap();
        assert_eq!(busy.len(), 2);
        let cluster = submit_cluster(&mut s, 3, 2).unwrap().id;
        // Before it has waited long enough, a later single job takes the free GPU.
        let early = submit(&mut s, 3);
        let a = s.assign(4).unwrap();
        assert_eq!(a.iter().map(|a| a.job_id.as_str()).collect::<Vec<_>>(), vec![early.as_str()]);
        s.finished(&early, &a[0].provider, done(), 5).unwrap();
        // Once it has: the free GPU is held, later single jobs wait, and the view says why.
        let late = submit(&mut s, 1_500);
        assert!(s.assign(2_100).unwrap().is_empty(), "the free GPU is the cluster's");
        let why = s.job(&cluster).unwrap().no_match.unwrap().summary;
        assert!(why.ends_with("; held for it until the rest free up: 1 free GPU(s) on 1 provider(s)"), "{why}");
        assert!(s.assign(2_150).unwrap().is_empty());
        let again = s.job(&cluster).unwrap().no_match.unwrap().summary;
        assert_eq!(again, why, "said once, however many passes");
        assert_eq!(s.job(&late).unwrap().state, JobState::Queued);
        // The singles end one by one; each freed GPU is held too, until the gang fits.
        s.finished(&singles[0], &busy[0].provider, done(), 2_200).unwrap();
        assert!(s.assign(2_300).unwrap().is_empty(), "two held, the single still waits");
        s.finished(&singles[1], &busy[1].provider, done(), 2_400).unwrap();
        let placed = s.assign(2_500).unwrap();
        assert_eq!(placed.len(), 3, "{placed:?}");
        assert!(placed.iter().all(|a| a.member.is_some()));
        let on: HashSet<PublicKey> = placed.iter().map(|a| a.provider).collect();
        assert_eq!(on, keys.iter().copied().collect::<HashSet<_>>());
        // With the cluster running, nothing is held: the single gets the next free GPU.
        for a in &placed {
            s.finished(&a.job_id, &a.provider, output(b"r", 1, 1), 2_600).unwrap();
        }
        assert_eq!(s.assign(2_700).unwrap().iter().map(|a| a.job_id.clone()).collect::<Vec<_>>(), vec![late]);
        // A cluster that could never fit (more GPUs than there are) holds nothing.
        let never = submit_cluster(&mut s, 9, 2_800).unwrap().id;
        let other = submit(&mut s, 2_800);
        let a = s.assign(9_000).unwrap();
        assert_eq!(a.iter().map(|a| a.job_id.as_str()).collect::<Vec<_>>(), vec![other.as_str()]);
        assert!(!s.job(&never).unwrap().no_match.unwrap().summary.contains("held"));
    }

    #[test]
    fn a_cluster_on_one_provider_gets_distinct_gpus_and_counts_once_against_the_renters_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config { max_jobs_per_renter: 1, ..Config::default() });
        let kp = proto::Keypair::from_seed([5; 32]);
        let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
        s.register(kp.public(), "rig".into(), "eu".into(), vec![gpu(), gpu(), gpu()], price, 3, None, 0, 0).unwrap();
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        let c = proto::api::ClusterRequest { gpus: 2, one_provider: true, ..Default::default() };
        let id = s
            .submit_job(
                renter(R),
                &hash,
                vec![],
                Requirements::default(),
                JobLimits::default(),
                None,
                Some(c.clone()),
                0,
            )
            .unwrap()
            .id;
        // One job for the cap, however many members.
        assert!(matches!(submit_cluster(&mut s, 2, 0), Err(SubmitError::TooManyJobs { count: 1, .. })));
        let a = s.assign(1).unwrap();
        let gpus: Vec<u32> = a.iter().map(|a| a.member.as_ref().unwrap().roster.members[0].gpu).collect();
        assert_eq!(gpus, vec![0, 0], "the roster is the same for every rank");
        let roster = &a[0].member.as_ref().unwrap().roster;
        assert_eq!(roster.members.iter().map(|m| m.gpu).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(roster.check(&scheduler_key().public(), &kp.public(), 1), Ok(vec![0, 1]));
        assert_eq!(s.job(&id).unwrap().cluster.unwrap().slowest_link_ms, Some(0));
        // Its third slot is free; a second cluster of two does not fit there, and says so.
        let why =
            s.cluster_fit(&Requirements::default(), &proto::api::ClusterRequest { gpus: 2, ..c }, &HashSet::new());
        assert!(why.err().unwrap().summary.contains("the most any fitting provider has free is 1"));
    }

    #[test]
    fn a_cluster_succeeds_with_rank_0s_output_and_receipt_once_every_member_has() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        let keys: Vec<proto::Keypair> = (1..=2).map(|n| member_provider(&mut s, n, 0)).collect();
        let id = submit_cluster(&mut s, 2, 0).unwrap().id;
        let a = s.assign(1).unwrap();
        let key_of = |p: &PublicKey| keys.iter().find(|k| k.public() == *p).unwrap();
        for a in &a {
            s.member_started(&a.job_id, &a.provider);
        }
        // Rank 1 ends first: the cluster still runs, and shows it.
        s.finished(&a[1].job_id, &a[1].provider, output(b"r1", 5, 70), 50).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Running);
        let m = members_of(&s, &id);
        assert_eq!((m[0].state, m[1].state), (JobState::Running, JobState::Succeeded));
        assert_eq!(m[1].usage.as_ref().map(|u| u.fuel), Some(5));
        // Rank 0 with a receipt its provider signed over its own job id.
        let mut r0 = output(b"r0", 3, 40);
        let k0 = key_of(&a[0].provider);
        r0.receipt = Some(proto::receipt::JobReceipt::sign(
            k0,
            &a[0].job_id,
            a[0].module,
            1,
            b"r0",
            Default::default(),
            40_000,
            1,
        ));
        s.finished(&a[0].job_id, &a[0].provider, r0, 60).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Succeeded, "{view:?}");
        assert_eq!(s.output(&id), Some(&b"r0"[..]), "rank 0's output");
        assert_eq!(view.provider, Some(a[0].provider));
        let receipt = view.receipt.clone().expect("rank 0's receipt");
        receipt.check(&a[0].job_id, &a[0].provider, b"r0").unwrap();
        let usage = view.usage.clone().unwrap();
        assert_eq!((usage.fuel, usage.net_bytes_sent), (8, 20), "the sum of the members'");
        assert_eq!(view.wall_time_ms, Some(70), "the slowest member's");
        assert_eq!(view.output_bytes, Some(2));
        assert_eq!(s.output_member(&id), Some(a[0].job_id.clone()));
        assert!(s.released(&id));
        assert!(view.cluster.unwrap().members.iter().all(|m| m.state == JobState::Succeeded));
        // Every slot is free again.
        assert!(s.providers().iter().all(|p| p.running == 0));
    }

    /// The providers report the end of the members they were told to cancel (what frees
    /// their slots: until then a cancelled member may still be running there).
    fn ack(s: &mut State, revoked: &[(PublicKey, Vec<String>)], now: u64) {
        for (p, jobs) in revoked {
            for j in jobs {
                s.attempt_failed(j, p, "cancelled", now).unwrap();
            }
        }
    }

    #[test]
    fn a_kernel_fault_in_one_rank_fails_the_cluster_and_cancels_the_others() {
        use proto::msg::FailureKind;
        let dir = tempfile::tempdir().unwrap();
        let (mut s, id) = cluster_on_three(&dir, 3);
        let a = s.assign(1).unwrap();
        assert_eq!(a.len(), 3);
        s.take_revoked();
        s.finished(&a[1].job_id, &a[1].provider, failed(FailureKind::Trap), 10).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Failed);
        assert_eq!(view.error.as_deref(), Some("rank 1 failed: trap on purpose"));
        let Some(Outcome::Failed { kind, message, .. }) = &view.outcome else { panic!("{:?}", view.outcome) };
        assert_eq!((*kind, message.as_str()), (FailureKind::Trap, "rank 1 failed: trap on purpose"));
        assert_eq!(s.output_member(&id), Some(a[1].job_id.clone()), "the failing rank's log is the cluster's");
        // The others are cancelled on their providers and end as failed.
        let mut revoked: Vec<(PublicKey, Vec<String>)> = s.take_revoked();
        revoked.sort();
        let mut want = vec![(a[0].provider, vec![a[0].job_id.clone()]), (a[2].provider, vec![a[2].job_id.clone()])];
        want.sort();
        assert_eq!(revoked, want);
        let m = members_of(&s, &id);
        assert_eq!(m.iter().map(|m| m.state).collect::<Vec<_>>(), vec![JobState::Failed; 3]);
        assert!(m[0].error.as_deref().unwrap().contains("rank 1 failed"), "{:?}", m[0].error);
        // A late report from a cancelled member changes nothing; nothing is queued again.
        s.finished(&a[0].job_id, &a[0].provider, done(), 11).unwrap();
        assert_eq!(s.job(&a[0].job_id).unwrap().state, JobState::Failed);
        assert_eq!(s.job(&id).unwrap().state, JobState::Failed);
        assert!(s.assign(12).unwrap().is_empty());
        // A cancelled member's slot stays taken until its provider says it ended.
        let held = |s: &State, p: &PublicKey| s.providers().iter().find(|v| v.key == *p).unwrap().running;
        assert_eq!(held(&s, &a[2].provider), 1);
        s.attempt_failed(&a[2].job_id, &a[2].provider, "cancelled", 13).unwrap();
        assert!(s.providers().iter().all(|p| p.running == 0));
    }

    #[test]
    fn a_renter_cancels_a_queued_a_running_and_a_cluster_job_and_nothing_of_them_runs_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        // Queued (nobody to run it): it ends without running and is never assigned.
        let queued = submit(&mut s, 0);
        let view = s.cancel(&queued, 1).unwrap();
        assert_eq!((view.state, view.error.as_deref()), (JobState::Failed, Some("cancelled by its renter")));
        let p = member_provider(&mut s, 1, 2);
        assert!(s.assign(3).unwrap().is_empty(), "a cancelled job is not placed");
        // Running: it ends now, its provider is told, and its late report changes nothing.
        let running = submit(&mut s, 4);
        assert_eq!(s.assign(5).unwrap().len(), 1);
        s.take_revoked();
        let view = s.cancel(&running, 6).unwrap();
        assert_eq!(view.state, JobState::Failed);
        assert_eq!(view.attempts[0].error.as_deref(), Some("cancelled by its renter"));
        assert_eq!(s.take_revoked(), vec![(p.public(), vec![running.clone()])]);
        s.finished(&running, &p.public(), done(), 7).unwrap();
        assert_eq!(s.job(&running).unwrap().state, JobState::Failed);
        assert_eq!(s.output(&running), None);
        assert!(s.providers().iter().all(|p| p.running == 0), "its report freed the slot");
        // Ended: a conflict, and the job is as it was. Unknown: not found.
        assert!(matches!(s.cancel(&running, 8), Err(CancelError::Ended(_, JobState::Failed))));
        assert!(matches!(s.cancel("job-nope", 8), Err(CancelError::NoJob(_))));
        // A cluster, cancelled through one of its members: every member stops and is told.
        member_provider(&mut s, 2, 9);
        let cluster = submit_cluster(&mut s, 2, 10).unwrap().id;
        let a = s.assign(11).unwrap();
        assert_eq!(a.len(), 2);
        s.take_revoked();
        let view = s.cancel(&a[1].job_id, 12).unwrap();
        assert_eq!((view.id.as_str(), view.state), (cluster.as_str(), JobState::Failed));
        let m = members_of(&s, &cluster);
        assert!(m.iter().all(|m| m.state == JobState::Failed), "{m:?}");
        assert!(m[0].error.as_deref().unwrap().contains("cancelled by its renter"));
        let mut told: Vec<String> = s.take_revoked().into_iter().flat_map(|(_, j)| j).collect();
        told.sort();
        let mut want = vec![a[0].job_id.clone(), a[1].job_id.clone()];
        want.sort();
        assert_eq!(told, want);
        ack(&mut s, &[(a[0].provider, vec![a[0].job_id.clone()]), (a[1].provider, vec![a[1].job_id.clone()])], 13);
        assert_eq!(s.job(&cluster).unwrap().state, JobState::Failed, "not queued again");
        assert!(s.assign(14).unwrap().is_empty());
        // It survives a restart as cancelled.
        drop(s);
        let s = state(&dir, Config::default());
        assert_eq!(s.job(&cluster).unwrap().error.as_deref(), Some("cancelled by its renter"));
        assert_eq!(s.job(&queued).unwrap().state, JobState::Failed);
    }

    #[test]
    fn a_provider_side_failure_requeues_the_whole_cluster_and_the_retry_avoids_that_provider() {
        use proto::msg::FailureKind;
        let dir = tempfile::tempdir().unwrap();
        let (mut s, id) = cluster_on_three(&dir, 2);
        let first = s.assign(1).unwrap();
        let bad = first[1].provider;
        s.finished(&first[1].job_id, &bad, failed(FailureKind::Host), 5).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!((view.state, view.queue_position), (JobState::Queued, Some(1)));
        let why = view.attempts[0].error.clone().unwrap();
        assert!(why.starts_with("rank 1 on ") && why.contains("the provider failed (host)"), "{why}");
        // The last try's members stay visible, with what happened to each.
        let m = view.cluster.unwrap().members;
        assert_eq!((m[0].state, m[1].state), (JobState::Failed, JobState::Failed));
        assert!(m[0].error.as_deref().unwrap().starts_with("the cluster stopped: rank 1 on"), "{:?}", m[0].error);
        let revoked = s.take_revoked();
        assert_eq!(revoked, vec![(first[0].provider, vec![first[0].job_id.clone()])]);
        ack(&mut s, &revoked, 6);
        // The retry: new member ids, and the provider that failed is left out (two others fit).
        let again = s.assign(6).unwrap();
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|a| a.provider != bad), "{again:?}");
        assert_eq!(again[0].job_id, member_id(&id, 2, 0));
        assert_eq!(s.job(&id).unwrap().cluster.unwrap().tries, 2);
        // The first try's members keep their own records.
        assert_eq!(s.job(&first[0].job_id).unwrap().state, JobState::Failed);
        // A late report from the first try changes nothing.
        s.finished(&first[0].job_id, &first[0].provider, done(), 7).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Running);
    }

    fn ck(step: u64) -> proto::msg::Checkpoint {
        proto::msg::Checkpoint { step, bytes: vec![step as u8; 100] }
    }

    /// A provider's checkpoint as the server hands it over: hashed first.
    fn save(s: &mut State, id: &str, p: &PublicKey, c: proto::msg::Checkpoint, now: u64) -> Result<(), String> {
        let sha256 = sha2::Sha256::digest(&c.bytes).into();
        s.checkpoint_saved(id, p, c, sha256, now)
    }

    #[test]
    fn a_jobs_newest_checkpoint_from_its_provider_goes_to_its_next_try_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let mut s = state(&dir, Config::default());
            let id = submit(&mut s, 0);
            let (p1, p2) = (member_provider(&mut s, 1, 0).public(), member_provider(&mut s, 2, 0).public());
            let first = s.assign(1).unwrap();
            assert_eq!(first[0].checkpoint, None, "a first try starts afresh");
            let runs = first[0].provider;
            let other = if runs == p1 { p2 } else { p1 };
            // Only the provider running it may save, and never past the cap.
            assert!(save(&mut s, &id, &other, ck(5), 10).is_err());
            assert!(save(&mut s, "job-nope", &runs, ck(5), 10).is_err());
            let huge = proto::msg::Checkpoint { step: 9, bytes: vec![0; proto::msg::CHECKPOINT_CAP + 1] };
            assert!(save(&mut s, &id, &runs, huge, 10).is_err());
            save(&mut s, &id, &runs, ck(5), 10).unwrap();
            // Faster than a provider sends them: dropped. An older step: ignored.
            assert!(save(&mut s, &id, &runs, ck(6), 100).is_err());
            save(&mut s, &id, &runs, ck(7), 1_100).unwrap();
            save(&mut s, &id, &runs, ck(3), 2_200).unwrap();
            let view = s.job(&id).unwrap().checkpoint.unwrap();
            assert_eq!((view.step, view.bytes, view.provider, view.rank), (7, 100, runs, None));
            assert_eq!(view.sha256, hash_hex(&sha2::Sha256::digest(ck(7).bytes).into()));
            // Only the checkpoint is written, never the record: the scheduler stops with the
            // record still showing none.
            s.store.sync().unwrap();
            assert_eq!(s.store.jobs().unwrap()[0].view.checkpoint, None);
            id
        };
        // After a restart the record shows it again, and the next try gets it.
        let mut s = state(&dir, Config::default());
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued);
        assert_eq!(view.checkpoint.map(|c| (c.step, c.bytes, c.saved_at_ms)), Some((7, 100, 1_100)));
        member_provider(&mut s, 1, 3_000);
        member_provider(&mut s, 2, 3_000);
        let again = s.assign(3_001).unwrap();
        assert_eq!(again[0].checkpoint.as_deref(), Some(&ck(7)));
        assert_eq!(s.job(&id).unwrap().attempts.last().unwrap().resumed_from_step, Some(7));
        // Once the job ends its bytes are dropped; the record still says what it was.
        s.finished(&id, &again[0].provider, done(), 3_100).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Succeeded);
        assert_eq!(s.store.checkpoint(&id).unwrap(), None);
        assert_eq!(s.job(&id).unwrap().checkpoint.map(|c| c.step), Some(7));
    }

    #[test]
    fn a_cluster_keeps_its_members_newest_checkpoint_and_every_rank_of_the_retry_resumes_from_it() {
        use proto::msg::FailureKind;
        let dir = tempfile::tempdir().unwrap();
        let (mut s, id) = cluster_on_three(&dir, 2);
        let first = s.assign(1).unwrap();
        // A member's save is its cluster's; another member's provider may not save for it.
        assert!(save(&mut s, &first[0].job_id, &first[1].provider, ck(4), 10).is_err());
        save(&mut s, &first[0].job_id, &first[0].provider, ck(4), 10).unwrap();
        save(&mut s, &first[1].job_id, &first[1].provider, ck(2), 20).unwrap();
        let kept = s.job(&id).unwrap().checkpoint.unwrap();
        assert_eq!((kept.step, kept.rank), (4, Some(0)), "the newest step wins");
        // Each member's pace is its own: rank 1's save between two of rank 0's does not let
        // rank 0 save again sooner.
        save(&mut s, &first[1].job_id, &first[1].provider, ck(5), 300).unwrap();
        assert!(save(&mut s, &first[0].job_id, &first[0].provider, ck(6), 400).is_err());
        assert_eq!(s.job(&id).unwrap().checkpoint.map(|c| (c.step, c.rank)), Some((5, Some(1))));
        save(&mut s, &first[0].job_id, &first[0].provider, ck(6), 600).unwrap();
        assert_eq!(s.job(&id).unwrap().checkpoint.map(|c| (c.step, c.rank)), Some((6, Some(0))));
        assert_eq!(s.job(&first[0].job_id).unwrap().checkpoint, None, "kept on the cluster, not the member");
        s.finished(&first[1].job_id, &first[1].provider, failed(FailureKind::Host), 630).unwrap();
        let revoked = s.take_revoked();
        ack(&mut s, &revoked, 631);
        let again = s.assign(632).unwrap();
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|a| a.checkpoint.as_deref() == Some(&ck(6))), "{again:?}");
        let view = s.job(&id).unwrap();
        assert_eq!(view.attempts.last().unwrap().resumed_from_step, Some(6));
        // A stopped try's late save changes nothing.
        assert!(save(&mut s, &first[0].job_id, &first[0].provider, ck(9), 2_000).is_err());
        assert_eq!(s.job(&id).unwrap().checkpoint.unwrap().step, 6);
    }

    #[test]
    fn a_provider_that_takes_no_peer_connections_holds_a_cluster_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        // p1: two GPUs, two slots, but no session endpoint; p2, p3: one GPU each, reachable.
        let p1 = proto::Keypair::from_seed([1; 32]).public();
        let price = Price { per_gpu_second: 1, per_inference: 1, per_net_gib: 0 };
        s.register(p1, "p1".into(), "eu".into(), vec![gpu(), gpu()], price, 2, None, 0, 0).unwrap();
        let (p2, p3) = (member_provider(&mut s, 2, 0).public(), member_provider(&mut s, 3, 0).public());
        // Three across providers cannot be had without p1, and the reason says so; on p1 alone
        // (its own two GPUs) a cluster needs no connections and fits.
        let three = proto::api::ClusterRequest { gpus: 3, max_per_provider: Some(1), ..Default::default() };
        let why = s.cluster_fit(&Requirements::default(), &three, &HashSet::new()).err().unwrap();
        assert!(why.summary.contains("no session endpoint"), "{}", why.summary);
        let whole = proto::api::ClusterRequest { gpus: 2, one_provider: true, ..Default::default() };
        let fit = s.cluster_fit(&Requirements::default(), &whole, &HashSet::new()).ok().unwrap();
        assert!(fit.members.iter().all(|m| m.provider == p1));
        // Two members, one per provider: only the reachable ones can link up.
        let spread = proto::api::ClusterRequest { gpus: 2, max_per_provider: Some(1), ..Default::default() };
        let id = submit_shaped(&mut s, spread, 0).unwrap().id;
        let placed = s.assign(1).unwrap();
        let on: HashSet<PublicKey> = placed.iter().map(|a| a.provider).collect();
        assert_eq!(on, HashSet::from([p2, p3]), "{placed:?}");
        assert!(placed.iter().all(|a| a.member.as_ref().unwrap().roster.members.iter().all(|m| m.addr.is_some())));
        let _ = id;

        // The cheapest pair spans a reachable provider and an unreachable one; without the
        // unreachable one nothing fits, but it holds the pair whole, and gets it.
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        let dear = Price { per_gpu_second: 5, per_inference: 1, per_net_gib: 0 };
        s.register(p1, "p1".into(), "eu".into(), vec![gpu(), gpu()], dear, 2, None, 0, 0).unwrap();
        let p2 = member_provider(&mut s, 2, 0).public();
        let two = proto::api::ClusterRequest { gpus: 2, ..Default::default() };
        let fit = s.cluster_fit(&Requirements::default(), &two, &HashSet::new()).ok().unwrap();
        assert!(fit.members.iter().all(|m| m.provider == p1), "{:?} (not with {p2})", fit.members);
    }

    #[test]
    fn a_lost_provider_requeues_the_whole_cluster_and_tries_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { heartbeat_timeout_ms: 100, max_attempts: 2, ..Config::default() };
        let mut s = cluster_state(&dir, config);
        let keys: Vec<PublicKey> = (1..=3).map(|n| member_provider(&mut s, n, 0).public()).collect();
        let id = submit_cluster(&mut s, 2, 0).unwrap().id;
        let first = s.assign(1).unwrap();
        // Rank 0's provider goes silent; the others heartbeat.
        let silent = first[0].provider;
        for k in keys.iter().filter(|k| **k != silent) {
            s.heartbeat(k, 1, 0, Some(1), 150);
        }
        s.tick(200).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued);
        assert!(view.attempts[0].error.as_deref().unwrap().contains("missed its heartbeats"), "{view:?}");
        let revoked = s.take_revoked();
        assert!(revoked.contains(&(first[1].provider, vec![first[1].job_id.clone()])), "{revoked:?}");
        ack(&mut s, &revoked, 200);
        // Placed again whole on the two still there.
        let again = s.assign(201).unwrap();
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|a| a.provider != silent));
        // One of them disconnects: two tries were all it had.
        s.disconnected(&again[1].provider, 202).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Failed);
        let error = view.error.unwrap();
        assert!(
            error.starts_with("gave up after 2 tries")
                && error.contains("missed its heartbeats")
                && error.contains("disconnected"),
            "{error}"
        );
        assert!(s.assign(203).unwrap().is_empty());
    }

    #[test]
    fn a_cluster_whose_members_do_not_all_start_in_time_goes_back_to_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config { heartbeat_timeout_ms: u64::MAX / 2, ..Config::default() });
        for n in 1..=3 {
            member_provider(&mut s, n, 0);
        }
        let id = submit_cluster(&mut s, 2, 0).unwrap().id;
        let a = s.assign(1_000).unwrap();
        // Only rank 0's provider says it started (a `Started` from another provider is no
        // member's).
        s.member_started(&a[0].job_id, &a[0].provider);
        s.member_started(&a[1].job_id, &a[0].provider);
        s.tick(60_999).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Running);
        s.tick(61_000).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued);
        assert_eq!(view.attempts[0].error.as_deref(), Some("rank(s) 1 did not start within 60 s"));
        let revoked = s.take_revoked();
        assert_eq!(revoked.len(), 2, "both members are cancelled");
        ack(&mut s, &revoked, 61_000);
        let again = s.assign(61_001).unwrap();
        assert!(again.iter().all(|x| x.provider != a[1].provider), "the late one is avoided");
        // Once every member has started, no timeout applies.
        for x in &again {
            s.member_started(&x.job_id, &x.provider);
        }
        s.tick(1_000_000).unwrap();
        assert_eq!(s.job(&id).unwrap().state, JobState::Running);
    }

    #[test]
    fn a_declined_member_requeues_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        for n in 1..=2 {
            member_provider(&mut s, n, 0);
        }
        let id = submit_cluster(&mut s, 2, 0).unwrap().id;
        let a = s.assign(1).unwrap();
        s.attempt_failed(&a[0].job_id, &a[0].provider, "the provider declined: refused the cluster roster", 2).unwrap();
        let view = s.job(&id).unwrap();
        assert_eq!(view.state, JobState::Queued);
        let revoked = s.take_revoked();
        ack(&mut s, &revoked, 2);
        // Only those two exist: the retry takes them again.
        assert_eq!(s.assign(3).unwrap().len(), 2);
    }

    #[test]
    fn a_restart_drops_a_running_clusters_members_and_queues_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (id, first) = {
            let mut s = cluster_state(&dir, Config::default());
            for n in 1..=2 {
                member_provider(&mut s, n, 0);
            }
            let id = submit_cluster(&mut s, 2, 0).unwrap().id;
            let a = s.assign(1).unwrap();
            s.store_handle().sync().unwrap();
            (id, a)
        };
        let mut s = cluster_state(&dir, Config::default());
        let view = s.job(&id).unwrap();
        assert_eq!((view.state, view.queue_position), (JobState::Queued, Some(1)));
        for a in &first {
            let child = s.job(&a.job_id).unwrap();
            assert_eq!(child.state, JobState::Failed);
            assert_eq!(child.error.as_deref(), Some("the scheduler restarted while the cluster ran"));
        }
        assert!(view.cluster.unwrap().members.iter().all(|m| m.state == JobState::Failed));
        // The providers come back: the cluster is placed again whole, under new ids.
        for n in 1..=2 {
            member_provider(&mut s, n, 2);
        }
        let again = s.assign(3).unwrap();
        assert_eq!(
            again.iter().map(|a| a.job_id.clone()).collect::<Vec<_>>(),
            vec![member_id(&id, 2, 0), member_id(&id, 2, 1)]
        );
        // The cap still counts the cluster once, not its members.
        assert_eq!(s.unfinished.get(&renter(R)).map(|u| u.len()), Some(1));
    }

    #[test]
    fn cluster_submissions_are_checked_and_a_cluster_of_one_is_a_plain_job() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = cluster_state(&dir, Config::default());
        for (gpus, why) in [(0, "at least 2 GPUs"), (100_000, "at most 64 members"), (65, "at most 64")] {
            let err = submit_cluster(&mut s, gpus, 0).unwrap_err();
            assert!(matches!(&err, SubmitError::Invalid(e) if e.contains(why)), "{gpus}: {err}");
        }
        let hash = hash_hex(&s.put_module(WASM).unwrap());
        let two = Requirements { gpu_count: Some(2), ..Default::default() };
        let c = Some(proto::api::ClusterRequest { gpus: 2, ..Default::default() });
        let err = s.submit_job(renter(R), &hash, vec![], two, JobLimits::default(), None, c, 0).unwrap_err();
        assert!(err.to_string().contains("cluster.gpus"), "{err}");
        // Its input goes to every member: the total is bounded.
        let big = vec![0u8; MAX_CLUSTER_INPUT_BYTES / 4 + 1];
        let c4 = Some(proto::api::ClusterRequest { gpus: 4, ..Default::default() });
        let err = s.submit_job(renter(R), &hash, big, Requirements::default(), JobLimits::default(), None, c4, 0);
        assert!(err.unwrap_err().to_string().contains("to each of the cluster's 4 members"));
        let one = submit_cluster(&mut s, 1, 0).unwrap().id;
        assert_eq!(s.job(&one).unwrap().cluster, None);
        // Without a key to sign rosters, a cluster stays queued and says why.
        let mut unsigned = state(&tempfile::tempdir().unwrap(), Config::default());
        register(&mut unsigned, 1, 0);
        register(&mut unsigned, 2, 0);
        let id = submit_cluster(&mut unsigned, 2, 0).unwrap().id;
        assert!(unsigned.assign(1).unwrap().is_empty());
        assert!(unsigned.job(&id).unwrap().no_match.unwrap().summary.contains("no key to sign"));
    }

    #[test]
    fn a_provider_timeout_under_three_heartbeats_is_refused() {
        let ok = Config { heartbeat_interval_ms: 1_000, heartbeat_timeout_ms: 3_000, ..Config::default() };
        ok.validate().unwrap();
        let short = Config { heartbeat_timeout_ms: 2_999, ..ok.clone() };
        let err = short.validate().unwrap_err().to_string();
        assert!(err.contains("at least 3 heartbeat intervals") && err.contains("3000 ms"), "{err}");
        assert!(Config { heartbeat_interval_ms: 10, heartbeat_timeout_ms: 1_000, ..ok }.validate().is_err());
    }
}
