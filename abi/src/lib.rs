#![doc = include_str!("../README.md")]
#![no_std]

extern crate alloc;

/// The version of the contract below. A module built against another version imports from
/// another module name (see [`import_module`]) and the host refuses it at load time.
pub const ABI_VERSION: u32 = 1;

/// The import module every wasmgrid host function lives in, for [`ABI_VERSION`].
pub const IMPORT_MODULE: &str = "wasmgrid_v1";

/// The prefix of every version's import module name; the host uses it to recognise a module
/// built against another ABI version and say which.
pub const IMPORT_MODULE_PREFIX: &str = "wasmgrid_v";

/// The WASI preview 1 import module. The host links all of it, with no preopened directory,
/// no environment, no network and captured standard streams.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Export a batch job runs: the WASI command entry point (`fn main` in Rust).
pub const EXPORT_START: &str = "_start";
/// Export an inference service runs once, before any request; its input is the job input.
pub const EXPORT_INIT: &str = "wasmgrid_init";
/// Export an inference service runs once per request; the request is the job input of that call.
pub const EXPORT_INFER: &str = "wasmgrid_infer";
/// Export of a WASI reactor (a `cdylib` built for `wasm32-wasip1`) that runs static constructors.
pub const EXPORT_INITIALIZE: &str = "_initialize";

/// Returns the ABI version a module name such as `wasmgrid_v7` denotes, if it is one.
pub fn import_module_version(module: &str) -> Option<u32> {
    module.strip_prefix(IMPORT_MODULE_PREFIX)?.parse().ok()
}

/// A WebAssembly value type as it appears in an import signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValType {
    I32,
    I64,
}

/// One host function: its name in [`IMPORT_MODULE`] and its signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Import {
    pub name: &'static str,
    pub params: &'static [ValType],
    pub results: &'static [ValType],
}

use ValType::{I32, I64};

