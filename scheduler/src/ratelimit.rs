//! Per-renter request rates: a token bucket per key. Pure: keys and `now` in, a verdict out.

use std::collections::HashMap;

use proto::PublicKey;

/// How fast one renter may send signed requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenterLimits {
    /// Requests per second on average: the rate the bucket refills at.
    pub requests_per_second: f64,
    /// Requests at once after a quiet spell: the size of the bucket.
    pub burst: u32,
}

impl Default for RenterLimits {
    fn default() -> Self {
        RenterLimits { requests_per_second: 50.0, burst: 100 }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// A token bucket per renter key. Buckets that have filled up again are forgotten, so memory
/// follows the renters active within the last `burst / rate` seconds.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RenterLimits,
    buckets: HashMap<PublicKey, Bucket>,
    swept_ms: u64,
}

/// How often full buckets are swept away.
const SWEEP_MS: u64 = 10_000;

impl RateLimiter {
    pub fn new(limits: RenterLimits) -> RateLimiter {
        let limits = RenterLimits {
            requests_per_second: limits.requests_per_second.max(f64::MIN_POSITIVE),
            burst: limits.burst.max(1),
        };
        RateLimiter { limits, buckets: HashMap::new(), swept_ms: 0 }
    }

    fn refilled(&self, b: Bucket, now_ms: u64) -> f64 {
        let earned = now_ms.saturating_sub(b.at_ms) as f64 * self.limits.requests_per_second / 1000.0;
        (b.tokens + earned).min(f64::from(self.limits.burst))
    }

    /// Takes one request from `key`'s bucket, or says in how many milliseconds the next one
    /// is allowed.
    pub fn take(&mut self, key: PublicKey, now_ms: u64) -> Result<(), u64> {
        if now_ms.saturating_sub(self.swept_ms) >= SWEEP_MS {
            self.sweep(now_ms);
        }
        let full = Bucket { tokens: f64::from(self.limits.burst), at_ms: now_ms };
        let bucket = self.buckets.get(&key).copied().unwrap_or(full);
        let tokens = self.refilled(bucket, now_ms);
        if tokens >= 1.0 {
            self.buckets.insert(key, Bucket { tokens: tokens - 1.0, at_ms: now_ms });
            return Ok(());
        }
        self.buckets.insert(key, Bucket { tokens, at_ms: now_ms });
        let wait = (1.0 - tokens) * 1000.0 / self.limits.requests_per_second;
        Err(wait.ceil().min(u64::MAX as f64) as u64)
    }

    /// Renters tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn sweep(&mut self, now_ms: u64) {
        let burst = f64::from(self.limits.burst);
        let buckets = std::mem::take(&mut self.buckets);
        self.buckets = buckets.into_iter().filter(|(_, b)| self.refilled(*b, now_ms) < burst).collect();
        self.swept_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_the_wait_is_said() {
        let mut r = RateLimiter::new(RenterLimits { requests_per_second: 2.0, burst: 3 });
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        for _ in 0..3 {
            r.take(a, 1_000).unwrap();
        }
        assert_eq!(r.take(a, 1_000), Err(500));
        assert_eq!(r.take(a, 1_250), Err(250), "half a token earned");
        // Another renter has its own bucket.
        r.take(b, 1_250).unwrap();
        r.take(a, 1_500).unwrap();
        assert_eq!(r.take(a, 1_500), Err(500));
    }

    #[test]
    fn idle_renters_are_forgotten() {
        let mut r = RateLimiter::new(RenterLimits { requests_per_second: 10.0, burst: 10 });
        for n in 0..100u8 {
            r.take(PublicKey([n; 32]), 0).unwrap();
        }
        assert_eq!(r.tracked(), 100);
        r.take(PublicKey([200; 32]), SWEEP_MS).unwrap();
        assert_eq!(r.tracked(), 1);
    }
}
