//! A job's checkpoints on the host side: the one its try resumes from, and where the ones it
//! saves go (the worker sends them to its daemon; `wasmgrid run --checkpoint` writes a file).

pub use proto::msg::Checkpoint;

/// Where a job's saved checkpoints go.
pub type CheckpointSink = Box<dyn FnMut(Checkpoint) + Send>;

/// At most one save goes to the sink in this time: of the saves in between, the newest is held
/// and goes once the time is over (at the job's next host call) or when the job ends. A guest
/// that saves in a loop then costs its provider one hand-over a second, not one per save.
pub const SEND_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// A job's checkpoints: the one it resumes from, and where its saves go. A job with no sink
/// still may save (its saves go nowhere: nothing would run it again).
#[derive(Default)]
pub struct Checkpoints {
    pub(crate) resume: Option<Checkpoint>,
    pub(crate) sink: Option<CheckpointSink>,
    /// Saves made so far, and the step of the newest.
    pub(crate) saved: u64,
    pub(crate) newest_step: Option<u64>,
    /// When a save last went to the sink, and the newest save since, held until [`SEND_GAP`]
    /// after it.
    sent_at: Option<std::time::Instant>,
    held: Option<Checkpoint>,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("resume_step", &self.resume.as_ref().map(|c| c.step))
            .field("saved", &self.saved)
            .field("held_step", &self.held.as_ref().map(|c| c.step))
            .finish_non_exhaustive()
    }
}

impl Checkpoints {
    /// A job that resumes from `resume` (if any) and hands its saves to `sink`, one per
    /// [`SEND_GAP`] at most (the newest in between held).
    pub fn new(resume: Option<Checkpoint>, sink: Option<CheckpointSink>) -> Checkpoints {
        Checkpoints { resume, sink, ..Checkpoints::default() }
    }

    pub(crate) fn save(&mut self, checkpoint: Checkpoint, now: std::time::Instant) {
        self.saved += 1;
        self.newest_step = Some(checkpoint.step);
        if self.sink.is_none() {
            return;
        }
        self.held = Some(checkpoint);
        self.poll(now);
    }

    /// Hands the held save to the sink once the gap since the last is over.
    pub(crate) fn poll(&mut self, now: std::time::Instant) {
        if self.held.is_some() && self.sent_at.is_none_or(|t| now.saturating_duration_since(t) >= SEND_GAP) {
            self.flush_at(now);
        }
    }

    /// Hands the held save (if any) to the sink now: the job ended, and its next try resumes
    /// from the newest it saved.
    pub(crate) fn flush(&mut self) {
        self.flush_at(std::time::Instant::now());
    }

    fn flush_at(&mut self, now: std::time::Instant) {
        if let (Some(checkpoint), Some(sink)) = (self.held.take(), self.sink.as_mut()) {
            sink(checkpoint);
            self.sent_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    #[test]
    fn saves_in_a_loop_reach_the_sink_once_a_gap_the_newest_held_until_due_or_the_end() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let got = got.clone();
            Box::new(move |c: Checkpoint| got.lock().unwrap().push(c.step)) as CheckpointSink
        };
        let mut c = Checkpoints::new(None, Some(sink));
        let t = Instant::now();
        let ck = |step| Checkpoint { step, bytes: vec![1; 8] };
        c.save(ck(1), t);
        for step in 2..100 {
            c.save(ck(step), t + Duration::from_millis(step));
        }
        assert_eq!(*got.lock().unwrap(), vec![1], "the first at once, the rest held");
        c.poll(t + Duration::from_millis(500));
        assert_eq!(*got.lock().unwrap(), vec![1], "not yet due");
        c.poll(t + SEND_GAP);
        assert_eq!(*got.lock().unwrap(), vec![1, 99], "the newest once due");
        c.poll(t + SEND_GAP * 3);
        assert_eq!(got.lock().unwrap().len(), 2, "nothing held, nothing sent");
        c.save(ck(100), t + SEND_GAP + Duration::from_millis(1));
        c.flush();
        assert_eq!(*got.lock().unwrap(), vec![1, 99, 100], "the job's end sends what is held");
        assert_eq!((c.saved, c.newest_step), (100, Some(100)), "every save counts");
    }

    #[test]
    fn the_guest_and_the_wire_agree_on_the_largest_checkpoint() {
        assert_eq!(abi::MAX_CHECKPOINT, proto::msg::CHECKPOINT_CAP as u64);
    }
}
