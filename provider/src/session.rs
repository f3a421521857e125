//! The inference-session protocol between the daemon, one worker, the renter and the payment
//! code, as a sans-IO core: messages and `now` in, actions out. `daemon::serve_session` only
//! pumps it (the renter's streams, the worker's frames, payment steps on a blocking thread, a
//! timer); everything the daemon decides about a session (what it trusts of the worker, when it
//! kills it, what each call is billed, when it signs a receipt, when the session is over) is
//! here, and tested without processes or sockets.
//!
//! One call at a time: the pump hands the flow a request only once the previous one has been
//! answered, so the receipt chain follows the order the instance served the calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::msg::{FailureKind, JobLimits, SessionMsg, SessionReply};
use proto::receipt::{Counts, Receipt, Signer};
use proto::voucher::{Claimed, Voucher};
use proto::worker::{FromWorker, ToWorker, WorkerFailure};
use proto::{Keypair, PublicKey};
use sha2::{Digest, Sha256};

use crate::flow::{KILL_GRACE, smaller, variant};
use crate::pool::WorkerDied;

/// What a session is: from its ticket, and what the daemon decided before starting it.
#[derive(Clone, Debug)]
pub(crate) struct SessionTerms {
    pub session_id: [u8; 16],
    pub renter: PublicKey,
    pub price_per_inference: u64,
    pub module_hash: [u8; 32],
    pub limits: JobLimits,
    /// Sign a receipt after every this many calls (on a paid session, each receipt is answered
    /// by a voucher: at most this many calls go unvouched).
    pub sign_every: u64,
    /// Whether the session is paid (through a payment channel).
    pub paid: bool,
    /// On a paid session, the newest voucher the provider holds on its channel, handed to the
    /// renter when the session opens.
    pub newest: Option<Box<Voucher>>,
}

/// A payment step, run by the pump (it may talk to the chain) and answered with
/// [`SessionFlow::on_paid`].
#[derive(Debug, PartialEq)]
pub(crate) enum PayStep {
    /// May this request be served, with this voucher for the newest receipt, this many calls
    /// served so far?
    Before(Option<Box<Voucher>>, u64),
    /// This call was served, with this receipt; claim if the policy says so.
    After(Box<Receipt>),
    /// The renter closes, with its last voucher, which answers the receipt of every call
    /// served (signed here, before the step).
    Close(Option<Box<Voucher>>, Option<Box<Receipt>>),
    /// The renter went: claim if the policy claims at the end.
    End,
}

/// Why a request is not served for want of payment.
#[derive(Debug, PartialEq)]
pub(crate) enum Unpaid {
    /// Never again on this session (a bad voucher, the deposit spent, a close started).
    Stopped(String),
}

/// The answer to a [`PayStep`].
#[derive(Debug)]
pub(crate) enum Paid {
    Before(Result<(), Unpaid>),
    After(Option<Claimed>),
    Close(Result<Option<Claimed>, String>),
    End,
}

/// How the pump hands the worker back.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Handback {
    /// The worker says it is idle already (its service never started): reuse it.
    Idle,
    /// End its service; reuse it if it comes back idle in time.
    EndService,
    /// Kill it: its instance may have left anything behind.
    Kill,
}

/// What the pump must do next.
#[derive(Debug, PartialEq)]
pub(crate) enum SessionAction {
    ToWorker(ToWorker),
    /// Ask the renter for the module on the opening stream; answer with
    /// [`SessionFlow::on_module`].
    FetchModule,
    Pay(PayStep),
    /// The answer to the renter's current stream (the opening one, or a request's). When the
    /// flow is done after an answer to the opening stream, the session was refused.
    Reply(SessionReply),
    /// Tell the scheduler where the session stands (the pump adds what payment knows).
    Report {
        receipt: Option<Box<Receipt>>,
        closed: bool,
    },
    /// The worker is done with this session.
    Retire(Handback),
}

#[derive(Debug)]
enum Phase {
    /// The worker is running `init` (or waiting for the module).
    Starting {
        fetched: bool,
        deadline: Instant,
    },
    /// Between calls.
    Ready,
    /// Waiting for [`Paid::Before`] to serve this request.
    Paying {
        request: Vec<u8>,
    },
    /// The worker is serving a call.
    Inferring {
        request_digest: [u8; 32],
        deadline: Instant,
    },
    /// Waiting for [`Paid::After`] to send this answer.
    Settling {
        reply: SessionReply,
    },
    /// Waiting for [`Paid::Close`].
    Closing,
    /// Waiting for [`Paid::End`].
    Ending,
    Done,
}

