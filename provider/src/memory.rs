//! What each session costs the provider in memory, and the budget sessions share.
//!
//! A session's cost is its worker's private memory: the anonymous resident pages of the
//! process (`RssAnon` in `/proc/PID/status`), which is where a tenant's linear memory, staged
//! GPU writes and, on a software GPU, its buffers live. Pages shared with every other worker
//! (the binary, Mesa's libraries) are not a session's doing and are not counted. The daemon
//! samples every session's worker once a second; a new session is admitted only if what the
//! open sessions hold, plus what the new one's worker holds already, fits the budget, and the
//! room left is what the provider tells the scheduler. Where `/proc` is not there (not Linux),
//! nothing is measured and sessions are bounded by their count alone.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// A `Key:   N kB` field of a `/proc` file, in bytes.
fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    kb.checked_mul(1024)
}

/// The private (anonymous resident) memory of process `pid`, in bytes.
pub(crate) fn private_bytes(pid: u32) -> Option<u64> {
    proc_field(&format!("/proc/{pid}/status"), "RssAnon")
}

/// This machine's memory (`MemTotal`), in bytes.
pub fn machine_bytes() -> Option<u64> {
    proc_field("/proc/meminfo", "MemTotal")
}

#[derive(Debug, Clone, Copy)]
struct Held {
    pid: u32,
    bytes: u64,
    peak: u64,
}

/// The memory of every open session, against the budget they share.
#[derive(Debug)]
pub(crate) struct SessionMemory {
    /// `None`: not bounded by memory.
    budget: Option<u64>,
    held: Mutex<HashMap<[u8; 16], Held>>,
    /// The most an idle worker was seen to hold when its session was admitted: what the next
    /// session will hold at least.
    baseline: Mutex<u64>,
}

/// Bytes as MiB, for reasons.
fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl SessionMemory {
    pub(crate) fn new(budget: Option<u64>) -> SessionMemory {
        SessionMemory { budget, held: Mutex::new(HashMap::new()), baseline: Mutex::new(0) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What all open sessions hold, as last sampled.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.held().values().map(|h| h.bytes).sum()
    }

    /// Admits a session whose worker (`pid`) holds `now` bytes before it starts: counted from
    /// here on, so sessions admitted at the same moment see each other. `Err` says why not.
    pub(crate) fn admit(&self, session_id: [u8; 16], pid: u32, now: u64) -> Result<(), String> {
        let mut held = self.held();
        let used: u64 = held.values().map(|h| h.bytes).sum();
        if let Some(budget) = self.budget
            && used.saturating_add(now) > budget
        {
            return Err(format!(
                "this provider's memory for sessions is in use ({} of {} held by {} sessions): ask the \
                 scheduler for another provider",
                mib(used),
                mib(budget),
                held.len()
            ));
        }
        held.insert(session_id, Held { pid, bytes: now, peak: now });
        drop(held);
        let mut baseline = self.baseline.lock().unwrap_or_else(PoisonError::into_inner);
        *baseline = (*baseline).max(now);
        Ok(())
    }

    /// Reads every open session's worker again with `read` (normally [`private_bytes`]).
    pub(crate) fn sample_with(&self, read: impl Fn(u32) -> Option<u64>) {
        let pids: Vec<([u8; 16], u32)> = self.held().iter().map(|(id, h)| (*id, h.pid)).collect();
        // Read without the lock: /proc reads are quick, but admissions need not wait for them.
        let read: Vec<([u8; 16], u64)> = pids.into_iter().filter_map(|(id, pid)| Some((id, read(pid)?))).collect();
        let mut held = self.held();
        for (id, bytes) in read {
            if let Some(h) = held.get_mut(&id) {
                h.bytes = bytes;
                h.peak = h.peak.max(bytes);
            }
        }
    }

    /// The session ended: returns the most its worker was seen to hold.
    pub(crate) fn release(&self, session_id: &[u8; 16]) -> Option<u64> {
        self.held().remove(session_id).map(|h| h.peak)
    }

    /// Sessions that fit in what is left of the budget, at what an open session holds on
    /// average (or an idle worker, before any is open), and no more than `slots_left`; `None`
    /// when memory does not bound them.
    pub(crate) fn room(&self, slots_left: u32) -> Option<u32> {
        let budget = self.budget?;
        let held = self.held();
        let used: u64 = held.values().map(|h| h.bytes).sum();
        let baseline = *self.baseline.lock().unwrap_or_else(PoisonError::into_inner);
        let each = if held.is_empty() { baseline } else { used / held.len() as u64 }.max(baseline).max(1);
        let fits = budget.saturating_sub(used) / each;
        Some(u32::try_from(fits).unwrap_or(u32::MAX).min(slots_left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sessions_are_admitted_while_what_they_hold_fits_the_budget() {
        let m = SessionMemory::new(Some(100 * MIB));
        assert_eq!(m.room(16), Some(16), "nothing measured yet: the slots decide");
        m.admit([1; 16], 11, 20 * MIB).unwrap();
        m.admit([2; 16], 12, 20 * MIB).unwrap();
        assert_eq!(m.room(16), Some(3), "60 MiB left at 20 MiB each");
        // One session's worker grows (its tenant loaded weights, say).
        m.sample_with(|pid| Some(if pid == 11 { 70 * MIB } else { 20 * MIB }));
        assert_eq!(m.used(), 90 * MIB);
        assert_eq!(m.room(16), Some(0));
        let why = m.admit([3; 16], 13, 20 * MIB).unwrap_err();
        assert!(why.contains("90 MiB of 100 MiB held by 2 sessions"), "{why}");
        // When it ends, its memory is free again, and its peak is what it cost.
        assert_eq!(m.release(&[1; 16]), Some(70 * MIB));
        assert_eq!(m.release(&[1; 16]), None);
        m.admit([3; 16], 13, 20 * MIB).unwrap();
        assert_eq!(m.room(1), Some(1), "never more than the slots left");
    }

    #[test]
    fn without_a_budget_memory_is_counted_but_bounds_nothing() {
        let m = SessionMemory::new(None);
        m.admit([1; 16], 1, u64::MAX / 2).unwrap();
        m.admit([2; 16], 2, u64::MAX / 2).unwrap();
        assert_eq!(m.room(4), None);
        // A worker that is gone (or unreadable) keeps its last figure.
        m.sample_with(|_| None);
        assert_eq!(m.used(), u64::MAX - 1);
    }

    #[test]
    fn this_process_has_private_memory() {
        if cfg!(target_os = "linux") {
            assert!(private_bytes(std::process::id()).is_some_and(|b| b > 0));
            assert!(machine_bytes().is_some_and(|b| b > 0));
        }
        assert_eq!(private_bytes(u32::MAX), None);
    }
}
