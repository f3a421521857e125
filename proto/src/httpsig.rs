//! Signed HTTP requests: how a renter proves to the scheduler that a request is its own, in the
//! manner of HTTP message signatures (RFC 9421) with a fixed set of covered components.
//!
//! The renter signs, with its ed25519 key, a signature base made of the method, the path with its
//! query, the SHA-256 of the body, its public key, a timestamp and a random nonce, and sends them
//! in five headers ([`KEY`], [`TIMESTAMP`], [`NONCE`], [`CONTENT_SHA256`], [`SIGNATURE`]). The
//! scheduler checks them ([`check`], then [`Claim::check_body`] and [`Verifier::admit`]): the
//! timestamp must be within the window of the scheduler's clock, the signature must verify, the
//! body must hash to the signed digest, and the nonce must not have been seen from that key
//! within the window (a replay). No IO, no clock: `now` is an argument.
//!
//! The signature base (UTF-8, lines separated by `\n`, no trailing newline):
//!
//! ```text
//! wasmgrid-http-request-v1
//! @method: POST
//! @path: /v1/jobs?wait_ms=100
//! content-sha256: <hex SHA-256 of the body; of no bytes for an empty body>
//! key: <base58 public key>
//! created: <unix seconds>
//! nonce: <32 lowercase hex digits>
//! ```

use std::collections::{BTreeSet, HashSet};

use sha2::{Digest, Sha256};

use crate::identity::{Keypair, PublicKey, Signature};

/// The renter's public key, base58.
pub const KEY: &str = "x-wasmgrid-key";
/// When the request was signed, in seconds since the Unix epoch.
pub const TIMESTAMP: &str = "x-wasmgrid-timestamp";
/// 16 random bytes, as 32 lowercase hex digits; never used twice by one key within the window.
pub const NONCE: &str = "x-wasmgrid-nonce";
/// SHA-256 of the request body, as 64 lowercase hex digits.
pub const CONTENT_SHA256: &str = "x-wasmgrid-content-sha256";
/// The ed25519 signature over [`signing_bytes`], base58.
pub const SIGNATURE: &str = "x-wasmgrid-signature";

/// Every header a signed request carries, in the order [`sign`] returns them.
pub const HEADERS: [&str; 5] = [KEY, TIMESTAMP, NONCE, CONTENT_SHA256, SIGNATURE];

/// The first line of the signature base: a signature over it means nothing elsewhere.
pub const DOMAIN: &str = "wasmgrid-http-request-v1";

/// How far a request's timestamp may be from the scheduler's clock, either way, by default.
pub const WINDOW_SECS: u64 = 60;

/// Nonces a [`Verifier`] remembers at most by default: about 130 bytes each, so some 64 MiB,
/// which is 60 s of about 8,700 signed requests per second.
pub const NONCE_CAP: usize = 1 << 19;

/// Why a request's signature was not accepted. Each message says what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the request is not signed: header {0} is missing (sign every request that creates or reads a renter's work with the renter's key; see /openapi.json)"
    )]
    Missing(&'static str),
    #[error("header {header} is malformed: {reason}")]
    Malformed { header: &'static str, reason: String },
    #[error(
        "stale timestamp: the request was signed at {timestamp}, {skew} s away from the scheduler's clock ({now}); at most {window} s are allowed: sign each request as it is sent, and check this machine's clock"
    )]
    Stale { timestamp: u64, now: u64, skew: u64, window: u64 },
    #[error("the body does not match its {CONTENT_SHA256} header: it changed after it was signed")]
    Digest,
    #[error("bad signature: it does not verify for key {0} over this method, path, body, timestamp and nonce")]
    BadSignature(PublicKey),
    #[error(
        "replayed nonce: key {key} already used nonce {nonce} within the last {window} s; sign each request with a fresh nonce"
    )]
    Replayed { key: PublicKey, nonce: String, window: u64 },
    #[error("too many signed requests within the last {window} s; retry in {retry_after_secs} s")]
    Busy { window: u64, retry_after_secs: u64 },
}

/// The signature base of a request (see the module documentation).
pub fn signing_bytes(
    method: &str,
    path_and_query: &str,
    content_sha256: &[u8; 32],
    key: &PublicKey,
    timestamp_secs: u64,
    nonce: &[u8; 16],
) -> Vec<u8> {
    format!(
        "{DOMAIN}\n@method: {}\n@path: {path_and_query}\ncontent-sha256: {}\nkey: {key}\ncreated: {timestamp_secs}\nnonce: {}",
        method.to_ascii_uppercase(),
        hex(content_sha256),
        hex(nonce),
    )
    .into_bytes()
}

