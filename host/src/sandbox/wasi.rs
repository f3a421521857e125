//! The WASI preview 1 functions the host implements itself instead of taking wasmtime-wasi's:
//! the ones that can block. `poll_oneoff` (what `std::thread::sleep` calls) sleeps in short
//! slices, checking the call's deadline and the job's cancel flag, so a sleeping guest ends
//! with limit `wall-time` or its cancellation like a spinning one does; its sleep counts as
//! host time, not CPU time.
//!
//! Every other WASI function a guest can call returns at once in this sandbox: stdin is empty
//! (a read answers end of file), stdout and stderr go to the capped in-memory log, and there is
//! no file, directory or socket to wait on.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use wasmtime::{Caller, Extern, Linker};

use super::JobState;
use crate::error::Fatal;
use crate::limits::LimitKind;

/// Longest single sleep between checks of the deadline and the cancel flag.
const SLICE: Duration = Duration::from_millis(10);
/// Most subscriptions one `poll_oneoff` may carry: a bound on what the host reads per call (a
/// program that sleeps, or polls stdio, uses one or two).
const MAX_SUBSCRIPTIONS: u32 = 4096;

/// Sizes and offsets of WASI preview 1's `subscription` and `event` records.
const SUBSCRIPTION_SIZE: usize = 48;
const EVENT_SIZE: usize = 32;

/// WASI preview 1 `errno` values.
const ERRNO_SUCCESS: u16 = 0;
const ERRNO_BADF: u16 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;

/// `eventtype`.
const EVENT_CLOCK: u8 = 0;
const EVENT_FD_READ: u8 = 1;
const EVENT_FD_WRITE: u8 = 2;

/// `clockid`.
const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;

const SUBCLOCK_ABSTIME: u16 = 1;
const EVENTRW_HANGUP: u16 = 1;

/// The monotonic clock of a job's WASI context: nanoseconds since the job's store was made,
/// so that an absolute `poll_oneoff` timeout can be turned into a wait.
#[derive(Debug)]
pub(crate) struct JobMonotonicClock {
    pub(crate) base: Instant,
}

impl wasmtime_wasi::HostMonotonicClock for JobMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Replaces wasmtime-wasi's `poll_oneoff` in `linker` (which must already hold WASI preview 1).
pub(crate) fn shadow_blocking(linker: &mut Linker<JobState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let added = linker
        .func_wrap(
            ::abi::WASI_MODULE,
            "poll_oneoff",
            |mut caller: Caller<'_, JobState>, subs: i32, events: i32, n: i32, nevents: i32| -> wasmtime::Result<i32> {
                poll_oneoff(&mut caller, subs, events, n, nevents)
            },
        )
        .map(|_| ());
    linker.allow_shadowing(false);
    added
}

