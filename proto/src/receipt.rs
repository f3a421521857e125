//! Usage receipts: the provider signs a session's cumulative counts and the amount due, chained
//! over the digests of every request and response. It signs one every few calls (on a paid
//! session, every call), not necessarily each: every answer carries its sequence number and its
//! usage, so the renter follows the chain and the counts call by call at the cost of two hashes,
//! and a signed receipt must then match what the renter itself added up. What the renter has
//! checked in a signed receipt is what it will pay for; a provider can never sign more than the
//! usage it reported call by call.
//!
//! The signature covers [`Receipt::signing_bytes`], a fixed little-endian layout (not whatever
//! serde emits), so any implementation can check a receipt byte for byte.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::{Keypair, PublicKey, Signature};

/// Domain separation: a receipt signature can never be mistaken for any other signed message.
const DOMAIN: &[u8] = b"wasmgrid-receipt-v1";

/// Cumulative counts of a session, as metered by the provider's host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub inferences: u64,
    pub fuel: u64,
    pub invocations: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    pub gpu_time_ns: u64,
}

impl Counts {
    /// One served call's counts, from the usage its answer reported (one call is one inference,
    /// whatever the usage says).
    pub fn of_call(u: &crate::msg::WireUsage) -> Counts {
        Counts {
            inferences: 1,
            fuel: u.fuel,
            invocations: u.invocations,
            bytes_uploaded: u.bytes_uploaded,
            bytes_downloaded: u.bytes_downloaded,
            gpu_time_ns: u.gpu_time_ns,
        }
    }

    /// These counts plus one call's.
    pub fn plus(&self, call: &Counts) -> Counts {
        Counts {
            inferences: self.inferences.saturating_add(call.inferences),
            fuel: self.fuel.saturating_add(call.fuel),
            invocations: self.invocations.saturating_add(call.invocations),
            bytes_uploaded: self.bytes_uploaded.saturating_add(call.bytes_uploaded),
            bytes_downloaded: self.bytes_downloaded.saturating_add(call.bytes_downloaded),
            gpu_time_ns: self.gpu_time_ns.saturating_add(call.gpu_time_ns),
        }
    }

    /// Appends the six counts as little-endian u64, in declaration order (signing layouts).
    fn write_le(&self, out: &mut Vec<u8>) {
        for v in
            [self.inferences, self.fuel, self.invocations, self.bytes_uploaded, self.bytes_downloaded, self.gpu_time_ns]
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// These counts less `earlier`'s (which they cover).
    fn minus(&self, earlier: &Counts) -> Counts {
        Counts {
            inferences: self.inferences - earlier.inferences,
            fuel: self.fuel - earlier.fuel,
            invocations: self.invocations - earlier.invocations,
            bytes_uploaded: self.bytes_uploaded - earlier.bytes_uploaded,
            bytes_downloaded: self.bytes_downloaded - earlier.bytes_downloaded,
            gpu_time_ns: self.gpu_time_ns - earlier.gpu_time_ns,
        }
    }

    /// Whether no count is below `earlier`'s.
    fn covers(&self, earlier: &Counts) -> bool {
        self.inferences >= earlier.inferences
            && self.fuel >= earlier.fuel
            && self.invocations >= earlier.invocations
            && self.bytes_uploaded >= earlier.bytes_uploaded
            && self.bytes_downloaded >= earlier.bytes_downloaded
            && self.gpu_time_ns >= earlier.gpu_time_ns
    }
}

/// A provider-signed statement of a session's cumulative usage and the amount due for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub session_id: [u8; 16],
    pub provider: PublicKey,
    pub renter: PublicKey,
    /// 1 for the first receipt of a session, then one more each time.
    pub sequence: u64,
    pub counts: Counts,
    /// Agreed price per inference (from the ticket).
    pub price_per_inference: u64,
    /// `counts.inferences * price_per_inference`.
    pub amount_due: u64,
    /// SHA-256 chain over every request and response digest so far.
    pub chain: [u8; 32],
    pub signature: Signature,
}

/// The chain value before any request.
pub fn chain_start(session_id: &[u8; 16]) -> [u8; 32] {
    Sha256::new().chain_update(DOMAIN).chain_update(session_id).finalize().into()
}

/// The chain after one more request and response.
pub fn chain_next(previous: &[u8; 32], request: &[u8], response: &[u8]) -> [u8; 32] {
    chain_link(previous, &Sha256::digest(request).into(), response)
}

/// SHA-256 of a request (what [`Signer::record`] takes).
pub fn request_digest(request: &[u8]) -> [u8; 32] {
    Sha256::digest(request).into()
}

/// [`chain_next`] with the request already digested (the provider hands the bytes on before
/// the response exists).
pub fn chain_link(previous: &[u8; 32], request_digest: &[u8; 32], response: &[u8]) -> [u8; 32] {
    let resp: [u8; 32] = Sha256::digest(response).into();
    Sha256::new().chain_update(previous).chain_update(request_digest).chain_update(resp).finalize().into()
}

