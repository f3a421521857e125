//! The raw host functions of [`abi::IMPORT_MODULE`]. Everything else in the SDK is safe code
//! over these.
//!
//! On targets other than wasm32 there is no host to call: every function answers
//! [`NOT_WASM`], so the workspace still type-checks and documents natively.

#[cfg(target_arch = "wasm32")]
mod imports {
    // SAFETY: these declarations match `abi::IMPORTS` exactly (the host refuses a module whose
    // import signatures differ, and a host test checks this list against `abi`). The host
    // validates every pointer and length against the guest's memory before using it, so no
    // argument value can cause undefined behaviour on either side.
    #[allow(unsafe_code)]
    #[link(wasm_import_module = "wasmgrid_v1")]
    unsafe extern "C" {
        pub(crate) safe fn input_len() -> i64;
        pub(crate) safe fn input_read(dst: i32, len: i32, offset: i64) -> i32;
        pub(crate) safe fn output_write(src: i32, len: i32) -> i32;
        pub(crate) safe fn log(level: i32, src: i32, len: i32) -> i32;
        pub(crate) safe fn last_error(dst: i32, len: i32) -> i32;
        pub(crate) safe fn set_failure(src: i32, len: i32) -> i32;
        pub(crate) safe fn buffer_create(size: i64, usage: i32) -> i32;
        pub(crate) safe fn buffer_write(buffer: i32, offset: i64, src: i32, len: i32) -> i32;
        pub(crate) safe fn buffer_read(buffer: i32, offset: i64, dst: i32, len: i32) -> i32;
        pub(crate) safe fn buffer_destroy(buffer: i32) -> i32;
        pub(crate) safe fn pipeline_create(src: i32, len: i32, entry: i32, entry_len: i32) -> i32;
        pub(crate) safe fn pipeline_destroy(pipeline: i32) -> i32;
        pub(crate) safe fn submit(descs: i32, count: i32) -> i32;
        pub(crate) safe fn rank() -> i32;
        pub(crate) safe fn world_size() -> i32;
        pub(crate) safe fn barrier() -> i32;
        pub(crate) safe fn broadcast(buffer: i32, offset: i64, len: i64, root: i32) -> i32;
        pub(crate) safe fn all_reduce(buffer: i32, offset: i64, len: i64, op: i32, compression: i32) -> i32;
        pub(crate) safe fn all_reduce_start(buffer: i32, offset: i64, len: i64, op: i32, compression: i32) -> i32;
        pub(crate) safe fn collective_wait() -> i32;
        pub(crate) safe fn checkpoint_save(src: i32, len: i32, step: i64) -> i32;
        pub(crate) safe fn checkpoint_step() -> i64;
        pub(crate) safe fn checkpoint_len() -> i64;
        pub(crate) safe fn checkpoint_read(dst: i32, len: i32, offset: i64) -> i32;
    }
}

#[cfg(target_arch = "wasm32")]
pub(crate) use imports::*;

/// What every host function answers off wasm32.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) const NOT_WASM: i32 = abi::ErrorCode::InvalidArgument as i32;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::NOT_WASM;
    pub(crate) fn input_len() -> i64 {
        i64::from(NOT_WASM)
    }
    pub(crate) fn input_read(_: i32, _: i32, _: i64) -> i32 {
        NOT_WASM
    }
    pub(crate) fn output_write(_: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn log(_: i32, _: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn last_error(_: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn set_failure(_: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn buffer_create(_: i64, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn buffer_write(_: i32, _: i64, _: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn buffer_read(_: i32, _: i64, _: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn buffer_destroy(_: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn pipeline_create(_: i32, _: i32, _: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn pipeline_destroy(_: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn submit(_: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn rank() -> i32 {
        NOT_WASM
    }
    pub(crate) fn world_size() -> i32 {
        NOT_WASM
    }
    pub(crate) fn barrier() -> i32 {
        NOT_WASM
    }
    pub(crate) fn broadcast(_: i32, _: i64, _: i64, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn all_reduce(_: i32, _: i64, _: i64, _: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn all_reduce_start(_: i32, _: i64, _: i64, _: i32, _: i32) -> i32 {
        NOT_WASM
    }
    pub(crate) fn collective_wait() -> i32 {
        NOT_WASM
    }
    pub(crate) fn checkpoint_save(_: i32, _: i32, _: i64) -> i32 {
        NOT_WASM
    }
    pub(crate) fn checkpoint_step() -> i64 {
        -1
    }
    pub(crate) fn checkpoint_len() -> i64 {
        -1
    }
    pub(crate) fn checkpoint_read(_: i32, _: i32, _: i64) -> i32 {
        NOT_WASM
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;

/// A guest address as the host functions take it. On wasm32 addresses fit in `i32`.
pub(crate) fn addr<T>(ptr: *const T) -> i32 {
    ptr as usize as i32
}

/// A guest length as the host functions take it; lengths beyond `i32::MAX` become `-1`,
/// which the host rejects as a bad pointer.
pub(crate) fn len(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(-1)
}