/// One subscription, read from guest memory.
#[derive(Clone, Copy, Debug)]
enum Subscription {
    /// Wakes at this instant (already in the past: at once).
    Clock { userdata: u64, at: Instant },
    /// An fd that is ready at once (stdio here) or that does not exist.
    Fd { userdata: u64, kind: u8, fd: u32 },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses one `subscription`; `None` is an argument the call refuses with `inval`.
fn parse(raw: &[u8], clock_base: Instant, now: Instant) -> Option<Subscription> {
    let userdata = u64_at(raw, 0)?;
    match *raw.get(8)? {
        EVENT_CLOCK => {
            let id = u32_at(raw, 16)?;
            let timeout = u64_at(raw, 24)?;
            let absolute = u16_at(raw, 40)? & SUBCLOCK_ABSTIME != 0;
            let wait = match (id, absolute) {
                (CLOCK_MONOTONIC | CLOCK_REALTIME, false) => Duration::from_nanos(timeout),
                (CLOCK_MONOTONIC, true) => {
                    super::later(clock_base, Duration::from_nanos(timeout)).saturating_duration_since(now)
                }
                (CLOCK_REALTIME, true) => {
                    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    Duration::from_nanos(timeout).saturating_sub(since_epoch)
                }
                _ => return None,
            };
            Some(Subscription::Clock { userdata, at: super::later(now, wait) })
        }
        kind @ (EVENT_FD_READ | EVENT_FD_WRITE) => Some(Subscription::Fd { userdata, kind, fd: u32_at(raw, 16)? }),
        _ => None,
    }
}

/// The `event` for a subscription that is ready.
fn event(sub: &Subscription) -> [u8; EVENT_SIZE] {
    let mut e = [0u8; EVENT_SIZE];
    let (userdata, kind, error, nbytes, flags) = match *sub {
        Subscription::Clock { userdata, .. } => (userdata, EVENT_CLOCK, ERRNO_SUCCESS, 0u64, 0u16),
        // stdin is empty: ready, at its end.
        Subscription::Fd { userdata, kind: EVENT_FD_READ, fd: 0 } => {
            (userdata, EVENT_FD_READ, ERRNO_SUCCESS, 0, EVENTRW_HANGUP)
        }
        // stdout and stderr take what is written (and drop what the log cap leaves no room for).
        Subscription::Fd { userdata, kind: EVENT_FD_WRITE, fd: 1 | 2 } => {
            (userdata, EVENT_FD_WRITE, ERRNO_SUCCESS, 1, 0)
        }
        Subscription::Fd { userdata, kind, .. } => (userdata, kind, ERRNO_BADF, 0, 0),
    };
    let fields: [(usize, &[u8]); 5] = [
        (0, &userdata.to_le_bytes()),
        (8, &error.to_le_bytes()),
        (10, &[kind]),
        (16, &nbytes.to_le_bytes()),
        (24, &flags.to_le_bytes()),
    ];
    for (at, bytes) in fields {
        if let Some(dst) = e.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    e
}

/// Ends the job from inside a WASI call: the failure is kept for `classify`.
fn trap(state: &mut JobState, fatal: Fatal) -> wasmtime::Result<i32> {
    state.fatal = Some(fatal.clone());
    Err(wasmtime::Error::new(fatal))
}

fn poll_oneoff(
    caller: &mut Caller<'_, JobState>,
    subs: i32,
    events: i32,
    n: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    let Some(memory) = caller.get_export("memory").and_then(Extern::into_memory) else {
        return Ok(ERRNO_FAULT);
    };
    let Ok(count) = u32::try_from(n) else { return Ok(ERRNO_INVAL) };
    if count == 0 || count > MAX_SUBSCRIPTIONS {
        // WASI preview 1 cannot sleep forever, and more than the bound is refused unread.
        return Ok(ERRNO_INVAL);
    }
    let count = count as usize;
    let (mem, state) = memory.data_and_store_mut(&mut *caller);
    let range = |ptr: i32, size: usize| -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(u32::try_from(ptr).ok()?).ok()?;
        let end = start.checked_add(size)?;
        (end <= mem.len()).then_some(start..end)
    };
    let (Some(subs_at), Some(events_at), Some(nevents_at)) =
        (range(subs, count * SUBSCRIPTION_SIZE), range(events, count * EVENT_SIZE), range(nevents, 4))
    else {
        return Ok(ERRNO_FAULT);
    };

    let now = Instant::now();
    let mut parsed = Vec::with_capacity(count);
    for raw in mem.get(subs_at).unwrap_or_default().chunks_exact(SUBSCRIPTION_SIZE) {
        match parse(raw, state.clock_base, now) {
            Some(sub) => parsed.push(sub),
            None => return Ok(ERRNO_INVAL),
        }
    }

    // Every fd here is ready at once, so a poll that names one never sleeps. Otherwise sleep
    // until the earliest clock, a slice at a time.
    let has_fd = parsed.iter().any(|s| matches!(s, Subscription::Fd { .. }));
    let wake = parsed
        .iter()
        .filter_map(|s| match s {
            Subscription::Clock { at, .. } => Some(*at),
            Subscription::Fd { .. } => None,
        })
        .min();
    if let (false, Some(wake)) = (has_fd, wake) {
        let started = Instant::now();
        let slept = loop {
            if state.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                state.clock.host_time += started.elapsed();
                return trap(state, Fatal::Host("the job was cancelled".into()));
            }
            let now = Instant::now();
            if now >= wake {
                break now.duration_since(started);
            }
            if now >= state.clock.deadline {
                state.clock.host_time += started.elapsed();
                let wall = now.duration_since(state.clock.started);
                let message = format!(
                    "the call ran for {wall:.1?}, over its {:.1?} (the guest was sleeping)",
                    state.limits.wall_time
                );
                return trap(state, Fatal::limit(LimitKind::WallTime, message));
            }
            std::thread::sleep(wake.min(state.clock.deadline).saturating_duration_since(now).min(SLICE));
        };
        // Sleeping is not the guest's CPU time.
        state.clock.host_time += slept;
    }

