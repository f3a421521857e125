//! Every party (renter, provider, scheduler) is an ed25519 keypair. The same key is its Solana
//! account, its signing key and its QUIC identity.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Why a key could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading keypair {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("writing keypair {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{path} already exists; refusing to overwrite a key (remove it first)")]
    Exists { path: String },
    #[error("{path} is not a Solana CLI keypair (a JSON array of 64 bytes): {reason}")]
    Format { path: String, reason: String },
    #[error("{0:?} is not a base58 ed25519 public key")]
    PublicKey(String),
    #[error("{0:?} is not a base58 address (32 bytes)")]
    Address(String),
}

/// An account address on the chain: 32 bytes, base58, and not necessarily a key anyone holds
/// (a program's, or an address a program derives, is off the ed25519 curve on purpose).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 32]);

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&bs58::encode(self.0).into_string())
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

impl FromStr for Address {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s.trim()).into_vec().map_err(|_| KeyError::Address(s.to_string()))?;
        bytes.try_into().map(Address).map_err(|_| KeyError::Address(s.to_string()))
    }
}

impl From<PublicKey> for Address {
    fn from(k: PublicKey) -> Address {
        Address(k.0)
    }
}

/// A public key: 32 bytes, shown (and serialized) as base58 like a Solana address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base58())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl PublicKey {
    pub fn to_base58(&self) -> String {
        bs58::encode(self.0).into_string()
    }

    /// Checks `signature` over `message`. A key that is not a valid curve point fails too.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else { return false };
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base58())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base58())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s.trim()).into_vec().map_err(|_| KeyError::PublicKey(s.to_string()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::PublicKey(s.to_string()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::PublicKey(s.to_string()))?;
        Ok(PublicKey(bytes))
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "sig_bytes")] pub [u8; 64]);

/// Base58, as Solana prints a transaction's signature.
impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", bs58::encode(self.0).into_string())
    }
}

mod sig_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: serde_bytes_compat::Bytes = Deserialize::deserialize(d)?;
        v.0.try_into().map_err(|_| serde::de::Error::custom("a signature is 64 bytes"))
    }

    /// Accepts both a byte string and a sequence, as different encoders produce either.
    mod serde_bytes_compat {
        use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

        pub(crate) struct Bytes(pub(crate) Vec<u8>);

        impl<'de> Deserialize<'de> for Bytes {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Bytes;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                        Ok(Bytes(v.to_vec()))
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                        Ok(Bytes(v))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                        let mut out = Vec::with_capacity(64);
                        while let Some(b) = seq.next_element::<u8>()? {
                            if out.len() >= 64 {
                                return Err(serde::de::Error::custom("a signature is 64 bytes"));
                            }
                            out.push(b);
                        }
                        Ok(Bytes(out))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    }
}

/// A party's keypair.
pub struct Keypair {
    key: SigningKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.public())
    }
}

impl Keypair {
    /// A fresh keypair from the operating system's randomness.
    pub fn generate() -> Keypair {
        Keypair { key: SigningKey::generate(&mut rand_core::OsRng) }
    }

    /// A keypair from its 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Keypair {
        Keypair { key: SigningKey::from_bytes(&seed) }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.key.sign(message).to_bytes())
    }

    /// The 32-byte secret seed.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The key as PKCS#8 DER, for building a TLS certificate.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        self.key.to_pkcs8_der().map(|d| d.as_bytes().to_vec()).unwrap_or_default()
    }

    /// The Solana CLI's format: a JSON array of 64 numbers, secret seed then public key.
    pub fn to_json(&self) -> String {
        let mut bytes = self.key.to_keypair_bytes().to_vec();
        let json = serde_json::to_string(&bytes).unwrap_or_default();
        bytes.fill(0);
        json
    }

    /// Parses the Solana CLI's format; `origin` names the source in errors.
    pub fn from_json(json: &str, origin: &str) -> Result<Keypair, KeyError> {
        let format = |reason: String| KeyError::Format { path: origin.to_string(), reason };
        let bytes: Vec<u8> = serde_json::from_str(json).map_err(|e| format(e.to_string()))?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|v: Vec<u8>| format(format!("{} bytes, not 64", v.len())))?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| format("the public half does not match the secret half".into()))?;
        Ok(Keypair { key })
    }

    pub fn read(path: &Path) -> Result<Keypair, KeyError> {
        let json = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        Keypair::from_json(&json, &path.display().to_string())
    }

    /// Writes the key, readable by its owner only, and never over an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let err = |source| KeyError::Write { path: path.display().to_string(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path.display().to_string() }
            } else {
                err(e)
            }
        })?;
        file.write_all(self.to_json().as_bytes()).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solana_json_round_trips_and_signs() {
        let k = Keypair::generate();
        let json = k.to_json();
        assert!(json.starts_with('[') && json.matches(',').count() == 63);
        let back = Keypair::from_json(&json, "test").unwrap();
        assert_eq!(back.public(), k.public());
        let sig = back.sign(b"hello");
        assert!(k.public().verify(b"hello", &sig));
        assert!(!k.public().verify(b"hellO", &sig));
        assert!(!Keypair::generate().public().verify(b"hello", &sig));
    }

    #[test]
    fn a_known_solana_keypair_is_read() {
        // The seed 1..=32 and its public key, as solana-keygen would write them.
        let k = Keypair::from_seed(std::array::from_fn(|i| i as u8 + 1));
        let json = k.to_json();
        let parsed: Vec<u8> = serde_json::from_str(&json).unwrap();
        assert_eq!(&parsed[..32], &k.seed());
        assert_eq!(&parsed[32..], &k.public().0);
    }

    #[test]
    fn bad_keypair_files_are_refused_with_reasons() {
        assert!(matches!(Keypair::from_json("[1,2,3]", "f"), Err(KeyError::Format { .. })));
        assert!(matches!(Keypair::from_json("not json", "f"), Err(KeyError::Format { .. })));
        let mut bytes: Vec<u8> = serde_json::from_str(&Keypair::generate().to_json()).unwrap();
        bytes[40] ^= 1;
        let err = Keypair::from_json(&serde_json::to_string(&bytes).unwrap(), "f").unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn public_keys_parse_from_base58() {
        let k = Keypair::generate().public();
        assert_eq!(k.to_base58().parse::<PublicKey>().unwrap(), k);
        assert!("not-a-key".parse::<PublicKey>().is_err());
        assert!("11111111".parse::<PublicKey>().is_err());
    }

    #[test]
    fn write_new_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("wasmgrid-key-{}", std::process::id()));
        let path = dir.join("id.json");
        let _ = std::fs::remove_file(&path);
        let k = Keypair::generate();
        k.write_new(&path).unwrap();
        assert!(matches!(Keypair::generate().write_new(&path), Err(KeyError::Exists { .. })));
        assert_eq!(Keypair::read(&path).unwrap().public(), k.public());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
