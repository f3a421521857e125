//! The worker loop (`host::worker::serve`) driven over an in-memory link, frame by frame, as the
//! daemon drives a worker process over its pipes.

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use proto::frame::{FrameDecoder, decode_body, encode};
use proto::msg::{FailureKind, JobLimits, Outcome};
use proto::worker::{FromWorker, ToWorker, WORKER_CAP};
use sha2::{Digest, Sha256};

/// The worker's stdin: bytes the test sends.
struct In {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Read for In {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.buf = b,
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        Ok(n)
    }
}

/// The worker's stdout: bytes the test reads.
struct Out(Sender<Vec<u8>>);

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(b.to_vec());
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The daemon's end of a link to a worker running on a thread of this test.
struct Daemon {
    to: Option<Sender<Vec<u8>>>,
    from: Receiver<Vec<u8>>,
    decoder: FrameDecoder,
    worker: Option<std::thread::JoinHandle<Result<(), host::worker::WorkerError>>>,
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_on(crate::host())
    }

    fn start_on(host: &'static host::Host) -> Daemon {
        let (to, rx) = channel();
        let (tx, from) = channel();
        let worker = std::thread::spawn(move || host::worker::serve(host, In { rx, buf: Vec::new() }, Out(tx)));
        Daemon { to: Some(to), from, decoder: FrameDecoder::new(WORKER_CAP), worker: Some(worker) }
    }

    fn send(&self, msg: &ToWorker) {
        self.send_raw(encode(msg, WORKER_CAP).unwrap());
    }

    fn send_raw(&self, bytes: Vec<u8>) {
        self.to.as_ref().unwrap().send(bytes).unwrap();
    }

    /// The next frame, past `Accepted` (which every job and service gets first).
    fn recv(&mut self) -> FromWorker {
        loop {
            match self.recv_any() {
                FromWorker::Accepted => continue,
                other => return other,
            }
        }
    }

    fn recv_any(&mut self) -> FromWorker {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(body) = self.decoder.push(&[]).unwrap() {
                return decode_body(&body).unwrap();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let bytes = self.from.recv_timeout(left).expect("the worker answered in time");
            if let Some(body) = self.decoder.push(&bytes).unwrap() {
                return decode_body(&body).unwrap();
            }
        }
    }

    /// Skips log frames.
    fn recv_not_log(&mut self) -> FromWorker {
        loop {
            match self.recv() {
                FromWorker::Log { .. } => continue,
                other => return other,
            }
        }
    }

    /// Waits for the end of a job, sending `module` if the worker asks for it.
    fn job_done(&mut self, module: &[u8]) -> (proto::msg::JobResult, bool) {
        loop {
            match self.recv() {
                FromWorker::NeedModule { .. } => self.send(&ToWorker::Module { bytes: module.to_vec() }),
                FromWorker::Log { .. } => {}
                FromWorker::JobDone { result, reusable } => return (*result, reusable),
                other => panic!("expected the job's end, got {other:?}"),
            }
        }
    }

    /// Closes the worker's stdin and returns how its loop ended.
    fn close(mut self) -> Result<(), host::worker::WorkerError> {
        self.to = None;
        self.worker.take().unwrap().join().unwrap()
    }
}

fn sample(name: &str) -> (Vec<u8>, [u8; 32]) {
    let bytes = sample_artifacts::read(name);
    let hash = Sha256::digest(&bytes).into();
    (bytes, hash)
}

