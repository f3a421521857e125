//! Length-prefixed frames: a 4-byte big-endian length, then the body, whose first byte is the
//! protocol version and the rest one rmp-serde message. The length is checked against the
//! caller's cap before any of the body is buffered, so a peer cannot make us allocate or decode
//! more than the cap.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The version byte every frame body starts with. A peer speaking another version is refused
/// with a message naming both.
pub const PROTOCOL_VERSION: u8 = 1;

/// Cap for control messages (registration, heartbeats, job updates).
pub const CONTROL_CAP: usize = 1 << 20;

/// Why a frame was refused. The connection it came on should be closed: framing is lost.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge { len: usize, cap: usize },
    #[error("empty frame")]
    Empty,
    #[error("peer speaks wire protocol v{found}; this side speaks v{PROTOCOL_VERSION}")]
    Version { found: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message does not fit the cap: {0}")]
    Encode(String),
}

/// Encodes `msg` as one frame (length prefix included), refusing it if the body exceeds `cap`.
pub fn encode<T: Serialize>(msg: &T, cap: usize) -> Result<Vec<u8>, FrameError> {
    let mut body = vec![PROTOCOL_VERSION];
    rmp_serde::encode::write_named(&mut body, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = body.len();
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, cap })?.to_be_bytes();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one frame body (without its length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (&version, rest) = body.split_first().ok_or(FrameError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version { found: version });
    }
    rmp_serde::from_slice(rest).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads the length prefix of a frame and checks it against `cap`.
pub fn body_len(prefix: [u8; 4], cap: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Splits a byte stream into frame bodies: feed it bytes as they arrive, take bodies out.
#[derive(Debug)]
pub struct FrameDecoder {
    cap: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(cap: usize) -> FrameDecoder {
        FrameDecoder { cap, buf: Vec::new() }
    }

    /// Adds bytes, then returns the next complete frame body if there is one. An oversized
    /// length is refused as soon as its 4 bytes arrive.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        self.buf.extend_from_slice(bytes);
        self.next_frame()
    }

    /// Adds bytes without taking a frame out: [`FrameDecoder::next_frame`] does (and checks
    /// the length prefix against the cap as soon as it is there).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame body already buffered, if any.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.get(..4) else { return Ok(None) };
        let mut p = [0u8; 4];
        p.copy_from_slice(prefix);
        let len = body_len(p, self.cap)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf.get(4..4 + len).map(<[u8]>::to_vec).unwrap_or_default();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        a: u32,
        b: String,
    }

    #[test]
    fn round_trip_in_pieces() {
        let m = Msg { a: 7, b: "hi".into() };
        let mut bytes = encode(&m, CONTROL_CAP).unwrap();
        bytes.extend(encode(&Msg { a: 8, b: "x".into() }, CONTROL_CAP).unwrap());
        let mut d = FrameDecoder::new(CONTROL_CAP);
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            if let Some(body) = d.push(chunk).unwrap() {
                got.push(decode_body::<Msg>(&body).unwrap());
            }
        }
        while let Some(body) = d.next_frame().unwrap() {
            got.push(decode_body::<Msg>(&body).unwrap());
        }
        assert_eq!(got, vec![m, Msg { a: 8, b: "x".into() }]);
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        assert_eq!(d.push(&u32::MAX.to_be_bytes()), Err(FrameError::TooLarge { len: u32::MAX as usize, cap: 1024 }));
        let big = Msg { a: 1, b: "x".repeat(2000) };
        assert!(matches!(encode(&big, 1024), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn malformed_and_foreign_bodies_are_refused() {
        assert_eq!(decode_body::<Msg>(&[]), Err(FrameError::Empty));
        assert_eq!(decode_body::<Msg>(&[9, 1, 2]), Err(FrameError::Version { found: 9 }));
        assert!(matches!(decode_body::<Msg>(&[PROTOCOL_VERSION, 0xc1, 0xff]), Err(FrameError::Malformed(_))));
        let mut d = FrameDecoder::new(1024);
        assert_eq!(d.push(&[0, 0, 0, 0]), Err(FrameError::Empty));
    }
}