/// Function names, one constant each, so guest and host cannot disagree on spelling.
pub mod func {
    /// `() -> i64`: length in bytes of the job input (of the current request for `wasmgrid_infer`).
    pub const INPUT_LEN: &str = "input_len";
    /// `(dst: i32, len: i32, offset: i64) -> i32`: copies input bytes from `offset`; returns the
    /// count copied (0 at the end).
    pub const INPUT_READ: &str = "input_read";
    /// `(src: i32, len: i32) -> i32`: appends bytes to the job output (the response, in a request).
    pub const OUTPUT_WRITE: &str = "output_write";
    /// `(level: i32, src: i32, len: i32) -> i32`: one UTF-8 line to the job log.
    pub const LOG: &str = "log";
    /// `(dst: i32, len: i32) -> i32`: copies the message of the last error this job got back;
    /// returns its full length.
    pub const LAST_ERROR: &str = "last_error";
    /// `(src: i32, len: i32) -> i32`: the reason the current call failed, shown to the renter.
    pub const SET_FAILURE: &str = "set_failure";
    /// `(size: i64, usage: i32) -> i32`: a new zero-filled GPU buffer; returns its handle.
    pub const BUFFER_CREATE: &str = "buffer_create";
    /// `(buffer: i32, offset: i64, src: i32, len: i32) -> i32`: guest bytes into a buffer.
    pub const BUFFER_WRITE: &str = "buffer_write";
    /// `(buffer: i32, offset: i64, dst: i32, len: i32) -> i32`: buffer bytes into the guest.
    pub const BUFFER_READ: &str = "buffer_read";
    /// `(buffer: i32) -> i32`: frees a buffer and its quota.
    pub const BUFFER_DESTROY: &str = "buffer_destroy";
    /// `(src: i32, len: i32, entry: i32, entry_len: i32) -> i32`: a compute pipeline from WGSL;
    /// returns its handle.
    pub const PIPELINE_CREATE: &str = "pipeline_create";
    /// `(pipeline: i32) -> i32`: frees a pipeline.
    pub const PIPELINE_DESTROY: &str = "pipeline_destroy";
    /// `(descs: i32, count: i32) -> i32`: runs `count` [`DispatchDesc`](super::DispatchDesc)s in
    /// order, in one GPU submission, and returns when the GPU has finished them.
    pub const SUBMIT: &str = "submit";
    /// `() -> i32`: this member's rank in its cluster job (0 in a job on one GPU).
    pub const RANK: &str = "rank";
    /// `() -> i32`: the cluster job's members (1 in a job on one GPU).
    pub const WORLD_SIZE: &str = "world_size";
    /// `() -> i32`: returns once every member has called it.
    pub const BARRIER: &str = "barrier";
    /// `(buffer: i32, offset: i64, len: i64, root: i32) -> i32`: `len` bytes of a GPU buffer
    /// from rank `root` to every member's same range.
    pub const BROADCAST: &str = "broadcast";
    /// `(buffer: i32, offset: i64, len: i64, op: i32, compression: i32) -> i32`: every
    /// member's `len / 4` f32s of a GPU buffer combined by `op` ([`REDUCE_SUM`](super::REDUCE_SUM),
    /// [`REDUCE_MEAN`](super::REDUCE_MEAN)), the result in every member's range, identical on
    /// all of them; sent as `compression` ([`COMPRESS_NONE`](super::COMPRESS_NONE), ...).
    pub const ALL_REDUCE: &str = "all_reduce";
    /// `(buffer: i32, offset: i64, len: i64, op: i32, compression: i32) -> i32`: the same
    /// all-reduce, started: the range is read now (at most [`MAX_ALL_REDUCE_START`](super::MAX_ALL_REDUCE_START)
    /// bytes) and combined while the kernel goes on; [`COLLECTIVE_WAIT`] writes the result
    /// into the range. One at a time: no other collective until it is waited for.
    pub const ALL_REDUCE_START: &str = "all_reduce_start";
    /// `() -> i32`: waits for the all-reduce [`ALL_REDUCE_START`] started and writes its
    /// result into its range; `InvalidArgument` when none is in flight.
    pub const COLLECTIVE_WAIT: &str = "collective_wait";
    /// `(src: i32, len: i32, step: i64) -> i32`: saves `len` bytes as the job's checkpoint at
    /// `step` (the kernel's own count, at least 0): if the job's provider is lost, its next try
    /// resumes from the newest one saved. At most [`MAX_CHECKPOINT`](super::MAX_CHECKPOINT)
    /// bytes.
    pub const CHECKPOINT_SAVE: &str = "checkpoint_save";
    /// `() -> i64`: the step of the checkpoint this try resumes from, or -1 when it starts
    /// afresh.
    pub const CHECKPOINT_STEP: &str = "checkpoint_step";
    /// `() -> i64`: the length in bytes of the checkpoint this try resumes from (-1: none).
    pub const CHECKPOINT_LEN: &str = "checkpoint_len";
    /// `(dst: i32, len: i32, offset: i64) -> i32`: copies checkpoint bytes from `offset`;
    /// returns the count copied (0 at the end).
    pub const CHECKPOINT_READ: &str = "checkpoint_read";
}

/// The most bytes `all_reduce_start` takes in one call: its range waits in host memory while
/// the kernel goes on.
pub const MAX_ALL_REDUCE_START: u64 = 64 << 20;

/// The largest checkpoint `checkpoint_save` takes.
pub const MAX_CHECKPOINT: u64 = 16 << 20;

/// Every host function of this ABI version. The host links exactly these; CI checks that built
/// samples import nothing else from [`IMPORT_MODULE`].
pub const IMPORTS: &[Import] = &[
    Import { name: func::INPUT_LEN, params: &[], results: &[I64] },
    Import { name: func::INPUT_READ, params: &[I32, I32, I64], results: &[I32] },
    Import { name: func::OUTPUT_WRITE, params: &[I32, I32], results: &[I32] },
    Import { name: func::LOG, params: &[I32, I32, I32], results: &[I32] },
    Import { name: func::LAST_ERROR, params: &[I32, I32], results: &[I32] },
    Import { name: func::SET_FAILURE, params: &[I32, I32], results: &[I32] },
    Import { name: func::BUFFER_CREATE, params: &[I64, I32], results: &[I32] },
    Import { name: func::BUFFER_WRITE, params: &[I32, I64, I32, I32], results: &[I32] },
    Import { name: func::BUFFER_READ, params: &[I32, I64, I32, I32], results: &[I32] },
    Import { name: func::BUFFER_DESTROY, params: &[I32], results: &[I32] },
    Import { name: func::PIPELINE_CREATE, params: &[I32, I32, I32, I32], results: &[I32] },
    Import { name: func::PIPELINE_DESTROY, params: &[I32], results: &[I32] },
    Import { name: func::SUBMIT, params: &[I32, I32], results: &[I32] },
    Import { name: func::RANK, params: &[], results: &[I32] },
    Import { name: func::WORLD_SIZE, params: &[], results: &[I32] },
    Import { name: func::BARRIER, params: &[], results: &[I32] },
    Import { name: func::BROADCAST, params: &[I32, I64, I64, I32], results: &[I32] },
    Import { name: func::ALL_REDUCE, params: &[I32, I64, I64, I32, I32], results: &[I32] },
    Import { name: func::ALL_REDUCE_START, params: &[I32, I64, I64, I32, I32], results: &[I32] },
    Import { name: func::COLLECTIVE_WAIT, params: &[], results: &[I32] },
    Import { name: func::CHECKPOINT_SAVE, params: &[I32, I32, I64], results: &[I32] },
    Import { name: func::CHECKPOINT_STEP, params: &[], results: &[I64] },
    Import { name: func::CHECKPOINT_LEN, params: &[], results: &[I64] },
    Import { name: func::CHECKPOINT_READ, params: &[I32, I32, I64], results: &[I32] },
];

