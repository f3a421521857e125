//! The batch-job protocol between the daemon, one worker and the scheduler, as a sans-IO core:
//! events and `now` in, actions out. `daemon::serve_job` only pumps it (worker frames, the
//! scheduler's job stream, the cancel flag, a timer); everything the daemon decides about a
//! job (what it trusts of the worker, when it kills it, whether it reuses it, what it bills) is
//! here, and tested without processes or sockets.

use std::time::{Duration, Instant};

use proto::msg::{CHECKPOINT_CAP, Checkpoint, FailureKind, JobLimits, JobReply, JobResult, Outcome};
use proto::worker::{FromWorker, ToWorker};

use crate::pool::WorkerDied;

/// How long a worker past its job's wall time has to end the job itself before it is killed.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);

/// At most one checkpoint a job saves goes to the scheduler in this time: of the saves in
/// between, the newest is held and sent when it is over (or when the job ends).
pub(crate) const CHECKPOINT_GAP: Duration = Duration::from_secs(1);

/// What the pump must do next.
#[derive(Debug, PartialEq)]
pub(crate) enum JobAction {
    ToWorker(ToWorker),
    ToScheduler(JobReply),
    /// Ask the scheduler for the module's bytes; answer with [`JobFlow::on_module`].
    FetchModule([u8; 32]),
    /// A paid job's slice ended: sign the receipt of its first `wall_time_us` (receipt number
    /// `sequence`) and send it for the renter to vouch for.
    Slice {
        sequence: u64,
        wall_time_us: u64,
    },
    /// The job is over: report `result`; hand the worker back as `reusable` says (a worker
    /// that is not reusable is killed).
    Done {
        result: Box<JobResult>,
        reusable: bool,
    },
}

/// One job in one worker.
#[derive(Debug)]
pub(crate) struct JobFlow {
    started: Instant,
    /// The job's wall time, the smaller of what it asked and the worker's most.
    wall: Duration,
    log_cap: u64,
    logged: u64,
    fetched: bool,
    cancelled: bool,
    done: bool,
    /// The worker said it took the job.
    accepted: bool,
    /// A paid job's slice: a receipt at the end of each, and the job is stopped at the end of
    /// one when the receipt before it has no voucher.
    slice: Option<Duration>,
    /// Slices' receipts signed, and the newest receipt vouched for.
    slices: u64,
    vouched: u64,
    /// The time the newest slice's receipt billed.
    billed_us: u64,
    /// When a checkpoint last went to the scheduler, and the newest saved since (held until
    /// [`CHECKPOINT_GAP`] after it).
    checkpoint_sent: Option<Instant>,
    checkpoint_held: Option<Box<Checkpoint>>,
}

/// The result of a job that never ran, or whose worker was lost.
pub(crate) fn failed_result(kind: FailureKind, limit: Option<String>, message: String) -> JobResult {
    JobResult::failed(kind, limit, message)
}

/// The smaller of a job's asked-for value and the worker's most, 0 meaning "not asked".
pub(crate) fn smaller(asked: u64, most: u64) -> u64 {
    match (asked, most) {
        (0, m) => m,
        (a, 0) => a,
        (a, m) => a.min(m),
    }
}

