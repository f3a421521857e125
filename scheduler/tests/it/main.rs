//! The scheduler end to end: its HTTP API through the router (signatures, ownership, limits)
//! and over a real socket with TLS, its QUIC endpoint against misbehaving peers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod api;
mod https;
mod quic;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use proto::Keypair;
use proto::msg::GpuInfo;
use rand_core::RngCore;
use tower::ServiceExt;

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

pub(crate) fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut n);
    n
}

/// A request signed by `key` now, with a fresh nonce.
pub(crate) fn signed(key: &Keypair, method: &str, path: &str, body: &[u8]) -> Request<Body> {
    signed_as(key, method, path, body, body, now_secs(), nonce())
}

/// A request signed over `signed_body` at `timestamp`, carrying `sent_body`.
pub(crate) fn signed_as(
    key: &Keypair,
    method: &str,
    path: &str,
    signed_body: &[u8],
    sent_body: &[u8],
    timestamp: u64,
    nonce: [u8; 16],
) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(path);
    for (name, value) in proto::httpsig::sign(key, method, path, signed_body, timestamp, nonce) {
        req = req.header(name, value);
    }
    if !sent_body.is_empty() && sent_body.first() == Some(&b'{') {
        req = req.header("content-type", "application/json");
    }
    req.body(Body::from(sent_body.to_vec())).unwrap()
}

/// Sends one request through the router: status, headers, body.
pub(crate) async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, body.to_vec())
}

/// The `error` of a JSON error body.
pub(crate) fn error_of(body: &[u8]) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    v["error"].as_str().unwrap_or_else(|| panic!("no error in {v}")).to_string()
}

/// Adds `key`'s signature headers for `method path` with `body` to a reqwest request.
pub(crate) fn sign_reqwest(
    rb: reqwest::RequestBuilder,
    key: &Keypair,
    method: &str,
    path: &str,
    body: &[u8],
) -> reqwest::RequestBuilder {
    proto::httpsig::sign(key, method, path, body, now_secs(), nonce())
        .into_iter()
        .fold(rb, |rb, (name, value)| rb.header(name, value))
}

pub(crate) fn gpu() -> GpuInfo {
    GpuInfo {
        name: "gpu".into(),
        vendor: "v".into(),
        backend: "vulkan".into(),
        device_type: "DiscreteGpu".into(),
        vram_bytes: 1 << 30,
        score_gflops: 1.0,
    }
}