impl Receipt {
    /// The fixed layout the provider signs: domain, session id, provider, renter, then
    /// sequence, the six counts, price and amount as little-endian u64, then the chain.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + 16 + 64 + 8 * 10 + 32);
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(&self.session_id);
        out.extend_from_slice(&self.provider.0);
        out.extend_from_slice(&self.renter.0);
        out.extend_from_slice(&self.sequence.to_le_bytes());
        self.counts.write_le(&mut out);
        for v in [self.price_per_inference, self.amount_due] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.chain);
        out
    }

    /// SHA-256 of the signing bytes: what a payment's memo names.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.signing_bytes()).into()
    }
}

/// The provider's side: follows the session call by call and signs its receipt when asked.
#[derive(Debug)]
pub struct Signer {
    session_id: [u8; 16],
    renter: PublicKey,
    price_per_inference: u64,
    sequence: u64,
    counts: Counts,
    chain: [u8; 32],
}

impl Signer {
    pub fn new(session_id: [u8; 16], renter: PublicKey, price_per_inference: u64) -> Signer {
        Signer {
            session_id,
            renter,
            price_per_inference,
            sequence: 0,
            counts: Counts::default(),
            chain: chain_start(&session_id),
        }
    }

    /// Adds one served call (`request_digest` is the SHA-256 of its request); returns its
    /// sequence number, 1 for the first.
    pub fn record(&mut self, call: &Counts, request_digest: &[u8; 32], response: &[u8]) -> u64 {
        self.sequence += 1;
        self.counts = self.counts.plus(call);
        self.chain = chain_link(&self.chain, request_digest, response);
        self.sequence
    }

    /// Calls recorded so far.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The signed receipt of every call recorded so far.
    pub fn sign(&self, keypair: &Keypair) -> Receipt {
        let mut r = Receipt {
            session_id: self.session_id,
            provider: keypair.public(),
            renter: self.renter,
            sequence: self.sequence,
            counts: self.counts,
            price_per_inference: self.price_per_inference,
            amount_due: self.counts.inferences.saturating_mul(self.price_per_inference),
            chain: self.chain,
            signature: Signature([0; 64]),
        };
        r.signature = keypair.sign(&r.signing_bytes());
        r
    }

    /// Records one more call and signs the receipt after it.
    pub fn next(&mut self, keypair: &Keypair, call: &Counts, request: &[u8], response: &[u8]) -> Receipt {
        self.record(call, &Sha256::digest(request).into(), response);
        self.sign(keypair)
    }
}

/// Why the renter refuses a receipt.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the receipt's signature does not verify")]
    BadSignature,
    #[error("the receipt is for another session, provider or renter")]
    WrongParties,
    #[error("receipt {got} arrived where {want} was due")]
    OutOfOrder { want: u64, got: u64 },
    #[error("the receipt's counts went down, or its inference count did not grow by one")]
    Counts,
    #[error("the receipt charges {got} per inference, not the agreed {want}")]
    Price { want: u64, got: u64 },
    #[error("the receipt claims {got} due where its counts make {want}")]
    Amount { want: u64, got: u64 },
    #[error("the receipt's chain does not match the requests and responses exchanged")]
    Chain,
    #[error("the receipt's counts are not the sum of the usage the provider reported call by call")]
    Unreported,
}

/// The renter's side: checks each receipt against the last one and what was exchanged.
#[derive(Debug)]
pub struct Checker {
    session_id: [u8; 16],
    provider: PublicKey,
    renter: PublicKey,
    price_per_inference: u64,
    last: Option<Receipt>,
    chain: [u8; 32],
    /// Calls followed so far, and the sum of their reported counts.
    calls: u64,
    counts: Counts,
}

impl Checker {
    /// The digest and amount due of the receipt the provider would sign now, for every call
    /// followed so far: what a renter vouches for when it closes a session whose newest calls
    /// came without a receipt (the provider signs that receipt at the close).
    pub fn expected(&self) -> ([u8; 32], u64) {
        let r = Receipt {
            session_id: self.session_id,
            provider: self.provider,
            renter: self.renter,
            sequence: self.calls,
            counts: self.counts,
            price_per_inference: self.price_per_inference,
            amount_due: self.counts.inferences.saturating_mul(self.price_per_inference),
            chain: self.chain,
            signature: Signature([0; 64]),
        };
        (r.digest(), r.amount_due)
    }

    pub fn new(session_id: [u8; 16], provider: PublicKey, renter: PublicKey, price_per_inference: u64) -> Checker {
        Checker {
            session_id,
            provider,
            renter,
            price_per_inference,
            last: None,
            chain: chain_start(&session_id),
            calls: 0,
            counts: Counts::default(),
        }
    }