    let now = Instant::now();
    let ready: Vec<[u8; EVENT_SIZE]> = parsed
        .iter()
        .filter(|s| match s {
            Subscription::Clock { at, .. } => *at <= now,
            Subscription::Fd { .. } => true,
        })
        .map(event)
        .collect();
    let out = mem.get_mut(events_at).unwrap_or_default();
    for (dst, e) in out.chunks_exact_mut(EVENT_SIZE).zip(&ready) {
        dst.copy_from_slice(e);
    }
    let written = u32::try_from(ready.len()).unwrap_or(u32::MAX);
    if let Some(dst) = mem.get_mut(nevents_at) {
        dst.copy_from_slice(&written.to_le_bytes());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock_sub(userdata: u64, id: u32, timeout: u64, flags: u16) -> [u8; SUBSCRIPTION_SIZE] {
        let mut s = [0u8; SUBSCRIPTION_SIZE];
        s[0..8].copy_from_slice(&userdata.to_le_bytes());
        s[8] = EVENT_CLOCK;
        s[16..20].copy_from_slice(&id.to_le_bytes());
        s[24..32].copy_from_slice(&timeout.to_le_bytes());
        s[40..42].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn subscriptions_are_read_as_wasi_lays_them_out() {
        let now = Instant::now();
        let base = now - Duration::from_secs(5);
        let rel = parse(&clock_sub(7, CLOCK_MONOTONIC, 2_000_000_000, 0), base, now).unwrap();
        assert!(matches!(rel, Subscription::Clock { userdata: 7, at } if at == now + Duration::from_secs(2)));
        // Six seconds after the job's clock started is one second from now.
        let abs = parse(&clock_sub(8, CLOCK_MONOTONIC, 6_000_000_000, SUBCLOCK_ABSTIME), base, now).unwrap();
        assert!(matches!(abs, Subscription::Clock { userdata: 8, at } if at == now + Duration::from_secs(1)));
        // A time already passed wakes at once.
        let past = parse(&clock_sub(9, CLOCK_MONOTONIC, 1, SUBCLOCK_ABSTIME), base, now).unwrap();
        assert!(matches!(past, Subscription::Clock { at, .. } if at == now));
        assert!(parse(&clock_sub(1, 2, 0, 0), base, now).is_none(), "cpu-time clocks are refused");
        let mut fd = [0u8; SUBSCRIPTION_SIZE];
        fd[8] = EVENT_FD_READ;
        assert!(matches!(parse(&fd, base, now), Some(Subscription::Fd { kind: EVENT_FD_READ, fd: 0, .. })));
        fd[8] = 9;
        assert!(parse(&fd, base, now).is_none());
    }

    #[test]
    fn events_are_written_as_wasi_lays_them_out() {
        let e = event(&Subscription::Fd { userdata: 0x0102, kind: EVENT_FD_READ, fd: 0 });
        assert_eq!(&e[0..8], &0x0102u64.to_le_bytes());
        assert_eq!(&e[8..10], &[0, 0]);
        assert_eq!(e[10], EVENT_FD_READ);
        assert_eq!(&e[24..26], &EVENTRW_HANGUP.to_le_bytes());
        let bad = event(&Subscription::Fd { userdata: 1, kind: EVENT_FD_WRITE, fd: 9 });
        assert_eq!(&bad[8..10], &ERRNO_BADF.to_le_bytes());
    }
}