/// One session in one worker.
#[derive(Debug)]
pub(crate) struct SessionFlow {
    phase: Phase,
    module_hash: [u8; 32],
    /// The session's wall time per call (and for `init`): the smaller of its limit and the
    /// worker's most.
    wall: Duration,
    signer: Signer,
    keypair: Arc<Keypair>,
    sign_every: u64,
    paid: bool,
    newest: Option<Box<Voucher>>,
    /// The newest receipt signed.
    last_signed: Option<Box<Receipt>>,
    /// Why the session stopped serving, once it has.
    over: Option<(FailureKind, String)>,
    /// Whether this session still holds its worker.
    worker: bool,
}

/// Whether a failure of a call means the guest's code ran (and the call is billed): its own
/// error, a trap, a limit it ran into. A crash of the worker or a host failure is the
/// provider's, and not billed.
fn billed(kind: FailureKind) -> bool {
    matches!(kind, FailureKind::Guest | FailureKind::Trap | FailureKind::Limit)
}

fn failed(f: WorkerFailure) -> SessionReply {
    SessionReply::Failed { kind: f.kind, limit: f.limit, message: f.message }
}

/// A session's init input: its bytes, or a file of the blob cache the worker reads.
#[derive(Debug)]
pub(crate) enum Init {
    Bytes(Vec<u8>),
    Blob(proto::worker::InitBlob),
}

impl SessionFlow {
    /// Starts the session's service in its worker.
    pub(crate) fn start(
        terms: SessionTerms,
        init: Init,
        defaults: &JobLimits,
        keypair: Arc<Keypair>,
        now: Instant,
    ) -> (SessionFlow, Vec<SessionAction>) {
        let wall = Duration::from_millis(smaller(terms.limits.wall_time_ms, defaults.wall_time_ms));
        let paid = terms.paid;
        let flow = SessionFlow {
            phase: Phase::Starting { fetched: false, deadline: now + wall + KILL_GRACE },
            module_hash: terms.module_hash,
            wall,
            signer: Signer::new(terms.session_id, terms.renter, terms.price_per_inference),
            keypair,
            sign_every: terms.sign_every.max(1),
            paid,
            newest: terms.newest,
            last_signed: None,
            over: None,
            worker: true,
        };
        let (init_input, init_blob) = match init {
            Init::Bytes(bytes) => (bytes, None),
            Init::Blob(blob) => (Vec::new(), Some(blob)),
        };
        let start = ToWorker::Service { module_hash: terms.module_hash, init_input, limits: terms.limits, init_blob };
        (flow, vec![SessionAction::ToWorker(start)])
    }

    /// When the worker is killed if the call (or `init`) it is running has not ended.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Starting { deadline, .. } | Phase::Inferring { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// Whether the flow waits for the worker's next frame.
    pub(crate) fn awaits_worker(&self) -> bool {
        self.deadline().is_some()
    }

    pub(crate) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The session stopped serving (it goes on only to answer a close).
    #[cfg(test)]
    fn is_over(&self) -> bool {
        self.over.is_some()
    }

    /// The receipt of every call served, signed (signing it now if the newest signed one is
    /// older); `None` before the first call.
    fn final_receipt(&mut self) -> Option<Box<Receipt>> {
        if self.signer.sequence() == 0 {
            return None;
        }
        if self.last_signed.as_ref().map(|r| r.sequence) != Some(self.signer.sequence()) {
            self.last_signed = Some(Box::new(self.signer.sign(&self.keypair)));
        }
        self.last_signed.clone()
    }

    /// The instance is over: the worker is killed and the session answers nothing but a close.
    fn lost(&mut self, f: WorkerFailure) -> Vec<SessionAction> {
        let starting = matches!(self.phase, Phase::Starting { .. });
        self.over = Some((f.kind, f.message.clone()));
        self.worker = false;
        let reply = if starting {
            self.phase = Phase::Done;
            if f.kind == FailureKind::Load { SessionReply::Refused { reason: f.message } } else { failed(f) }
        } else {
            self.phase = Phase::Ready;
            failed(f)
        };
        vec![SessionAction::Retire(Handback::Kill), SessionAction::Reply(reply)]
    }

    /// The session stops serving for `message`; its worker stays until the session ends.
    fn stop(&mut self, kind: FailureKind, message: String) -> Vec<SessionAction> {
        log::info!("session stopped: {message}");
        self.over = Some((kind, message.clone()));
        self.phase = Phase::Ready;
        vec![SessionAction::Reply(SessionReply::Failed { kind, limit: None, message })]
    }

    fn broke_protocol(&mut self, m: &FromWorker) -> Vec<SessionAction> {
        let during =
            if matches!(self.phase, Phase::Starting { .. }) { "while starting a service" } else { "for an inference" };
        let message = format!("the worker broke the protocol ({} {during})", variant(m));
        self.lost(WorkerFailure { kind: FailureKind::Crash, limit: None, message })
    }