    /// Calls followed so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Follows one more call, answered as number `sequence` with the counts its answer reported.
    /// Calls must be followed in sequence order.
    pub fn call(&mut self, sequence: u64, call: &Counts, request: &[u8], response: &[u8]) -> Result<(), ReceiptError> {
        if sequence != self.calls + 1 {
            return Err(ReceiptError::OutOfOrder { want: self.calls + 1, got: sequence });
        }
        if call.inferences != 1 {
            return Err(ReceiptError::Counts);
        }
        self.calls = sequence;
        self.counts = self.counts.plus(call);
        self.chain = chain_next(&self.chain, request, response);
        Ok(())
    }

    /// Checks a signed receipt of every call followed so far; on success it becomes the last
    /// receipt.
    pub fn signed(&mut self, r: &Receipt) -> Result<(), ReceiptError> {
        if r.session_id != self.session_id || r.provider != self.provider || r.renter != self.renter {
            return Err(ReceiptError::WrongParties);
        }
        if r.sequence != self.calls {
            return Err(ReceiptError::OutOfOrder { want: self.calls, got: r.sequence });
        }
        if r.price_per_inference != self.price_per_inference {
            return Err(ReceiptError::Price { want: self.price_per_inference, got: r.price_per_inference });
        }
        if r.counts != self.counts {
            return Err(ReceiptError::Unreported);
        }
        let due = r
            .counts
            .inferences
            .checked_mul(self.price_per_inference)
            .ok_or(ReceiptError::Amount { want: u64::MAX, got: r.amount_due })?;
        if r.amount_due != due {
            return Err(ReceiptError::Amount { want: due, got: r.amount_due });
        }
        if r.chain != self.chain {
            return Err(ReceiptError::Chain);
        }
        // The cheap checks first: a receipt that fails them costs no signature check.
        if !r.provider.verify(&r.signing_bytes(), &r.signature) {
            return Err(ReceiptError::BadSignature);
        }
        self.last = Some(r.clone());
        Ok(())
    }

    /// The last receipt that passed.
    pub fn last(&self) -> Option<&Receipt> {
        self.last.as_ref()
    }

    /// Follows one call and checks the receipt signed right after it, taking the call's counts
    /// from the receipt (for a party that signs every call and reports no usage of its own).
    pub fn check(&mut self, r: &Receipt, request: &[u8], response: &[u8]) -> Result<(), ReceiptError> {
        if r.sequence != self.calls + 1 {
            return Err(ReceiptError::OutOfOrder { want: self.calls + 1, got: r.sequence });
        }
        let before = self.counts;
        if !r.counts.covers(&before) || r.counts.inferences != before.inferences + 1 {
            return Err(ReceiptError::Counts);
        }
        let call = r.counts.minus(&before);
        let saved = (self.calls, self.counts, self.chain);
        self.call(r.sequence, &call, request, response)?;
        self.signed(r).inspect_err(|_| (self.calls, self.counts, self.chain) = saved)
    }
}

/// Domain separation for batch-job receipts.
const JOB_DOMAIN: &[u8] = b"wasmgrid-job-receipt-v3";

/// A provider-signed statement of a batch job's cumulative GPU time and what it costs at the
/// provider's price per GPU-second (of wall time holding the GPU). A paid job gets one at the
/// end of every slice of its time as it runs (`done` false: no output yet, no counts), each
/// answered by the renter's voucher, and a last one when it ends (`done`): what it produced and
/// used, billed for a failed run as for a succeeded one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReceipt {
    pub job_id: String,
    pub provider: PublicKey,
    pub module_hash: [u8; 32],
    /// 1 for the job's first receipt, then one more each time.
    pub sequence: u64,
    /// The job ended: this is its last receipt.
    pub done: bool,
    /// SHA-256 of the job's output (zeros on a slice's receipt).
    pub output_digest: [u8; 32],
    pub counts: Counts,
    pub wall_time_us: u64,
    pub price_per_gpu_second: u64,
    /// A cluster member's bytes sent to its peers so far, as its provider's daemon counted
    /// them, and the provider's price per GiB of them (0 for a job on one GPU).
    #[serde(default)]
    pub net_bytes: u64,
    #[serde(default)]
    pub price_per_net_gib: u64,
    /// `wall_time_us * price_per_gpu_second / 1e6 + net_bytes * price_per_net_gib / 2^30`,
    /// each rounded up.
    pub amount_due: u64,
    pub signature: Signature,
}

/// What a job receipt bills: GPU time and, for a cluster member, bytes sent to its peers, each
/// at the provider's price.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobBill {
    pub wall_time_us: u64,
    pub price_per_gpu_second: u64,
    pub net_bytes: u64,
    pub price_per_net_gib: u64,
}

impl JobBill {
    /// GPU time alone.
    pub fn time(wall_time_us: u64, price_per_gpu_second: u64) -> JobBill {
        JobBill { wall_time_us, price_per_gpu_second, ..JobBill::default() }
    }