impl JobFlow {
    /// Starts a job in a worker: hands it over. (The scheduler heard `Started` when the job
    /// took its slot.)
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        job_id: String,
        module_hash: [u8; 32],
        input: Vec<u8>,
        limits: JobLimits,
        defaults: &JobLimits,
        member: Option<proto::worker::WorkerMember>,
        checkpoint: Option<Box<Checkpoint>>,
        now: Instant,
    ) -> (JobFlow, Vec<JobAction>) {
        let flow = JobFlow {
            started: now,
            wall: Duration::from_millis(smaller(limits.wall_time_ms, defaults.wall_time_ms)),
            log_cap: smaller(limits.log_bytes, defaults.log_bytes),
            logged: 0,
            fetched: false,
            cancelled: false,
            done: false,
            accepted: false,
            slice: None,
            slices: 0,
            vouched: 0,
            billed_us: 0,
            checkpoint_sent: None,
            checkpoint_held: None,
        };
        let run = ToWorker::Job { job_id, module_hash, input, limits, member, checkpoint };
        (flow, vec![JobAction::ToWorker(run)])
    }

    /// Makes the job a paid one: a receipt every `slice` of its time (at least a millisecond).
    pub(crate) fn paid_by_the_slice(&mut self, slice: Duration) {
        self.slice = Some(slice.max(Duration::from_millis(1)));
    }

    /// When the worker is killed if the job has not ended: its wall time plus a grace.
    pub(crate) fn deadline(&self) -> Instant {
        self.started + self.wall + KILL_GRACE
    }

    /// When [`JobFlow::on_deadline`] is due next: the end of the current slice, the time a
    /// held checkpoint may go, or the kill deadline.
    pub(crate) fn next_wake(&self) -> Instant {
        let wake = match self.slice {
            Some(slice) if !self.done => {
                let end = self.started + slice.saturating_mul(u32::try_from(self.slices + 1).unwrap_or(u32::MAX));
                end.min(self.deadline())
            }
            _ => self.deadline(),
        };
        match self.checkpoint_due() {
            Some(due) => wake.min(due),
            None => wake,
        }
    }

    /// When the held checkpoint may go to the scheduler, if one is held.
    fn checkpoint_due(&self) -> Option<Instant> {
        self.checkpoint_held.as_ref()?;
        Some(self.checkpoint_sent.map_or(self.started, |t| t + CHECKPOINT_GAP))
    }

    /// A checkpoint the worker sent: on to the scheduler now, or held until the gap since the
    /// last one is over (replacing any held before it).
    fn on_checkpoint(&mut self, checkpoint: Box<Checkpoint>, now: Instant) -> Vec<JobAction> {
        if checkpoint.bytes.len() > CHECKPOINT_CAP {
            let message = format!("the worker sent a checkpoint over the {CHECKPOINT_CAP} bytes a job may save");
            return self.lost(FailureKind::Crash, message);
        }
        self.checkpoint_held = Some(checkpoint);
        self.send_checkpoint(now)
    }

    /// The held checkpoint, if it may go now.
    fn send_checkpoint(&mut self, now: Instant) -> Vec<JobAction> {
        if self.checkpoint_due().is_none_or(|due| now < due) {
            return Vec::new();
        }
        self.checkpoint_sent = Some(now);
        self.checkpoint_held.take().map(|c| JobAction::ToScheduler(JobReply::Checkpoint(c))).into_iter().collect()
    }

    /// Receipts signed so far for the job's slices (its last receipt is one more).
    pub(crate) fn slices(&self) -> u64 {
        self.slices
    }

    /// The renter's voucher for receipt `sequence` was taken.
    pub(crate) fn on_vouched(&mut self, sequence: u64) {
        self.vouched = self.vouched.max(sequence);
    }

    /// The job cannot go on being paid (its deposit is spent, its channel closing, the chain
    /// silent): it stops with the reason, billed for the time it ran, and the worker is not
    /// reused (it was cut off mid-run).
    pub(crate) fn stop_unpaid(&mut self, reason: String, now: Instant) -> Vec<JobAction> {
        if self.done {
            return Vec::new();
        }
        let mut result = failed_result(FailureKind::Payment, None, reason);
        result.wall_time_us = self.billable_us(now);
        result.wall_time_ms = result.wall_time_us / 1000;
        self.end(result, false)
    }

    /// Ends the job for a limit the daemon enforces itself (bytes to and from a cluster's
    /// peers): billed for its time so far, like a limit the worker hit.
    pub(crate) fn stop_at_limit(&mut self, limit: &str, reason: String, now: Instant) -> Vec<JobAction> {
        if self.done {
            return Vec::new();
        }
        let mut result = failed_result(FailureKind::Limit, Some(limit.to_string()), reason);
        result.wall_time_us = self.billable_us(now);
        result.wall_time_ms = result.wall_time_us / 1000;
        self.end(result, false)
    }

    /// The job's time so far as the daemon saw it, never past its wall time.
    fn billable_us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).min(self.wall).as_micros() as u64
    }

    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.done
    }

    /// Ends the job: a checkpoint still held goes first (the job may yet run again from it,
    /// if this try's end is the provider's fault).
    fn end(&mut self, result: JobResult, reusable: bool) -> Vec<JobAction> {
        self.done = true;
        let held = self.checkpoint_held.take().map(|c| JobAction::ToScheduler(JobReply::Checkpoint(c)));
        held.into_iter().chain([JobAction::Done { result: Box::new(result), reusable }]).collect()
    }

    /// Ends the job with the worker not reused.
    fn lost(&mut self, kind: FailureKind, message: String) -> Vec<JobAction> {
        self.end(failed_result(kind, None, message), false)
    }

    /// A frame from the worker (or its death).
    pub(crate) fn on_worker(&mut self, msg: Result<FromWorker, WorkerDied>, now: Instant) -> Vec<JobAction> {
        if self.done {
            return Vec::new();
        }
        match msg {
            Ok(FromWorker::Accepted) if !self.accepted => {
                self.accepted = true;
                Vec::new()
            }
            // Dead before it took the job: the worker's own failure (it died idle, say), never
            // the tenant's. The pump tries another worker.
            Err(WorkerDied { message, .. }) if !self.accepted => {
                self.lost(FailureKind::Host, format!("the worker died before it took the job: {message}"))
            }
            Ok(FromWorker::NeedModule { module_hash }) if !self.fetched => {
                self.fetched = true;
                vec![JobAction::FetchModule(module_hash)]
            }
            Ok(FromWorker::NeedModule { .. }) => {
                self.lost(FailureKind::Crash, "the worker asked for the module twice".into())
            }
            Ok(FromWorker::Log { bytes }) => {
                self.logged = self.logged.saturating_add(bytes.len() as u64);
                if self.logged > self.log_cap {
                    let message = format!("the worker sent more than the job's {} bytes of log", self.log_cap);
                    return self.lost(FailureKind::Crash, message);
                }
                vec![JobAction::ToScheduler(JobReply::Log { bytes })]
            }
            Ok(FromWorker::Checkpoint(c)) if self.accepted => self.on_checkpoint(c, now),
            Ok(FromWorker::JobDone { result, reusable }) => self.job_done(*result, reusable, now),
            Ok(FromWorker::Fatal { reason }) => self.lost(FailureKind::Host, reason),
            Ok(other) => {
                let message = format!("the worker broke the protocol ({} during a job)", variant(&other));
                self.lost(FailureKind::Crash, message)
            }
            Err(WorkerDied { kind, message }) => self.lost(kind, message),
        }
    }

    /// The worker's report of the job's end, checked against what the daemon saw.
    fn job_done(&mut self, mut result: JobResult, reported_reusable: bool, now: Instant) -> Vec<JobAction> {
        let elapsed = now.saturating_duration_since(self.started);
        // The worker's word is not enough to hand it to the next tenant: only after an ending
        // that leaves nothing behind, within the wall time, and never after a cancel.
        let clean_end = match &result.outcome {
            Outcome::Succeeded => true,
            Outcome::Failed { kind, .. } => matches!(kind, FailureKind::Exit | FailureKind::Guest | FailureKind::Load),
        };
        let reusable = reported_reusable && clean_end && elapsed <= self.wall && !self.cancelled;
        // What is billed is never more than the daemon itself saw the job take, and (on a paid
        // job) never less than the slices it already billed, which it saw too.
        result.wall_time_us = result.wall_time_us.max(self.billed_us).min(elapsed.as_micros() as u64);
        result.wall_time_ms = result.wall_time_us / 1000;
        result.receipt = None;
        self.end(result, reusable)
    }

    /// The scheduler's answer to [`JobAction::FetchModule`], as the worker should get it.
    pub(crate) fn on_module(&mut self, reply: ToWorker) -> Vec<JobAction> {
        if self.done { Vec::new() } else { vec![JobAction::ToWorker(reply)] }
    }

    /// The scheduler cancelled the job (it gave it to another provider).
    pub(crate) fn on_cancel(&mut self) -> Vec<JobAction> {
        if self.done || self.cancelled {
            return Vec::new();
        }
        self.cancelled = true;
        vec![JobAction::ToWorker(ToWorker::Cancel)]
    }

    /// Whether the job ended before its worker took it (the worker died first): nothing of the
    /// tenant's ran, and another worker may take it.
    pub(crate) fn never_taken(&self) -> bool {
        self.done && !self.accepted
    }

    /// The deadline passed: the worker is killed. Or a paid job's slice ended: its receipt is
    /// signed, unless the slice before it is still unpaid, which stops the job.
    pub(crate) fn on_deadline(&mut self, now: Instant) -> Vec<JobAction> {
        if self.done {
            return Vec::new();
        }
        if now < self.deadline() {
            let mut out = self.send_checkpoint(now);
            if self.slice.is_none() || now < self.next_wake() {
                return out;
            }
            if self.slices > self.vouched {
                let reason = format!(
                    "the renter's vouchers stopped: receipt {} had no voucher by the end of the next slice, so the job was stopped",
                    self.vouched + 1
                );
                out.extend(self.stop_unpaid(reason, now));
                return out;
            }
            self.slices += 1;
            self.billed_us = self.billable_us(now);
            out.push(JobAction::Slice { sequence: self.slices, wall_time_us: self.billed_us });
            return out;
        }
        let result = failed_result(
            FailureKind::Limit,
            Some("wall-time".into()),
            "GPU work was still running at the wall-time limit: the worker was stopped".into(),
        );
        self.end(result, false)
    }
}

