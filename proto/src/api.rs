//! The scheduler's HTTP API, as JSON. The same records are what the scheduler stores, so a
//! restart reads back exactly what clients were shown.
//!
//! Every request that creates or reads a renter's work is signed by that renter
//! ([`crate::httpsig`]); jobs and sessions belong to the key that signed their creation, and
//! nobody else can see them (they read as not found).

use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;
use crate::msg::{GpuInfo, JobLimits, JobResult, Price, Requirements, WireUsage};

/// `POST /v1/modules` answers this; the body of the request is the module's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleUploaded {
    /// SHA-256 of the module, hex: what jobs refer to it by.
    pub module: String,
    pub bytes: u64,
}

/// `POST /v1/jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// Hex SHA-256 of a module uploaded with `POST /v1/modules`.
    pub module: String,
    /// The job input, base64.
    #[serde(default)]
    pub input_base64: String,
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default)]
    pub limits: JobLimits,
    /// How long the job may wait in the queue and run, in seconds from submission (default one
    /// hour).
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    /// Run it as a cluster: this many members, one GPU each, placed together or not at all.
    #[serde(default)]
    pub cluster: Option<ClusterRequest>,
}

/// The shape of a cluster job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRequest {
    /// Members (GPUs), 2 to [`crate::cluster::MAX_MEMBERS`].
    pub gpus: u32,
    /// Every member on the same provider.
    #[serde(default)]
    pub one_provider: bool,
    /// The slowest round trip allowed between two members' providers.
    #[serde(default)]
    pub max_link_rtt_ms: Option<u32>,
    /// The most members on any one provider (1: every member on a provider of its own, so
    /// one provider's failure stops one rank only).
    #[serde(default)]
    pub max_per_provider: Option<u32>,
}

/// A cluster job's members and link plan, in its job record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub request: ClusterRequest,
    /// The members of the current (or last) try, by rank; empty while queued.
    pub members: Vec<MemberView>,
    /// The ring's slowest measured link (`None`: a link not measured yet, or one provider).
    pub slowest_link_ms: Option<u32>,
    /// Across regions, each region's ranks (rings of rings).
    pub regions: Vec<Vec<u32>>,
    /// Times the whole gang was placed.
    pub tries: u32,
}

/// One rank of a cluster job: its own job record (`job_id`: readable like any job of the
/// renter's, paid through its own channel with its provider).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub rank: u32,
    pub job_id: String,
    pub provider: PublicKey,
    pub name: String,
    pub region: String,
    pub gpu: u32,
    pub gpu_name: String,
    pub state: JobState,
    pub usage: Option<WireUsage>,
    pub wall_time_ms: Option<u64>,
    pub error: Option<String>,
}

/// Why providers did not match, with how many for each reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoMatch {
    pub total: u32,
    pub matching: u32,
    /// Each provider is counted once, under the first requirement it fails.
    pub reasons: Vec<ReasonCount>,
    /// A sentence for people: "0 of 3 providers match: 2 have too little VRAM, 1 is offline".
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// A stable key: `offline`, `busy`, `sessions_full`, `gpu_count`, `vram`, `gpu`, `backend`,
    /// `region`, `price`, `rtt`.
    pub reason: String,
    pub count: u32,
}

/// `POST /v1/jobs` answers this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// `job-` and 32 hex digits (128 random bits): not to be guessed, and readable only with
    /// the submitting renter's signature anyway.
    pub id: String,
    pub state: JobState,
    /// Present when no provider matches now: the job waits until one does or its deadline
    /// passes.
    pub no_match: Option<NoMatch>,
    pub queue_position: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// The deadline passed before the job could finish.
    Expired,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Expired)
    }
}

/// One try of a job on a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub provider: PublicKey,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Why this try ended without a result (the provider went offline, declined), if it did.
    pub error: Option<String>,
    /// The step of the checkpoint this try was given to resume from, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
}

