//! The two ways a host call can fail: an error the guest gets back, or the end of the job.

use crate::limits::LimitKind;
use abi::ErrorCode;

/// A failure the guest gets back as a negative result, with a message for `last_error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GuestError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl GuestError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> GuestError {
        GuestError { code, message: message.into() }
    }
}

/// A failure that ends the job: a limit, or a host-side fault the guest cannot act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Fatal {
    #[error("limit {kind} exceeded: {message}")]
    Limit { kind: LimitKind, message: String },
    #[error("host failure: {0}")]
    Host(String),
    /// The kernel's own doing, found by the host (members of a cluster making different
    /// collective calls): ends the job like a trap.
    #[error("{0}")]
    Kernel(String),
}

impl Fatal {
    pub(crate) fn limit(kind: LimitKind, message: impl Into<String>) -> Fatal {
        Fatal::Limit { kind, message: message.into() }
    }
}

/// What a host call returns inside the host.
#[derive(Debug)]
pub(crate) enum CallError {
    Guest(GuestError),
    Fatal(Fatal),
}

impl From<GuestError> for CallError {
    fn from(e: GuestError) -> Self {
        CallError::Guest(e)
    }
}

impl From<Fatal> for CallError {
    fn from(e: Fatal) -> Self {
        CallError::Fatal(e)
    }
}

/// Shorthand for a guest error result.
pub(crate) fn guest<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, CallError> {
    Err(CallError::Guest(GuestError::new(code, message)))
}