/// A worker message's name, for reasons (never its payload, which the tenant may have shaped).
pub(crate) fn variant(m: &FromWorker) -> &'static str {
    match m {
        FromWorker::Ready { .. } => "Ready",
        FromWorker::Benchmarked { .. } => "Benchmarked",
        FromWorker::Accepted => "Accepted",
        FromWorker::NeedModule { .. } => "NeedModule",
        FromWorker::Log { .. } => "Log",
        FromWorker::JobDone { .. } => "JobDone",
        FromWorker::ServiceStarted { .. } => "ServiceStarted",
        FromWorker::Inferred { .. } => "Inferred",
        FromWorker::Idle => "Idle",
        FromWorker::Fatal { .. } => "Fatal",
        FromWorker::Peer { .. } => "Peer",
        FromWorker::Checkpoint(_) => "Checkpoint",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> JobLimits {
        JobLimits { wall_time_ms: 120_000, log_bytes: 1000, ..JobLimits::default() }
    }

    fn start(now: Instant) -> JobFlow {
        let limits = JobLimits { wall_time_ms: 1000, ..JobLimits::default() };
        let (flow, actions) = JobFlow::start("j".into(), [1; 32], vec![9], limits, &defaults(), None, None, now);
        assert!(matches!(actions.as_slice(), [JobAction::ToWorker(ToWorker::Job { .. })]));
        let mut flow = flow;
        assert_eq!(flow.on_worker(Ok(FromWorker::Accepted), now), vec![]);
        flow
    }

    fn done(result: JobResult, reusable: bool) -> Result<FromWorker, WorkerDied> {
        Ok(FromWorker::JobDone { result: Box::new(result), reusable })
    }

    fn succeeded(wall_time_us: u64) -> JobResult {
        JobResult { outcome: Outcome::Succeeded, wall_time_us, ..failed_result(FailureKind::Host, None, String::new()) }
    }

    fn ended(actions: &[JobAction]) -> (&JobResult, bool) {
        match actions {
            [JobAction::Done { result, reusable }] => (result, *reusable),
            other => panic!("expected the job's end, got {other:?}"),
        }
    }

    fn saved(step: u64, len: usize) -> Result<FromWorker, WorkerDied> {
        Ok(FromWorker::Checkpoint(Box::new(Checkpoint { step, bytes: vec![7; len] })))
    }

    fn sent(step: u64, len: usize) -> JobAction {
        JobAction::ToScheduler(JobReply::Checkpoint(Box::new(Checkpoint { step, bytes: vec![7; len] })))
    }

    #[test]
    fn checkpoints_reach_the_scheduler_a_second_apart_the_newest_held_and_sent_before_the_end() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut f = start(t);
        assert_eq!(f.on_worker(saved(1, 10), t + ms(10)), vec![sent(1, 10)], "the first goes at once");
        // Saves within the gap: held, each replacing the one before.
        assert_eq!(f.on_worker(saved(2, 10), t + ms(20)), vec![]);
        assert_eq!(f.on_worker(saved(3, 10), t + ms(30)), vec![]);
        assert_eq!(f.next_wake(), t + ms(10) + CHECKPOINT_GAP);
        assert_eq!(f.on_deadline(t + ms(500)), vec![], "not yet");
        assert_eq!(f.on_deadline(t + ms(1010)), vec![sent(3, 10)], "the newest, once the gap is over");
        assert_eq!(f.on_deadline(t + ms(1020)), vec![], "nothing held");
        // One held when the worker dies: it goes before the job's end (a retry resumes from it).
        assert_eq!(f.on_worker(saved(4, 10), t + ms(1100)), vec![]);
        let died = f.on_worker(Err(WorkerDied { kind: FailureKind::Crash, message: "gone".into() }), t + ms(1200));
        assert_eq!(died.first(), Some(&sent(4, 10)), "{died:?}");
        assert!(matches!(died.get(1), Some(JobAction::Done { .. })), "{died:?}");
    }

    #[test]
    fn a_checkpoint_over_the_cap_or_before_the_job_is_taken_ends_the_worker() {
        let t = Instant::now();
        let mut f = start(t);
        let end = f.on_worker(saved(1, CHECKPOINT_CAP + 1), t);
        let (result, reusable) = ended(&end);
        assert!(!reusable);
        assert!(matches!(&result.outcome, Outcome::Failed { kind: FailureKind::Crash, .. }), "{result:?}");
        // A worker that saves before it said it took the job breaks the protocol.
        let limits = JobLimits { wall_time_ms: 1000, ..JobLimits::default() };
        let (mut f, _) = JobFlow::start("j".into(), [1; 32], vec![9], limits, &defaults(), None, None, t);
        let end = f.on_worker(saved(1, 1), t);
        let (result, _) = ended(&end);
        assert!(matches!(&result.outcome, Outcome::Failed { kind: FailureKind::Host | FailureKind::Crash, .. }));
    }

    #[test]
    fn a_paid_job_gets_a_receipt_every_slice_and_stops_one_slice_after_its_vouchers_stop() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut f = start(t);
        f.paid_by_the_slice(ms(100));
        assert_eq!(f.next_wake(), t + ms(100));
        assert_eq!(f.on_deadline(t + ms(50)), vec![], "not yet");
        assert_eq!(f.on_deadline(t + ms(101)), vec![JobAction::Slice { sequence: 1, wall_time_us: 101_000 }]);
        assert_eq!(f.next_wake(), t + ms(200));
        // Vouched in time: the next slice is billed too.
        f.on_vouched(1);
        assert_eq!(f.on_deadline(t + ms(200)), vec![JobAction::Slice { sequence: 2, wall_time_us: 200_000 }]);
        // Receipt 2 is not vouched by the end of slice 3: the job stops, billed for its time.
        let end = f.on_deadline(t + ms(300));
        let (result, reusable) = ended(&end);
        assert!(!reusable, "cut off mid-run");
        match &result.outcome {
            Outcome::Failed { kind: FailureKind::Payment, message, .. } => {
                assert!(message.contains("vouchers stopped") && message.contains("receipt 2"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(result.wall_time_us, 300_000);
        assert_eq!(f.slices(), 2, "the last receipt is number 3");
    }

    #[test]
    fn a_paid_jobs_last_receipt_bills_no_less_than_its_slices_and_no_more_than_the_daemon_saw() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut f = start(t);
        f.paid_by_the_slice(ms(100));
        assert_eq!(f.on_deadline(t + ms(130)), vec![JobAction::Slice { sequence: 1, wall_time_us: 130_000 }]);
        // The worker says less than the slice billed: the slice stands.
        let end = f.on_worker(done(succeeded(90_000), true), t + ms(150));
        assert_eq!(ended(&end).0.wall_time_us, 130_000);
        // Slices are never billed past the job's wall time (1 s here).
        let mut f = start(t);
        f.paid_by_the_slice(ms(700));
        assert_eq!(f.on_deadline(t + ms(700)), vec![JobAction::Slice { sequence: 1, wall_time_us: 700_000 }]);
        f.on_vouched(1);
        assert_eq!(
            f.on_deadline(t + ms(1400)),
            vec![JobAction::Slice { sequence: 2, wall_time_us: 1_000_000 }],
            "past its wall time a job is billed its wall time, no more"
        );
    }

    #[test]
    fn a_job_fetches_its_module_once_streams_its_log_and_ends_reusable() {
        let t = Instant::now();
        let mut f = start(t);
        assert_eq!(
            f.on_worker(Ok(FromWorker::NeedModule { module_hash: [1; 32] }), t),
            vec![JobAction::FetchModule([1; 32])]
        );
        let reply = ToWorker::Module { bytes: vec![0] };
        assert_eq!(f.on_module(reply.clone()), vec![JobAction::ToWorker(reply)]);
        let log = f.on_worker(Ok(FromWorker::Log { bytes: b"hi".to_vec() }), t);
        assert_eq!(log, vec![JobAction::ToScheduler(JobReply::Log { bytes: b"hi".to_vec() })]);
        let end = f.on_worker(done(succeeded(500_000), true), t + Duration::from_millis(600));
        let (result, reusable) = ended(&end);
        assert!(reusable);
        assert_eq!(result.wall_time_us, 500_000);
        assert!(f.is_done());
    }

    #[test]
    fn the_daemon_bills_no_more_than_it_saw_and_reuses_a_worker_only_after_a_clean_end() {
        let t = Instant::now();
        // A worker that claims more time than passed is billed what passed.
        let mut f = start(t);
        let end = f.on_worker(done(succeeded(9_000_000), true), t + Duration::from_millis(300));
        let (result, _) = ended(&end);
        assert_eq!(result.wall_time_us, 300_000);
        // A limit failure the worker calls reusable is not.
        let mut f = start(t);
        let limit = failed_result(FailureKind::Limit, Some("fuel".into()), "out".into());
        let end = f.on_worker(done(limit, true), t);
        assert!(!ended(&end).1);
        // Past the wall time, even a success is not reused.
        let mut f = start(t);
        let end = f.on_worker(done(succeeded(1), true), t + Duration::from_millis(1500));
        assert!(!ended(&end).1);
        // After a cancel, never.
        let mut f = start(t);
        assert_eq!(f.on_cancel(), vec![JobAction::ToWorker(ToWorker::Cancel)]);
        assert_eq!(f.on_cancel(), vec![], "one cancel is sent once");
        let end = f.on_worker(done(succeeded(1), true), t);
        assert!(!ended(&end).1);
        // A guest's own failure leaves the worker fit to serve.
        let mut f = start(t);
        let guest = failed_result(FailureKind::Exit, None, "status 3".into());
        let end = f.on_worker(done(guest, true), t);
        assert!(ended(&end).1);
    }

    #[test]
    fn a_worker_that_misbehaves_ends_its_job_and_is_not_reused() {
        let t = Instant::now();
        let mut f = start(t);
        let _ = f.on_worker(Ok(FromWorker::NeedModule { module_hash: [1; 32] }), t);
        let end = f.on_worker(Ok(FromWorker::NeedModule { module_hash: [1; 32] }), t);
        let (result, reusable) = ended(&end);
        assert!(!reusable);
        assert!(matches!(&result.outcome, Outcome::Failed { message, .. } if message.contains("twice")));

        let mut f = start(t);
        let _ = f.on_worker(Ok(FromWorker::Log { bytes: vec![0; 600] }), t);
        let end = f.on_worker(Ok(FromWorker::Log { bytes: vec![0; 600] }), t);
        let (result, reusable) = ended(&end);
        assert!(!reusable);
        assert!(
            matches!(&result.outcome, Outcome::Failed { kind: FailureKind::Crash, message, .. } if message.contains("log"))
        );

        let mut f = start(t);
        let end = f.on_worker(Ok(FromWorker::Idle), t);
        let (result, _) = ended(&end);
        assert!(matches!(&result.outcome, Outcome::Failed { message, .. } if message.contains("Idle")));

        let mut f = start(t);
        let died = WorkerDied { kind: FailureKind::Crash, message: "signal 9".into() };
        let end = f.on_worker(Err(died), t);
        let (result, reusable) = ended(&end);
        assert!(!reusable && matches!(&result.outcome, Outcome::Failed { kind: FailureKind::Crash, .. }));

        let mut f = start(t);
        let end = f.on_worker(Ok(FromWorker::Fatal { reason: "device lost".into() }), t);
        let (result, _) = ended(&end);
        assert!(
            matches!(&result.outcome, Outcome::Failed { kind: FailureKind::Host, .. }),
            "a provider-side end is re-run"
        );
        assert_eq!(f.on_worker(Ok(FromWorker::Log { bytes: vec![1] }), t), vec![], "nothing after the end");
    }

    #[test]
    fn a_worker_that_dies_before_taking_the_job_is_the_providers_failure() {
        let t = Instant::now();
        let (mut f, _) =
            JobFlow::start("j".into(), [1; 32], Vec::new(), JobLimits::default(), &defaults(), None, None, t);
        let died = WorkerDied { kind: FailureKind::Crash, message: "signal 9".into() };
        let end = f.on_worker(Err(died), t);
        let (result, reusable) = ended(&end);
        assert!(!reusable && f.never_taken());
        assert!(matches!(&result.outcome, Outcome::Failed { kind: FailureKind::Host, .. }), "{:?}", result.outcome);
    }

    #[test]
    fn a_worker_past_its_wall_time_and_grace_is_killed_with_the_reason() {
        let t = Instant::now();
        let mut f = start(t);
        assert_eq!(f.deadline(), t + Duration::from_millis(1000) + KILL_GRACE);
        assert_eq!(f.on_deadline(t + Duration::from_millis(2000)), vec![], "not yet");
        let end = f.on_deadline(f.deadline());
        let (result, reusable) = ended(&end);
        assert!(!reusable);
        assert!(matches!(&result.outcome, Outcome::Failed { limit: Some(l), message, .. }
            if l == "wall-time" && message.contains("still running at the wall-time limit")));
    }
}
