//! The host functions of `abi::IMPORTS`, linked into every job. Each one checks the guest's
//! pointers and lengths against its memory, then calls the GPU layer with plain slices.

use std::time::Instant;

use abi::{BindingDesc, DispatchDesc, ErrorCode, func};
use wasmtime::{Caller, Linker};

use super::JobState;
use crate::collective::{CollectiveError, Compression, Member, ReduceOp};
use crate::error::{CallError, Fatal, GuestError, guest};
use crate::limits::LimitKind;

/// Most dispatches one `submit` may carry, and bindings one dispatch may carry: bounds on what
/// the host decodes from guest memory per call.
const MAX_DISPATCHES_PER_SUBMIT: usize = 4096;
const MAX_BINDINGS_PER_DISPATCH: usize = 64;
/// Longest message `log` and `set_failure` keep.
const MAX_MESSAGE: usize = 64 << 10;

type Ctx<'a> = Caller<'a, JobState>;

/// The guest's memory and the job state, borrowed together.
fn split<'a>(caller: &'a mut Ctx<'_>) -> Result<(&'a mut [u8], &'a mut JobState), CallError> {
    let memory = caller
        .data()
        .memory
        .ok_or_else(|| CallError::Guest(GuestError::new(ErrorCode::BadPointer, "the module exports no memory")))?;
    Ok(memory.data_and_store_mut(caller))
}

fn range(mem_len: usize, ptr: i32, len: i32) -> Result<std::ops::Range<usize>, CallError> {
    let bad = || {
        GuestError::new(
            ErrorCode::BadPointer,
            format!("{len} bytes at {ptr:#x} are outside guest memory ({mem_len} bytes)"),
        )
    };
    let start = u32::try_from(ptr).map_err(|_| bad())? as usize;
    let n = u32::try_from(len).map_err(|_| bad())? as usize;
    let end = start.checked_add(n).filter(|&e| e <= mem_len).ok_or_else(bad)?;
    Ok(start..end)
}

fn bytes(mem: &[u8], ptr: i32, len: i32) -> Result<&[u8], CallError> {
    let r = range(mem.len(), ptr, len)?;
    mem.get(r).ok_or_else(|| GuestError::new(ErrorCode::BadPointer, "range outside guest memory").into())
}

fn bytes_mut(mem: &mut [u8], ptr: i32, len: i32) -> Result<&mut [u8], CallError> {
    let r = range(mem.len(), ptr, len)?;
    mem.get_mut(r).ok_or_else(|| GuestError::new(ErrorCode::BadPointer, "range outside guest memory").into())
}

/// Maps a host call's result onto the guest: a value, an error code (keeping its message for
/// `last_error`), or a trap that ends the job.
fn finish(state: &mut JobState, result: Result<i32, CallError>) -> wasmtime::Result<i32> {
    match result {
        Ok(v) => Ok(v),
        Err(CallError::Guest(e)) => {
            state.last_error = e.message;
            Ok(e.code as i32)
        }
        Err(CallError::Fatal(f)) => {
            state.fatal = Some(f.clone());
            Err(wasmtime::Error::new(f))
        }
    }
}

/// Runs a host call that may block on the GPU, counting its time as host time rather than
/// guest CPU time. (Work the host does for the guest, such as compiling its shaders, is not
/// wrapped in this: it counts as CPU time.)
fn timed<T>(state: &mut JobState, f: impl FnOnce(&mut JobState, Instant) -> T) -> T {
    let start = Instant::now();
    let deadline = state.clock.deadline;
    let out = f(state, deadline);
    // A checkpoint held for the gap goes on at the job's next host call once it is due.
    state.checkpoints.poll(Instant::now());
    state.clock.host_time += start.elapsed();
    out
}

/// Bytes of a GPU buffer one collective step holds in host memory: a larger range goes in
/// windows of this size, each its own collective (every member splits the same way).
const COLLECTIVE_WINDOW: usize = 64 << 20;

