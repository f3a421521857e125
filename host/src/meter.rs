//! The counts a job is billed for. They are the same counters the limits are enforced on, so
//! what is billed is what was enforced.

use std::ops::Sub;

/// How GPU time was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuTimeSource {
    /// GPU timestamp queries around each dispatch (the adapter supports them).
    Timestamps,
    /// Host wall time from submission to completion (the adapter has no timestamp queries).
    WallClock,
}

impl GpuTimeSource {
    pub fn name(self) -> &'static str {
        match self {
            GpuTimeSource::Timestamps => "timestamps",
            GpuTimeSource::WallClock => "wall-clock",
        }
    }
}

/// Usage of a job, a session or one inference call. Every count except `gpu_time_ns` is
/// deterministic: the same module with the same input gives the same counts on any host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Inference calls served (0 for a batch job).
    pub inferences: u64,
    /// WebAssembly fuel consumed (about one unit per instruction).
    pub fuel: u64,
    /// Compute dispatches.
    pub dispatches: u64,
    /// Workgroups dispatched (x * y * z summed over dispatches).
    pub workgroups: u64,
    /// Shader invocations: workgroups times workgroup size, summed over dispatches.
    pub invocations: u64,
    /// Bytes copied from the guest into GPU buffers.
    pub bytes_uploaded: u64,
    /// Bytes copied from GPU buffers into the guest.
    pub bytes_downloaded: u64,
    /// Highest GPU memory held in buffers at once.
    pub peak_gpu_bytes: u64,
    /// GPU time in nanoseconds, measured as `gpu_time_source` says.
    pub gpu_time_ns: u64,
    pub gpu_time_source: GpuTimeSource,
    /// A cluster member's bytes to and from its peers (collectives).
    pub net_bytes_sent: u64,
    pub net_bytes_received: u64,
    /// A cluster member's time in its collectives spent on the network (sending into a full
    /// link, waiting for its peer's frames).
    pub net_wait_ns: u64,
}

impl Usage {
    pub(crate) fn new(gpu_time_source: GpuTimeSource) -> Usage {
        Usage {
            inferences: 0,
            fuel: 0,
            dispatches: 0,
            workgroups: 0,
            invocations: 0,
            bytes_uploaded: 0,
            bytes_downloaded: 0,
            peak_gpu_bytes: 0,
            gpu_time_ns: 0,
            gpu_time_source,
            net_bytes_sent: 0,
            net_bytes_received: 0,
            net_wait_ns: 0,
        }
    }
}

impl Sub for Usage {
    type Output = Usage;

    /// The usage between two cumulative readings. `peak_gpu_bytes` is not a sum, so the
    /// difference keeps the later peak.
    fn sub(self, earlier: Usage) -> Usage {
        Usage {
            inferences: self.inferences.saturating_sub(earlier.inferences),
            fuel: self.fuel.saturating_sub(earlier.fuel),
            dispatches: self.dispatches.saturating_sub(earlier.dispatches),
            workgroups: self.workgroups.saturating_sub(earlier.workgroups),
            invocations: self.invocations.saturating_sub(earlier.invocations),
            bytes_uploaded: self.bytes_uploaded.saturating_sub(earlier.bytes_uploaded),
            bytes_downloaded: self.bytes_downloaded.saturating_sub(earlier.bytes_downloaded),
            peak_gpu_bytes: self.peak_gpu_bytes,
            gpu_time_ns: self.gpu_time_ns.saturating_sub(earlier.gpu_time_ns),
            gpu_time_source: self.gpu_time_source,
            net_bytes_sent: self.net_bytes_sent.saturating_sub(earlier.net_bytes_sent),
            net_bytes_received: self.net_bytes_received.saturating_sub(earlier.net_bytes_received),
            net_wait_ns: self.net_wait_ns.saturating_sub(earlier.net_wait_ns),
        }
    }
}
