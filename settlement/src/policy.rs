//! When a provider claims its newest voucher from a payment channel: when a session ends, every
//! N inferences, every T seconds, or once the unclaimed amount passes a threshold. Whatever the
//! policy, it claims at once when the renter starts closing the channel (its watcher sees it).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A provider's claim policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// When a session ends (the default: one claim per session, not per inference).
    #[default]
    End,
    /// Every N vouched inferences (1: every inference).
    Inferences(u64),
    /// When the oldest unclaimed voucher is this old.
    Interval(Duration),
    /// When the unclaimed amount reaches this many token units.
    Amount(u64),
}

impl Policy {
    /// Whether to claim now, with `inferences` and `amount` vouched and unclaimed, the oldest
    /// of them vouched `age` ago (in the middle of a session: `End` waits for its end).
    pub fn due(&self, inferences: u64, amount: u64, age: Duration) -> bool {
        if inferences == 0 || amount == 0 {
            return false;
        }
        match *self {
            Policy::End => false,
            Policy::Inferences(n) => inferences >= n,
            Policy::Interval(t) => age >= t,
            Policy::Amount(a) => amount >= a,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::End => write!(f, "end"),
            Policy::Inferences(1) => write!(f, "every"),
            Policy::Inferences(n) => write!(f, "every:{n}"),
            Policy::Interval(t) => write!(f, "every:{}s", t.as_secs_f64()),
            Policy::Amount(a) => write!(f, "over:{a}"),
        }
    }
}

impl FromStr for Policy {
    type Err = String;

    /// `end` (when a session ends), `every` (each inference), `every:N` (N inferences),
    /// `every:Ts` (T seconds, `ms` too), or `over:AMOUNT` (token units).
    fn from_str(s: &str) -> Result<Policy, String> {
        let bad = || format!("claim policy {s:?}: use end, every, every:N, every:30s, every:500ms or over:AMOUNT");
        if s == "end" {
            return Ok(Policy::End);
        }
        if s == "every" {
            return Ok(Policy::Inferences(1));
        }
        if let Some(a) = s.strip_prefix("over:") {
            return a.parse().ok().filter(|a| *a > 0).map(Policy::Amount).ok_or_else(bad);
        }
        let rest = s.strip_prefix("every:").ok_or_else(bad)?;
        if let Some(ms) = rest.strip_suffix("ms") {
            return ms
                .parse()
                .ok()
                .filter(|v| *v > 0)
                .map(|v| Policy::Interval(Duration::from_millis(v)))
                .ok_or_else(bad);
        }
        if let Some(secs) = rest.strip_suffix('s') {
            return secs
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e9)
                .map(|v| Policy::Interval(Duration::from_secs_f64(v)))
                .ok_or_else(bad);
        }
        rest.parse().ok().filter(|n| *n > 0).map(Policy::Inferences).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        for s in ["end", "every", "every:10", "every:30s", "over:5000"] {
            assert_eq!(s.parse::<Policy>().unwrap().to_string(), s);
        }
        assert_eq!("every:500ms".parse::<Policy>().unwrap(), Policy::Interval(Duration::from_millis(500)));
        for bad in ["", "each", "every:0", "every:-1s", "over:", "over:0", "every:xs", "every:infs"] {
            assert!(bad.parse::<Policy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn each_policy_fires_when_it_should() {
        let zero = Duration::ZERO;
        assert!(Policy::Inferences(1).due(1, 10, zero));
        assert!(!Policy::Inferences(3).due(2, 20, zero));
        assert!(Policy::Inferences(3).due(3, 30, zero));
        assert!(!Policy::Interval(Duration::from_secs(5)).due(9, 90, Duration::from_secs(4)));
        assert!(Policy::Interval(Duration::from_secs(5)).due(1, 10, Duration::from_secs(5)));
        assert!(!Policy::Amount(100).due(9, 90, zero));
        assert!(Policy::Amount(100).due(10, 100, zero));
        assert!(!Policy::Inferences(1).due(0, 0, zero), "nothing to claim");
        assert!(!Policy::End.due(1_000, 1_000_000, Duration::from_secs(3600)), "only at the end");
    }
}
