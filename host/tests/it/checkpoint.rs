//! Checkpoints at the guest boundary: every bad save or read is an error code and nothing is
//! saved by it; a try given a checkpoint reads exactly it; `cluster-train` resumed from a
//! checkpoint ends with the output of a run that never stopped.

use std::sync::{Arc, Mutex};

use host::checkpoint::{Checkpoint, Checkpoints};
use host::collective::{Member, local_ring};
use host::{JobContext, Limits};

use crate::{host, text};

const WAT: &str = r#"(module
  (import "wasmgrid_v1" "checkpoint_save" (func $save (param i32 i32 i64) (result i32)))
  (import "wasmgrid_v1" "checkpoint_step" (func $step (result i64)))
  (import "wasmgrid_v1" "checkpoint_len" (func $len (result i64)))
  (import "wasmgrid_v1" "checkpoint_read" (func $read (param i32 i32 i64) (result i32)))
  (import "wasmgrid_v1" "output_write" (func $out (param i32 i32) (result i32)))
  ;; 16 MiB and a page: room for a save one byte over the cap.
  (memory (export "memory") 257)
  (data (i32.const 0) "abc")
  (func (export "_start")
    (i32.store (i32.const 100) (i32.wrap_i64 (call $step)))
    (i32.store (i32.const 104) (i32.wrap_i64 (call $len)))
    (i32.store (i32.const 108) (call $read (i32.const 200) (i32.const 10) (i64.const 2)))
    (i32.store (i32.const 112) (call $read (i32.const 200) (i32.const 10) (i64.const 6)))
    (i32.store (i32.const 116) (call $read (i32.const -8) (i32.const 10) (i64.const 0)))
    (i32.store (i32.const 120) (call $save (i32.const 0) (i32.const 3) (i64.const -1)))
    (i32.store (i32.const 124) (call $save (i32.const -4) (i32.const 3) (i64.const 1)))
    (i32.store (i32.const 128) (call $save (i32.const 0) (i32.const 16777217) (i64.const 1)))
    (i32.store (i32.const 132) (call $save (i32.const 0) (i32.const 3) (i64.const 3)))
    (i32.store (i32.const 136) (i32.load (i32.const 200)))
    (drop (call $out (i32.const 100) (i32.const 40)))))"#;

fn words(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A sink that keeps every save.
fn keep() -> (Arc<Mutex<Vec<Checkpoint>>>, host::checkpoint::CheckpointSink) {
    let saved = Arc::new(Mutex::new(Vec::new()));
    let to = saved.clone();
    (saved, Box::new(move |c| to.lock().unwrap().push(c)))
}

#[test]
fn bad_saves_and_reads_are_error_codes_and_a_resumed_try_reads_exactly_its_checkpoint() {
    use abi::ErrorCode::*;
    let module = host().load(&wat::parse_str(WAT).unwrap()).unwrap();
    let run = |resume: Option<Checkpoint>| {
        let (saved, sink) = keep();
        let context = JobContext { checkpoints: Checkpoints::new(resume, Some(sink)), ..JobContext::default() };
        let report = host().run_job(&module, Vec::new(), &Limits::default(), |_| {}, context).unwrap();
        assert_eq!(report.outcome, Ok(()), "{}", text(&report.log));
        let saved = saved.lock().unwrap().clone();
        (words(&report.output), saved, report)
    };
    // Afresh: nothing to resume from, and reading it is refused.
    let (got, saved, report) = run(None);
    let bad = [InvalidArgument as i32, BadPointer as i32, InvalidArgument as i32];
    assert_eq!(&got[..5], &[-1, -1, InvalidArgument as i32, InvalidArgument as i32, InvalidArgument as i32]);
    assert_eq!(&got[5..8], &bad, "a negative step, a bad pointer, one byte over the cap");
    assert_eq!(got[8], 0, "the good save after them");
    // Only the good save was made, whole.
    assert_eq!(saved, vec![Checkpoint { step: 3, bytes: b"abc".to_vec() }]);
    assert_eq!((report.checkpoints_saved, report.newest_checkpoint_step), (1, Some(3)));
    // Resumed: the step and length, a read from an offset, past the end refused, a bad pointer.
    let (got, _, _) = run(Some(Checkpoint { step: 9, bytes: b"hello".to_vec() }));
    assert_eq!(&got[..5], &[9, 5, 3, OutOfBounds as i32, BadPointer as i32], "{got:?}");
    assert_eq!(got[9].to_le_bytes()[..3], *b"llo", "bytes 2.. of the checkpoint");
}

/// Runs `cluster-train` as `world` members in this process, resuming from `resume`; returns
/// rank 0's output and every save made.
fn train(world: u32, input: &str, resume: Option<Checkpoint>) -> (Result<String, String>, Vec<Checkpoint>) {
    let module = host().load(&sample_artifacts::read(sample_artifacts::CLUSTER_TRAIN)).unwrap();
    let saved = Arc::new(Mutex::new(Vec::new()));
    let reports: Vec<host::JobReport> = std::thread::scope(|s| {
        let members: Vec<_> = local_ring(world)
            .into_iter()
            .zip(0..)
            .map(|(link, rank)| {
                let (module, resume, to) = (&module, resume.clone(), saved.clone());
                s.spawn(move || {
                    let sink: host::checkpoint::CheckpointSink = Box::new(move |c| to.lock().unwrap().push(c));
                    let context = JobContext {
                        cancel: None,
                        member: Member::new(rank, world, link, u64::MAX),
                        checkpoints: Checkpoints::new(resume, Some(sink)),
                    };
                    host().run_job(module, input.as_bytes().to_vec(), &Limits::default(), |_| {}, context).unwrap()
                })
            })
            .collect();
        members.into_iter().map(|m| m.join().unwrap()).collect()
    });
    let first = &reports[0];
    let out = match &first.outcome {
        Ok(()) => Ok(text(&first.output)),
        Err(f) => Err(format!("{f}: {}", text(&first.log))),
    };
    let saved = saved.lock().unwrap().clone();
    (out, saved)
}

#[test]
fn cluster_train_resumed_from_a_checkpoint_ends_as_a_run_that_never_stopped() {
    for (input, steps) in [
        ("mode=sync steps=60 lr=0.8 samples=256 features=5 seed=3 report=10 checkpoint=20", vec![20, 40]),
        ("mode=diloco steps=60 lr=0.8 samples=256 features=5 seed=3 h=10 checkpoint=2 compress=f16", vec![20, 40]),
    ] {
        let (whole, saved) = train(2, input, None);
        let whole = whole.unwrap();
        // Rank 0 saves every `checkpoint` (outer) steps, never at the end.
        assert_eq!(saved.iter().map(|c| c.step).collect::<Vec<_>>(), steps, "{input}");
        for c in &saved {
            let (resumed, again) = train(2, input, Some(c.clone()));
            assert_eq!(resumed.unwrap(), whole, "{input}: resumed from step {}", c.step);
            assert!(again.iter().all(|a| a.step > c.step), "a resumed run saves only later steps");
        }
    }
    // A checkpoint of another job's shape is refused as bad input, not trained from.
    let wrong = Checkpoint { step: 20, bytes: b"ctk1 not this one".to_vec() };
    let (out, _) = train(1, "mode=sync steps=60 checkpoint=20", Some(wrong));
    let err = out.unwrap_err();
    assert!(err.contains("checkpoint"), "{err}");
}
