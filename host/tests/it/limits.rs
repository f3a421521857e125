//! Limits that hold whatever the guest does: blocking WASI calls end within the wall time and
//! obey cancellation, no WGSL overflows the compiler's stack, staged buffer writes keep host
//! memory bounded, compiles count toward CPU time, and a lost device is told apart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use host::{Failure, Host, HostConfig, LimitKind, Limits};

use crate::hostile::{case, expect_limit, lines, still_serves};
use crate::{host, text};

/// Generous room over a limit for the host to notice it and tear the job down.
const SLACK: Duration = Duration::from_secs(2);

#[test]
fn sleeping_past_the_wall_time_ends_at_the_wall_time() {
    let limits = Limits { wall_time: Duration::from_secs(1), ..Limits::default() };
    let report = case("sleep 10000", &limits);
    expect_limit(&report, LimitKind::WallTime);
    assert!(
        report.wall_time < limits.wall_time + SLACK,
        "a 10 s sleep ran {:?} under a 1 s wall time",
        report.wall_time
    );
    let report = case("sleep-until 10000", &limits);
    expect_limit(&report, LimitKind::WallTime);
    assert!(report.wall_time < limits.wall_time + SLACK, "{:?}", report.wall_time);
}

#[test]
fn a_sleep_within_the_wall_time_returns_and_is_not_cpu_time() {
    // Sleeping three times as long as the CPU limit is fine: a sleep is host time.
    let limits =
        Limits { cpu_time: Duration::from_millis(300), wall_time: Duration::from_secs(20), ..Limits::default() };
    assert_eq!(lines(&case("sleep 900", &limits)), [("slept".to_string(), "900 ms".to_string())]);
    // An absolute deadline on the monotonic clock wakes with its own event.
    assert_eq!(text(&case("sleep-until 100", &limits).output).trim(), "clock 0 poll 0 events 1 userdata 7");
}

#[test]
fn a_cancelled_sleeping_job_ends_promptly() {
    let module = host().load(&sample_artifacts::read(sample_artifacts::HOSTILE)).unwrap();
    let limits = Limits { wall_time: Duration::from_secs(60), ..Limits::default() };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        flag.store(true, Ordering::SeqCst);
    });
    let started = Instant::now();
    let report = host().run_batch_cancellable(&module, b"sleep 30000".to_vec(), &limits, |_| {}, Some(cancel)).unwrap();
    canceller.join().unwrap();
    assert_eq!(report.outcome, Err(Failure::Host("the job was cancelled".into())));
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK, "cancelled after {:?}", started.elapsed());
    still_serves(host());
}

#[test]
fn polling_and_reading_stdin_never_block() {
    let limits = Limits { wall_time: Duration::from_secs(5), ..Limits::default() };
    // A ten-second clock beside stdin: stdin (empty) is ready at once, event type fd_read.
    assert_eq!(text(&case("poll-stdin", &limits).output).trim(), "poll 0 events 1 first 2 type 1");
    assert_eq!(text(&case("stdin", &limits).output).trim(), "stdin Ok(0) bytes");
}

/// What the host answered for each `wgsl <n> <shape>` case.
fn wgsl(cases: &[(&str, usize)]) -> Vec<String> {
    cases
        .iter()
        .map(|(shape, n)| {
            let report = case(&format!("wgsl {n} {shape}"), &Limits::default());
            assert_eq!(report.outcome, Ok(()), "{shape} {n}: log {}", text(&report.log));
            text(&report.output).trim().to_string()
        })
        .collect()
}

#[test]
fn a_300000_term_wgsl_sum_is_refused_not_a_stack_overflow() {
    // Each of these overflowed (or, for the sum, was measured to overflow) the stack of the
    // thread that compiled it; the host refuses them before naga sees them, with a guest error.
    let refused = wgsl(&[
        ("sum", 300_000),
        ("xsum", 300_000),
        ("neg", 300_000),
        ("parens", 100_000),
        ("else-if", 5_000),
        ("decls", 20_000),
    ]);
    assert_eq!(refused.len(), 6);
    for (line, want) in refused.iter().zip([
        "an expression of more than 4096 tokens",
        "an expression of more than 4096 tokens",
        "an expression of more than 4096 tokens",
        "nest 65 deep, over the 64 levels",
        "nest 65 deep, over the 64 levels",
        "more than 4096 declarations",
    ]) {
        assert!(line.contains("Some(InvalidWgsl): invalid wgsl: line "), "{line}");
        assert!(line.contains(want), "{line}");
    }
}