    /// A frame from the worker (or its death).
    pub(crate) fn on_worker(&mut self, msg: Result<FromWorker, WorkerDied>, _now: Instant) -> Vec<SessionAction> {
        if !self.awaits_worker() {
            return Vec::new();
        }
        let msg = match msg {
            Ok(m) => m,
            Err(d) => return self.lost(WorkerFailure { kind: d.kind, limit: None, message: d.message }),
        };
        match (&mut self.phase, msg) {
            (_, FromWorker::Fatal { reason }) => {
                self.lost(WorkerFailure { kind: FailureKind::Host, limit: None, message: reason })
            }
            (Phase::Starting { .. }, FromWorker::Accepted) => Vec::new(),
            (Phase::Starting { fetched, .. }, FromWorker::NeedModule { module_hash })
                if !*fetched && module_hash == self.module_hash =>
            {
                *fetched = true;
                vec![SessionAction::FetchModule]
            }
            (Phase::Starting { .. }, FromWorker::ServiceStarted { result: Ok(usage), .. }) => {
                self.phase = Phase::Ready;
                let vouch_every = if self.paid { self.sign_every } else { 0 };
                vec![SessionAction::Reply(SessionReply::Opened { usage, newest: self.newest.take(), vouch_every })]
            }
            (Phase::Starting { .. }, FromWorker::ServiceStarted { result: Err(f), reusable, .. }) => {
                self.phase = Phase::Done;
                self.worker = false;
                let back = if reusable { Handback::Idle } else { Handback::Kill };
                let reply =
                    if f.kind == FailureKind::Load { SessionReply::Refused { reason: f.message } } else { failed(f) };
                vec![SessionAction::Retire(back), SessionAction::Reply(reply)]
            }
            (Phase::Inferring { request_digest, .. }, FromWorker::Inferred { result: Ok(inf) }) => {
                let digest = *request_digest;
                self.served(digest, inf)
            }
            // The guest's code ran and failed: billed as any call (its message is what it
            // returned), and the session goes on after the guest's own error only.
            (Phase::Inferring { request_digest, .. }, FromWorker::Inferred { result: Err(f) }) if billed(f.kind) => {
                let digest = *request_digest;
                self.failed_call(digest, f)
            }
            (Phase::Inferring { .. }, FromWorker::Inferred { result: Err(f) }) => self.lost(f),
            (_, other) => self.broke_protocol(&other),
        }
    }

    /// A call was served: meter it, sign when due, claim on a paid session if due.
    fn served(&mut self, request_digest: [u8; 32], inf: proto::worker::Inferred) -> Vec<SessionAction> {
        let sequence = self.signer.record(&Counts::of_call(&inf.usage), &request_digest, &inf.response);
        let receipt = self.receipt_due(sequence);
        let reply = SessionReply::Response { bytes: inf.response, usage: inf.usage, sequence, receipt, claimed: None };
        self.answer(reply, Vec::new())
    }

    /// A call whose guest code ran and failed: metered as one inference (the worker reports no
    /// usage for it) with the failure's message as its response; an instance-ending failure
    /// then kills the worker. Nothing a kernel returns, a failure message included, is free.
    fn failed_call(&mut self, request_digest: [u8; 32], f: WorkerFailure) -> Vec<SessionAction> {
        let call = Counts { inferences: 1, ..Counts::default() };
        let sequence = self.signer.record(&call, &request_digest, f.message.as_bytes());
        let receipt = self.receipt_due(sequence);
        let mut first = Vec::new();
        if f.kind != FailureKind::Guest {
            self.over = Some((f.kind, f.message.clone()));
            self.worker = false;
            first.push(SessionAction::Retire(Handback::Kill));
        }
        let reply = SessionReply::CallFailed {
            kind: f.kind,
            limit: f.limit,
            message: f.message,
            sequence,
            receipt,
            claimed: None,
        };
        self.answer(reply, first)
    }

    /// The receipt this call brings, when one is due (every call of a paid session).
    fn receipt_due(&mut self, sequence: u64) -> Option<Box<Receipt>> {
        sequence.is_multiple_of(self.sign_every).then(|| {
            let r = Box::new(self.signer.sign(&self.keypair));
            self.last_signed = Some(r.clone());
            r
        })
    }

    /// Sends a metered call's answer, through the payment step on a paid session.
    fn answer(&mut self, reply: SessionReply, mut actions: Vec<SessionAction>) -> Vec<SessionAction> {
        let receipt = match &reply {
            SessionReply::Response { receipt, .. } | SessionReply::CallFailed { receipt, .. } => receipt.clone(),
            _ => None,
        };
        match receipt.filter(|_| self.paid) {
            Some(r) => {
                self.phase = Phase::Settling { reply };
                actions.push(SessionAction::Pay(PayStep::After(r)));
            }
            None => {
                self.phase = Phase::Ready;
                actions.push(SessionAction::Reply(reply));
            }
        }
        actions
    }