/// The windows a collective of `n` bytes at `offset` goes in: (offset, size) each, and one
/// empty window for an empty call, which still shows on the wire.
fn windows(offset: i64, n: usize) -> impl Iterator<Item = (i64, usize)> {
    let count = n.div_ceil(COLLECTIVE_WINDOW).max(1);
    (0..count).map(move |i| {
        let at = i * COLLECTIVE_WINDOW;
        (offset.saturating_add(at as i64), (n - at).min(COLLECTIVE_WINDOW))
    })
}

/// A collective's failure: the job ends, saying why.
fn collective_fatal(e: CollectiveError) -> CallError {
    CallError::Fatal(match e {
        CollectiveError::Mismatch(_) => Fatal::Kernel(e.to_string()),
        CollectiveError::Limit { .. } => Fatal::limit(LimitKind::NetBytes, e.to_string()),
        CollectiveError::Deadline { .. } => Fatal::limit(LimitKind::WallTime, e.to_string()),
        CollectiveError::Cancelled => Fatal::Host("the job was cancelled".into()),
        _ => Fatal::Host(format!("cluster: {e}")),
    })
}

/// The byte length of a collective's range, checked against the buffer before any peer hears
/// of the call.
fn collective_range(state: &JobState, buffer: i32, offset: i64, len: i64) -> Result<usize, CallError> {
    let n = usize::try_from(len)
        .map_err(|_| GuestError::new(ErrorCode::InvalidArgument, format!("length {len} is negative")))?;
    state.gpu.check_range(buffer, offset, n)?;
    Ok(n)
}

/// An all-reduce's operation and compression codes, checked.
fn reduce_args(op: i32, compression: i32) -> Result<(ReduceOp, Compression), CallError> {
    let op = ReduceOp::from_abi(op)
        .ok_or_else(|| GuestError::new(ErrorCode::InvalidArgument, format!("unknown reduction {op}")))?;
    let compression = Compression::from_abi(compression)
        .ok_or_else(|| GuestError::new(ErrorCode::InvalidArgument, format!("unknown compression {compression}")))?;
    Ok((op, compression))
}

fn all_reduce(
    state: &mut JobState,
    buffer: i32,
    offset: i64,
    len: i64,
    op: i32,
    compression: i32,
) -> Result<i32, CallError> {
    let (op, compression) = reduce_args(op, compression)?;
    let n = collective_range(state, buffer, offset, len)?;
    timed(state, |state, deadline| {
        for (window_offset, size) in windows(offset, n) {
            let mut bytes = vec![0u8; size];
            state.gpu.buffer_read(buffer, window_offset, &mut bytes, deadline)?;
            let mut values: Vec<f32> =
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
            // Every part names the whole call's size: members whose calls differ are found
            // even where their parts would match.
            state.member.all_reduce_part(&mut values, op, compression, n as u64, deadline).map_err(collective_fatal)?;
            for (c, v) in bytes.chunks_exact_mut(4).zip(&values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
            state.gpu.buffer_write(buffer, window_offset, &bytes, deadline)?;
        }
        Ok(0)
    })
}

/// An all-reduce `all_reduce_start` began: the thread that runs it on the member (taken out
/// of the job's state meanwhile) and where its result goes.
pub(crate) struct InFlight {
    buffer: i32,
    offset: i64,
    rank: u32,
    world: u32,
    /// The member's network wait before it started: the overlapped time does not count.
    waited_before: std::time::Duration,
    thread: std::thread::JoinHandle<(Member, Result<Vec<u8>, CollectiveError>)>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").field("buffer", &self.buffer).field("offset", &self.offset).finish()
    }
}

/// Refuses a collective while one started with `all_reduce_start` is in flight.
fn none_in_flight(state: &JobState) -> Result<(), CallError> {
    match state.in_flight {
        Some(_) => guest(
            ErrorCode::InvalidArgument,
            "an all-reduce started with all_reduce_start is in flight: wait for it (collective_wait) first",
        ),
        None => Ok(()),
    }
}

/// This member's rank and world, an all-reduce in flight or not.
fn place(state: &JobState) -> (u32, u32) {
    match &state.in_flight {
        Some(f) => (f.rank, f.world),
        None => (state.member.rank(), state.member.world()),
    }
}

