//! The door of the HTTP API: a request that creates or reads a renter's work must be signed by
//! that renter ([`proto::httpsig`]), its nonce new, and its renter within its rate. The key that
//! signed goes to the handler as a [`Renter`]; what fails is answered here (401, 429, 503) with
//! a JSON error that says what is wrong, before any body is read.

use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use proto::PublicKey;
use proto::api::ApiError;
use proto::httpsig::{self, AuthError, Verifier};
use proto::msg::BLOB_CAP;

use crate::ratelimit::{RateLimiter, RenterLimits};
use crate::server::now_ms;

/// The renter whose signature a request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Renter(pub(crate) PublicKey);

/// What the door remembers: nonces within the window, and each renter's bucket.
#[derive(Debug)]
pub(crate) struct Gate {
    verifier: Mutex<Verifier>,
    limiter: Option<(RenterLimits, Mutex<RateLimiter>)>,
}

impl Gate {
    pub(crate) fn new(limits: Option<RenterLimits>) -> Gate {
        Gate {
            verifier: Mutex::new(Verifier::default()),
            limiter: limits.map(|l| (l, Mutex::new(RateLimiter::new(l)))),
        }
    }
}

/// Bodies over this are checked against their digest on a blocking thread.
const HASH_INLINE: usize = 1 << 20;

/// An error with a `Retry-After` header, in whole seconds (at least one).
pub(crate) fn retry_later(status: StatusCode, message: String, retry_after_ms: u64) -> Response {
    let secs = retry_after_ms.div_ceil(1000).max(1);
    let body = ApiError { error: message, retry_after_secs: Some(secs) };
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn refused(e: &AuthError) -> Response {
    if let AuthError::Busy { retry_after_secs, .. } = e {
        return retry_later(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), retry_after_secs.saturating_mul(1000));
    }
    let body = ApiError { error: e.to_string(), retry_after_secs: None };
    let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            "Wasmgrid-Signature headers=\"x-wasmgrid-key x-wasmgrid-timestamp x-wasmgrid-nonce x-wasmgrid-content-sha256 x-wasmgrid-signature\"",
        ),
    );
    resp
}

/// Middleware: checks the signature, admits the nonce, takes a token from the renter's
/// bucket, then reads the body (bounded) and checks it against the signed digest.
pub(crate) async fn authenticate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let now = now_ms();
    let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path(), |p| p.as_str());
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let window = gate.verifier.lock().unwrap_or_else(PoisonError::into_inner).window_secs();
    let claim = match httpsig::check(parts.method.as_str(), path, header, now / 1000, window) {
        Ok(c) => c,
        Err(e) => return refused(&e),
    };
    let admitted = gate.verifier.lock().unwrap_or_else(PoisonError::into_inner).admit(&claim, now / 1000);
    let renter = match admitted {
        Ok(k) => k,
        Err(e) => return refused(&e),
    };
    if let Some((limits, limiter)) = &gate.limiter {
        let taken = limiter.lock().unwrap_or_else(PoisonError::into_inner).take(renter, now);
        if let Err(wait_ms) = taken {
            let secs = wait_ms.div_ceil(1000).max(1);
            let message = format!(
                "renter {renter} is over its rate of {} requests per second (bursts of {}): retry in {secs} s",
                limits.requests_per_second, limits.burst
            );
            return retry_later(StatusCode::TOO_MANY_REQUESTS, message, wait_ms);
        }
    }
    let bytes = match axum::body::to_bytes(body, BLOB_CAP).await {
        Ok(b) => b,
        Err(e) => {
            let body =
                ApiError { error: format!("reading the body (at most {BLOB_CAP} bytes): {e}"), retry_after_secs: None };
            return (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(body)).into_response();
        }
    };
    let matches = if bytes.len() > HASH_INLINE {
        let (claim, bytes) = (claim.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || claim.check_body(&bytes)).await.unwrap_or(Err(AuthError::Digest))
    } else {
        claim.check_body(&bytes)
    };
    if let Err(e) = matches {
        return refused(&e);
    }
    parts.extensions.insert(Renter(renter));
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}
