//! Messages between provider hosts and the scheduler, and the job types they carry.
//!
//! A host keeps one QUIC connection to the scheduler. On it:
//! - the host opens one bidirectional *control* stream: [`HostMsg::Register`] first, then
//!   [`HostMsg::Heartbeat`]s; the scheduler answers [`SchedulerMsg::Registered`] or
//!   [`SchedulerMsg::Refused`];
//! - the scheduler opens one bidirectional stream per job: [`JobMsg::Run`]; the host may ask
//!   [`JobReply::NeedModule`] and gets [`JobMsg::Module`]; it answers [`JobReply::Started`],
//!   may send [`JobReply::Checkpoint`]s, and ends with [`JobReply::Finished`].

use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;

/// Cap for a frame carrying a module, a job input or a job result.
pub const BLOB_CAP: usize = 64 << 20;

/// Init inputs up to this size go inline in [`SessionMsg::Init`]; larger ones as a blob
/// ([`SessionMsg::InitBlob`]), which the provider keeps by hash so that the next session with
/// the same weights sends nothing.
pub const INIT_INLINE_MAX: usize = 1 << 20;

/// The largest init blob a renter may send.
pub const MAX_INIT_BLOB: u64 = 1 << 30;

/// Bytes in one [`SessionMsg::BlobChunk`] at most.
pub const BLOB_CHUNK: usize = 4 << 20;

/// Cap for a frame carrying one blob chunk, with headroom for the fields.
pub const BLOB_CHUNK_CAP: usize = BLOB_CHUNK + 1024;

/// The largest checkpoint a job may save: what its retry resumes from.
pub const CHECKPOINT_CAP: usize = 16 << 20;

/// Cap for a frame on a job stream: a job's input and the checkpoint it resumes from, or its
/// result, with headroom for the fields.
pub const JOB_FRAME_CAP: usize = BLOB_CAP + CHECKPOINT_CAP + (1 << 20);

/// A job's saved state, as its kernel saved it (`wasmgrid::checkpoint::save`): `step` is the
/// kernel's own count of its progress (shown in the job record, the newest kept), `bytes`
/// whatever the kernel needs to go on from there (parameters, optimiser state, data
/// position). The scheduler keeps a job's newest and hands it to the job's next try.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    #[serde(with = "bytes")]
    pub bytes: Vec<u8>,
}

/// SHA-256 of a module's bytes: the name it is cached and fetched by.
pub type ModuleHash = [u8; 32];

/// The SHA-256 of `bytes`: how modules and init blobs are named.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Hex of a module hash, as the HTTP API shows it.
pub fn hash_hex(hash: &ModuleHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A module hash from its hex form.
pub fn parse_hash(hex: &str) -> Option<ModuleHash> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One GPU a provider offers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub name: String,
    pub vendor: String,
    /// `vulkan`, `metal`, `dx12`, `gl`.
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `Cpu`, ...
    pub device_type: String,
    /// Memory the provider declares for jobs, in bytes.
    pub vram_bytes: u64,
    /// Measured f32 matmul throughput, in GFLOP/s (the host's own benchmark at start-up).
    pub score_gflops: f64,
}

/// What a provider charges, in the smallest unit of the payment token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// Per GPU-second of a batch job.
    pub per_gpu_second: u64,
    /// Per inference of a session.
    pub per_inference: u64,
    /// Per GiB a cluster member sends to its peers (2^30 bytes; 0: bytes are free).
    #[serde(default)]
    pub per_net_gib: u64,
}

/// What a renter asks of the GPUs that run a job. Every field is optional; the empty set
/// matches any online provider.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Requirements {
    /// GPUs on one provider (default 1).
    pub gpu_count: Option<u32>,
    /// Least memory per GPU, in bytes.
    pub min_vram_bytes: Option<u64>,
    /// Case-insensitive text the GPU's vendor or name must contain (`nvidia`, `H100`, `radeon`).
    pub gpu: Option<String>,
    /// Graphics backend (`vulkan`, `metal`, `dx12`).
    pub backend: Option<String>,
    /// Highest price per GPU-second.
    pub max_price_per_gpu_second: Option<u64>,
    /// Highest price per inference, for sessions.
    pub max_price_per_inference: Option<u64>,
    /// Provider region, exactly (`eu-west`).
    pub region: Option<String>,
    /// Highest round-trip time between scheduler and provider, in milliseconds.
    pub max_rtt_ms: Option<u32>,
}

