//! A folder of files as one byte string: how `wasmgrid infer --init DIR` (and `session`,
//! `submit`) send a model folder as one init input, and how a guest reads it back
//! (`wasmgrid::files`).
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! "WGFILES1"                      8 bytes, the magic
//! count: u32                      number of files, at most MAX_FILES
//! count times:
//!     name_len: u32               at most MAX_NAME bytes
//!     name: name_len bytes        UTF-8 relative path, `/` between parts; no empty,
//!                                 `.` or `..` part, no leading `/`, no NUL or `\`
//!     len: u64
//!     data: len bytes
//! ```
//!
//! Names are unique and sorted (bytewise), so the same folder always gives the same bytes (and
//! the same content hash); nothing may follow the last file.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The first bytes of a bundle.
pub const MAGIC: &[u8; 8] = b"WGFILES1";
/// Files in one bundle at most.
pub const MAX_FILES: usize = 4096;
/// Bytes of one name at most.
pub const MAX_NAME: usize = 1024;

/// Why bytes are not a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleError(pub String);

impl core::fmt::Display for BundleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "not a file bundle: {}", self.0)
    }
}

impl core::error::Error for BundleError {}

fn bad(why: impl Into<String>) -> BundleError {
    BundleError(why.into())
}

/// Whether `bytes` start like a bundle (the magic), before any parsing.
pub fn is_bundle(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Whether `name` is a name a bundle may hold.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.contains(['\0', '\\'])
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Encodes `files` (name, data); names must be valid and unique. They are sorted here.
pub fn encode(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, BundleError> {
    if files.len() > MAX_FILES {
        return Err(bad(format!("{} files, at most {MAX_FILES}", files.len())));
    }
    let mut sorted: Vec<&(String, Vec<u8>)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let total: usize = sorted.iter().map(|(n, d)| 12 + n.len() + d.len()).sum();
    let mut out = Vec::with_capacity(12 + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(sorted.len() as u32).to_le_bytes());
    let mut previous: Option<&str> = None;
    for (name, data) in sorted {
        if !valid_name(name) {
            return Err(bad(format!("{name:?} is not a relative path of plain parts")));
        }
        if previous == Some(name.as_str()) {
            return Err(bad(format!("{name:?} appears twice")));
        }
        previous = Some(name);
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
    Ok(out)
}

fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], BundleError> {
    if bytes.len() < n {
        return Err(bad(format!("it ends inside {what}")));
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

fn array<const N: usize>(bytes: &mut &[u8], what: &str) -> Result<[u8; N], BundleError> {
    take(bytes, N, what)?.try_into().map_err(|_| bad(format!("it ends inside {what}")))
}

fn u32_at(bytes: &mut &[u8], what: &str) -> Result<u32, BundleError> {
    array(bytes, what).map(u32::from_le_bytes)
}

/// The files of a bundle, borrowed from it, in their (sorted) order.
pub fn parse(bytes: &[u8]) -> Result<Vec<(&str, &[u8])>, BundleError> {
    let mut rest = bytes;
    if take(&mut rest, 8, "the magic")? != MAGIC {
        return Err(bad("it does not start with WGFILES1"));
    }
    let count = u32_at(&mut rest, "the file count")? as usize;
    if count > MAX_FILES {
        return Err(bad(format!("{count} files, at most {MAX_FILES}")));
    }
    let mut files: Vec<(&str, &[u8])> = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = u32_at(&mut rest, "a name's length")? as usize;
        if name_len > MAX_NAME {
            return Err(bad(format!("file {i}'s name is {name_len} bytes, at most {MAX_NAME}")));
        }
        let name = core::str::from_utf8(take(&mut rest, name_len, "a name")?)
            .map_err(|_| bad(format!("file {i}'s name is not UTF-8")))?;
        if !valid_name(name) {
            return Err(bad(format!("{name:?} is not a relative path of plain parts")));
        }
        if let Some((last, _)) = files.last()
            && last.as_bytes() >= name.as_bytes()
        {
            return Err(bad(format!("{name:?} comes after {last:?}: names must be unique and sorted")));
        }
        let len = u64::from_le_bytes(array(&mut rest, "a file's length")?);
        let len = usize::try_from(len).map_err(|_| bad(format!("{name:?} is {len} bytes")))?;
        let data = take(&mut rest, len, &format!("{name:?}'s data"))?;
        files.push((name, data));
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes follow the last file", rest.len())));
    }
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn a_bundle_round_trips_sorted_and_every_malformed_one_is_refused() {
        let files = vec![("b/c.txt".to_string(), b"cc".to_vec()), ("a".to_string(), Vec::new())];
        let bytes = encode(&files).unwrap();
        assert!(is_bundle(&bytes));
        let back = parse(&bytes).unwrap();
        assert_eq!(back, vec![("a", &b""[..]), ("b/c.txt", &b"cc"[..])]);
        assert_eq!(encode(&[files[1].clone(), files[0].clone()]).unwrap(), bytes, "order does not matter");

        for name in ["", "/abs", "a//b", "../up", "a/./b", "a\\b", "nul\0"] {
            assert!(encode(&[(name.to_string(), Vec::new())]).is_err(), "{name:?}");
        }
        assert!(encode(&[("x".into(), Vec::new()), ("x".into(), Vec::new())]).is_err());

        // Every truncation, trailing bytes, a wrong magic, a huge length, unsorted names.
        for n in 0..bytes.len() {
            assert!(parse(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse(&longer).unwrap_err().0.contains("follow the last file"));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(parse(&magic).is_err());
        let mut huge = bytes.clone();
        // File "a": magic 8 + count 4 + name_len 4 + name 1, then its u64 length.
        huge[17..25].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
        let mut many = MAGIC.to_vec();
        many.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&many).unwrap_err().0.contains("at most"));
        let mut unsorted = MAGIC.to_vec();
        unsorted.extend_from_slice(&2u32.to_le_bytes());
        for name in [b"b", b"a"] {
            unsorted.extend_from_slice(&1u32.to_le_bytes());
            unsorted.extend_from_slice(name);
            unsorted.extend_from_slice(&0u64.to_le_bytes());
        }
        assert!(parse(&unsorted).unwrap_err().0.contains("sorted"));
    }
}
