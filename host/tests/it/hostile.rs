//! Hostile guests: each case is contained with its named error, and the same host then runs a
//! good job correctly.

use std::time::Duration;

use host::{Failure, Host, HostConfig, LimitKind, Limits};

use crate::{host, run, text};

/// A small matmul on `h`, checked: the host still serves good jobs after a hostile one.
pub(crate) fn still_serves(h: &Host) {
    let (m, k, n) = (16u32, 16u32, 16u32);
    let mut input: Vec<u8> = [m, k, n].iter().flat_map(|w| w.to_le_bytes()).collect();
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
    input.extend(a.iter().chain(&b).flat_map(|v| v.to_le_bytes()));
    let module = h.load(&sample_artifacts::read(sample_artifacts::MATMUL)).unwrap();
    let report = h.run_batch(&module, input, &Limits::default()).unwrap();
    assert_eq!(report.outcome, Ok(()), "log: {}", text(&report.log));
    let c: Vec<f32> = bytemuck::pod_collect_to_vec(&report.output);
    for i in 0..m as usize {
        for j in 0..n as usize {
            let want: f32 = (0..k as usize).map(|p| a[i * 16 + p] * b[p * 16 + j]).sum();
            assert_eq!(c[i * 16 + j], want);
        }
    }
}

pub(crate) fn case(name: &str, limits: &Limits) -> host::JobReport {
    let report = run(sample_artifacts::HOSTILE, name.as_bytes(), limits);
    still_serves(host());
    report
}

pub(crate) fn expect_limit(report: &host::JobReport, want: LimitKind) {
    match &report.outcome {
        Err(Failure::Limit { limit, message }) => {
            assert_eq!(*limit, want, "{message}");
            let shown = report.outcome.as_ref().unwrap_err().to_string();
            assert!(shown.contains(want.name()), "the reason names the limit: {shown}");
        }
        other => panic!("expected limit {want}, got {other:?}; log: {}", text(&report.log)),
    }
}

/// Lines of the case's output as (name, rest).
pub(crate) fn lines(report: &host::JobReport) -> Vec<(String, String)> {
    assert_eq!(report.outcome, Ok(()), "log: {}", text(&report.log));
    text(&report.output)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap_or((l, ""));
            (a.to_string(), b.to_string())
        })
        .collect()
}

#[test]
pub(crate) fn hostile() {
    // An unknown case is the guest's own error, reported through its exit status and log.
    let report = case("no-such-case", &Limits::default());
    assert_eq!(report.outcome, Err(Failure::Exit(1)));
    assert!(text(&report.log).contains("unknown case"), "{}", text(&report.log));
}

#[test]
fn endless_loop_hits_cpu_time() {
    let limits = Limits { cpu_time: Duration::from_millis(500), ..Limits::default() };
    expect_limit(&case("loop", &limits), LimitKind::CpuTime);
}

#[test]
fn endless_loop_hits_fuel() {
    let limits = Limits { fuel: 20_000_000, ..Limits::default() };
    let report = case("loop", &limits);
    expect_limit(&report, LimitKind::Fuel);
    assert_eq!(report.usage.fuel, 20_000_000, "fuel is billed as enforced");
}

#[test]
fn unbounded_memory_growth_hits_memory() {
    let limits = Limits { memory_bytes: 64 << 20, ..Limits::default() };
    expect_limit(&case("grow", &limits), LimitKind::Memory);
}

#[test]
fn deep_recursion_hits_stack() {
    expect_limit(&case("recurse", &Limits::default()), LimitKind::Stack);
}

#[test]
fn panic_is_a_trap_with_the_message_in_the_log() {
    let report = case("panic", &Limits::default());
    assert!(matches!(report.outcome, Err(Failure::Trap(_))), "{:?}", report.outcome);
    assert!(text(&report.log).contains("panicked on purpose"), "{}", text(&report.log));
}

#[test]
fn exit_status_is_reported() {
    assert_eq!(case("exit", &Limits::default()).outcome, Err(Failure::Exit(3)));
}

