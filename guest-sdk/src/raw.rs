//! The host functions themselves, one wrapper per entry of `abi::IMPORTS`, for code that must
//! pass values the safe API never produces (the host's own hostile-guest tests and fuzzer).
//! Kernels should use [`Buffer`](crate::Buffer), [`Pipeline`](crate::Pipeline) and friends.
//!
//! Results are as the ABI defines them: zero or positive on success, a negative
//! [`ErrorCode`](crate::ErrorCode) otherwise. Pointers are guest addresses.
//!
//! The three functions that write into guest memory are `unsafe`: the host writes `len` bytes
//! at `dst` (after checking that they lie inside linear memory), behind the back of whatever
//! Rust thinks lives there.
#![allow(unsafe_code, clippy::missing_safety_doc)]

use crate::sys;

pub fn input_len() -> i64 {
    sys::input_len()
}

/// # Safety
/// `dst..dst + len` must be memory the caller owns and may overwrite.
pub unsafe fn input_read(dst: i32, len: i32, offset: i64) -> i32 {
    sys::input_read(dst, len, offset)
}

pub fn output_write(src: i32, len: i32) -> i32 {
    sys::output_write(src, len)
}

pub fn log(level: i32, src: i32, len: i32) -> i32 {
    sys::log(level, src, len)
}

/// # Safety
/// `dst..dst + len` must be memory the caller owns and may overwrite.
pub unsafe fn last_error(dst: i32, len: i32) -> i32 {
    sys::last_error(dst, len)
}

pub fn set_failure(src: i32, len: i32) -> i32 {
    sys::set_failure(src, len)
}

pub fn buffer_create(size: i64, usage: i32) -> i32 {
    sys::buffer_create(size, usage)
}

pub fn buffer_write(buffer: i32, offset: i64, src: i32, len: i32) -> i32 {
    sys::buffer_write(buffer, offset, src, len)
}

/// # Safety
/// `dst..dst + len` must be memory the caller owns and may overwrite.
pub unsafe fn buffer_read(buffer: i32, offset: i64, dst: i32, len: i32) -> i32 {
    sys::buffer_read(buffer, offset, dst, len)
}

pub fn buffer_destroy(buffer: i32) -> i32 {
    sys::buffer_destroy(buffer)
}

pub fn pipeline_create(src: i32, len: i32, entry: i32, entry_len: i32) -> i32 {
    sys::pipeline_create(src, len, entry, entry_len)
}

pub fn pipeline_destroy(pipeline: i32) -> i32 {
    sys::pipeline_destroy(pipeline)
}

pub fn submit(descs: i32, count: i32) -> i32 {
    sys::submit(descs, count)
}

pub fn all_reduce_start(buffer: i32, offset: i64, len: i64, op: i32, compression: i32) -> i32 {
    sys::all_reduce_start(buffer, offset, len, op, compression)
}

pub fn collective_wait() -> i32 {
    sys::collective_wait()
}

pub fn checkpoint_save(src: i32, len: i32, step: i64) -> i32 {
    sys::checkpoint_save(src, len, step)
}

pub fn checkpoint_step() -> i64 {
    sys::checkpoint_step()
}

pub fn checkpoint_len() -> i64 {
    sys::checkpoint_len()
}

/// # Safety
/// `dst..dst + len` must be memory the caller owns and may overwrite.
pub unsafe fn checkpoint_read(dst: i32, len: i32, offset: i64) -> i32 {
    sys::checkpoint_read(dst, len, offset)
}