/// Looks up a host function of this ABI version by name.
pub fn import(name: &str) -> Option<&'static Import> {
    IMPORTS.iter().find(|i| i.name == name)
}

/// Every WASI preview 1 function. A module may import any of them: the host's WASI context has
/// no preopened directory, no socket and no environment, so they reach nothing outside the job.
pub const WASI_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// Whether a module may import `module::name` under this ABI version.
pub fn import_allowed(module: &str, name: &str) -> bool {
    match module {
        IMPORT_MODULE => import(name).is_some(),
        WASI_MODULE => WASI_FUNCTIONS.contains(&name),
        _ => false,
    }
}

/// Buffer usage passed to `buffer_create`: a storage buffer (`var<storage>` in WGSL).
pub const BUFFER_STORAGE: i32 = 1;
/// Buffer usage passed to `buffer_create`: a uniform buffer (`var<uniform>` in WGSL).
pub const BUFFER_UNIFORM: i32 = 2;

/// Log levels for `log`.
pub const LOG_ERROR: i32 = 1;
pub const LOG_WARN: i32 = 2;
pub const LOG_INFO: i32 = 3;
pub const LOG_DEBUG: i32 = 4;

/// Reductions of `all_reduce`: the sum of the members' values, or their mean.
pub const REDUCE_SUM: i32 = 0;
pub const REDUCE_MEAN: i32 = 1;

/// How `all_reduce` sends values between members: f32 as they are; IEEE half precision (half
/// the bytes); int8 with one f32 scale per chunk (a quarter). The result is identical on every
/// member whichever is chosen.
pub const COMPRESS_NONE: i32 = 0;
pub const COMPRESS_F16: i32 = 1;
pub const COMPRESS_INT8: i32 = 2;

/// Offsets and lengths of `buffer_write` and `buffer_read` are multiples of this.
pub const COPY_ALIGNMENT: u64 = 4;

/// Errors the host returns to the guest as negative `i32` results. The host also keeps a
/// message for the last one, which the guest reads with `last_error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ErrorCode {
    /// A pointer and length do not lie inside the guest's linear memory.
    BadPointer = -1,
    /// A buffer or pipeline handle is not one this job holds (never created, or destroyed).
    UnknownHandle = -2,
    /// WGSL that does not parse or validate, or that uses what the host does not offer.
    InvalidWgsl = -3,
    /// The buffers bound to a dispatch do not match the pipeline's bindings.
    BindingMismatch = -4,
    /// A quota of this job (GPU bytes, buffer count, pipeline count) would be exceeded.
    QuotaExceeded = -5,
    /// A dispatch asks for more workgroups than the job or the device allows.
    WorkgroupLimit = -6,
    /// An offset or length is not a multiple of [`COPY_ALIGNMENT`].
    Misaligned = -7,
    /// An offset and length reach past the end of a buffer.
    OutOfBounds = -8,
    /// The job output would exceed its size limit.
    OutputTooLarge = -9,
    /// The GPU failed the operation (out of device memory, device lost).
    Gpu = -10,
    /// Any other argument the host cannot accept (an unknown usage flag, bad UTF-8, a zero size).
    InvalidArgument = -11,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and tables.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadPointer,
        ErrorCode::UnknownHandle,
        ErrorCode::InvalidWgsl,
        ErrorCode::BindingMismatch,
        ErrorCode::QuotaExceeded,
        ErrorCode::WorkgroupLimit,
        ErrorCode::Misaligned,
        ErrorCode::OutOfBounds,
        ErrorCode::OutputTooLarge,
        ErrorCode::Gpu,
        ErrorCode::InvalidArgument,
    ];

    /// The code for a negative result, if it is one.
    pub fn from_i32(code: i32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as i32 == code)
    }

    /// A short, stable, lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadPointer => "bad pointer",
            ErrorCode::UnknownHandle => "unknown handle",
            ErrorCode::InvalidWgsl => "invalid wgsl",
            ErrorCode::BindingMismatch => "binding mismatch",
            ErrorCode::QuotaExceeded => "quota exceeded",
            ErrorCode::WorkgroupLimit => "workgroup limit",
            ErrorCode::Misaligned => "misaligned",
            ErrorCode::OutOfBounds => "out of bounds",
            ErrorCode::OutputTooLarge => "output too large",
            ErrorCode::Gpu => "gpu error",
            ErrorCode::InvalidArgument => "invalid argument",
        }
    }
}