#[test]
fn log_flood_hits_the_log_cap() {
    let limits = Limits { log_bytes: 64 << 10, ..Limits::default() };
    let report = case("log-flood", &limits);
    expect_limit(&report, LimitKind::LogBytes);
    assert!(report.log.len() <= 64 << 10);
}

#[test]
fn out_of_range_pointers_and_lengths_are_errors() {
    let bad = abi::ErrorCode::BadPointer as i32;
    let got = lines(&case("bad-pointer", &Limits::default()));
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["buffer_write", "buffer_read", "input_read", "output_write", "log", "pipeline_create", "submit", "wrap"]
    );
    for (name, code) in got {
        assert_eq!(code, bad.to_string(), "{name}");
    }
}

#[test]
fn unknown_and_freed_handles_are_errors() {
    let unknown = (abi::ErrorCode::UnknownHandle as i32).to_string();
    let got = lines(&case("bad-handle", &Limits::default()));
    for (name, code) in &got {
        let want = if name == "destroy" { "0" } else { unknown.as_str() };
        assert_eq!(code, want, "{name}: {got:?}");
    }
    assert_eq!(got.len(), 8);
}

#[test]
fn invalid_wgsl_is_an_error_with_the_compiler_message() {
    let got = lines(&case("invalid-wgsl", &Limits::default()));
    assert_eq!(got.len(), 3);
    for (name, rest) in &got {
        assert!(rest.starts_with("Some(InvalidWgsl): invalid wgsl: "), "{name}: {rest}");
    }
    assert!(got[0].1.contains("expected"), "parser message: {}", got[0].1);
    assert!(got[1].1.contains("u32"), "type checker message: {}", got[1].1);
    assert!(got[2].1.contains("no entry point named `nope`"), "{}", got[2].1);
}

#[test]
fn mismatched_bindings_are_errors() {
    let got = lines(&case("binding-mismatch", &Limits::default()));
    let expect = [
        ("swapped", "is var<uniform> but buffer"),
        ("missing", "@binding(1) (var<storage, read_write>) has no buffer"),
        ("extra", "declares no @group(0) @binding(7)"),
        ("twice", "@binding(1) is given twice"),
    ];
    for ((name, rest), (want_name, want)) in got.iter().zip(expect) {
        assert_eq!(name, want_name);
        assert!(rest.starts_with("Some(BindingMismatch)"), "{name}: {rest}");
        assert!(rest.contains(want), "{name}: {rest}");
    }
    assert_eq!(got[4], ("ok".to_string(), "ok".to_string()));
}

#[test]
fn dispatch_over_the_workgroup_limit_is_an_error() {
    let got = lines(&case("workgroups", &Limits::default()));
    assert!(got[0].1.starts_with("Some(WorkgroupLimit)") && got[0].1.contains("this device's maximum"), "{got:?}");
    assert!(
        got[1].1.starts_with("Some(WorkgroupLimit)") && got[1].1.contains("limit workgroups-per-dispatch"),
        "{got:?}"
    );
    assert_eq!(got[2].1, "ok");
}

#[test]
fn gpu_allocation_over_quota_is_refused_and_freeing_gives_it_back() {
    let limits = Limits { gpu_bytes: 64 << 20, ..Limits::default() };
    let out = text(&case("gpu-quota", &limits).output);
    assert!(out.contains("held 64 MiB, then Some(QuotaExceeded): quota exceeded: limit gpu-bytes"), "{out}");
    assert!(out.contains("after free ok"), "{out}");
}

#[test]
fn fresh_buffers_are_zero_after_another_job_filled_gpu_memory_with_a_secret() {
    let filled = case("secret 32", &Limits::default());
    assert!(text(&filled.output).starts_with("filled 32 MiB, first bytes [00, ee, ff, c0"), "{}", text(&filled.output));
    let read = case("zeros 32", &Limits::default());
    assert_eq!(text(&read.output).trim(), "read 32 MiB of fresh buffers, 0 non-zero bytes");
}