/// The headers that sign a request, as (name, value) pairs in the order of [`HEADERS`].
/// `nonce` must be fresh randomness for every request.
pub fn sign(
    keypair: &Keypair,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    timestamp_secs: u64,
    nonce: [u8; 16],
) -> [(&'static str, String); 5] {
    let digest: [u8; 32] = Sha256::digest(body).into();
    let key = keypair.public();
    let signature = keypair.sign(&signing_bytes(method, path_and_query, &digest, &key, timestamp_secs, &nonce));
    [
        (KEY, key.to_base58()),
        (TIMESTAMP, timestamp_secs.to_string()),
        (NONCE, hex(&nonce)),
        (CONTENT_SHA256, hex(&digest)),
        (SIGNATURE, signature.to_string()),
    ]
}

/// What a request's headers claim, its signature checked: the key, when, the nonce and the
/// digest of the body. The body itself is checked with [`Claim::check_body`] once read, so a
/// request whose signature fails costs no body read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub key: PublicKey,
    pub timestamp_secs: u64,
    pub nonce: [u8; 16],
    content_sha256: [u8; 32],
}

impl Claim {
    /// Whether `body` is the body that was signed.
    pub fn check_body(&self, body: &[u8]) -> Result<(), AuthError> {
        if <[u8; 32]>::from(Sha256::digest(body)) == self.content_sha256 { Ok(()) } else { Err(AuthError::Digest) }
    }
}

/// Checks a request's signature headers: all there and well formed, the timestamp within
/// `window_secs` of `now_secs`, the signature valid over the method, the path, the claimed
/// body digest, the key, the timestamp and the nonce. `header` looks a header up by its
/// lower-case name. The nonce is not checked here: see [`Verifier::admit`].
pub fn check<'h>(
    method: &str,
    path_and_query: &str,
    header: impl Fn(&str) -> Option<&'h str>,
    now_secs: u64,
    window_secs: u64,
) -> Result<Claim, AuthError> {
    let get = |name: &'static str| header(name).ok_or(AuthError::Missing(name));
    let (key, timestamp, nonce, digest, signature) =
        (get(KEY)?, get(TIMESTAMP)?, get(NONCE)?, get(CONTENT_SHA256)?, get(SIGNATURE)?);
    let malformed = |header: &'static str, reason: &str| AuthError::Malformed { header, reason: reason.into() };
    let key: PublicKey = key.parse().map_err(|_| malformed(KEY, "not a base58 ed25519 public key"))?;
    let timestamp: u64 = timestamp
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| timestamp.parse().ok())
        .flatten()
        .ok_or_else(|| malformed(TIMESTAMP, "not a count of seconds since the Unix epoch"))?;
    let nonce: [u8; 16] = unhex(nonce).ok_or_else(|| malformed(NONCE, "not 32 lowercase hex digits"))?;
    let digest: [u8; 32] = unhex(digest).ok_or_else(|| malformed(CONTENT_SHA256, "not 64 lowercase hex digits"))?;
    let signature: [u8; 64] = bs58::decode(signature)
        .into_vec()
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| malformed(SIGNATURE, "not a base58 ed25519 signature"))?;
    if method.contains(['\r', '\n']) || path_and_query.contains(['\r', '\n']) {
        return Err(malformed(SIGNATURE, "the method or path holds a line break"));
    }
    let skew = now_secs.abs_diff(timestamp);
    if skew > window_secs {
        return Err(AuthError::Stale { timestamp, now: now_secs, skew, window: window_secs });
    }
    let message = signing_bytes(method, path_and_query, &digest, &key, timestamp, &nonce);
    if !key.verify(&message, &Signature(signature)) {
        return Err(AuthError::BadSignature(key));
    }
    Ok(Claim { key, timestamp_secs: timestamp, nonce, content_sha256: digest })
}

/// Remembers the nonces of admitted requests for as long as their timestamps are within the
/// window, so that no request is served twice. Memory is bounded by `cap` nonces: past it,
/// new requests are refused ([`AuthError::Busy`]) until old nonces expire, never admitted
/// unchecked.
#[derive(Debug)]
pub struct Verifier {
    window_secs: u64,
    cap: usize,
    seen: HashSet<(PublicKey, [u8; 16])>,
    /// The same nonces by the second after which they can be forgotten.
    expiry: BTreeSet<(u64, PublicKey, [u8; 16])>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new(WINDOW_SECS, NONCE_CAP)
    }
}

impl Verifier {
    pub fn new(window_secs: u64, cap: usize) -> Verifier {
        Verifier { window_secs, cap: cap.max(1), seen: HashSet::new(), expiry: BTreeSet::new() }
    }

    /// How far a timestamp may be from the clock, either way.
    pub fn window_secs(&self) -> u64 {
        self.window_secs
    }