/// The limits a job runs under, on the wire. Zero means "the host's default".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobLimits {
    pub memory_bytes: u64,
    pub fuel: u64,
    pub cpu_time_ms: u64,
    pub wall_time_ms: u64,
    pub gpu_bytes: u64,
    pub dispatches: u64,
    /// GPU buffers held at once.
    #[serde(default)]
    pub buffers: u32,
    /// Workgroups in one dispatch (x * y * z).
    #[serde(default)]
    pub workgroups_per_dispatch: u64,
    /// Bytes of output.
    #[serde(default)]
    pub output_bytes: u64,
    /// Bytes of log kept.
    #[serde(default)]
    pub log_bytes: u64,
    /// Bytes a cluster member may send and receive to and from its peers, together.
    #[serde(default)]
    pub net_bytes: u64,
}

/// The billed counts of a job or a call, on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    pub inferences: u64,
    pub fuel: u64,
    pub dispatches: u64,
    pub workgroups: u64,
    pub invocations: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    pub peak_gpu_bytes: u64,
    pub gpu_time_ns: u64,
    pub gpu_time_source: String,
    /// A cluster member's bytes to and from its peers, as its provider's daemon counted them.
    #[serde(default)]
    pub net_bytes_sent: u64,
    #[serde(default)]
    pub net_bytes_received: u64,
    /// A cluster member's time on the network in its collectives: handing frames to its link
    /// and waiting for its peer's (what the share of its wall time spent waiting is made of).
    #[serde(default)]
    pub net_wait_ns: u64,
}

/// What kind of failure ended a job, a session or one inference. Spelled in lowercase on the
/// wire and in the HTTP API (`"limit"`, `"trap"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// The job hit one of its limits (`limit` names it).
    Limit,
    /// The guest trapped: a panic, an unreachable instruction, a bad memory access.
    Trap,
    /// A batch job exited with a non-zero status.
    Exit,
    /// The guest reported an error (an inference call returned one).
    Guest,
    /// The module was refused before anything ran (bad imports, not a module, wrong kind).
    Load,
    /// The worker process running the job died (a compiler stack overflow, an abort); the
    /// daemon and every other tenant carried on.
    Crash,
    /// The renter stopped paying, or a payment was refused.
    Payment,
    /// The provider could not serve it (device lost, worker could not start, host error).
    Host,
}

impl FailureKind {
    /// The name as the wire and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Limit => "limit",
            FailureKind::Trap => "trap",
            FailureKind::Exit => "exit",
            FailureKind::Guest => "guest",
            FailureKind::Load => "load",
            FailureKind::Crash => "crash",
            FailureKind::Payment => "payment",
            FailureKind::Host => "host",
        }
    }

    /// Whether the kernel (or its renter) caused it: running it again on another provider
    /// would fail the same way, so the scheduler does not. Only provider-side failures
    /// ([`FailureKind::Host`]) are re-run elsewhere.
    pub fn is_kernel_fault(self) -> bool {
        !matches!(self, FailureKind::Host)
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a job ended on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    /// The job failed: `limit` names the limit when `kind` is [`FailureKind::Limit`].
    Failed {
        kind: FailureKind,
        limit: Option<String>,
        message: String,
    },
}

/// A finished job, as the host reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub outcome: Outcome,
    #[serde(with = "bytes")]
    pub output: Vec<u8>,
    #[serde(with = "bytes")]
    pub log: Vec<u8>,
    pub usage: WireUsage,
    pub wall_time_ms: u64,
    /// Wall time on the host in microseconds, and from the job's start to its first GPU
    /// dispatch.
    #[serde(default)]
    pub wall_time_us: u64,
    #[serde(default)]
    pub first_dispatch_us: Option<u64>,
    /// The provider's signed receipt, for a job that succeeded.
    #[serde(default)]
    pub receipt: Option<crate::receipt::JobReceipt>,
}

impl JobResult {
    /// The result of a job that failed before it produced anything (it never ran, or its
    /// worker was lost): no output, no log, no usage.
    pub fn failed(kind: FailureKind, limit: Option<String>, message: String) -> JobResult {
        JobResult {
            outcome: Outcome::Failed { kind, limit, message },
            output: Vec::new(),
            log: Vec::new(),
            usage: WireUsage::default(),
            wall_time_ms: 0,
            wall_time_us: 0,
            first_dispatch_us: None,
            receipt: None,
        }
    }
}