/// The newest checkpoint a running job saved: what its next try resumes from. The bytes stay
/// with the scheduler; the record shows what they are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointView {
    pub step: u64,
    pub bytes: u64,
    /// SHA-256 of the bytes, in hex.
    pub sha256: String,
    pub saved_at_ms: u64,
    /// Who saved it: the provider, and the rank in a cluster job.
    pub provider: PublicKey,
    #[serde(default)]
    pub rank: Option<u32>,
}

/// `GET /v1/jobs/{id}`: everything about a job but its output bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    /// The renter that submitted it (the key that signed the submission): the only one that
    /// may read it. `None` on records from before requests were signed: nobody may.
    #[serde(default)]
    pub renter: Option<PublicKey>,
    pub module: String,
    pub state: JobState,
    pub requirements: Requirements,
    pub limits: JobLimits,
    pub submitted_at_ms: u64,
    pub deadline_ms: u64,
    pub queue_position: Option<u32>,
    /// Why it is still queued, when it is.
    pub no_match: Option<NoMatch>,
    pub attempts: Vec<Attempt>,
    pub provider: Option<PublicKey>,
    pub usage: Option<WireUsage>,
    /// How the job ended on the host, when it has: `succeeded`, or the failure.
    pub outcome: Option<crate::msg::Outcome>,
    pub output_bytes: Option<u64>,
    pub wall_time_ms: Option<u64>,
    /// Wall time on the host in microseconds, and from the job's start to its first GPU
    /// dispatch.
    #[serde(default)]
    pub wall_time_us: Option<u64>,
    #[serde(default)]
    pub first_dispatch_us: Option<u64>,
    /// Last reason the scheduler gave up on the job (deadline, too many tries).
    pub error: Option<String>,
    /// The provider's signed receipt, once the job succeeded.
    #[serde(default)]
    pub receipt: Option<crate::receipt::JobReceipt>,
    /// On a provider that takes payment: the job's payment through the renter's channel with
    /// it, as the scheduler relayed it. The output and the log are released once the renter's
    /// voucher for the job's last receipt is taken.
    #[serde(default)]
    pub channel: Option<JobChannel>,
    /// A cluster job's members and link plan; `None` for a job on one GPU.
    #[serde(default)]
    pub cluster: Option<ClusterView>,
    /// On a cluster member's own record: the cluster job it is a rank of.
    #[serde(default)]
    pub member_of: Option<String>,
    /// The newest checkpoint the job saved (a cluster job's: any rank's), while it may still
    /// be needed: dropped when the job ends.
    #[serde(default)]
    pub checkpoint: Option<CheckpointView>,
}

impl JobView {
    /// The bytes the job may move to and from peers, what its receipts are checked against:
    /// its limit (`Some(0)`: none given) for a cluster's member, `None` for any other job
    /// (which has no peers and bills no bytes).
    pub fn net_limit(&self) -> Option<u64> {
        self.member_of.as_ref().map(|_| self.limits.net_bytes)
    }

    /// Whether the job's output and log may be released: it is free, it ended with nothing
    /// billed (it never ran), or the renter's voucher for its last receipt was taken.
    pub fn paid(&self) -> bool {
        match &self.channel {
            None => true,
            // A last receipt held for the bytes cross-check is still to be paid.
            Some(c) if c.held.is_some() => false,
            Some(c) if c.receipt.is_none() => self.state.is_final(),
            Some(c) => c.paid(),
        }
    }
}