    /// The worker's module, as the renter sent it (or why it did not).
    pub(crate) fn on_module(&mut self, module: Result<Vec<u8>, String>, now: Instant) -> Vec<SessionAction> {
        let Phase::Starting { deadline, .. } = &mut self.phase else { return Vec::new() };
        // The upload was the renter's time; init's wall time starts now.
        *deadline = now + self.wall + KILL_GRACE;
        let reply = match module {
            Ok(bytes) if <[u8; 32]>::from(Sha256::digest(&bytes)) == self.module_hash => ToWorker::Module { bytes },
            Ok(_) => ToWorker::NoModule { reason: "the module bytes do not match the ticket's module".into() },
            Err(reason) => ToWorker::NoModule { reason },
        };
        vec![SessionAction::ToWorker(reply)]
    }

    /// The deadline passed: the worker is killed.
    pub(crate) fn on_deadline(&mut self, now: Instant) -> Vec<SessionAction> {
        let Some(deadline) = self.deadline() else { return Vec::new() };
        if now < deadline {
            return Vec::new();
        }
        let what = if matches!(self.phase, Phase::Starting { .. }) { "init" } else { "GPU work" };
        let f = WorkerFailure {
            kind: FailureKind::Limit,
            limit: Some("wall-time".into()),
            message: format!("{what} was still running at the wall-time limit: the worker was stopped"),
        };
        // A call that ran to its limit used the whole limit: it is billed.
        match self.phase {
            Phase::Inferring { request_digest, .. } => self.failed_call(request_digest, f),
            _ => self.lost(f),
        }
    }

    /// One message from the renter on a request stream.
    pub(crate) fn on_request(&mut self, msg: SessionMsg, now: Instant) -> Vec<SessionAction> {
        if !matches!(self.phase, Phase::Ready) {
            let message = if self.is_done() {
                "the session has ended: open a new one".to_string()
            } else {
                "the session answers one request at a time".to_string()
            };
            return vec![SessionAction::Reply(SessionReply::Failed { kind: FailureKind::Host, limit: None, message })];
        }
        // A close is answered whatever happened before: the renter needs the final receipt.
        if let Some((kind, why)) = self.over.as_ref().filter(|_| !matches!(msg, SessionMsg::Close { .. })) {
            return vec![SessionAction::Reply(SessionReply::Failed { kind: *kind, limit: None, message: why.clone() })];
        }
        match msg {
            SessionMsg::Request { bytes, voucher } if self.paid => {
                self.phase = Phase::Paying { request: bytes };
                vec![SessionAction::Pay(PayStep::Before(voucher, self.signer.sequence()))]
            }
            SessionMsg::Request { bytes, .. } => self.infer(bytes, now),
            SessionMsg::Close { voucher } if self.paid => {
                self.phase = Phase::Closing;
                let receipt = self.final_receipt();
                vec![SessionAction::Pay(PayStep::Close(voucher, receipt))]
            }
            SessionMsg::Close { .. } => {
                self.over = Some((FailureKind::Payment, "the renter closed the session".into()));
                let receipt = self.final_receipt();
                vec![
                    SessionAction::Report { receipt: receipt.clone(), closed: true },
                    SessionAction::Reply(SessionReply::Closed { claimed: None, receipt }),
                ]
            }
            other => {
                let name = match other {
                    SessionMsg::Open { .. } => "Open",
                    SessionMsg::Init { .. } => "Init",
                    _ => "Module",
                };
                let message = format!("a session stream must carry a request or a close, not {name}");
                vec![SessionAction::Reply(SessionReply::Failed { kind: FailureKind::Host, limit: None, message })]
            }
        }
    }

    fn infer(&mut self, request: Vec<u8>, now: Instant) -> Vec<SessionAction> {
        if !self.worker {
            return self.stop(FailureKind::Host, "the session's worker is gone".into());
        }
        let request_digest = Sha256::digest(&request).into();
        self.phase = Phase::Inferring { request_digest, deadline: now + self.wall + KILL_GRACE };
        vec![SessionAction::ToWorker(ToWorker::Infer { bytes: request })]
    }

