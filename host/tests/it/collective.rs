//! The collective host functions at the guest boundary: every bad argument is an error code
//! the guest gets back before any peer hears of the call (so its peers do not wait on it),
//! and a good call right after works.

use host::collective::{Member, local_ring};
use host::{Failure, LimitKind, Limits};

use crate::host;

const WAT: &str = r#"(module
  (import "wasmgrid_v1" "buffer_create" (func $create (param i64 i32) (result i32)))
  (import "wasmgrid_v1" "buffer_write" (func $write (param i32 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "buffer_read" (func $read (param i32 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "all_reduce" (func $ar (param i32 i64 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "broadcast" (func $bc (param i32 i64 i64 i32) (result i32)))
  (import "wasmgrid_v1" "barrier" (func $barrier (result i32)))
  (import "wasmgrid_v1" "rank" (func $rank (result i32)))
  (import "wasmgrid_v1" "world_size" (func $world (result i32)))
  (import "wasmgrid_v1" "output_write" (func $out (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\00\00\80\3f\00\00\00\40\00\00\40\40\00\00\80\40")
  (func (export "_start") (local $b i32)
    (local.set $b (call $create (i64.const 16) (i32.const 1)))
    (drop (call $write (local.get $b) (i64.const 0) (i32.const 0) (i32.const 16)))
    (i32.store (i32.const 100) (call $ar (i32.const 99) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 104) (call $ar (local.get $b) (i64.const 0) (i64.const 32) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 108) (call $ar (local.get $b) (i64.const 2) (i64.const 8) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 112) (call $ar (local.get $b) (i64.const 0) (i64.const -4) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 116) (call $ar (local.get $b) (i64.const 0) (i64.const 16) (i32.const 7) (i32.const 0)))
    (i32.store (i32.const 120) (call $ar (local.get $b) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 9)))
    (i32.store (i32.const 124) (call $bc (local.get $b) (i64.const 0) (i64.const 16) (i32.const 5)))
    (i32.store (i32.const 128) (call $bc (local.get $b) (i64.const 0) (i64.const 16) (i32.const -1)))
    (i32.store (i32.const 132) (call $barrier))
    (i32.store (i32.const 136) (call $ar (local.get $b) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 140) (call $rank))
    (i32.store (i32.const 144) (call $world))
    (drop (call $read (local.get $b) (i64.const 0) (i32.const 148) (i32.const 16)))
    (drop (call $out (i32.const 100) (i32.const 64)))))"#;

fn words(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Both members' 1 2 3 4, summed, at byte `at` of a member's output, and bytes sent for it.
fn assert_summed(report: &host::JobReport, at: usize) {
    let sums: Vec<f32> =
        report.output[at..at + 16].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(sums, vec![2.0, 4.0, 6.0, 8.0], "both members' 1 2 3 4, summed");
    assert!(report.usage.net_bytes_sent > 0);
}

fn run_pair(limits: &Limits) -> Vec<host::JobReport> {
    run_pair_of(WAT, limits)
}

/// `wat` run as both members of a 2-member ring in this process.
fn run_pair_of(wat: &str, limits: &Limits) -> Vec<host::JobReport> {
    let module = host().load(&wat::parse_str(wat).unwrap()).unwrap();
    std::thread::scope(|s| {
        let runs: Vec<_> = local_ring(2)
            .into_iter()
            .zip(0..)
            .map(|(link, rank)| {
                let module = &module;
                s.spawn(move || {
                    let member = Member::new(rank, 2, link, limits.net_bytes);
                    host().run_member(module, Vec::new(), limits, |_| {}, None, member).unwrap()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

#[test]
fn bad_collective_arguments_are_error_codes_and_a_good_call_after_works() {
    use abi::ErrorCode::*;
    for (rank, report) in run_pair(&Limits::default()).iter().enumerate() {
        assert_eq!(report.outcome, Ok(()), "{}", String::from_utf8_lossy(&report.log));
        let got = words(&report.output);
        let codes: Vec<i32> = [UnknownHandle, OutOfBounds, Misaligned, InvalidArgument, InvalidArgument]
            .iter()
            .map(|c| *c as i32)
            .chain([InvalidArgument as i32, InvalidArgument as i32, InvalidArgument as i32, 0, 0])
            .collect();
        assert_eq!(&got[..10], &codes[..], "rank {rank}");
        assert_eq!(&got[10..12], &[rank as i32, 2]);
        assert_summed(report, 48);
    }
    // Alone (a job on one GPU) the same calls check the same way and the sum is its own.
    let module = host().load(&wat::parse_str(WAT).unwrap()).unwrap();
    let alone = host().run_batch(&module, Vec::new(), &Limits::default()).unwrap();
    let got = words(&alone.output);
    assert_eq!(&got[7..12], &[InvalidArgument as i32, 0, 0, 0, 1], "root 5 and -1 of 1 member are refused too");
    assert_eq!(alone.usage.net_bytes_sent, 0);
}

#[test]
fn bytes_past_the_net_limit_end_the_job_naming_the_limit() {
    let limits = Limits { net_bytes: 40, ..Limits::default() };
    for report in run_pair(&limits) {
        match &report.outcome {
            Err(Failure::Limit { limit: LimitKind::NetBytes, message }) => assert!(message.contains("40"), "{message}"),
            // The member that failed second may find the first already gone.
            Err(Failure::Host(m)) if m.contains("cluster") => {}
            other => panic!("{other:?}"),
        }
    }
}

const STARTED: &str = r#"(module
  (import "wasmgrid_v1" "buffer_create" (func $create (param i64 i32) (result i32)))
  (import "wasmgrid_v1" "buffer_write" (func $write (param i32 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "buffer_read" (func $read (param i32 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "all_reduce" (func $ar (param i32 i64 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "all_reduce_start" (func $start (param i32 i64 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "collective_wait" (func $wait (result i32)))
  (import "wasmgrid_v1" "barrier" (func $barrier (result i32)))
  (import "wasmgrid_v1" "rank" (func $rank (result i32)))
  (import "wasmgrid_v1" "world_size" (func $world (result i32)))
  (import "wasmgrid_v1" "output_write" (func $out (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\00\00\80\3f\00\00\00\40\00\00\40\40\00\00\80\40")
  (func (export "_start") (local $b i32) (local $c i32)
    (local.set $b (call $create (i64.const 16) (i32.const 1)))
    (local.set $c (call $create (i64.const 16) (i32.const 1)))
    (drop (call $write (local.get $b) (i64.const 0) (i32.const 0) (i32.const 16)))
    ;; Nothing in flight to wait for; a bad range, a bad op and one over the cap refused.
    (i32.store (i32.const 100) (call $wait))
    (i32.store (i32.const 104) (call $start (local.get $b) (i64.const 0) (i64.const 32) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 108) (call $start (local.get $b) (i64.const 0) (i64.const 16) (i32.const 7) (i32.const 0)))
    ;; Started: the kernel goes on (writing another buffer), other collectives are refused,
    ;; the place is still known, and the wait writes the sum.
    (i32.store (i32.const 112) (call $start (local.get $b) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
    (drop (call $write (local.get $c) (i64.const 0) (i32.const 0) (i32.const 16)))
    (i32.store (i32.const 116) (call $start (local.get $b) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 120) (call $ar (local.get $c) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 124) (call $barrier))
    (i32.store (i32.const 128) (call $rank))
    (i32.store (i32.const 132) (call $world))
    (i32.store (i32.const 136) (call $wait))
    ;; A good collective right after.
    (i32.store (i32.const 140) (call $barrier))
    (drop (call $read (local.get $b) (i64.const 0) (i32.const 144) (i32.const 16)))
    ;; Started and never waited for: the job still ends, and cleanly.
    (drop (call $start (local.get $c) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
    (drop (call $out (i32.const 100) (i32.const 60)))))"#;

#[test]
fn a_started_all_reduce_runs_while_the_kernel_goes_on_refuses_other_collectives_and_is_waited_for() {
    use abi::ErrorCode::*;
    let reports = run_pair_of(STARTED, &Limits::default());
    for (rank, report) in reports.iter().enumerate() {
        assert_eq!(report.outcome, Ok(()), "{}", String::from_utf8_lossy(&report.log));
        let got = words(&report.output);
        let invalid = InvalidArgument as i32;
        assert_eq!(&got[..3], &[invalid, OutOfBounds as i32, invalid], "rank {rank}");
        assert_eq!(got[3], 0, "started");
        assert_eq!(&got[4..7], &[invalid; 3], "a second start, an all-reduce, a barrier while in flight");
        assert_eq!(&got[7..11], &[rank as i32, 2, 0, 0], "rank and world as before; the wait; a barrier after");
        assert_summed(report, 44);
    }
    // Alone, the same: the sum is its own.
    let module = host().load(&wat::parse_str(STARTED).unwrap()).unwrap();
    let alone = host().run_batch(&module, Vec::new(), &Limits::default()).unwrap();
    assert_eq!(alone.outcome, Ok(()));
    assert_eq!(&words(&alone.output)[7..11], &[0, 1, 0, 0]);
}

/// Rank 0 starts an all-reduce and traps at once; rank 1 computes a while without any
/// collective, then ends.
const TRAP_IN_FLIGHT: &str = r#"(module
  (import "wasmgrid_v1" "buffer_create" (func $create (param i64 i32) (result i32)))
  (import "wasmgrid_v1" "all_reduce_start" (func $start (param i32 i64 i64 i32 i32) (result i32)))
  (import "wasmgrid_v1" "rank" (func $rank (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32)
    (if (i32.eqz (call $rank))
      (then
        (drop (call $start (call $create (i64.const 16) (i32.const 1)) (i64.const 0) (i64.const 16) (i32.const 0) (i32.const 0)))
        unreachable))
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1500000000))))))"#;

#[test]
fn a_member_that_traps_with_an_all_reduce_in_flight_ends_at_once_not_when_its_peers_do() {
    let module = host().load(&wat::parse_str(TRAP_IN_FLIGHT).unwrap()).unwrap();
    let limits = Limits::default();
    let ends: Vec<(host::JobReport, std::time::Instant)> = std::thread::scope(|s| {
        let runs: Vec<_> = local_ring(2)
            .into_iter()
            .zip(0..)
            .map(|(link, rank)| {
                let (module, limits) = (&module, &limits);
                s.spawn(move || {
                    let member = Member::new(rank, 2, link, limits.net_bytes);
                    let report = host().run_member(module, Vec::new(), limits, |_| {}, None, member).unwrap();
                    (report, std::time::Instant::now())
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let (trapped, busy) = (&ends[0], &ends[1]);
    assert!(matches!(trapped.0.outcome, Err(Failure::Trap(_))), "{:?}", trapped.0.outcome);
    assert_eq!(busy.0.outcome, Ok(()), "{:?}", busy.0.outcome);
    // Its all-reduce could only end when rank 1's links went with its job: the trapped member
    // did not wait for that (its worker is replaced; the round is left to die with it).
    let margin = busy.1.saturating_duration_since(trapped.1);
    assert!(margin > std::time::Duration::from_millis(300), "rank 0 ended only {margin:?} before rank 1");
}