/// Host to scheduler, on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HostMsg {
    Register {
        /// Free text, for people.
        name: String,
        region: String,
        gpus: Vec<GpuInfo>,
        price: Price,
        /// Jobs the host runs at once.
        capacity: u32,
        /// Where renters reach this host for inference sessions (`ip:port`), if it serves them.
        session_addr: Option<String>,
        /// Inference sessions the host serves at once (a count of its own: light sessions may
        /// outnumber batch jobs).
        #[serde(default)]
        session_capacity: u32,
    },
    Heartbeat {
        /// Jobs running now.
        running: u32,
        /// Inference sessions open now.
        #[serde(default)]
        sessions: u32,
        /// Sessions it can open now, when its memory for sessions bounds that below its free
        /// slots; `None` when only the slots do.
        #[serde(default)]
        session_room: Option<u32>,
    },
    /// Where an inference session stands: sent after a settlement and when it ends.
    SessionReport(Box<SessionReport>),
    /// The round trips measured to the peers a `MeasureLinks` named.
    Links { measured: Vec<LinkRtt> },
}

/// The most peers one `MeasureLinks` names.
pub const MAX_LINK_PEERS: usize = 64;

/// A provider the scheduler asks another to measure its round trip to: its key (the
/// connection is pinned to it) and its QUIC address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkPeer {
    pub key: PublicKey,
    pub addr: String,
}

/// One measured link: the round trip to `peer` in microseconds, `None` when it could not be
/// reached (or did not show its key) within the probe's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRtt {
    pub peer: PublicKey,
    pub rtt_us: Option<u32>,
}

/// A provider's report on one inference session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    pub session_id: [u8; 16],
    /// The newest receipt this provider signed for it.
    pub receipt: Option<crate::receipt::Receipt>,
    /// On a paid session: the renter's newest voucher and the receipt it answers.
    #[serde(default)]
    pub vouched: Option<Box<SessionVouched>>,
    /// The newest claim transactions on the session's channel (at most a few hundred), oldest
    /// first: ids to look up on the chain.
    pub settlements: Vec<crate::identity::Signature>,
    pub closed: bool,
}

/// What a renter paid for in a session, as the renter signed it: its voucher on the channel
/// and the provider's receipt the voucher answers. Whoever knows the two parties checks it
/// without the chain ([`crate::voucher::ChannelRef::verify`], [`SessionVouched::check`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionVouched {
    pub channel: crate::voucher::ChannelRef,
    pub receipt: crate::receipt::Receipt,
    pub voucher: crate::voucher::Voucher,
}

impl SessionVouched {
    /// Checks that the provider signed the receipt for this session and renter, and that the
    /// renter's voucher answers that receipt on the channel between the two; returns the
    /// receipt's amount due (what the renter paid for in the session) and the channel's address.
    pub fn check(
        &self,
        session_id: &[u8; 16],
        renter: &PublicKey,
        provider: &PublicKey,
    ) -> Result<(u64, crate::identity::Address), String> {
        let r = &self.receipt;
        if r.provider != *provider
            || r.session_id != *session_id
            || r.renter != *renter
            || !r.provider.verify(&r.signing_bytes(), &r.signature)
        {
            return Err("the vouched receipt is not the provider's for this session".into());
        }
        if self.voucher.receipt_digest != r.digest() {
            return Err("the voucher answers another receipt".into());
        }
        let address = self
            .channel
            .verify(renter, provider, &self.voucher)
            .ok_or_else(|| "the voucher is not the renter's signature on its channel with this provider".to_string())?;
        Ok((r.amount_due, address))
    }
}

/// Scheduler to host, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerMsg {
    Registered {
        provider: PublicKey,
        heartbeat_ms: u64,
    },
    Refused {
        reason: String,
    },
    /// Stop these jobs: the scheduler gave them to another provider (this one missed its
    /// heartbeats, or reconnected), and their results would be ignored.
    Cancel {
        job_ids: Vec<String>,
    },
    /// Measure the round trip to each of these providers (a QUIC handshake to its session
    /// address, pinned to its key) and answer with `HostMsg::Links`: what gang placement and
    /// a cluster's ring are planned from.
    MeasureLinks {
        peers: Vec<LinkPeer>,
    },
}

