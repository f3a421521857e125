//! Collectives between the members of a cluster job (`wasmgrid submit JOB.wasm --gpus N`).
//!
//! Every member runs the same module with the same input; [`rank`] tells them apart. Each
//! collective must be called by every member, in the same order, with the same sizes: a member
//! whose calls differ from its peers' ends the job, saying so. In a job on one GPU (and under
//! `wasmgrid run`) the rank is 0, the world size 1, and every collective returns at once,
//! leaving the buffer as it was.
//!
//! ```no_run
//! use wasmgrid::{Buffer, collective::{self, Compression, Op}};
//! # fn main() -> wasmgrid::Result<()> {
//! let grads = Buffer::storage_from(&[0.5f32; 1024])?;
//! // ... each member computes its gradient on its share of the batch ...
//! collective::all_reduce(&grads, Op::Mean, Compression::None)?;
//! // every member now holds the same mean gradient
//! # Ok(()) }
//! ```
//!
//! An all-reduce can also run while the kernel computes: [`all_reduce_start`] reads the buffer
//! now and returns; [`Pending::wait`] writes the result back (DiLoCo overlapping its outer
//! step with the next inner ones, say). One is in flight at a time.
//!
//! ```no_run
//! use wasmgrid::{Buffer, collective::{self, Compression, Op}};
//! # fn main() -> wasmgrid::Result<()> {
//! let delta = Buffer::storage_from(&[0.5f32; 1024])?;
//! let pending = collective::all_reduce_start(&delta, Op::Mean, Compression::Int8)?;
//! // ... more local steps, on other buffers ...
//! pending.wait()?;
//! // `delta` now holds every member's mean
//! # Ok(()) }
//! ```
//!
//! A member whose provider dies fails the collective on the others once its link times out
//! (10 seconds after its last packet); the job then ends, or the scheduler runs it again. A
//! member computing between collectives is waited for, up to the job's wall time.

use crate::{Buffer, Result, check, sys};

/// How all-reduce combines the members' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Sum,
    /// The sum divided by the world size.
    Mean,
}

/// How all-reduce sends values between members. The result is identical on every member
/// whichever is chosen; compression trades precision for bytes on the wire (and so time on
/// slow links).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// f32 as they are.
    None,
    /// IEEE half precision: half the bytes, about 3 significant digits.
    F16,
    /// 8-bit integers with one scale per chunk of 262,144 values: a quarter of the bytes;
    /// each value within 1/254 of the chunk's largest magnitude (per hop).
    Int8,
}

/// This member's rank: 0 to [`world_size`] - 1.
pub fn rank() -> u32 {
    u32::try_from(sys::rank()).unwrap_or(0)
}

/// How many members the job has.
pub fn world_size() -> u32 {
    u32::try_from(sys::world_size()).ok().filter(|w| *w > 0).unwrap_or(1)
}

/// Returns once every member has called it.
pub fn barrier() -> Result<()> {
    check(sys::barrier()).map(|_| ())
}

/// Rank `root`'s whole `buffer` into every member's.
pub fn broadcast(buffer: &Buffer, root: u32) -> Result<()> {
    broadcast_range(buffer, 0, buffer.size(), root)
}

/// `len` bytes at `offset` (both multiples of 4) of rank `root`'s buffer into every member's.
pub fn broadcast_range(buffer: &Buffer, offset: u64, len: u64, root: u32) -> Result<()> {
    let root = i32::try_from(root).unwrap_or(i32::MAX);
    check(sys::broadcast(buffer.handle() as i32, to_i64(offset), to_i64(len), root)).map(|_| ())
}

/// The whole of `buffer`, as f32s, combined over every member by `op`, into every member's.
pub fn all_reduce(buffer: &Buffer, op: Op, compression: Compression) -> Result<()> {
    all_reduce_range(buffer, 0, buffer.size(), op, compression)
}

/// `len` bytes at `offset` (both multiples of 4) of `buffer`, as f32s, combined over every
/// member by `op`, into every member's same range.
pub fn all_reduce_range(buffer: &Buffer, offset: u64, len: u64, op: Op, compression: Compression) -> Result<()> {
    let (op, compression) = codes(op, compression);
    check(sys::all_reduce(buffer.handle() as i32, to_i64(offset), to_i64(len), op, compression)).map(|_| ())
}

/// An all-reduce [`all_reduce_start`] started: its buffer is borrowed until it is waited for
/// (dropping it waits too, ignoring the outcome).
#[must_use = "an all-reduce in flight must be waited for before the next collective"]
#[derive(Debug)]
pub struct Pending<'a> {
    _buffer: &'a Buffer,
    done: bool,
}

impl Pending<'_> {
    /// Waits for the all-reduce and writes its result into the buffer's range.
    pub fn wait(mut self) -> Result<()> {
        self.done = true;
        check(sys::collective_wait()).map(|_| ())
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = sys::collective_wait();
        }
    }
}

/// Starts the all-reduce of the whole of `buffer` ([`all_reduce`]) and returns at once: the
/// buffer is read now and combined while the kernel goes on; [`Pending::wait`] writes the
/// result. At most [`abi::MAX_ALL_REDUCE_START`] bytes, one in flight at a time, and no other
/// collective until it is waited for.
pub fn all_reduce_start(buffer: &Buffer, op: Op, compression: Compression) -> Result<Pending<'_>> {
    let (op, compression) = codes(op, compression);
    check(sys::all_reduce_start(buffer.handle() as i32, 0, to_i64(buffer.size()), op, compression))?;
    Ok(Pending { _buffer: buffer, done: false })
}

fn codes(op: Op, compression: Compression) -> (i32, i32) {
    let op = match op {
        Op::Sum => abi::REDUCE_SUM,
        Op::Mean => abi::REDUCE_MEAN,
    };
    let compression = match compression {
        Compression::None => abi::COMPRESS_NONE,
        Compression::F16 => abi::COMPRESS_F16,
        Compression::Int8 => abi::COMPRESS_INT8,
    };
    (op, compression)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