/// A paid job's payment, relayed between its provider and its renter by the scheduler. Every
/// figure is one the other party signed: the receipts are the provider's (checked here: the
/// signature, the job, the provider's registered price, the billed time against the job's
/// limit and the time this scheduler saw it run), the vouchers the renter's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobChannel {
    /// The provider's payment-channel program and mint.
    pub program: crate::identity::Address,
    pub mint: PublicKey,
    /// What the channel must hold beyond what is vouched on it for the job to start (its cost
    /// at its wall-time limit).
    pub need: u64,
    /// A receipt comes every this many milliseconds of the job's time; one not answered by a
    /// voucher within the next slice stops the job.
    pub slice_ms: u64,
    /// The channel id the renter named, once it did.
    pub id: Option<u64>,
    /// Once the provider took the channel: the cumulative amount the job's vouchers count
    /// from, and the provider's copy of the newest voucher on it.
    pub base: Option<u64>,
    pub newest: Option<crate::voucher::Voucher>,
    /// The provider's newest receipt for the job (a slice's, or the last one once it ended).
    pub receipt: Option<crate::receipt::JobReceipt>,
    /// The newest voucher the provider took for the job, and the receipt it answers: always
    /// one the renter sent through this scheduler (the provider's word that it took another is
    /// refused).
    pub vouched: Option<crate::voucher::Voucher>,
    pub vouched_sequence: u64,
    /// Vouchers the renter sent and the provider has not yet said it took, each with the
    /// number of the receipt it answers (the newest few).
    #[serde(default)]
    pub sent: Vec<(u64, crate::voucher::Voucher)>,
    /// Claim transactions as the provider reports them, after the job's vouchers (base58
    /// signatures, to look up on the chain: `wasmgrid spend --rpc-url` reads what they paid).
    pub claims: Vec<String>,
    /// Why the provider refused the channel or a voucher, when it did.
    pub refused: Option<String>,
    /// A cluster member's last receipt the scheduler holds back until the next rank says what
    /// it received (bytes billed as sent are checked against it): why it is not shown yet.
    /// Its renter waits for it rather than taking the job as settled.
    #[serde(default)]
    pub held: Option<String>,
    /// Counts every change, for long polls (`GET /v1/jobs/{id}?pay=N` returns once it moves).
    pub updates: u64,
}

impl JobChannel {
    /// The renter's voucher answers the job's last receipt.
    pub fn paid(&self) -> bool {
        self.receipt.as_ref().is_some_and(|r| r.done && r.sequence == self.vouched_sequence)
    }

    /// The newest receipt, when it waits for a voucher.
    pub fn unvouched(&self) -> Option<&crate::receipt::JobReceipt> {
        self.receipt.as_ref().filter(|r| r.sequence > self.vouched_sequence)
    }
}

/// `GET /v1/sessions/{id}`: an inference session as the scheduler knows it: who serves whom,
/// what, at what price, the usage from the provider's signed receipt, and what the renter's
/// signed voucher paid for (both checked by the scheduler), with the claim transactions to look
/// up on Solana.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// Hex session id (the ticket's).
    pub id: String,
    pub renter: PublicKey,
    pub provider: PublicKey,
    /// Hex SHA-256 of the module.
    pub module: String,
    pub price_per_inference: u64,
    pub opened_ms: u64,
    pub updated_ms: u64,
    pub closed: bool,
    /// Cumulative counts from the provider's newest signed receipt.
    pub usage: Option<crate::receipt::Counts>,
    /// That receipt's sequence number and amount due.
    pub receipts: u64,
    pub amount_due: u64,
    /// On a paid session: the amount due on the newest receipt the renter's voucher answers
    /// (the voucher's signature checked here against the renter's key, on the channel derived
    /// from the two parties), and that channel's address.
    #[serde(default)]
    pub vouched: u64,
    #[serde(default)]
    pub channel: Option<crate::identity::Address>,
    /// Claim transactions on the channel as the provider reports them (base58 signatures, to
    /// look up on the chain: `wasmgrid spend --rpc-url` reads what they paid), oldest first;
    /// the newest `SESSION_SETTLEMENTS_KEPT` when there were more.
    pub settlements: Vec<String>,
}

impl SessionView {
    /// A session as the scheduler records it when it grants it: nothing served or paid yet.
    pub fn granted(
        id: String,
        renter: PublicKey,
        provider: PublicKey,
        module: String,
        price_per_inference: u64,
        now_ms: u64,
    ) -> SessionView {
        SessionView {
            id,
            renter,
            provider,
            module,
            price_per_inference,
            opened_ms: now_ms,
            updated_ms: now_ms,
            closed: false,
            usage: None,
            receipts: 0,
            amount_due: 0,
            vouched: 0,
            channel: None,
            settlements: Vec::new(),
        }
    }
}

