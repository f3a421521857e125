//! Checkpoints: what a long job saves as it goes, so that a try after its provider is lost
//! (killed, cut off, out of its heartbeat) resumes from there instead of from the start.
//!
//! A job saves its state with [`save`] (parameters, optimiser state, where it is in its data:
//! whatever it needs, at most [`MAX_BYTES`]) and a step number of its own. The scheduler keeps
//! the newest; when the job is run again, [`load`] gives it back. A job that starts afresh gets
//! `None`. Saving is cheap for the kernel (one copy of the bytes; the provider sends them on),
//! and at most one save a second reaches the scheduler: the newest of those in between is the
//! one kept. In a cluster job every rank may save; the newest step wins, so save from one rank
//! (rank 0, say) the state every member shares, as after an all-reduce.
//!
//! ```no_run
//! # fn main() -> wasmgrid::Result<()> {
//! let (mut step, mut params) = match wasmgrid::checkpoint::load()? {
//!     Some((step, bytes)) => (step, wasmgrid::from_bytes::<f32>(&bytes)),
//!     None => (0, vec![0.0f32; 1024]),
//! };
//! while step < 1000 {
//!     // ... one step of training on `params` ...
//!     step += 1;
//!     if step % 50 == 0 {
//!         wasmgrid::checkpoint::save(step, &wasmgrid::to_bytes(&params))?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Under `wasmgrid run JOB.wasm --checkpoint FILE` the newest checkpoint goes to `FILE`, and a
//! run that finds `FILE` resumes from it: a way to try a kernel's resume before submitting it.

use crate::{Error, ErrorCode, Result, check, sys};

/// The largest checkpoint [`save`] takes.
pub const MAX_BYTES: u64 = abi::MAX_CHECKPOINT;

/// Saves `bytes` as the job's checkpoint at `step`.
pub fn save(step: u64, bytes: &[u8]) -> Result<()> {
    let step = i64::try_from(step).map_err(|_| Error::kernel("a checkpoint's step must fit in an i64"))?;
    check(sys::checkpoint_save(sys::addr(bytes.as_ptr()), sys::len(bytes.len()), step)).map(|_| ())
}

/// The checkpoint this try resumes from (its step and bytes), or `None` when it starts afresh.
pub fn load() -> Result<Option<(u64, Vec<u8>)>> {
    let (Ok(step), Ok(total)) = (u64::try_from(sys::checkpoint_step()), usize::try_from(sys::checkpoint_len())) else {
        return Ok(None);
    };
    #[allow(clippy::redundant_closure)] // an `extern "C"` import on wasm32, not `Fn`
    let buf = crate::read_all(total, |d, l, o| sys::checkpoint_read(d, l, o))?;
    let done = buf.len();
    if done != total {
        let message = format!("the checkpoint ended after {done} of its {total} bytes");
        return Err(Error::Host { code: ErrorCode::InvalidArgument, message });
    }
    Ok(Some((step, buf)))
}