/// Scheduler to host, on a job stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobMsg {
    Run {
        job_id: String,
        module_hash: ModuleHash,
        #[serde(with = "bytes")]
        input: Vec<u8>,
        limits: JobLimits,
        /// The renter that submitted it: a provider that takes payment reads its channel with
        /// this renter.
        #[serde(default)]
        renter: Option<PublicKey>,
        /// For one rank of a cluster job: which rank, and the scheduler's signed roster.
        #[serde(default)]
        member: Option<Box<crate::cluster::MemberAssign>>,
        /// The checkpoint an earlier try saved, for this try to resume from.
        #[serde(default)]
        checkpoint: Option<Box<Checkpoint>>,
    },
    Module {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// The renter's payment channel with this provider, relayed for a job the provider said it
    /// waits to be paid for ([`JobReply::AwaitingChannel`]).
    Channel(Box<crate::voucher::ChannelTerms>),
    /// The renter's voucher for one of the job's receipts, relayed.
    Voucher(Box<crate::voucher::Voucher>),
}

/// Host to scheduler, on a job stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobReply {
    NeedModule,
    Started,
    /// New log bytes of the running job, sent as they appear.
    Log {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    Finished(Box<JobResult>),
    /// The running job saved a checkpoint (at most one a second reaches the scheduler: the
    /// provider holds back all but the newest of those in between).
    Checkpoint(Box<Checkpoint>),
    /// The host cannot take the job (full, module refused); the scheduler places it again.
    Declined {
        reason: String,
    },
    /// The provider takes payment: it runs the job once the renter names its payment channel
    /// ([`JobMsg::Channel`]) holding at least `need` beyond what is vouched on it (the job's
    /// cost at its wall-time limit). A receipt comes every `slice_ms` of the job's time, and the
    /// job stops when one is not answered by a voucher within the next slice.
    AwaitingChannel {
        program: crate::identity::Address,
        mint: PublicKey,
        need: u64,
        slice_ms: u64,
    },
    /// The job runs, paid through the channel: `newest` is the provider's copy of the newest
    /// voucher on it (the renter counts on from it, if it is the renter's own signature).
    ChannelTaken {
        newest: Option<Box<crate::voucher::Voucher>>,
        /// The channel's cumulative amount the job's vouchers count from.
        base: u64,
    },
    /// The channel was refused (not on the chain, another program or mint, too little left):
    /// the job does not run.
    ChannelRefused {
        reason: String,
    },
    /// The receipt of the job's first `wall_time_us` of GPU time, to be answered by a voucher.
    Slice(Box<crate::receipt::JobReceipt>),
    /// A voucher was taken (it answers receipt `sequence`).
    Vouched {
        sequence: u64,
        voucher: Box<crate::voucher::Voucher>,
    },
    /// The provider claimed on the chain after the job's last voucher.
    Claimed(Box<crate::voucher::Claimed>),
    /// A voucher was refused, and why.
    VoucherRefused {
        reason: String,
    },
}

/// Byte vectors as msgpack binary rather than arrays of integers.
pub(crate) mod bytes {
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{CONTROL_CAP, decode_body, encode};

    #[test]
    fn messages_round_trip_through_frames() {
        let run = JobMsg::Run {
            job_id: "j1".into(),
            module_hash: [7; 32],
            input: vec![200; 10_000],
            limits: JobLimits::default(),
            renter: None,
            member: None,
            checkpoint: None,
        };
        let frame = encode(&run, BLOB_CAP).unwrap();
        // Binary stays binary: 10,000 input bytes cost 10,000 bytes plus a small header.
        assert!(frame.len() < 10_300, "{}", frame.len());
        assert_eq!(decode_body::<JobMsg>(&frame[4..]).unwrap(), run);
        let reg = HostMsg::Register {
            name: "rig".into(),
            region: "eu".into(),
            gpus: vec![],
            price: Price { per_gpu_second: 1, per_inference: 2, per_net_gib: 0 },
            capacity: 4,
            session_addr: None,
            session_capacity: 8,
        };
        let frame = encode(&reg, CONTROL_CAP).unwrap();
        assert_eq!(decode_body::<HostMsg>(&frame[4..]).unwrap(), reg);
    }

    #[test]
    fn hashes_round_trip_as_hex() {
        let h = [0xab; 32];
        assert_eq!(parse_hash(&hash_hex(&h)), Some(h));
        assert_eq!(parse_hash("abc"), None);
        assert_eq!(parse_hash(&"zz".repeat(32)), None);
    }
}

/// Cap of the first frame on a session connection ([`SessionMsg::Open`]), which a provider
/// reads before it knows who the peer is: a ticket and channel terms fit in far less.
pub const OPEN_CAP: usize = 16 << 10;