fn all_reduce_start(
    state: &mut JobState,
    buffer: i32,
    offset: i64,
    len: i64,
    op: i32,
    compression: i32,
) -> Result<i32, CallError> {
    none_in_flight(state)?;
    let (op, compression) = reduce_args(op, compression)?;
    let n = collective_range(state, buffer, offset, len)?;
    if n as u64 > abi::MAX_ALL_REDUCE_START {
        return guest(
            ErrorCode::InvalidArgument,
            format!("all_reduce_start takes at most {} bytes, not {n}: use all_reduce", abi::MAX_ALL_REDUCE_START),
        );
    }
    let mut bytes = vec![0u8; n];
    timed(state, |state, deadline| state.gpu.buffer_read(buffer, offset, &mut bytes, deadline))?;
    let deadline = state.clock.deadline;
    let mut member = std::mem::take(&mut state.member);
    let (rank, world, waited_before) = (member.rank(), member.world(), member.network_wait());
    let thread = std::thread::Builder::new()
        .name("wasmgrid-all-reduce".into())
        .spawn(move || {
            let mut values: Vec<f32> =
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
            let reduced = member.all_reduce_part(&mut values, op, compression, n as u64, deadline);
            let out = reduced.map(|()| values.iter().flat_map(|v| v.to_le_bytes()).collect());
            (member, out)
        })
        .map_err(|e| CallError::Fatal(Fatal::Host(format!("starting an all-reduce: {e}"))))?;
    state.in_flight = Some(InFlight { buffer, offset, rank, world, waited_before, thread });
    Ok(0)
}

/// Joins the all-reduce in flight, if any: the member is back in the job's state, the time
/// the kernel waited for it counted as network wait. Its result, if it had one.
fn join_in_flight(state: &mut JobState) -> Option<(InFlightEnd, i32, i64)> {
    let f = state.in_flight.take()?;
    let t = Instant::now();
    let joined = f.thread.join();
    let blocked = t.elapsed();
    Some(match joined {
        Ok((mut member, result)) => {
            member.set_network_wait(f.waited_before + blocked);
            state.member = member;
            (InFlightEnd::Done(result), f.buffer, f.offset)
        }
        Err(_) => (InFlightEnd::Panicked, f.buffer, f.offset),
    })
}

enum InFlightEnd {
    Done(Result<Vec<u8>, CollectiveError>),
    Panicked,
}

/// At the job's end: an all-reduce still in flight is waited for and its result dropped
/// (`join`), or left running detached (a failed job: its worker is replaced).
pub(crate) fn settle_in_flight(state: &mut JobState, join: bool) {
    if join {
        let _ = join_in_flight(state);
    } else {
        state.in_flight = None;
    }
}

fn collective_wait(state: &mut JobState) -> Result<i32, CallError> {
    if state.in_flight.is_none() {
        return guest(ErrorCode::InvalidArgument, "no all-reduce is in flight (all_reduce_start starts one)");
    }
    let joined = timed(state, |state, _| join_in_flight(state));
    let Some((end, buffer, offset)) = joined else { return Ok(0) };
    let bytes = match end {
        InFlightEnd::Done(Ok(bytes)) => bytes,
        InFlightEnd::Done(Err(e)) => return Err(collective_fatal(e)),
        InFlightEnd::Panicked => return Err(CallError::Fatal(Fatal::Host("the all-reduce thread failed".into()))),
    };
    // The kernel may have destroyed or shrunk the buffer meanwhile: that is its error.
    timed(state, |state, deadline| state.gpu.buffer_write(buffer, offset, &bytes, deadline))?;
    Ok(0)
}

fn broadcast(state: &mut JobState, buffer: i32, offset: i64, len: i64, root: i32) -> Result<i32, CallError> {
    let world = state.member.world();
    let root = u32::try_from(root).ok().filter(|r| *r < world).ok_or_else(|| {
        GuestError::new(ErrorCode::InvalidArgument, format!("root {root} is not a rank of this {world}-member job"))
    })?;
    let n = collective_range(state, buffer, offset, len)?;
    let is_root = state.member.rank() == root;
    timed(state, |state, deadline| {
        for (window_offset, size) in windows(offset, n) {
            let mut bytes = vec![0u8; size];
            if is_root {
                state.gpu.buffer_read(buffer, window_offset, &mut bytes, deadline)?;
            }
            state.member.broadcast_part(&mut bytes, root, n as u64, deadline).map_err(collective_fatal)?;
            if !is_root {
                state.gpu.buffer_write(buffer, window_offset, &bytes, deadline)?;
            }
        }
        Ok(0)
    })
}