    /// Nonces remembered now.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Admits a checked request unless its key used its nonce before within the window.
    /// Only a [`Claim`] (a verified signature) gets here, so nobody can use up another key's
    /// nonces.
    pub fn admit(&mut self, claim: &Claim, now_secs: u64) -> Result<PublicKey, AuthError> {
        self.forget_expired(now_secs);
        let (key, nonce) = (claim.key, claim.nonce);
        if self.seen.contains(&(key, nonce)) {
            return Err(AuthError::Replayed { key, nonce: hex(&nonce), window: self.window_secs });
        }
        if self.seen.len() >= self.cap {
            let oldest = self.expiry.first().map_or(now_secs, |(t, _, _)| *t);
            let retry_after_secs = oldest.saturating_sub(now_secs).saturating_add(1);
            return Err(AuthError::Busy { window: self.window_secs, retry_after_secs });
        }
        // Past `timestamp + window` the clock check refuses it anyway.
        let expires = claim.timestamp_secs.saturating_add(self.window_secs);
        self.seen.insert((key, nonce));
        self.expiry.insert((expires, key, nonce));
        Ok(key)
    }

    /// The whole check of a request whose body is at hand: [`check`], [`Claim::check_body`],
    /// then [`Verifier::admit`]. Returns the key that signed it.
    pub fn verify<'h>(
        &mut self,
        method: &str,
        path_and_query: &str,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now_secs: u64,
    ) -> Result<PublicKey, AuthError> {
        let claim = check(method, path_and_query, header, now_secs, self.window_secs)?;
        claim.check_body(body)?;
        self.admit(&claim, now_secs)
    }

    fn forget_expired(&mut self, now_secs: u64) {
        while let Some(&(expires, key, nonce)) = self.expiry.first() {
            if expires >= now_secs {
                break;
            }
            self.expiry.pop_first();
            self.seen.remove(&(key, nonce));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `2 * N` lowercase hex digits.
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = match pair {
            [hi, lo] => (value(*hi)?, value(*lo)?),
            _ => return None,
        };
        *byte = hi << 4 | lo;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn headers(signed: &[(&'static str, String)]) -> HashMap<&'static str, String> {
        signed.iter().cloned().collect()
    }

    fn check(
        v: &mut Verifier,
        h: &HashMap<&'static str, String>,
        method: &str,
        path: &str,
        body: &[u8],
        now: u64,
    ) -> Result<PublicKey, AuthError> {
        v.verify(method, path, |name| h.get(name).map(String::as_str), body, now)
    }

    #[test]
    fn a_signed_request_verifies_once_and_names_its_key() {
        let renter = Keypair::generate();
        let h = headers(&sign(&renter, "post", "/v1/jobs?x=1", b"{}", NOW, [7; 16]));
        let mut v = Verifier::default();
        assert_eq!(check(&mut v, &h, "POST", "/v1/jobs?x=1", b"{}", NOW + 59), Ok(renter.public()));
        let replay = check(&mut v, &h, "POST", "/v1/jobs?x=1", b"{}", NOW + 59).unwrap_err();
        assert!(matches!(replay, AuthError::Replayed { .. }), "{replay}");
        assert!(replay.to_string().contains("replayed nonce"), "{replay}");
        // The same nonce from another key is that key's own.
        let other = Keypair::generate();
        let h = headers(&sign(&other, "POST", "/v1/jobs?x=1", b"{}", NOW, [7; 16]));
        assert_eq!(check(&mut v, &h, "POST", "/v1/jobs?x=1", b"{}", NOW), Ok(other.public()));
    }

    #[test]
    fn every_covered_part_is_bound_by_the_signature() {
        let renter = Keypair::generate();
        let h = headers(&sign(&renter, "GET", "/v1/jobs/job-1", b"", NOW, [1; 16]));
        let mut v = Verifier::default();
        for (method, path) in [("POST", "/v1/jobs/job-1"), ("GET", "/v1/jobs/job-2"), ("GET", "/v1/jobs/job-1?a")] {
            assert_eq!(check(&mut v, &h, method, path, b"", NOW), Err(AuthError::BadSignature(renter.public())));
        }
        // The body changed after signing.
        assert_eq!(check(&mut v, &h, "GET", "/v1/jobs/job-1", b"x", NOW), Err(AuthError::Digest));
        // A body changed together with its digest no longer matches the signature.
        let mut forged = h.clone();
        forged.insert(CONTENT_SHA256, hex(&<[u8; 32]>::from(Sha256::digest(b"x"))));
        assert!(matches!(check(&mut v, &forged, "GET", "/v1/jobs/job-1", b"x", NOW), Err(AuthError::BadSignature(_))));
        // Someone else's key claimed over this signature.
        let mut claimed = h.clone();
        claimed.insert(KEY, Keypair::generate().public().to_base58());
        assert!(matches!(check(&mut v, &claimed, "GET", "/v1/jobs/job-1", b"", NOW), Err(AuthError::BadSignature(_))));
        // Another timestamp or nonce than signed.
        let mut later = h.clone();
        later.insert(TIMESTAMP, (NOW + 1).to_string());
        assert!(matches!(check(&mut v, &later, "GET", "/v1/jobs/job-1", b"", NOW), Err(AuthError::BadSignature(_))));
        let mut renonced = h.clone();
        renonced.insert(NONCE, hex(&[2u8; 16]));
        assert!(matches!(check(&mut v, &renonced, "GET", "/v1/jobs/job-1", b"", NOW), Err(AuthError::BadSignature(_))));
        // None of the failures used up the nonce: the real request still goes through.
        assert_eq!(check(&mut v, &h, "GET", "/v1/jobs/job-1", b"", NOW), Ok(renter.public()));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let renter = Keypair::generate();
        let mut v = Verifier::default();
        for ts in [NOW - 61, NOW + 61] {
            let h = headers(&sign(&renter, "GET", "/", b"", ts, [3; 16]));
            let err = check(&mut v, &h, "GET", "/", b"", NOW).unwrap_err();
            assert!(matches!(err, AuthError::Stale { skew: 61, .. }), "{err}");
            assert!(err.to_string().starts_with("stale timestamp"), "{err}");
        }
    }

    #[test]
    fn missing_and_malformed_headers_are_named() {
        let renter = Keypair::generate();
        let good = headers(&sign(&renter, "GET", "/", b"", NOW, [4; 16]));
        let mut v = Verifier::default();
        for name in HEADERS {
            let mut h = good.clone();
            h.remove(name);
            assert_eq!(check(&mut v, &h, "GET", "/", b"", NOW), Err(AuthError::Missing(name)));
        }
        let cases = [
            (KEY, "not-a-key"),
            (TIMESTAMP, "+1800000000"),
            (TIMESTAMP, "soon"),
            (NONCE, "0404"),
            (NONCE, &"0G".repeat(16)),
            (NONCE, &"AB".repeat(16)),
            (CONTENT_SHA256, "00"),
            (SIGNATURE, "0OIl"),
            (SIGNATURE, "2222"),
        ];
        for (name, value) in cases {
            let mut h = good.clone();
            h.insert(name, value.to_string());
            let err = check(&mut v, &h, "GET", "/", b"", NOW).unwrap_err();
            assert!(matches!(&err, AuthError::Malformed { header, .. } if *header == name), "{name}={value}: {err}");
        }
        assert!(check(&mut v, &good, "GET", "/\nx", b"", NOW).is_err());
        assert_eq!(check(&mut v, &good, "GET", "/", b"", NOW), Ok(renter.public()));
    }

    #[test]
    fn nonces_are_forgotten_after_the_window_and_bounded_before() {
        let renter = Keypair::generate();
        let mut v = Verifier::new(60, 2);
        for n in 0..2u8 {
            let h = headers(&sign(&renter, "GET", "/", b"", NOW + u64::from(n), [n; 16]));
            check(&mut v, &h, "GET", "/", b"", NOW).unwrap();
        }
        let third = headers(&sign(&renter, "GET", "/", b"", NOW, [9; 16]));
        let err = check(&mut v, &third, "GET", "/", b"", NOW).unwrap_err();
        assert_eq!(err, AuthError::Busy { window: 60, retry_after_secs: 61 });
        // Later the refused request is stale; a fresh one takes the room the first nonce left.
        assert!(matches!(check(&mut v, &third, "GET", "/", b"", NOW + 61), Err(AuthError::Stale { .. })));
        let late = headers(&sign(&renter, "GET", "/", b"", NOW + 61, [9; 16]));
        assert_eq!(check(&mut v, &late, "GET", "/", b"", NOW + 61), Ok(renter.public()));
        assert_eq!(v.remembered(), 2);
        let first_again = headers(&sign(&renter, "GET", "/", b"", NOW, [0; 16]));
        assert!(matches!(check(&mut v, &first_again, "GET", "/", b"", NOW + 61), Err(AuthError::Stale { .. })));
    }

    #[test]
    fn the_signature_base_is_fixed() {
        let key = Keypair::from_seed([1; 32]).public();
        let base = String::from_utf8(signing_bytes("get", "/v1/jobs?a=b", &[0xab; 32], &key, 5, &[0x01; 16])).unwrap();
        let want = format!(
            "wasmgrid-http-request-v1\n@method: GET\n@path: /v1/jobs?a=b\ncontent-sha256: {}\nkey: {key}\ncreated: 5\nnonce: {}",
            "ab".repeat(32),
            "01".repeat(16)
        );
        assert_eq!(base, want);
    }
}