/// Settlement signatures a session record keeps (the newest).
pub const SESSION_SETTLEMENTS_KEPT: usize = 1000;

/// What the scheduler stores per job: the view plus the bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub view: JobView,
    #[serde(with = "crate::msg::bytes")]
    pub input: Vec<u8>,
    pub result: Option<JobResult>,
    /// Order of submission (ids are random): the queue's order after a restart.
    #[serde(default)]
    pub seq: u64,
}

/// `GET /v1/providers`: one entry per provider the scheduler knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderView {
    pub key: PublicKey,
    pub name: String,
    pub region: String,
    pub gpus: Vec<GpuInfo>,
    pub price: Price,
    pub capacity: u32,
    pub running: u32,
    pub online: bool,
    pub rtt_ms: Option<u32>,
    pub last_seen_ms: u64,
    /// Where renters reach the provider for inference sessions, if it serves them.
    #[serde(default)]
    pub session_addr: Option<String>,
    /// Inference sessions it serves at once, and how many it has now (as it last reported,
    /// plus those granted since).
    #[serde(default)]
    pub session_capacity: u32,
    #[serde(default)]
    pub sessions: u32,
    /// Sessions it said at its last heartbeat it can still open, when its memory for sessions
    /// bounds that below its free slots (less those granted since); `None` when only the
    /// slots do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_room: Option<u32>,
    /// Round trips to other providers, as measured at the scheduler's request.
    #[serde(default)]
    pub links: Vec<LinkView>,
}

/// A measured link from one provider to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkView {
    pub peer: PublicKey,
    pub rtt_ms: u32,
}

/// Every error of the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    /// On `429 Too Many Requests` (and a full nonce table, `503`): seconds to wait before
    /// asking again, as the `Retry-After` header says too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// `POST /v1/sessions`: a renter asks for a provider to serve an inference module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSession {
    /// Hex SHA-256 of a module uploaded with `POST /v1/modules`.
    pub module: String,
    /// The renter's key: the ticket is issued to it, and the renter must connect to the
    /// provider with it. It must be the key that signed the request.
    pub renter: PublicKey,
    #[serde(default)]
    pub requirements: Requirements,
    /// Providers not to pick (for example one that just failed this renter).
    #[serde(default)]
    pub exclude: Vec<PublicKey>,
}

/// The scheduler's answer: whom to talk to, and the ticket to show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionGrant {
    pub provider: PublicKey,
    /// The provider's QUIC address for sessions.
    pub addr: String,
    pub price_per_inference: u64,
    pub ticket: crate::ticket::Ticket,
}

/// `POST /v1/plan`: where a cluster of `gpus` GPUs would go now, and in what ring order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub gpus: u32,
    /// Every GPU on the same provider.
    #[serde(default)]
    pub one_provider: bool,
    /// The slowest round trip allowed between two members' providers.
    #[serde(default)]
    pub max_link_rtt_ms: Option<u32>,
    /// What each GPU must be (its `gpu_count` is ignored: `gpus` says how many).
    #[serde(default)]
    pub requirements: crate::msg::Requirements,
}

/// A cluster placed whole: its members in ring order (rank 0 first; the last passes to the
/// first), the ring's slowest measured link and, across regions, each region's ranks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangPlan {
    pub members: Vec<PlanMember>,
    /// `None` when the ring uses a link not measured yet.
    pub slowest_link_ms: Option<u32>,
    pub regions: Vec<Vec<u32>>,
    /// What the whole cluster costs per second of its time.
    pub price_per_second: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanMember {
    pub rank: u32,
    pub provider: PublicKey,
    pub name: String,
    pub region: String,
    /// Which of the provider's GPUs (its index in the provider's list).
    pub gpu: u32,
    pub gpu_name: String,
    pub price_per_gpu_second: u64,
}

/// The answer when no cluster fits now: why, with counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoPlan {
    pub error: String,
    pub no_match: NoMatch,
}