    /// What it costs: each part rounded up to a whole unit, the sum saturating.
    pub fn amount(&self) -> u64 {
        let net = u128::from(self.net_bytes) * u128::from(self.price_per_net_gib);
        let net = u64::try_from(net.div_ceil(1 << 30)).unwrap_or(u64::MAX);
        JobReceipt::amount(self.wall_time_us, self.price_per_gpu_second).saturating_add(net)
    }
}

/// Why a job receipt is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobReceiptError {
    #[error("the job receipt's signature does not verify")]
    BadSignature,
    #[error("the job receipt is for job {got}, not {want}")]
    WrongJob { want: String, got: String },
    #[error("the job receipt is signed by another provider than the one that ran the job")]
    WrongProvider,
    #[error("the job receipt's output digest does not match the output")]
    Output,
    #[error("the job receipt charges {got} where its time and price make {want}")]
    Amount { want: u64, got: u64 },
    #[error("the job receipt bills {billed_us} us of wall time, more than the {most_us} us {bound}")]
    OverTime { billed_us: u64, most_us: u64, bound: &'static str },
    #[error("the job receipt does not follow the one before it: {0}")]
    OutOfOrder(&'static str),
    #[error("the job receipt charges {got} per GPU-second, not the provider's price of {want}")]
    Price { want: u64, got: u64 },
    #[error("the job receipt charges {got} per GiB sent to peers, not the provider's price of {want}")]
    NetPrice { want: u64, got: u64 },
    #[error("the job receipt bills {billed} bytes sent to peers, more than the {most} {bound}")]
    OverNet { billed: u64, most: u64, bound: &'static str },
}

/// Slack on the time the scheduler saw a job run, for its millisecond clock: a receipt may bill
/// up to this much more than the difference of the two readings.
pub const OBSERVED_SLACK_US: u64 = 2_000;

impl JobReceipt {
    /// What `wall_time_us` costs at `price_per_gpu_second`, rounded up to a whole unit.
    pub fn amount(wall_time_us: u64, price_per_gpu_second: u64) -> u64 {
        let units = u128::from(wall_time_us) * u128::from(price_per_gpu_second);
        u64::try_from(units.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    /// Signs the last receipt of a job (`sequence`: one more than its slices' receipts).
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        keypair: &Keypair,
        job_id: &str,
        module_hash: [u8; 32],
        sequence: u64,
        output: &[u8],
        counts: Counts,
        wall_time_us: u64,
        price_per_gpu_second: u64,
    ) -> JobReceipt {
        let bill = JobBill::time(wall_time_us, price_per_gpu_second);
        JobReceipt::sign_billed(keypair, job_id, module_hash, sequence, output, counts, bill)
    }

    /// Signs the last receipt of a job for `bill` (GPU time, and bytes sent to peers).
    pub fn sign_billed(
        keypair: &Keypair,
        job_id: &str,
        module_hash: [u8; 32],
        sequence: u64,
        output: &[u8],
        counts: Counts,
        bill: JobBill,
    ) -> JobReceipt {
        let output_digest = Sha256::digest(output).into();
        JobReceipt::signed(keypair, job_id, module_hash, (sequence, true), output_digest, counts, bill)
    }

    fn signed(
        keypair: &Keypair,
        job_id: &str,
        module_hash: [u8; 32],
        (sequence, done): (u64, bool),
        output_digest: [u8; 32],
        counts: Counts,
        bill: JobBill,
    ) -> JobReceipt {
        let mut r = JobReceipt {
            job_id: job_id.to_string(),
            provider: keypair.public(),
            module_hash,
            sequence,
            done,
            output_digest,
            counts,
            wall_time_us: bill.wall_time_us,
            price_per_gpu_second: bill.price_per_gpu_second,
            net_bytes: bill.net_bytes,
            price_per_net_gib: bill.price_per_net_gib,
            amount_due: bill.amount(),
            signature: Signature([0; 64]),
        };
        r.signature = keypair.sign(&r.signing_bytes());
        r
    }

    /// Signs the receipt of a running job's first `wall_time_us` of GPU time (its `sequence`th
    /// slice).
    pub fn sign_slice(
        keypair: &Keypair,
        job_id: &str,
        module_hash: [u8; 32],
        sequence: u64,
        wall_time_us: u64,
        price_per_gpu_second: u64,
    ) -> JobReceipt {
        let bill = JobBill::time(wall_time_us, price_per_gpu_second);
        JobReceipt::sign_slice_billed(keypair, job_id, module_hash, sequence, bill)
    }

    /// Signs the receipt of a running job's `sequence`th slice for `bill` so far.
    pub fn sign_slice_billed(
        keypair: &Keypair,
        job_id: &str,
        module_hash: [u8; 32],
        sequence: u64,
        bill: JobBill,
    ) -> JobReceipt {
        JobReceipt::signed(keypair, job_id, module_hash, (sequence, false), [0; 32], Counts::default(), bill)
    }

    /// What this receipt bills.
    pub fn bill(&self) -> JobBill {
        JobBill {
            wall_time_us: self.wall_time_us,
            price_per_gpu_second: self.price_per_gpu_second,
            net_bytes: self.net_bytes,
            price_per_net_gib: self.price_per_net_gib,
        }
    }

    /// Checks that this receipt may follow `earlier` of the same job: a later sequence, the same
    /// module and price, no less time, and nothing after the last receipt.
    pub fn follows(&self, earlier: &JobReceipt) -> Result<(), JobReceiptError> {
        if earlier.done {
            return Err(JobReceiptError::OutOfOrder("the job's last receipt came before it"));
        }
        if self.job_id != earlier.job_id || self.module_hash != earlier.module_hash {
            return Err(JobReceiptError::OutOfOrder("it is for another job or module"));
        }
        if self.sequence <= earlier.sequence {
            return Err(JobReceiptError::OutOfOrder("its sequence number does not grow"));
        }
        if self.price_per_gpu_second != earlier.price_per_gpu_second
            || self.price_per_net_gib != earlier.price_per_net_gib
        {
            return Err(JobReceiptError::OutOfOrder("its price changed"));
        }
        if self.wall_time_us < earlier.wall_time_us {
            return Err(JobReceiptError::OutOfOrder("it bills less time than the one before"));
        }
        if self.net_bytes < earlier.net_bytes {
            return Err(JobReceiptError::OutOfOrder("it bills fewer bytes than the one before"));
        }
        Ok(())
    }

    /// The fixed layout signed: domain, the job id's length (u32 LE) and bytes, provider,
    /// module hash, sequence (u64 LE), done (one byte), output digest, the six counts, wall
    /// time, price per GPU-second, net bytes, price per net GiB and amount (u64 LE).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(JOB_DOMAIN.len() + 4 + self.job_id.len() + 105 + 8 * 11);
        out.extend_from_slice(JOB_DOMAIN);
        out.extend_from_slice(&(self.job_id.len() as u32).to_le_bytes());
        out.extend_from_slice(self.job_id.as_bytes());
        out.extend_from_slice(&self.provider.0);
        out.extend_from_slice(&self.module_hash);
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.push(u8::from(self.done));
        out.extend_from_slice(&self.output_digest);
        self.counts.write_le(&mut out);
        for v in [self.wall_time_us, self.price_per_gpu_second, self.net_bytes, self.price_per_net_gib, self.amount_due]
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// SHA-256 of the signing bytes: what a payment's memo names.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.signing_bytes()).into()
    }

    /// Checks the receipt for job `job_id` run by `provider` with `output`.
    pub fn check(&self, job_id: &str, provider: &PublicKey, output: &[u8]) -> Result<(), JobReceiptError> {
        self.check_terms(job_id, provider)?;
        if self.output_digest != <[u8; 32]>::from(Sha256::digest(output)) {
            return Err(JobReceiptError::Output);
        }
        Ok(())
    }

    /// Checks the billed wall time against the most the job could have run: its wall-time limit
    /// (`0`: none given) and the time the scheduler saw it running (from its assignment to its
    /// result, in the scheduler's milliseconds; `None` when not known). A provider never bills
    /// more than either.
    pub fn check_time(&self, limit_ms: u64, observed_ms: Option<u64>) -> Result<(), JobReceiptError> {
        if limit_ms > 0 && self.wall_time_us > limit_ms.saturating_mul(1_000) {
            let most_us = limit_ms.saturating_mul(1_000);
            return Err(JobReceiptError::OverTime {
                billed_us: self.wall_time_us,
                most_us,
                bound: "the job's wall-time limit",
            });
        }
        if let Some(ms) = observed_ms {
            let most_us = ms.saturating_mul(1_000).saturating_add(OBSERVED_SLACK_US);
            if self.wall_time_us > most_us {
                return Err(JobReceiptError::OverTime {
                    billed_us: self.wall_time_us,
                    most_us,
                    bound: "the scheduler saw the job run",
                });
            }
        }
        Ok(())
    }

    /// Checks the billed bytes sent to peers against the most the job could have sent: for a
    /// cluster member, its net-bytes limit (`Some(0)`: none given) and, on a last receipt, what
    /// its provider reported the job sent (`reported`); a job that is no cluster's member
    /// (`None`) has no peers and is billed no bytes at all. A provider never bills more.
    pub fn check_net(&self, member_limit: Option<u64>, reported: Option<u64>) -> Result<(), JobReceiptError> {
        let Some(limit_bytes) = member_limit else {
            if self.net_bytes > 0 {
                let bound = "a job that is no cluster's member may bill";
                return Err(JobReceiptError::OverNet { billed: self.net_bytes, most: 0, bound });
            }
            return Ok(());
        };
        if limit_bytes > 0 && self.net_bytes > limit_bytes {
            let bound = "the job's net-bytes limit";
            return Err(JobReceiptError::OverNet { billed: self.net_bytes, most: limit_bytes, bound });
        }
        match reported {
            Some(most) if self.net_bytes > most => {
                let bound = "its provider reported the job sent";
                Err(JobReceiptError::OverNet { billed: self.net_bytes, most, bound })
            }
            _ => Ok(()),
        }
    }

    /// Checks everything but the output (which a renter sees only once it paid).
    pub fn check_terms(&self, job_id: &str, provider: &PublicKey) -> Result<(), JobReceiptError> {
        if !self.provider.verify(&self.signing_bytes(), &self.signature) {
            return Err(JobReceiptError::BadSignature);
        }
        if self.job_id != job_id {
            return Err(JobReceiptError::WrongJob { want: job_id.to_string(), got: self.job_id.clone() });
        }
        if self.provider != *provider {
            return Err(JobReceiptError::WrongProvider);
        }
        let want = self.bill().amount();
        if self.amount_due != want {
            return Err(JobReceiptError::Amount { want, got: self.amount_due });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Counts {
        Counts { inferences: 1, fuel: 100, invocations: 64, bytes_uploaded: 8, bytes_downloaded: 4, gpu_time_ns: 1000 }
    }

    fn setup() -> (Keypair, Keypair, Signer, Checker) {
        let (provider, renter) = (Keypair::generate(), Keypair::generate());
        let signer = Signer::new([3; 16], renter.public(), 5);
        let checker = Checker::new([3; 16], provider.public(), renter.public(), 5);
        (provider, renter, signer, checker)
    }

    #[test]
    fn a_session_of_receipts_checks_and_amounts_add_up() {
        let (provider, _, mut signer, mut checker) = setup();
        for i in 0..10u8 {
            let r = signer.next(&provider, &call(), &[i], &[i, i]);
            checker.check(&r, &[i], &[i, i]).unwrap();
        }
        let last = checker.last().unwrap();
        assert_eq!((last.sequence, last.counts.inferences, last.amount_due), (10, 10, 50));
        assert_eq!(last.counts.fuel, 1000);
    }

    #[test]
    fn a_receipt_signed_every_few_calls_covers_them_all_and_only_what_was_reported() {
        let (provider, _, mut signer, mut checker) = setup();
        for i in 1..=20u8 {
            let seq = signer.record(&call(), &Sha256::digest([i]).into(), &[i, i]);
            checker.call(seq, &call(), &[i], &[i, i]).unwrap();
            if i % 8 == 0 {
                checker.signed(&signer.sign(&provider)).unwrap();
            }
        }
        assert_eq!(checker.last().map(|r| r.sequence), Some(16));
        let last = signer.sign(&provider);
        checker.signed(&last).unwrap();
        assert_eq!((last.sequence, last.amount_due, last.counts.fuel), (20, 100, 2000));
        assert_eq!(checker.signed(&last), Ok(()), "the same receipt again is the same promise");

        // A receipt of more usage than the calls reported, even signed, is refused.
        let mut signer2 = Signer::new([3; 16], last.renter, 5);
        let mut checker2 = Checker::new([3; 16], provider.public(), last.renter, 5);
        let heavy = Counts { gpu_time_ns: 9_999, ..call() };
        let seq = signer2.record(&heavy, &Sha256::digest(b"q").into(), b"r");
        checker2.call(seq, &call(), b"q", b"r").unwrap();
        assert_eq!(checker2.signed(&signer2.sign(&provider)), Err(ReceiptError::Unreported));

        // Calls followed out of order, or a receipt for calls not yet followed, are refused.
        assert_eq!(checker2.call(3, &call(), b"x", b"y"), Err(ReceiptError::OutOfOrder { want: 2, got: 3 }));
        let two = Counts { inferences: 2, ..call() };
        assert_eq!(checker2.call(2, &two, b"x", b"y"), Err(ReceiptError::Counts), "one call is one inference");
        let _ = signer2.record(&call(), &Sha256::digest(b"x").into(), b"y");
        assert_eq!(checker2.signed(&signer2.sign(&provider)), Err(ReceiptError::OutOfOrder { want: 1, got: 2 }));
        // A response the renter saw differently breaks the chain.
        checker2.call(2, &call(), b"x", b"not y").unwrap();
        let mut honest = Signer::new([3; 16], last.renter, 5);
        honest.record(&call(), &Sha256::digest(b"q").into(), b"r");
        honest.record(&call(), &Sha256::digest(b"x").into(), b"y");
        let mut c3 = Checker::new([3; 16], provider.public(), last.renter, 5);
        c3.call(1, &call(), b"q", b"r").unwrap();
        c3.call(2, &call(), b"x", b"not y").unwrap();
        assert_eq!(c3.signed(&honest.sign(&provider)), Err(ReceiptError::Chain));
    }

    #[test]
    fn tampered_replayed_and_foreign_receipts_are_refused() {
        let (provider, renter, mut signer, mut checker) = setup();
        let first = signer.next(&provider, &call(), b"a", b"b");

        let mut more = first.clone();
        more.amount_due = 1;
        assert_eq!(checker.check(&more, b"a", b"b"), Err(ReceiptError::Amount { want: 5, got: 1 }));
        let mut forged = first.clone();
        forged.signature = Signature([7; 64]);
        assert_eq!(checker.check(&forged, b"a", b"b"), Err(ReceiptError::BadSignature));

        let mut resigned = first.clone();
        resigned.amount_due = 7;
        resigned.signature = provider.sign(&resigned.signing_bytes());
        assert_eq!(checker.check(&resigned, b"a", b"b"), Err(ReceiptError::Amount { want: 5, got: 7 }));

        let mut cheap = first.clone();
        cheap.price_per_inference = 9;
        cheap.amount_due = 9;
        cheap.signature = provider.sign(&cheap.signing_bytes());
        assert_eq!(checker.check(&cheap, b"a", b"b"), Err(ReceiptError::Price { want: 5, got: 9 }));

        assert_eq!(
            checker.check(&first, b"a", b"tampered"),
            Err(ReceiptError::Chain),
            "a changed response breaks the chain"
        );

        let mut other = Signer::new([4; 16], renter.public(), 5);
        let foreign = other.next(&provider, &call(), b"a", b"b");
        assert_eq!(checker.check(&foreign, b"a", b"b"), Err(ReceiptError::WrongParties));

        checker.check(&first, b"a", b"b").unwrap();
        assert_eq!(checker.check(&first, b"a", b"b"), Err(ReceiptError::OutOfOrder { want: 2, got: 1 }), "no replay");
        let _second = signer.next(&provider, &call(), b"c", b"d");
        let third = signer.next(&provider, &call(), b"e", b"f");
        assert_eq!(checker.check(&third, b"e", b"f"), Err(ReceiptError::OutOfOrder { want: 2, got: 3 }));
    }

    #[test]
    fn the_signing_layout_is_fixed() {
        let r = Receipt {
            session_id: [1; 16],
            provider: PublicKey([2; 32]),
            renter: PublicKey([3; 32]),
            sequence: 4,
            counts: Counts {
                inferences: 5,
                fuel: 6,
                invocations: 7,
                bytes_uploaded: 8,
                bytes_downloaded: 9,
                gpu_time_ns: 10,
            },
            price_per_inference: 11,
            amount_due: 55,
            chain: [12; 32],
            signature: Signature([0; 64]),
        };
        let b = r.signing_bytes();
        assert_eq!(b.len(), DOMAIN.len() + 16 + 32 + 32 + 9 * 8 + 32);
        assert!(b.starts_with(DOMAIN));
        let at = DOMAIN.len() + 16 + 64;
        assert_eq!(&b[at..at + 8], &4u64.to_le_bytes());
        assert_eq!(&b[b.len() - 40..b.len() - 32], &55u64.to_le_bytes());
        assert_eq!(&b[b.len() - 32..], &[12; 32]);
    }

    #[test]
    fn a_renter_pays_no_job_receipt_billing_more_time_than_its_limit_or_than_the_scheduler_saw() {
        let provider = Keypair::generate();
        let r = JobReceipt::sign(&provider, "job-1", [1; 32], 1, b"out", call(), 90_000, 3);
        assert_eq!(r.check_time(100, Some(95)), Ok(()));
        assert_eq!(r.check_time(0, None), Ok(()), "no limit given, no time seen");
        assert!(matches!(r.check_time(80, None), Err(JobReceiptError::OverTime { most_us: 80_000, .. })));
        assert!(matches!(r.check_time(0, Some(50)), Err(JobReceiptError::OverTime { .. })));
        // The scheduler's clock reads milliseconds: a little slack, no more.
        assert_eq!(r.check_time(0, Some(88)), Ok(()));
        assert!(r.check_time(0, Some(87)).is_err());
    }

    #[test]
    fn a_jobs_receipts_follow_each_other_and_none_follows_its_last() {
        let provider = Keypair::generate();
        let one = JobReceipt::sign_slice(&provider, "job-1", [1; 32], 1, 100_000, 3);
        let two = JobReceipt::sign_slice(&provider, "job-1", [1; 32], 2, 200_000, 3);
        let last = JobReceipt::sign(&provider, "job-1", [1; 32], 3, b"out", call(), 250_000, 3);
        one.check_terms("job-1", &provider.public()).unwrap();
        assert_eq!(one.amount_due, 1);
        assert_eq!(two.follows(&one), Ok(()));
        assert_eq!(last.follows(&two), Ok(()));
        assert!(one.follows(&two).is_err(), "sequence must grow");
        let less = JobReceipt::sign_slice(&provider, "job-1", [1; 32], 3, 150_000, 3);
        assert!(less.follows(&two).is_err(), "time never shrinks");
        let dearer = JobReceipt::sign_slice(&provider, "job-1", [1; 32], 3, 300_000, 4);
        assert!(dearer.follows(&two).is_err(), "the price is fixed");
        let other = JobReceipt::sign_slice(&provider, "job-2", [1; 32], 3, 300_000, 3);
        assert!(other.follows(&two).is_err());
        let after = JobReceipt::sign(&provider, "job-1", [1; 32], 4, b"out", call(), 300_000, 3);
        assert!(after.follows(&last).is_err(), "nothing after the last");
        // `done` and the sequence are signed.
        let mut flipped = two.clone();
        flipped.done = true;
        assert_eq!(flipped.check_terms("job-1", &provider.public()), Err(JobReceiptError::BadSignature));
    }

    #[test]
    fn job_receipts_check_and_refuse_tampering() {
        let provider = Keypair::generate();
        let r = JobReceipt::sign(&provider, "job-000007", [1; 32], 1, b"out", call(), 2_500_001, 3);
        assert_eq!(r.amount_due, 8, "2.500001 s at 3 per second, rounded up");
        r.check("job-000007", &provider.public(), b"out").unwrap();
        assert_eq!(
            r.check("job-000008", &provider.public(), b"out").unwrap_err(),
            JobReceiptError::WrongJob { want: "job-000008".into(), got: "job-000007".into() }
        );
        assert_eq!(r.check("job-000007", &Keypair::generate().public(), b"out"), Err(JobReceiptError::WrongProvider));
        assert_eq!(r.check("job-000007", &provider.public(), b"other"), Err(JobReceiptError::Output));
        let mut more = r.clone();
        more.amount_due = 80;
        assert_eq!(more.check("job-000007", &provider.public(), b"out"), Err(JobReceiptError::BadSignature));
        assert_eq!(JobReceipt::amount(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(JobReceipt::amount(0, 5), 0);
    }

    #[test]
    fn a_members_receipt_bills_its_bytes_at_its_price_and_never_past_its_limit_or_its_count() {
        let provider = Keypair::generate();
        let bill =
            JobBill { wall_time_us: 1_000_000, price_per_gpu_second: 3, net_bytes: 3 << 29, price_per_net_gib: 10 };
        let slice = JobReceipt::sign_slice_billed(&provider, "job-1", [1; 32], 1, bill);
        assert_eq!(slice.amount_due, 3 + 15, "1 s at 3, and 1.5 GiB at 10 per GiB");
        slice.check_terms("job-1", &provider.public()).unwrap();
        let last = JobReceipt::sign_billed(
            &provider,
            "job-1",
            [1; 32],
            2,
            b"out",
            call(),
            JobBill { net_bytes: 1 << 31, ..bill },
        );
        assert_eq!(last.follows(&slice), Ok(()));
        assert_eq!(last.check_net(Some(0), Some(1 << 31)), Ok(()));
        assert!(matches!(last.check_net(Some(1 << 30), None), Err(JobReceiptError::OverNet { .. })), "over the limit");
        assert!(
            matches!(last.check_net(Some(0), Some(100)), Err(JobReceiptError::OverNet { .. })),
            "over its own count"
        );
        assert!(
            matches!(last.check_net(None, Some(1 << 31)), Err(JobReceiptError::OverNet { most: 0, .. })),
            "a job that is no cluster's member bills no bytes, whatever its provider reports"
        );
        let none = JobReceipt::sign_slice_billed(&provider, "job-1", [1; 32], 3, JobBill { net_bytes: 0, ..bill });
        assert_eq!(none.check_net(None, None), Ok(()));
        // Bytes never shrink, the price per GiB never changes, and both are signed.
        let fewer = JobReceipt::sign_slice_billed(&provider, "job-1", [1; 32], 2, JobBill { net_bytes: 1, ..bill });
        assert!(fewer.follows(&slice).is_err());
        let dearer =
            JobReceipt::sign_slice_billed(&provider, "job-1", [1; 32], 2, JobBill { price_per_net_gib: 11, ..bill });
        assert!(dearer.follows(&slice).is_err());
        let mut more = slice.clone();
        more.net_bytes += 1;
        assert_eq!(more.check_terms("job-1", &provider.public()), Err(JobReceiptError::BadSignature));
        // One byte at any price costs a whole unit; no price, nothing.
        assert_eq!(JobBill { net_bytes: 1, price_per_net_gib: 1, ..JobBill::default() }.amount(), 1);
        assert_eq!(JobBill { net_bytes: u64::MAX, ..JobBill::default() }.amount(), 0);
        assert_eq!(JobBill { net_bytes: u64::MAX, price_per_net_gib: u64::MAX, ..bill }.amount(), u64::MAX);
    }
}