#[test]
fn a_worker_fetches_a_module_once_runs_jobs_and_serves_a_service() {
    let mut d = Daemon::start();
    assert!(matches!(d.recv(), FromWorker::Ready { .. }));
    let (hostile, hash) = sample(sample_artifacts::HOSTILE);
    d.send(&ToWorker::Job {
        job_id: "j1".into(),
        module_hash: hash,
        input: b"zeros".to_vec(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    assert!(matches!(d.recv_any(), FromWorker::Accepted), "a worker says it took the job first");
    let (result, reusable) = d.job_done(&hostile);
    assert_eq!(result.outcome, Outcome::Succeeded, "{}", String::from_utf8_lossy(&result.log));
    assert!(reusable);
    assert!(result.receipt.is_none(), "workers sign nothing");
    // The same module again: compiled already, no fetch.
    d.send(&ToWorker::Job {
        job_id: "j2".into(),
        module_hash: hash,
        input: b"panic".to_vec(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    match d.recv_not_log() {
        FromWorker::JobDone { result, reusable } => {
            assert!(matches!(result.outcome, Outcome::Failed { kind: FailureKind::Trap, .. }), "{:?}", result.outcome);
            assert!(!reusable, "a worker whose job crashed is replaced");
        }
        other => panic!("expected JobDone, got {other:?}"),
    }
    let (echo, echo_hash) = sample(sample_artifacts::ECHO);
    d.send(&ToWorker::Service {
        module_hash: echo_hash,
        init_input: Vec::new(),
        limits: JobLimits::default(),
        init_blob: None,
    });
    // The worker asks for the module unless another test in this process (sharing its host)
    // compiled it already; then its first answer is the start itself.
    let started = match d.recv_not_log() {
        FromWorker::NeedModule { .. } => {
            d.send(&ToWorker::Module { bytes: echo });
            d.recv_not_log()
        }
        other => other,
    };
    match started {
        FromWorker::ServiceStarted { result: Ok(_), reusable: true, .. } => {}
        other => panic!("expected a started service, got {other:?}"),
    }
    for req in [&b"abc"[..], b"hello"] {
        d.send(&ToWorker::Infer { bytes: req.to_vec() });
        match d.recv() {
            FromWorker::Inferred { result: Ok(inf) } => {
                assert_eq!(inf.response, req.iter().rev().copied().collect::<Vec<u8>>());
                assert_eq!(inf.usage.inferences, 1);
            }
            other => panic!("expected an inference, got {other:?}"),
        }
    }
    d.send(&ToWorker::EndService);
    assert!(matches!(d.recv(), FromWorker::Idle));

    // An init input from the daemon's blob cache: read where it lies, after its length and
    // hash are checked; a file that no longer holds what the renter sent starts nothing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, b"weights").unwrap();
    let blob = |hash: [u8; 32]| proto::worker::InitBlob { path: path.to_string_lossy().into(), hash, len: 7 };
    for (hash, ok) in [(proto::msg::sha256(b"other"), false), (proto::msg::sha256(b"weights"), true)] {
        d.send(&ToWorker::Service {
            module_hash: echo_hash,
            init_input: Vec::new(),
            limits: JobLimits::default(),
            init_blob: Some(blob(hash)),
        });
        match (d.recv_not_log(), ok) {
            (FromWorker::ServiceStarted { result: Ok(_), .. }, true) => {}
            (FromWorker::ServiceStarted { result: Err(f), reusable: true, .. }, false) => {
                assert!(f.message.contains("no longer holds"), "{}", f.message);
            }
            (other, _) => panic!("expected the service to start: {ok}, got {other:?}"),
        }
    }
    d.send(&ToWorker::EndService);
    assert!(matches!(d.recv(), FromWorker::Idle));
    assert!(d.close().is_ok(), "a closed stdin ends the worker cleanly");
}

#[test]
fn a_cancelled_job_ends_at_once_and_its_worker_is_not_reused() {
    let mut d = Daemon::start();
    assert!(matches!(d.recv(), FromWorker::Ready { .. }));
    let (hostile, hash) = sample(sample_artifacts::HOSTILE);
    // Compile the module first, so the cancel below lands while the job runs.
    d.send(&ToWorker::Job {
        job_id: "warm".into(),
        module_hash: hash,
        input: b"zeros".to_vec(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    assert_eq!(d.job_done(&hostile).0.outcome, Outcome::Succeeded);
    d.send(&ToWorker::Job {
        job_id: "spin".into(),
        module_hash: hash,
        input: b"loop".to_vec(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    std::thread::sleep(Duration::from_millis(300));
    let cancelled = Instant::now();
    d.send(&ToWorker::Cancel);
    let (result, reusable) = d.job_done(&hostile);
    assert!(matches!(result.outcome, Outcome::Failed { .. }), "{:?}", result.outcome);
    assert!(!reusable);
    assert!(cancelled.elapsed() < Duration::from_secs(10), "cancelled in {:?}", cancelled.elapsed());
    // A cancel that arrives after its job ended stops nothing later.
    d.send(&ToWorker::Cancel);
    d.send(&ToWorker::Job {
        job_id: "ok".into(),
        module_hash: hash,
        input: b"zeros".to_vec(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    match d.recv_not_log() {
        FromWorker::JobDone { result, .. } => assert_eq!(result.outcome, Outcome::Succeeded),
        other => panic!("expected JobDone, got {other:?}"),
    }
    assert!(d.close().is_ok());
}

#[test]
fn bytes_that_do_not_match_their_hash_and_oversized_frames_end_the_worker() {
    let mut d = Daemon::start();
    assert!(matches!(d.recv(), FromWorker::Ready { .. }));
    d.send(&ToWorker::Job {
        job_id: "j".into(),
        module_hash: [9; 32],
        input: Vec::new(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    assert!(matches!(d.recv(), FromWorker::NeedModule { .. }));
    d.send(&ToWorker::Module { bytes: b"\0asm not this one".to_vec() });
    let ended = d.close();
    assert!(matches!(ended, Err(host::worker::WorkerError::Protocol(_))), "{ended:?}");

    let mut d = Daemon::start();
    assert!(matches!(d.recv(), FromWorker::Ready { .. }));
    d.send_raw(((WORKER_CAP + 1) as u32).to_be_bytes().to_vec());
    let ended = d.close();
    assert!(matches!(ended, Err(host::worker::WorkerError::Frame(_))), "{ended:?}");

    // A module that is refused is a job failure, and the worker goes on.
    let mut d = Daemon::start();
    assert!(matches!(d.recv(), FromWorker::Ready { .. }));
    let junk = b"not wasm at all".to_vec();
    let hash: [u8; 32] = Sha256::digest(&junk).into();
    d.send(&ToWorker::Job {
        job_id: "junk".into(),
        module_hash: hash,
        input: Vec::new(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    assert!(matches!(d.recv(), FromWorker::NeedModule { .. }));
    d.send(&ToWorker::Module { bytes: junk });
    match d.recv_not_log() {
        FromWorker::JobDone { result, reusable } => {
            assert!(matches!(result.outcome, Outcome::Failed { kind: FailureKind::Load, .. }), "{:?}", result.outcome);
            assert!(reusable);
        }
        other => panic!("expected JobDone, got {other:?}"),
    }
    assert!(d.close().is_ok());
}

#[test]
fn a_worker_whose_device_is_lost_says_so_and_ends_instead_of_failing_the_next_tenant() {
    // A host of its own: losing the shared one would fail every other test.
    let host: &'static host::Host = Box::leak(Box::new(host::Host::new(host::HostConfig::default()).unwrap()));
    let mut d = Daemon::start_on(host);
    assert!(matches!(d.recv(), FromWorker::Ready { .. }));
    host::bench::lose_device(host);
    let (_, hash) = sample(sample_artifacts::HOSTILE);
    d.send(&ToWorker::Job {
        job_id: "next".into(),
        module_hash: hash,
        input: b"zeros".to_vec(),
        limits: JobLimits::default(),
        member: None,
        checkpoint: None,
    });
    match d.recv() {
        FromWorker::Fatal { reason } => assert!(reason.contains("device was lost"), "{reason}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    let ended = d.close();
    assert!(matches!(ended, Err(host::worker::WorkerError::DeviceLost(_))), "{ended:?}");
}