/// Renter to provider, on a session connection. The first stream carries `Open` (at most
/// [`OPEN_CAP`] bytes: read before the ticket is checked) and right after it `Init` or
/// `InitBlob` (read only once the ticket is good), the `BlobChunk`s if the provider asks, then
/// `Module` if the provider asks; every later stream carries one `Request` or the `Close`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionMsg {
    Open {
        ticket: Box<crate::ticket::Ticket>,
        /// The payment channel the renter pays through; a provider that takes payment
        /// refuses a session without one.
        channel: Option<Box<crate::voucher::ChannelTerms>>,
    },
    /// Instead of `Open`: a cluster member dialling the member after it in the ring, with the
    /// roster the scheduler signed (its member ticket) and the rank it speaks as. Checked like
    /// a ticket before anything else is read; the stream then carries peer frames.
    Peer { roster: Box<crate::cluster::Roster>, from_rank: u32 },
    /// The input of the service's `init` (weights, say).
    Init {
        #[serde(with = "bytes")]
        init_input: Vec<u8>,
    },
    Module {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    Request {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
        /// The voucher for the last receipt, on a paid session.
        voucher: Option<Box<crate::voucher::Voucher>>,
    },
    /// The renter is done: the last voucher, if any, and the receipt of every call served.
    Close { voucher: Option<Box<crate::voucher::Voucher>> },
    /// Instead of `Init`, for an init input over [`INIT_INLINE_MAX`]: its SHA-256 and length.
    /// A provider that keeps it goes on at once; one that does not answers
    /// [`SessionReply::NeedBlob`] and the renter streams it in [`SessionMsg::BlobChunk`]s.
    InitBlob { hash: [u8; 32], len: u64 },
    /// The next at most [`BLOB_CHUNK`] bytes of the blob asked for; the provider refuses the
    /// session when what arrived does not hash to what was announced.
    BlobChunk {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
}

/// Provider to renter, on a session connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionReply {
    NeedModule,
    /// The provider does not keep the init blob announced: stream it.
    NeedBlob,
    /// A cluster member's `Peer` was taken: the stream carries its frames from now on.
    PeerAccepted,
    /// `init` ran; the session serves requests.
    Opened {
        usage: WireUsage,
        /// On a paid session, the newest voucher the provider holds on the channel (the
        /// renter's own signature), so both count on from the same amount.
        newest: Option<Box<crate::voucher::Voucher>>,
        /// On a paid session, the provider signs a receipt (to be answered by a voucher) every
        /// this many calls, and serves no more than this many past the newest voucher; 0 on an
        /// unpaid one.
        vouch_every: u64,
    },
    /// The ticket or the module was refused; nothing ran.
    Refused {
        reason: String,
    },
    Response {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
        usage: WireUsage,
        /// This call's number in the session, 1 for the first: the renter follows the receipt
        /// chain in this order.
        sequence: u64,
        /// The session's cumulative counts and amount due after this call, signed: on every
        /// call of a paid session, every few calls of an unpaid one.
        receipt: Option<Box<crate::receipt::Receipt>>,
        /// A claim made on the channel before this call was served, if the provider's
        /// policy said so.
        claimed: Option<Box<crate::voucher::Claimed>>,
    },
    /// The answer to `Close`: the claim made at the end, if the policy made one, and the
    /// signed receipt of every call served.
    Closed {
        claimed: Option<Box<crate::voucher::Claimed>>,
        receipt: Option<Box<crate::receipt::Receipt>>,
    },
    /// The call ran and the guest's code failed (its own error, a trap, a limit): billed as
    /// any call, in the receipt chain with `message` as its response. After any kind but
    /// [`FailureKind::Guest`] the session is over.
    CallFailed {
        kind: FailureKind,
        limit: Option<String>,
        message: String,
        sequence: u64,
        receipt: Option<Box<crate::receipt::Receipt>>,
        claimed: Option<Box<crate::voucher::Claimed>>,
    },
    /// The request (or `init`) failed; `kind` as in [`Outcome::Failed`], or
    /// [`FailureKind::Payment`] when the provider stops serving for want of a valid voucher.
    /// After any failure but [`FailureKind::Guest`] the session is over.
    Failed {
        kind: FailureKind,
        limit: Option<String>,
        message: String,
    },
    /// The provider has no free session slot (or is shutting down): nothing ran, and the
    /// renter should ask the scheduler for another provider.
    Busy {
        reason: String,
    },
}