    /// The answer to a [`PayStep`].
    pub(crate) fn on_paid(&mut self, paid: Paid, now: Instant) -> Vec<SessionAction> {
        match (std::mem::replace(&mut self.phase, Phase::Ready), paid) {
            (Phase::Paying { request }, Paid::Before(Ok(()))) => self.infer(request, now),
            (Phase::Paying { .. }, Paid::Before(Err(Unpaid::Stopped(message)))) => {
                self.stop(FailureKind::Payment, message)
            }
            (Phase::Settling { mut reply }, Paid::After(claim)) => {
                let report = claim.is_some();
                if let SessionReply::Response { claimed, .. } | SessionReply::CallFailed { claimed, .. } = &mut reply {
                    *claimed = claim.map(Box::new);
                }
                let mut actions = vec![SessionAction::Reply(reply)];
                if report {
                    actions.push(SessionAction::Report { receipt: self.last_signed.clone(), closed: false });
                }
                actions
            }
            (Phase::Closing, Paid::Close(Ok(claimed))) => {
                self.over = Some((FailureKind::Payment, "the renter closed the session".into()));
                let receipt = self.final_receipt();
                let reply = SessionReply::Closed { claimed: claimed.map(Box::new), receipt: receipt.clone() };
                vec![SessionAction::Report { receipt, closed: true }, SessionAction::Reply(reply)]
            }
            (Phase::Closing, Paid::Close(Err(e))) => self.stop(FailureKind::Payment, e),
            (Phase::Ending, Paid::End) => self.finish(),
            (phase, paid) => {
                // An answer to a step not asked for: a bug in the pump, never the renter's doing.
                log::error!("session: payment answer {paid:?} in phase {phase:?}");
                self.phase = phase;
                Vec::new()
            }
        }
    }

    /// The renter went, or the session idled out: claim if due, report, hand the worker back.
    pub(crate) fn on_end(&mut self) -> Vec<SessionAction> {
        match self.phase {
            Phase::Done | Phase::Ending => Vec::new(),
            _ if self.paid => {
                self.phase = Phase::Ending;
                vec![SessionAction::Pay(PayStep::End)]
            }
            _ => self.finish(),
        }
    }