/// One dispatch in a `submit` call, as little-endian `u32`s in guest memory:
/// `pipeline, bindings_ptr, bindings_len, x, y, z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchDesc {
    /// Handle from `pipeline_create`.
    pub pipeline: u32,
    /// Guest address of `bindings_len` [`BindingDesc`]s.
    pub bindings_ptr: u32,
    pub bindings_len: u32,
    /// Workgroups along x, y and z.
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl DispatchDesc {
    pub const SIZE: usize = 24;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let fields = [self.pipeline, self.bindings_ptr, self.bindings_len, self.x, self.y, self.z];
        for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> DispatchDesc {
        let mut f = [0u32; 6];
        for (v, chunk) in f.iter_mut().zip(bytes.chunks_exact(4)) {
            let mut word = [0u8; 4];
            word.copy_from_slice(chunk);
            *v = u32::from_le_bytes(word);
        }
        let [pipeline, bindings_ptr, bindings_len, x, y, z] = f;
        DispatchDesc { pipeline, bindings_ptr, bindings_len, x, y, z }
    }
}

/// One buffer bound to a `@group(0) @binding(n)` of a pipeline, as little-endian `u32`s:
/// `binding, buffer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingDesc {
    pub binding: u32,
    /// Handle from `buffer_create`.
    pub buffer: u32,
}

impl BindingDesc {
    pub const SIZE: usize = 8;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let (a, b) = out.split_at_mut(4);
        a.copy_from_slice(&self.binding.to_le_bytes());
        b.copy_from_slice(&self.buffer.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> BindingDesc {
        let [a0, a1, a2, a3, b0, b1, b2, b3] = *bytes;
        BindingDesc { binding: u32::from_le_bytes([a0, a1, a2, a3]), buffer: u32::from_le_bytes([b0, b1, b2, b3]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip() {
        let d = DispatchDesc { pipeline: 1, bindings_ptr: 0x1000, bindings_len: 3, x: 4, y: 5, z: 6 };
        assert_eq!(DispatchDesc::from_bytes(&d.to_bytes()), d);
        let b = BindingDesc { binding: 2, buffer: 9 };
        assert_eq!(BindingDesc::from_bytes(&b.to_bytes()), b);
    }

    #[test]
    fn error_codes_are_distinct_and_negative() {
        for c in ErrorCode::ALL {
            assert!((c as i32) < 0);
            assert_eq!(ErrorCode::from_i32(c as i32), Some(c));
        }
        assert_eq!(ErrorCode::from_i32(0), None);
        assert_eq!(ErrorCode::from_i32(-1000), None);
    }

    #[test]
    fn version_is_encoded_in_module_name() {
        assert_eq!(import_module_version(IMPORT_MODULE), Some(ABI_VERSION));
        assert_eq!(import_module_version("wasmgrid_v2"), Some(2));
        assert_eq!(import_module_version("env"), None);
        assert!(import_allowed(IMPORT_MODULE, func::SUBMIT));
        assert!(!import_allowed(IMPORT_MODULE, "open_socket"));
        assert!(import_allowed(WASI_MODULE, "fd_write"));
        assert!(!import_allowed("env", "fd_write"));
    }
}

pub mod files;
