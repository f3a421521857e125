//! The pool against stand-in worker processes (small shell scripts that speak just enough of
//! the protocol), so that deaths, bad frames and idle crashes are tested without a GPU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use proto::frame::encode;
use proto::msg::{FailureKind, GpuInfo, JobLimits};
use proto::worker::{FromWorker, ToWorker, WORKER_CAP};
use provider::pool::{Pool, Worker, WorkerCommand};

/// A worker that says Ready, then runs `then` (a shell snippet).
fn fake(dir: &tempfile::TempDir, then: &str) -> WorkerCommand {
    let ready = FromWorker::Ready {
        gpu: GpuInfo {
            name: "fake".into(),
            vendor: "none".into(),
            backend: "none".into(),
            device_type: "Cpu".into(),
            vram_bytes: 1 << 30,
            score_gflops: 0.0,
        },
        defaults: JobLimits { wall_time_ms: 1000, ..JobLimits::default() },
    };
    let path = dir.path().join(format!("ready-{}", then.len()));
    std::fs::write(&path, encode(&ready, WORKER_CAP).unwrap()).unwrap();
    WorkerCommand {
        program: "sh".into(),
        args: vec!["-c".into(), format!("cat \"$0\"; {then}").into(), path.into_os_string()],
    }
}

fn job() -> ToWorker {
    ToWorker::Job {
        job_id: "j".into(),
        module_hash: [1; 32],
        input: Vec::new(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

#[test]
fn a_worker_that_overflows_the_compilers_stack_is_described_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = fake(
        &dir,
        "sleep 0.2; echo \"thread 'wasmgrid-wgsl' has overflowed its stack\" >&2; \
         echo 'fatal runtime error: stack overflow' >&2; kill -s ABRT $$",
    );
    runtime().block_on(async {
        let mut w = Worker::start(&cmd).await.unwrap();
        assert_eq!(w.gpu.name, "fake");
        w.send(&job()).await.unwrap();
        let died = w.recv().await.unwrap_err();
        assert_eq!(died.kind, FailureKind::Crash);
        assert!(died.message.contains("shader overflowed the compiler's stack"), "{}", died.message);
    });
}

#[test]
fn a_worker_killed_by_a_signal_or_sending_junk_is_a_crash_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut w = Worker::start(&fake(&dir, "sleep 0.2; kill -s KILL $$")).await.unwrap();
        let died = w.recv().await.unwrap_err();
        assert_eq!(died.kind, FailureKind::Crash);
        assert!(died.message.contains("signal 9"), "{}", died.message);

        // A frame that claims more than the cap is refused on its length, and the worker
        // killed, before any of its body is read.
        let mut w = Worker::start(&fake(&dir, "printf '\\377\\377\\377\\377'; sleep 30")).await.unwrap();
        let died = w.recv().await.unwrap_err();
        assert!(died.message.contains("bad frame"), "{}", died.message);

        // A worker that never says Ready is not handed out.
        let cmd = WorkerCommand { program: "sh".into(), args: vec!["-c".into(), "echo nope >&2; exit 3".into()] };
        let refused = Worker::start(&cmd).await.unwrap_err();
        assert_eq!(refused.kind, FailureKind::Host, "a worker that cannot start is the provider's failure");
        assert!(refused.message.contains("status 3"), "{}", refused.message);
    });
}

#[test]
fn the_pool_keeps_workers_warm_never_hands_out_a_dead_one_and_replaces_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    // Each worker lives 1.5 s when idle, as if the OOM killer took it.
    let pool = Pool::new(fake(&dir, "sleep 1.5"), 2);
    runtime().block_on(async {
        pool.fill().await.unwrap();
        assert_eq!(pool.stats().idle, 2);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Both idle workers are dead by now: take starts a fresh one instead.
        let w = pool.take().await.unwrap();
        assert!(pool.stats().replaced >= 1, "{:?}", pool.stats());
        let pid = w.pid();
        pool.give_back(w, false).await;
        assert!(!pool.idle_pids().contains(&pid), "a worker given back as not reusable is not kept");
    });
}