fn len_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub(crate) fn add_to_linker(linker: &mut Linker<JobState>) -> wasmtime::Result<()> {
    let m = abi::IMPORT_MODULE;

    linker.func_wrap(m, func::INPUT_LEN, |caller: Ctx<'_>| -> i64 { caller.data().input.len() as i64 })?;

    linker.func_wrap(m, func::INPUT_READ, |mut caller: Ctx<'_>, dst: i32, len: i32, offset: i64| {
        let r = split(&mut caller)
            .and_then(|(mem, state)| read_at(bytes_mut(mem, dst, len)?, &state.input, offset, "input"));
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::OUTPUT_WRITE, |mut caller: Ctx<'_>, src: i32, len: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let data = bytes(mem, src, len)?;
            let after = state.output.len() as u64 + data.len() as u64;
            if after > state.limits.output_bytes {
                return guest(
                    ErrorCode::OutputTooLarge,
                    format!("limit output-bytes: output would reach {after} bytes, over {}", state.limits.output_bytes),
                );
            }
            state.output.extend_from_slice(data);
            Ok(0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::LOG, |mut caller: Ctx<'_>, level: i32, src: i32, len: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let data = bytes(mem, src, len)?;
            let tag = match level {
                abi::LOG_ERROR => "error",
                abi::LOG_WARN => "warn",
                abi::LOG_INFO => "info",
                abi::LOG_DEBUG => "debug",
                other => return guest(ErrorCode::InvalidArgument, format!("unknown log level {other}")),
            };
            let text = String::from_utf8_lossy(data.get(..data.len().min(MAX_MESSAGE)).unwrap_or_default());
            state.log.write(format!("[{tag}] {text}\n").as_bytes());
            Ok(0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::LAST_ERROR, |mut caller: Ctx<'_>, dst: i32, len: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let out = bytes_mut(mem, dst, len)?;
            let msg = state.last_error.as_bytes();
            let n = msg.len().min(out.len());
            if let (Some(d), Some(s)) = (out.get_mut(..n), msg.get(..n)) {
                d.copy_from_slice(s);
            }
            Ok(len_i32(msg.len()))
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::SET_FAILURE, |mut caller: Ctx<'_>, src: i32, len: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let data = bytes(mem, src, len)?;
            let data = data.get(..data.len().min(MAX_MESSAGE)).unwrap_or_default();
            state.failure = Some(String::from_utf8_lossy(data).into_owned());
            Ok(0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::BUFFER_CREATE, |mut caller: Ctx<'_>, size: i64, usage: i32| {
        let state = caller.data_mut();
        let r = state.gpu.buffer_create(size, usage).map(|h| h as i32);
        finish(state, r)
    })?;

    linker.func_wrap(m, func::BUFFER_WRITE, |mut caller: Ctx<'_>, buffer: i32, offset: i64, src: i32, len: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let data = bytes(mem, src, len)?;
            // A write may wait for earlier staged writes to reach the GPU.
            timed(state, |state, deadline| state.gpu.buffer_write(buffer, offset, data, deadline)).map(|()| 0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::BUFFER_READ, |mut caller: Ctx<'_>, buffer: i32, offset: i64, dst: i32, len: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let out = bytes_mut(mem, dst, len)?;
            timed(state, |state, deadline| state.gpu.buffer_read(buffer, offset, out, deadline)).map(|()| 0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::BUFFER_DESTROY, |mut caller: Ctx<'_>, buffer: i32| {
        let state = caller.data_mut();
        let r = state.gpu.buffer_destroy(buffer).map(|()| 0);
        finish(state, r)
    })?;

    linker.func_wrap(
        m,
        func::PIPELINE_CREATE,
        |mut caller: Ctx<'_>, src: i32, len: i32, entry: i32, entry_len: i32| {
            let r = split(&mut caller).and_then(|(mem, state)| {
                let source = bytes(mem, src, len)?;
                let entry = bytes(mem, entry, entry_len)?;
                // Compiling is work done for the guest: its time counts as CPU time (it is not
                // `timed`), and it may take no longer than the CPU and wall time left.
                let (deadline, cpu_deadline) = (state.clock.deadline, state.clock.cpu_deadline(&state.limits));
                state.gpu.pipeline_create(source, entry, deadline, cpu_deadline).map(|h| h as i32)
            });
            finish(caller.data_mut(), r)
        },
    )?;

    linker.func_wrap(m, func::PIPELINE_DESTROY, |mut caller: Ctx<'_>, pipeline: i32| {
        let state = caller.data_mut();
        let r = state.gpu.pipeline_destroy(pipeline).map(|()| 0);
        finish(state, r)
    })?;

    linker.func_wrap(m, func::SUBMIT, |mut caller: Ctx<'_>, descs: i32, count: i32| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let n = usize::try_from(count).map_err(|_| {
                GuestError::new(ErrorCode::InvalidArgument, format!("dispatch count {count} is negative"))
            })?;
            if n > MAX_DISPATCHES_PER_SUBMIT {
                return guest(
                    ErrorCode::InvalidArgument,
                    format!("{n} dispatches in one submit, over {MAX_DISPATCHES_PER_SUBMIT}"),
                );
            }
            let table = bytes(mem, descs, len_i32(n * DispatchDesc::SIZE))?;
            let mut dispatches = Vec::with_capacity(n);
            for chunk in table.chunks_exact(DispatchDesc::SIZE) {
                let raw: &[u8; DispatchDesc::SIZE] = chunk
                    .try_into()
                    .map_err(|_| GuestError::new(ErrorCode::BadPointer, "short dispatch descriptor"))?;
                let d = DispatchDesc::from_bytes(raw);
                let count = d.bindings_len as usize;
                if count > MAX_BINDINGS_PER_DISPATCH {
                    return guest(
                        ErrorCode::InvalidArgument,
                        format!("{count} bindings in one dispatch, over {MAX_BINDINGS_PER_DISPATCH}"),
                    );
                }
                let raw = bytes(mem, d.bindings_ptr as i32, len_i32(count * BindingDesc::SIZE))?;
                let mut bindings = Vec::with_capacity(count);
                for b in raw.chunks_exact(BindingDesc::SIZE) {
                    let b: &[u8; BindingDesc::SIZE] =
                        b.try_into().map_err(|_| GuestError::new(ErrorCode::BadPointer, "short binding descriptor"))?;
                    bindings.push(BindingDesc::from_bytes(b));
                }
                dispatches.push((d, bindings));
            }
            timed(state, |state, deadline| state.gpu.submit(&dispatches, deadline)).map(|()| 0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::RANK, |caller: Ctx<'_>| -> i32 { place(caller.data()).0 as i32 })?;
    linker.func_wrap(m, func::WORLD_SIZE, |caller: Ctx<'_>| -> i32 { place(caller.data()).1 as i32 })?;

    linker.func_wrap(m, func::BARRIER, |mut caller: Ctx<'_>| {
        let state = caller.data_mut();
        let r = none_in_flight(state).and_then(|()| {
            timed(state, |state, deadline| state.member.barrier(deadline).map(|()| 0).map_err(collective_fatal))
        });
        finish(state, r)
    })?;

    linker.func_wrap(m, func::BROADCAST, |mut caller: Ctx<'_>, buffer: i32, offset: i64, len: i64, root: i32| {
        let state = caller.data_mut();
        let r = none_in_flight(state).and_then(|()| broadcast(state, buffer, offset, len, root));
        finish(state, r)
    })?;

    linker.func_wrap(
        m,
        func::ALL_REDUCE,
        |mut caller: Ctx<'_>, buffer: i32, offset: i64, len: i64, op: i32, compression: i32| {
            let state = caller.data_mut();
            let r = none_in_flight(state).and_then(|()| all_reduce(state, buffer, offset, len, op, compression));
            finish(state, r)
        },
    )?;

    linker.func_wrap(
        m,
        func::ALL_REDUCE_START,
        |mut caller: Ctx<'_>, buffer: i32, offset: i64, len: i64, op: i32, compression: i32| {
            let state = caller.data_mut();
            let r = all_reduce_start(state, buffer, offset, len, op, compression);
            finish(state, r)
        },
    )?;

    linker.func_wrap(m, func::COLLECTIVE_WAIT, |mut caller: Ctx<'_>| {
        let state = caller.data_mut();
        let r = collective_wait(state);
        finish(state, r)
    })?;

    linker.func_wrap(m, func::CHECKPOINT_SAVE, |mut caller: Ctx<'_>, src: i32, len: i32, step: i64| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let data = bytes(mem, src, len)?;
            let step = u64::try_from(step).map_err(|_| {
                GuestError::new(ErrorCode::InvalidArgument, format!("checkpoint step {step} is negative"))
            })?;
            if data.len() as u64 > abi::MAX_CHECKPOINT {
                return guest(
                    ErrorCode::InvalidArgument,
                    format!("a checkpoint of {} bytes is over the {} a job may save", data.len(), abi::MAX_CHECKPOINT),
                );
            }
            let checkpoint = crate::checkpoint::Checkpoint { step, bytes: data.to_vec() };
            // Handing it on may wait on the daemon's pipe: host time, not the guest's (held
            // saves cost nothing: at most one a second goes on).
            timed(state, |state, _| state.checkpoints.save(checkpoint, Instant::now()));
            Ok(0)
        });
        finish(caller.data_mut(), r)
    })?;

    linker.func_wrap(m, func::CHECKPOINT_STEP, |caller: Ctx<'_>| -> i64 {
        caller.data().checkpoints.resume.as_ref().and_then(|c| i64::try_from(c.step).ok()).unwrap_or(-1)
    })?;

    linker.func_wrap(m, func::CHECKPOINT_LEN, |caller: Ctx<'_>| -> i64 {
        caller.data().checkpoints.resume.as_ref().map_or(-1, |c| c.bytes.len() as i64)
    })?;

    linker.func_wrap(m, func::CHECKPOINT_READ, |mut caller: Ctx<'_>, dst: i32, len: i32, offset: i64| {
        let r = split(&mut caller).and_then(|(mem, state)| {
            let Some(c) = state.checkpoints.resume.as_ref() else {
                return guest(ErrorCode::InvalidArgument, "this try resumes from no checkpoint");
            };
            read_at(bytes_mut(mem, dst, len)?, &c.bytes, offset, "checkpoint")
        });
        finish(caller.data_mut(), r)
    })?;

    Ok(())
}

