//! The daemon <-> worker protocol. A provider's daemon is a supervisor: every tenant's job or
//! session runs in a worker process (`wasmgrid worker`) that owns the wasmtime store and the
//! wgpu device. The daemon writes [`ToWorker`] frames to the worker's stdin and reads
//! [`FromWorker`] frames from its stdout, each a [`crate::frame`] (length prefix checked
//! against [`WORKER_CAP`] before the body is read).
//!
//! A worker serves one tenant at a time:
//! - at start it sends [`FromWorker::Ready`] with the GPU it opened and its default limits;
//! - [`ToWorker::Job`] runs a batch job: the worker says [`FromWorker::Accepted`], may ask [`FromWorker::NeedModule`] (answered
//!   by [`ToWorker::Module`]), streams [`FromWorker::Log`] and ends with
//!   [`FromWorker::JobDone`];
//! - [`ToWorker::Service`] starts an inference service ([`FromWorker::ServiceStarted`]), then
//!   each [`ToWorker::Infer`] is answered by one [`FromWorker::Inferred`], until
//!   [`ToWorker::EndService`] ([`FromWorker::Idle`]);
//! - [`ToWorker::Cancel`] ends the running call at its next check.
//!
//! A worker that has ended a tenant's work abnormally (crash, limit, hang, device loss) is not
//! reused: the daemon kills it and starts another. A worker that dies mid-job fails only that
//! job. Nothing here is trusted by the daemon beyond its size caps: a worker runs tenant code.

use serde::{Deserialize, Serialize};

use crate::msg::{
    BLOB_CAP, CHECKPOINT_CAP, Checkpoint, FailureKind, GpuInfo, JobLimits, JobResult, ModuleHash, WireUsage, bytes,
};

/// Cap of one frame either way: a module, an input and a checkpoint, an output, plus headroom
/// for the fields.
pub const WORKER_CAP: usize = BLOB_CAP + CHECKPOINT_CAP + (1 << 20);

/// Daemon to worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Measure the GPU's f32 matmul throughput (answered by [`FromWorker::Benchmarked`]).
    Benchmark,
    /// Run a batch job to its end.
    Job {
        job_id: String,
        module_hash: ModuleHash,
        #[serde(with = "bytes")]
        input: Vec<u8>,
        limits: JobLimits,
        /// For one rank of a cluster job: its rank and the world size. Its collectives then
        /// go out as [`FromWorker::Peer`] and come in as [`ToWorker::Peer`].
        #[serde(default)]
        member: Option<WorkerMember>,
        /// The checkpoint an earlier try saved, for the kernel to resume from.
        #[serde(default)]
        checkpoint: Option<Box<Checkpoint>>,
    },
    /// Start an inference service: load the module, run its `init`.
    Service {
        module_hash: ModuleHash,
        #[serde(with = "bytes")]
        init_input: Vec<u8>,
        limits: JobLimits,
        /// The init input is this file of the daemon's blob cache instead (`init_input` is
        /// then empty): too large for a frame, and read where it lies.
        #[serde(default)]
        init_blob: Option<InitBlob>,
    },
    /// The module bytes the worker asked for.
    Module {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// No module with that hash can be had: the job ends without running.
    NoModule { reason: String },
    /// One request to the running service.
    Infer {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// End the running service and free its resources.
    EndService,
    /// Stop the running job or call at its next check.
    Cancel,
    /// A frame from the member before this one in the ring, for the running cluster job.
    Peer {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// The link from the member before is gone: no more frames will come.
    PeerClosed { reason: String },
}

/// An init input the worker reads from a file of the daemon's blob cache, checking its length
/// and hash before `init` sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitBlob {
    pub path: String,
    pub hash: [u8; 32],
    pub len: u64,
}

/// A cluster job's rank as a worker runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerMember {
    pub rank: u32,
    pub world: u32,
}

/// What a job or call that did not succeed ended with, as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerFailure {
    pub kind: FailureKind,
    /// The limit's name when `kind` is [`FailureKind::Limit`].
    pub limit: Option<String>,
    pub message: String,
}

/// Worker to daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The worker opened its GPU and is ready for work.
    Ready {
        /// The GPU; `vram_bytes` is its largest buffer, `score_gflops` 0 (ask
        /// [`ToWorker::Benchmark`]).
        gpu: GpuInfo,
        /// The limits a job gets where it asks for none (and the most it may ask for).
        defaults: JobLimits,
    },
    Benchmarked {
        gflops: f64,
    },
    /// The worker took the job or service just sent, before running anything of it: a worker
    /// that dies before this failed on its own (the daemon tries another), not by the tenant.
    Accepted,
    /// The worker has no compiled module with this hash: send [`ToWorker::Module`].
    NeedModule {
        module_hash: ModuleHash,
    },
    /// New log bytes of the running job.
    Log {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// The batch job ended. Its `receipt` is `None`: the daemon signs receipts, never a worker.
    /// `reusable` is false when the worker must not serve another tenant (it hit a limit that
    /// may leave GPU work running, lost its device, or crashed its way out).
    JobDone {
        result: Box<JobResult>,
        reusable: bool,
    },
    /// The service's `init` ran (`Ok`) or failed; on failure the worker is idle again (or, if
    /// not `reusable`, must be replaced).
    ServiceStarted {
        result: Result<WireUsage, WorkerFailure>,
        #[serde(with = "bytes")]
        log: Vec<u8>,
        reusable: bool,
    },
    /// One request served. After an `Err` whose kind is not [`FailureKind::Guest`] the service
    /// is over.
    Inferred {
        result: Result<Inferred, WorkerFailure>,
    },
    /// The service ended; the worker is ready for the next tenant.
    Idle,
    /// The running job saved a checkpoint (at most [`CHECKPOINT_CAP`] bytes).
    Checkpoint(Box<Checkpoint>),
    /// A frame for the member after this one in the ring (the running cluster job's).
    Peer {
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// The worker cannot go on (its GPU device was lost, say) and exits after this.
    Fatal {
        reason: String,
    },
}

/// One inference's response and the usage of that call alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inferred {
    #[serde(with = "bytes")]
    pub response: Vec<u8>,
    pub usage: WireUsage,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_body, encode};

    #[test]
    fn worker_messages_round_trip_through_frames() {
        let job = ToWorker::Job {
            job_id: "job-1".into(),
            module_hash: [3; 32],
            input: vec![1; 1000],
            limits: JobLimits::default(),
            member: Some(WorkerMember { rank: 1, world: 2 }),
            checkpoint: Some(Box::new(Checkpoint { step: 7, bytes: vec![9; 100] })),
        };
        let frame = encode(&job, WORKER_CAP).unwrap();
        assert_eq!(decode_body::<ToWorker>(&frame[4..]).unwrap(), job);
        let failed = FromWorker::Inferred {
            result: Err(WorkerFailure { kind: FailureKind::Limit, limit: Some("fuel".into()), message: "out".into() }),
        };
        let frame = encode(&failed, WORKER_CAP).unwrap();
        assert_eq!(decode_body::<FromWorker>(&frame[4..]).unwrap(), failed);
    }
}