#[test]
fn the_deepest_wgsl_the_check_lets_through_compiles() {
    // Just under each bound, on the compile thread's stack, through naga, wgpu and the driver.
    let got = wgsl(&[("sum", 2000), ("xsum", 2000), ("neg", 4000), ("parens", 60), ("else-if", 60), ("decls", 4000)]);
    for line in &got {
        assert!(line.ends_with(" ok"), "{line}");
    }
    // Types nested 2000 deep meet naga's own parser limit, which is a guest error too.
    let got = wgsl(&[("types", 2000)]);
    assert!(got[0].contains("Some(InvalidWgsl)") && got[0].contains("recursion limit"), "{}", got[0]);
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn writing_a_buffer_over_and_over_without_submitting_keeps_host_memory_bounded() {
    // 200 writes of 64 MiB: 12.8 GB staged in host memory when nothing bounded it.
    let before = rss();
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..100_000 {
            peak = peak.max(rss());
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    let report = run_flood();
    done.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    assert_eq!(report.outcome, Ok(()), "log: {}", text(&report.log));
    assert_eq!(text(&report.output).trim(), "wrote 12800 MiB");
    assert_eq!(report.usage.bytes_uploaded, 200 << 26, "every write is billed");
    let growth = peak.saturating_sub(before);
    eprintln!("write flood: resident memory grew by at most {} MiB", growth >> 20);
    // The buffer, the guest's 64 MiB copy and one staging budget, plus what other tests in
    // this process hold meanwhile.
    assert!(growth < 1536 << 20, "resident memory grew by {} MiB", growth >> 20);
}

fn run_flood() -> host::JobReport {
    let module = host().load(&sample_artifacts::read(sample_artifacts::HOSTILE)).unwrap();
    host().run_batch(&module, b"write-flood 64 200".to_vec(), &Limits::default()).unwrap()
}

#[test]
fn shader_compiles_use_up_cpu_time() {
    // Compiling is the host's work for the guest: a job that does nothing but compile shaders
    // ends on its CPU time, long before its wall time.
    let limits = Limits { cpu_time: Duration::from_secs(1), wall_time: Duration::from_secs(60), ..Limits::default() };
    let report = case("compile-loop 1000000", &limits);
    expect_limit(&report, LimitKind::CpuTime);
    assert!(report.wall_time < limits.cpu_time + Duration::from_secs(10), "{:?}", report.wall_time);
}

#[test]
fn module_compile_time_is_reported_and_bounded_by_a_deadline() {
    // A module no test has loaded: the matmul sample with a custom section of its own.
    let mut wasm = sample_artifacts::read(sample_artifacts::MATMUL);
    wasm.extend_from_slice(&custom_section("compile-deadline-test"));
    let err = host().load_with_deadline(&wasm, Some(Instant::now())).unwrap_err();
    assert_eq!(err, host::LoadError::CompileTimeout(Duration::ZERO));
    assert!(err.to_string().contains("wall-time"), "{err}");
    let module = host().load_with_deadline(&wasm, Some(Instant::now() + Duration::from_secs(600))).unwrap();
    assert!(module.compile_time() > Duration::ZERO);
    // From memory, the same module costs (next to) nothing, and says so.
    let again = host().load(&wasm).unwrap();
    assert!(
        again.compile_time() <= module.compile_time(),
        "{:?} then {:?}",
        module.compile_time(),
        again.compile_time()
    );
}

/// A custom section named `name`: changes a module's hash, not what it does.
pub(crate) fn custom_section(name: &str) -> Vec<u8> {
    let mut payload = vec![u8::try_from(name.len()).unwrap()];
    payload.extend_from_slice(name.as_bytes());
    let mut section = vec![0u8, u8::try_from(payload.len()).unwrap()];
    section.extend(payload);
    section
}

#[test]
fn a_lost_device_fails_the_jobs_on_it_and_is_reported() {
    let own = Host::new(HostConfig { max_instances: 4, ..HostConfig::default() }).unwrap();
    assert_eq!(own.device_lost(), None);
    let module = own.load(&sample_artifacts::read(sample_artifacts::HOSTILE)).unwrap();
    let limits = Limits { wall_time: Duration::from_secs(30), ..Limits::default() };
    // A job holding a buffer while the device goes.
    let running = {
        let (own, module, limits) = (own.clone(), module.clone(), limits.clone());
        std::thread::spawn(move || own.run_batch(&module, b"gpu-after-sleep 1500".to_vec(), &limits).unwrap())
    };
    std::thread::sleep(Duration::from_millis(500));
    host::bench::lose_device(&own);
    let why = own.device_lost().expect("the loss is seen");
    let report = running.join().unwrap();
    match &report.outcome {
        Err(Failure::Host(m)) => assert!(m.starts_with("the GPU device was lost: ") && m.contains(&why), "{m}"),
        other => panic!("expected a host failure, got {other:?}"),
    }
    // A later job fails the same way, at its first GPU call.
    let report = own.run_batch(&module, b"gpu-after-sleep 0".to_vec(), &limits).unwrap();
    assert!(matches!(&report.outcome, Err(Failure::Host(m)) if m.contains("device was lost")), "{:?}", report.outcome);
}

#[test]
fn a_cancelled_job_waiting_for_the_gpu_ends_promptly() {
    // A host of its own: the shader keeps its device busy after the job is gone.
    let own = Host::new(HostConfig { max_instances: 2, ..HostConfig::default() }).unwrap();
    let module = own.load(&sample_artifacts::read(sample_artifacts::HOSTILE)).unwrap();
    let limits = Limits { wall_time: Duration::from_secs(120), ..Limits::default() };
    let case: &[u8] = if own.gpu().device_type == "Cpu" { b"long-shader 5000" } else { b"long-shader 60000 1000" };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        flag.store(true, Ordering::SeqCst);
    });
    let started = Instant::now();
    let report = own.run_batch_cancellable(&module, case.to_vec(), &limits, |_| {}, Some(cancel)).unwrap();
    canceller.join().unwrap();
    assert_eq!(report.outcome, Err(Failure::Host("the job was cancelled".into())));
    assert!(started.elapsed() < Duration::from_millis(500) + SLACK, "cancelled after {:?}", started.elapsed());
}