#[test]
fn files_and_environment_are_out_of_reach() {
    let out = text(&case("wasi-file", &Limits::default()).output);
    for line in out.lines().filter(|l| !l.starts_with("env")) {
        assert!(line.contains("error"), "{line}\n{out}");
    }
    assert!(out.contains("env vars 0"), "{out}");
}

#[test]
fn sockets_are_out_of_reach() {
    let out = text(&case("wasi-socket", &Limits::default()).output);
    assert!(out.contains("connect: error"), "{out}");
    assert!(out.contains("bind: error"), "{out}");
    let accepts: Vec<&str> = out.lines().filter(|l| l.starts_with("sock_accept")).collect();
    assert_eq!(accepts.len(), 8);
    for line in accepts {
        assert!(!line.ends_with("errno 0"), "{line}");
    }
}

/// A shader that would spin for many seconds ends with the job's wall-time limit, and the same
/// host goes on serving on a fresh device. It gets a host of its own so its hung device does
/// not slow the other tests.
#[test]
fn hung_shader_ends_at_wall_time_and_the_host_recovers() {
    let own = Host::new(HostConfig { max_instances: 4, ..HostConfig::default() }).unwrap();
    let module = own.load(&sample_artifacts::read(sample_artifacts::HOSTILE)).unwrap();
    let limits = Limits { wall_time: Duration::from_secs(1), ..Limits::default() };
    let started = std::time::Instant::now();
    // About five seconds of work on a software driver (which keeps a CPU busy until it is done,
    // so no longer), and far more than a second on any GPU.
    let case: &[u8] = if own.gpu().device_type == "Cpu" { b"long-shader 5000" } else { b"long-shader 60000 1000" };
    assert_eq!(own.device_replaced_count(), 0);
    let report = own.run_batch(&module, case.to_vec(), &limits).unwrap();
    expect_limit(&report, LimitKind::WallTime);
    let shown = report.outcome.as_ref().unwrap_err().to_string();
    assert!(shown.contains("GPU work was still running at the wall-time limit"), "{shown}");
    assert!(started.elapsed() < Duration::from_secs(20), "the kill came {:?} after the start", started.elapsed());
    // A worker learns from the count that its device was given up on, and that it should go.
    assert_eq!(own.device_replaced_count(), 1);
    assert_eq!(own.device_lost(), None, "the fresh device works");
    still_serves(&own);
}

/// The fuzzing guest runs a known program: a buffer round trip through a shader, then bad
/// pointers, each call answered.
#[test]
pub(crate) fn fuzz_driver() {
    let program = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/gpu-roundtrip")).unwrap();
    let report = run(sample_artifacts::FUZZ_DRIVER, &program, &Limits::default());
    let out = text(&report.output);
    let results: Vec<(u8, i64)> = out
        .lines()
        .map(|l| {
            let (op, r) = l.split_once(' ').unwrap();
            (op.parse().unwrap(), r.parse().unwrap())
        })
        .collect();
    // create -> handle 1, write -> ok, pipeline -> handle 2, submit -> ok, read -> ok, last_error.
    assert_eq!(&results[..5], &[(6, 1), (7, 0), (10, 2), (13, 0), (8, 0)], "{out}");
    assert_eq!(report.usage.dispatches, 1);
    // A started all-reduce (alone: the identity), waited for once; a second wait is refused.
    let program = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/all-reduce-start")).unwrap();
    let report = run(sample_artifacts::FUZZ_DRIVER, &program, &Limits::default());
    let out = text(&report.output);
    let invalid = abi::ErrorCode::InvalidArgument as i64;
    assert_eq!(out.lines().collect::<Vec<_>>(), ["6 1", "15 0", "20 0", &format!("20 {invalid}")], "{out}");
    for seed in ["bad-pointers", "uniform-shader", "io"] {
        let program = std::fs::read(format!("{}/../fuzz/seeds/{seed}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let report = run(sample_artifacts::FUZZ_DRIVER, &program, &Limits::default());
        assert!(!matches!(report.outcome, Err(Failure::Host(_))), "{seed}: {:?}", report.outcome);
    }
}
