//! A job's checkpoints on the host side: the one its try resumes from, and where the ones it
//! saves go (the worker sends them to its daemon; `wasmgrid run --checkpoint` writes a file).

pub use proto::msg::Checkpoint;

/// Where a job's saved checkpoints go.
pub type CheckpointSink = Box<dyn FnMut(Checkpoint) + Send>;

/// A job's checkpoints: the one it resumes from, and where its saves go. A job with no sink
/// still may save (its saves go nowhere: nothing would run it again).
#[derive(Default)]
pub struct Checkpoints {
    pub(crate) resume: Option<Checkpoint>,
    pub(crate) sink: Option<CheckpointSink>,
    /// Saves made so far, and the step of the newest.
    pub(crate) saved: u64,
    pub(crate) newest_step: Option<u64>,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("resume_step", &self.resume.as_ref().map(|c| c.step))
            .field("saved", &self.saved)
            .finish_non_exhaustive()
    }
}

impl Checkpoints {
    /// A job that resumes from `resume` (if any) and hands every save to `sink`.
    pub fn new(resume: Option<Checkpoint>, sink: Option<CheckpointSink>) -> Checkpoints {
        Checkpoints { resume, sink, saved: 0, newest_step: None }
    }

    pub(crate) fn save(&mut self, checkpoint: Checkpoint) {
        self.saved += 1;
        self.newest_step = Some(checkpoint.step);
        if let Some(sink) = self.sink.as_mut() {
            sink(checkpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_guest_and_the_wire_agree_on_the_largest_checkpoint() {
        assert_eq!(abi::MAX_CHECKPOINT, proto::msg::CHECKPOINT_CAP as u64);
    }
}