/// Copies `src` from `offset` into `out`, as much as fits; returns the count (0 at the end).
fn read_at(out: &mut [u8], src: &[u8], offset: i64, what: &str) -> Result<i32, CallError> {
    let offset = usize::try_from(offset).ok().filter(|&o| o <= src.len()).ok_or_else(|| {
        GuestError::new(
            ErrorCode::OutOfBounds,
            format!("{what} offset {offset} is outside the {}-byte {what}", src.len()),
        )
    })?;
    let src = src.get(offset..).unwrap_or_default();
    let n = src.len().min(out.len());
    if let (Some(d), Some(s)) = (out.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
    Ok(len_i32(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_go_in_windows_and_an_empty_one_in_one() {
        let w = COLLECTIVE_WINDOW;
        assert_eq!(windows(8, 0).collect::<Vec<_>>(), vec![(8, 0)]);
        assert_eq!(windows(0, 4).collect::<Vec<_>>(), vec![(0, 4)]);
        assert_eq!(windows(4, w + 8).collect::<Vec<_>>(), vec![(4, w), (4 + w as i64, 8)]);
        assert_eq!(windows(0, 2 * w).count(), 2);
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert_eq!(range(100, 10, 20).unwrap(), 10..30);
        assert!(range(100, 90, 20).is_err());
        assert!(range(100, -1, 1).is_err());
        assert!(range(100, 1, -1).is_err());
        assert!(range(usize::MAX, i32::MAX, i32::MAX).is_ok());
        assert_eq!(range(100, 100, 0).unwrap(), 100..100);
        assert!(range(100, 101, 0).is_err());
    }
}