    fn finish(&mut self) -> Vec<SessionAction> {
        self.phase = Phase::Done;
        let mut actions = vec![SessionAction::Report { receipt: self.final_receipt(), closed: true }];
        if std::mem::take(&mut self.worker) {
            actions.push(SessionAction::Retire(Handback::EndService));
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use proto::msg::WireUsage;
    use proto::receipt::Checker;
    use proto::worker::Inferred;

    use super::*;

    const PRICE: u64 = 5;

    fn defaults() -> JobLimits {
        JobLimits { wall_time_ms: 60_000, ..JobLimits::default() }
    }

    fn module() -> Vec<u8> {
        b"\0asm module".to_vec()
    }

    fn terms(renter: PublicKey, paid: bool) -> SessionTerms {
        SessionTerms {
            session_id: [7; 16],
            renter,
            price_per_inference: PRICE,
            module_hash: Sha256::digest(module()).into(),
            limits: JobLimits { wall_time_ms: 1000, ..JobLimits::default() },
            // The daemon's choice: a paid session's receipts every call (`--max-unvouched 1`).
            sign_every: if paid { 1 } else { 4 },
            paid,
            newest: None,
        }
    }

    /// Both ends of a session with no sockets: the daemon's flow, a scripted worker (an echo
    /// that uppercases, or whatever a test makes it say), and the renter's receipt checker.
    struct Pair {
        flow: SessionFlow,
        checker: Checker,
        now: Instant,
        /// What the pump saw, in order, other than the replies it returned.
        log: Vec<SessionAction>,
        /// What the scripted worker answers the next `Infer` with; `None` echoes.
        worker_says: Option<Result<FromWorker, WorkerDied>>,
    }

    fn usage(bytes: usize) -> WireUsage {
        WireUsage {
            inferences: 1,
            fuel: 10 * bytes as u64,
            invocations: 64,
            gpu_time_ns: 1_000,
            ..WireUsage::default()
        }
    }

    impl Pair {
        fn open(paid: bool) -> (Pair, SessionReply) {
            let (provider, renter) = (Arc::new(Keypair::generate()), Keypair::generate());
            let now = Instant::now();
            let (flow, actions) = SessionFlow::start(
                terms(renter.public(), paid),
                Init::Bytes(vec![1]),
                &defaults(),
                provider.clone(),
                now,
            );
            let checker = Checker::new([7; 16], provider.public(), renter.public(), PRICE);
            let mut pair = Pair { flow, checker, now, log: Vec::new(), worker_says: None };
            let reply = pair.pump(actions).expect("the session opens");
            (pair, reply)
        }

        /// Runs actions the way `daemon::serve_session` does, with the worker scripted: the
        /// reply to the renter, if one came.
        fn pump(&mut self, mut actions: Vec<SessionAction>) -> Option<SessionReply> {
            let mut reply = None;
            while !actions.is_empty() {
                for action in std::mem::take(&mut actions) {
                    match action {
                        SessionAction::ToWorker(ToWorker::Service { .. }) => {
                            actions.extend(self.flow.on_worker(Ok(FromWorker::Accepted), self.now));
                            let need = FromWorker::NeedModule { module_hash: self.flow.module_hash };
                            actions.extend(self.flow.on_worker(Ok(need), self.now));
                        }
                        SessionAction::ToWorker(ToWorker::Module { .. }) => {
                            let started = FromWorker::ServiceStarted {
                                result: Ok(WireUsage::default()),
                                log: Vec::new(),
                                reusable: true,
                            };
                            actions.extend(self.flow.on_worker(Ok(started), self.now));
                        }
                        SessionAction::ToWorker(ToWorker::Infer { bytes }) => {
                            let answer = self.worker_says.take().unwrap_or_else(|| {
                                let response = bytes.to_ascii_uppercase();
                                let usage = usage(bytes.len());
                                Ok(FromWorker::Inferred { result: Ok(Inferred { response, usage }) })
                            });
                            actions.extend(self.flow.on_worker(answer, self.now));
                        }
                        SessionAction::FetchModule => actions.extend(self.flow.on_module(Ok(module()), self.now)),
                        SessionAction::Pay(PayStep::Before(..)) => {
                            actions.extend(self.flow.on_paid(Paid::Before(Ok(())), self.now));
                        }
                        SessionAction::Pay(PayStep::After(_)) => {
                            actions.extend(self.flow.on_paid(Paid::After(None), self.now));
                        }
                        SessionAction::Pay(PayStep::Close(..)) => {
                            actions.extend(self.flow.on_paid(Paid::Close(Ok(None)), self.now));
                        }
                        SessionAction::Pay(PayStep::End) => actions.extend(self.flow.on_paid(Paid::End, self.now)),
                        SessionAction::Reply(r) => {
                            assert!(reply.is_none(), "one reply per stream");
                            reply = Some(r);
                        }
                        other => self.log.push(other),
                    }
                }
            }
            reply
        }

        fn close(&mut self) -> Option<SessionReply> {
            let actions = self.flow.on_request(SessionMsg::Close { voucher: None }, self.now);
            self.pump(actions)
        }

        fn end(&mut self) -> Option<SessionReply> {
            let actions = self.flow.on_end();
            self.pump(actions)
        }

        /// One request through the flow; the renter follows the chain and checks any receipt.
        fn call(&mut self, request: &[u8]) -> SessionReply {
            let actions =
                self.flow.on_request(SessionMsg::Request { bytes: request.to_vec(), voucher: None }, self.now);
            let reply = self.pump(actions).expect("every request is answered");
            let followed = match &reply {
                SessionReply::Response { bytes, usage, sequence, receipt, .. } => {
                    Some((*sequence, Counts::of_call(usage), bytes.clone(), receipt))
                }
                SessionReply::CallFailed { message, sequence, receipt, .. } => {
                    let one = Counts { inferences: 1, ..Counts::default() };
                    Some((*sequence, one, message.as_bytes().to_vec(), receipt))
                }
                _ => None,
            };
            if let Some((sequence, counts, response, receipt)) = followed {
                self.checker.call(sequence, &counts, request, &response).unwrap();
                if let Some(r) = receipt {
                    self.checker.signed(r).unwrap();
                }
            }
            reply
        }
    }

    #[test]
    fn an_unpaid_session_signs_every_few_calls_and_its_close_covers_them_all() {
        let (mut pair, opened) = Pair::open(false);
        assert!(matches!(opened, SessionReply::Opened { newest: None, .. }));
        let mut signed = Vec::new();
        for i in 0..10u8 {
            match pair.call(&[b'a' + i; 3]) {
                SessionReply::Response { bytes, sequence, receipt, .. } => {
                    assert_eq!(bytes, vec![b'A' + i; 3]);
                    assert_eq!(sequence, u64::from(i) + 1);
                    if receipt.is_some() {
                        signed.push(sequence);
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(signed, vec![4, 8], "a receipt every 4 calls");
        let closed = pair.close().unwrap();
        let SessionReply::Closed { receipt: Some(last), claimed: None } = closed else { panic!("{closed:?}") };
        pair.checker.signed(&last).unwrap();
        assert_eq!((last.sequence, last.amount_due, last.counts.fuel), (10, 50, 300));
        assert!(
            matches!(&pair.log[..], [SessionAction::Report { closed: true, receipt: Some(r) }] if r.sequence == 10)
        );
        // After a close the session serves nothing, and ends handing its worker back cleanly.
        let refused = pair.call(b"more");
        assert!(matches!(refused, SessionReply::Failed { kind: FailureKind::Payment, .. }), "{refused:?}");
        assert_eq!(pair.end(), None);
        assert_eq!(pair.log.last(), Some(&SessionAction::Retire(Handback::EndService)));
        assert!(pair.flow.is_done());
        let late = pair.flow.on_request(SessionMsg::Request { bytes: vec![1], voucher: None }, pair.now);
        assert!(
            matches!(&late[..], [SessionAction::Reply(SessionReply::Failed { message, .. })] if message.contains("ended"))
        );
    }

    #[test]
    fn a_paid_session_signs_every_call_and_asks_for_payment_around_each() {
        let (mut pair, opened) = Pair::open(true);
        assert!(matches!(opened, SessionReply::Opened { .. }));
        for i in 0..3u8 {
            let reply = pair.call(&[i]);
            assert!(matches!(reply, SessionReply::Response { receipt: Some(_), .. }), "{reply:?}");
        }
        let closed = pair.close().unwrap();
        assert!(matches!(closed, SessionReply::Closed { receipt: Some(ref r), .. } if r.sequence == 3));
    }

    #[test]
    fn a_payment_refusal_stops_the_session_and_a_close_is_still_answered() {
        let (mut pair, _) = Pair::open(true);
        let ask = pair.flow.on_request(SessionMsg::Request { bytes: vec![1], voucher: None }, pair.now);
        assert!(matches!(ask.as_slice(), [SessionAction::Pay(PayStep::Before(None, _))]));
        let served = pair.flow.on_paid(Paid::Before(Ok(())), pair.now);
        assert!(matches!(pair.pump(served), Some(SessionReply::Response { sequence: 1, .. })));
        let _ = pair.flow.on_request(SessionMsg::Request { bytes: vec![1], voucher: None }, pair.now);
        let stop = pair.flow.on_paid(Paid::Before(Err(Unpaid::Stopped("bad voucher".into()))), pair.now);
        assert!(
            matches!(stop.as_slice(), [SessionAction::Reply(SessionReply::Failed { message, .. })] if message == "bad voucher")
        );
        assert!(pair.flow.is_over());
        let again = pair.call(b"x");
        assert!(matches!(again, SessionReply::Failed { message, .. } if message == "bad voucher"));
        // A close is still answered, with the receipt of what was served.
        let closed = pair.close().unwrap();
        assert!(matches!(closed, SessionReply::Closed { receipt: Some(ref r), .. } if r.sequence == 1));
    }

    #[test]
    fn a_kernel_that_writes_its_result_and_then_fails_is_billed_and_its_failure_is_in_the_receipt() {
        // Finding: an inference that failed (set_failure, a trap) returned its message with no
        // receipt, and the session went on: a kernel that wrote its result and then failed ran
        // free. Now every call whose guest code ran is metered and in the receipt chain.
        let (mut pair, _) = Pair::open(true);
        let guest =
            WorkerFailure { kind: FailureKind::Guest, limit: None, message: "the result, then a failure".into() };
        pair.worker_says = Some(Ok(FromWorker::Inferred { result: Err(guest) }));
        let failed = pair.call(b"x");
        assert!(
            matches!(&failed, SessionReply::CallFailed { kind: FailureKind::Guest, sequence: 1, receipt: Some(r), .. }
                if r.amount_due == PRICE),
            "{failed:?}"
        );
        assert!(
            matches!(pair.call(b"y"), SessionReply::Response { sequence: 2, receipt: Some(ref r), .. } if r.amount_due == 2 * PRICE),
            "the session goes on after the guest's own error"
        );
        assert!(pair.log.is_empty());

        let trap = WorkerFailure { kind: FailureKind::Trap, limit: None, message: "unreachable".into() };
        pair.worker_says = Some(Ok(FromWorker::Inferred { result: Err(trap) }));
        let trapped = pair.call(b"z");
        assert!(
            matches!(&trapped, SessionReply::CallFailed { kind: FailureKind::Trap, sequence: 3, receipt: Some(_), .. }),
            "{trapped:?}"
        );
        assert_eq!(pair.log, vec![SessionAction::Retire(Handback::Kill)], "a trapped instance's worker is killed");
        assert!(
            matches!(pair.call(b"w"), SessionReply::Failed { kind: FailureKind::Trap, .. }),
            "and the session is over"
        );
        // It ends without handing back a worker it no longer has, with its last receipt.
        let end = pair.flow.on_end();
        let _ = pair.pump(end);
        assert!(
            matches!(pair.log.last(), Some(SessionAction::Report { receipt: Some(r), closed: true }) if r.sequence == 3)
        );
    }

    #[test]
    fn an_unpaid_sessions_failed_calls_are_metered_too() {
        let (mut pair, _) = Pair::open(false);
        let guest = WorkerFailure { kind: FailureKind::Guest, limit: None, message: "bad input".into() };
        pair.worker_says = Some(Ok(FromWorker::Inferred { result: Err(guest) }));
        assert!(matches!(pair.call(b"x"), SessionReply::CallFailed { sequence: 1, receipt: None, .. }));
        assert!(matches!(pair.call(b"y"), SessionReply::Response { sequence: 2, .. }));
    }

    #[test]
    fn a_worker_that_misbehaves_or_dies_is_killed_with_the_reason() {
        let cases: Vec<(Result<FromWorker, WorkerDied>, FailureKind, &str)> = vec![
            (Ok(FromWorker::Idle), FailureKind::Crash, "broke the protocol (Idle for an inference)"),
            (Ok(FromWorker::Fatal { reason: "device lost".into() }), FailureKind::Host, "device lost"),
            (
                Err(WorkerDied { kind: FailureKind::Crash, message: "the worker was killed by signal 9".into() }),
                FailureKind::Crash,
                "signal 9",
            ),
        ];
        for (says, kind, why) in cases {
            let (mut pair, _) = Pair::open(false);
            pair.worker_says = Some(says);
            let reply = pair.call(b"x");
            assert!(
                matches!(&reply, SessionReply::Failed { kind: k, message, .. } if *k == kind && message.contains(why)),
                "{reply:?}"
            );
            assert_eq!(pair.log, vec![SessionAction::Retire(Handback::Kill)]);
        }
    }

    #[test]
    fn a_call_past_its_wall_time_kills_the_worker() {
        let (mut pair, _) = Pair::open(false);
        let ask = pair.flow.on_request(SessionMsg::Request { bytes: vec![1], voucher: None }, pair.now);
        assert!(matches!(ask.as_slice(), [SessionAction::ToWorker(ToWorker::Infer { .. })]));
        let deadline = pair.flow.deadline().unwrap();
        assert_eq!(
            deadline,
            pair.now + Duration::from_millis(1000) + KILL_GRACE,
            "the session's limit, not the worker's"
        );
        assert_eq!(pair.flow.on_deadline(deadline - Duration::from_millis(1)), vec![]);
        let killed = pair.flow.on_deadline(deadline);
        assert!(
            matches!(&killed[..], [SessionAction::Retire(Handback::Kill), SessionAction::Reply(SessionReply::CallFailed {
            kind: FailureKind::Limit, limit: Some(l), message, sequence: 1, .. })] if l == "wall-time" && message.contains("GPU work was still running")),
            "{killed:?}"
        );
        // A late answer from the killed worker changes nothing.
        let late = Ok(FromWorker::Inferred { result: Ok(Inferred { response: vec![], usage: usage(0) }) });
        assert_eq!(pair.flow.on_worker(late, deadline), vec![]);
    }

    #[test]
    fn opening_checks_the_module_and_refuses_what_does_not_start() {
        let now = Instant::now();
        let kp = Arc::new(Keypair::generate());
        let renter = Keypair::generate().public();
        // The renter's module bytes must hash to the ticket's module.
        let (mut flow, _) = SessionFlow::start(terms(renter, false), Init::Bytes(vec![]), &defaults(), kp.clone(), now);
        let need = flow.on_worker(Ok(FromWorker::NeedModule { module_hash: flow.module_hash }), now);
        assert_eq!(need, vec![SessionAction::FetchModule]);
        let wrong = flow.on_module(Ok(b"other".to_vec()), now);
        assert!(
            matches!(&wrong[..], [SessionAction::ToWorker(ToWorker::NoModule { reason })] if reason.contains("do not match"))
        );
        // Asking twice (or for another module) is the worker breaking the protocol.
        let twice = flow.on_worker(Ok(FromWorker::NeedModule { module_hash: flow.module_hash }), now);
        assert!(matches!(
            &twice[..],
            [
                SessionAction::Retire(Handback::Kill),
                SessionAction::Reply(SessionReply::Failed { kind: FailureKind::Crash, .. })
            ]
        ));
        assert!(flow.is_done());

        // A module that does not load is refused (nothing ran), and its worker reused.
        let (mut flow, _) = SessionFlow::start(terms(renter, false), Init::Bytes(vec![]), &defaults(), kp.clone(), now);
        let load = WorkerFailure { kind: FailureKind::Load, limit: None, message: "no `init` export".into() };
        let started = FromWorker::ServiceStarted { result: Err(load), log: vec![], reusable: true };
        let refused = flow.on_worker(Ok(started), now);
        assert!(
            matches!(&refused[..], [SessionAction::Retire(Handback::Idle), SessionAction::Reply(SessionReply::Refused {
            reason })] if reason.contains("init"))
        );
        assert!(flow.is_done());

        // init past its wall time: killed, with the reason.
        let (mut flow, _) = SessionFlow::start(terms(renter, false), Init::Bytes(vec![]), &defaults(), kp, now);
        let late = flow.on_deadline(flow.deadline().unwrap());
        assert!(
            matches!(&late[..], [SessionAction::Retire(Handback::Kill), SessionAction::Reply(SessionReply::Failed {
            message, .. })] if message.starts_with("init was still running"))
        );
    }

    #[test]
    fn streams_that_carry_the_wrong_message_are_answered_and_change_nothing() {
        let (mut pair, _) = Pair::open(false);
        let wrong = pair.flow.on_request(SessionMsg::Init { init_input: vec![] }, pair.now);
        assert!(
            matches!(&wrong[..], [SessionAction::Reply(SessionReply::Failed { message, .. })] if message.ends_with("not Init"))
        );
        assert!(matches!(pair.call(b"ok"), SessionReply::Response { sequence: 1, .. }));
    }
}
