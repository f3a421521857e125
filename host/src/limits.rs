//! What one job may use. The same numbers are enforced by the sandbox and the GPU layer and
//! reported back when a job hits one.

use std::fmt;
use std::time::Duration;

/// The limits of one job (for an inference service: of the whole session, `init` and every
/// request together, except `wall_time` and `cpu_time`, which apply to each call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory the guest may grow to, in bytes.
    pub memory_bytes: u64,
    /// WebAssembly fuel: a deterministic count of executed instructions.
    pub fuel: u64,
    /// Time the guest may spend running WebAssembly (time inside host calls, such as waiting for
    /// the GPU, does not count).
    pub cpu_time: Duration,
    /// Time a call may take from start to end, GPU work included.
    pub wall_time: Duration,
    /// GPU memory held in buffers at any one time, in bytes.
    pub gpu_bytes: u64,
    /// GPU buffers held at any one time.
    pub buffers: u32,
    /// Compute pipelines held at any one time.
    pub pipelines: u32,
    /// Workgroups in one dispatch (x * y * z).
    pub workgroups_per_dispatch: u64,
    /// Dispatches over the life of the job.
    pub dispatches: u64,
    /// Bytes the job may write to its output (per request, for a service).
    pub output_bytes: u64,
    /// Bytes of stdout and stderr kept in the job log.
    pub log_bytes: u64,
    /// Size of one WGSL source.
    pub wgsl_bytes: u64,
    /// Bytes a cluster member sends to and receives from its peers, together.
    pub net_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            fuel: 50_000_000_000,
            cpu_time: Duration::from_secs(60),
            wall_time: Duration::from_secs(120),
            gpu_bytes: 2 << 30,
            buffers: 1024,
            pipelines: 256,
            workgroups_per_dispatch: 1 << 24,
            dispatches: 1_000_000,
            output_bytes: 256 << 20,
            log_bytes: 1 << 20,
            wgsl_bytes: 1 << 20,
            net_bytes: 64 << 30,
        }
    }
}

/// Which limit a job hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Memory,
    Fuel,
    CpuTime,
    WallTime,
    Stack,
    GpuBytes,
    Buffers,
    Pipelines,
    WorkgroupsPerDispatch,
    Dispatches,
    OutputBytes,
    LogBytes,
    WgslBytes,
    NetBytes,
}

impl LimitKind {
    /// The limit's name as the CLI flag and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Fuel => "fuel",
            LimitKind::CpuTime => "cpu-time",
            LimitKind::WallTime => "wall-time",
            LimitKind::Stack => "stack",
            LimitKind::GpuBytes => "gpu-bytes",
            LimitKind::Buffers => "buffers",
            LimitKind::Pipelines => "pipelines",
            LimitKind::WorkgroupsPerDispatch => "workgroups-per-dispatch",
            LimitKind::Dispatches => "dispatches",
            LimitKind::OutputBytes => "output-bytes",
            LimitKind::LogBytes => "log-bytes",
            LimitKind::WgslBytes => "wgsl-bytes",
            LimitKind::NetBytes => "net-bytes",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
