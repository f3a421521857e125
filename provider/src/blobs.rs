//! Init inputs kept by their SHA-256: a renter's weights arrive once, in chunks, are checked
//! against the hash it announced, and serve every later session with the same weights. The
//! cache is a folder of files named by hash, bounded in bytes; the least recently used go
//! first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// A folder of blobs named by the hex of their SHA-256.
#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Held while a blob is put in place and the cache trimmed, so two sessions storing at once
    /// count each other's bytes.
    trim: Mutex<()>,
    /// Bytes announced by uploads under way: together at most `max_bytes`, so that the
    /// temporary files cannot fill the disk past the cache's bound.
    reserved: Arc<AtomicU64>,
}

/// A blob held for one session: a second name for its file (a hard link, `.inuse-*`, which
/// trimming leaves alone), removed when this is dropped. The worker reads this path, so a blob
/// trimmed meanwhile still reaches it whole.
#[derive(Debug)]
pub struct Pinned {
    path: PathBuf,
}

impl Pinned {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an upload cannot start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Larger than this provider's cache: no provider like it takes it.
    TooLarge(String),
    /// No room while other uploads are under way: another provider, or later.
    Full(String),
}

/// A blob being received: written to a temporary file beside the cache and hashed as it goes.
#[derive(Debug)]
pub struct Incoming {
    hash: [u8; 32],
    len: u64,
    got: u64,
    hasher: Sha256,
    file: std::fs::File,
    temp: PathBuf,
    reserved: Arc<AtomicU64>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Put in place or abandoned, the temporary name goes (a no-op once renamed), and so
        // does its reservation.
        let _ = std::fs::remove_file(&self.temp);
        self.reserved.fetch_sub(self.len, Ordering::SeqCst);
    }
}

impl Incoming {
    /// Appends the next chunk; more bytes than announced are refused.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), String> {
        let after = self.got.saturating_add(bytes.len() as u64);
        if after > self.len {
            return Err(format!("the renter sent more than the {} bytes of the init it announced", self.len));
        }
        self.file.write_all(bytes).map_err(|e| format!("writing the init blob: {e}"))?;
        self.hasher.update(bytes);
        self.got = after;
        Ok(())
    }

    /// Whether every announced byte has arrived.
    pub fn complete(&self) -> bool {
        self.got == self.len
    }

    pub fn received(&self) -> u64 {
        self.got
    }
}

impl BlobCache {
    /// A cache in `dir` (made if missing) holding at most `max_bytes`. Temporary files a crash
    /// left behind are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<BlobCache> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".incoming-") || name.starts_with(".inuse-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let cache = BlobCache {
            dir: dir.to_path_buf(),
            max_bytes,
            trim: Mutex::new(()),
            reserved: Arc::new(AtomicU64::new(0)),
        };
        // A cache opened with a smaller bound than its folder holds is trimmed at once.
        cache.trim_to(max_bytes, Path::new(""));
        Ok(cache)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn path(&self, hash: &[u8; 32]) -> PathBuf {
        self.dir.join(hex(hash))
    }

    /// Blob `hash`, when the cache holds it with length `len`: marked as just used and pinned
    /// for the caller's session.
    pub fn get(&self, hash: &[u8; 32], len: u64) -> Option<Pinned> {
        let _one = self.trim.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.path(hash);
        let meta = std::fs::metadata(&path).ok()?;
        if !meta.is_file() || meta.len() != len {
            return None;
        }
        // Its modification time is its last use: what trimming goes by.
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        self.pin(&path, hash).ok()
    }

    /// Drops blob `hash` from the cache (a file found not to hold what its name says).
    pub fn forget(&self, hash: &[u8; 32]) {
        let _one = self.trim.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = std::fs::remove_file(self.path(hash));
    }

    /// A second name for blob `hash`'s file, for one session (taken under the trim lock).
    fn pin(&self, path: &Path, hash: &[u8; 32]) -> std::io::Result<Pinned> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pinned = self.dir.join(format!(".inuse-{}-{}-{n}", hex(hash), std::process::id()));
        std::fs::hard_link(path, &pinned)?;
        Ok(Pinned { path: pinned })
    }

    /// Starts receiving blob `hash` of `len` bytes: `Err(Refusal::TooLarge)` when it could
    /// never fit, `Err(Refusal::Full)` while other uploads hold the room it needs.
    pub fn receive(&self, hash: [u8; 32], len: u64) -> Result<Incoming, Refusal> {
        if len > self.max_bytes {
            return Err(Refusal::TooLarge(format!(
                "an init of {len} bytes is over this provider's blob cache of {} bytes",
                self.max_bytes
            )));
        }
        let reserved = self.reserved.fetch_add(len, Ordering::SeqCst);
        if reserved.saturating_add(len) > self.max_bytes {
            self.reserved.fetch_sub(len, Ordering::SeqCst);
            return Err(Refusal::Full(format!(
                "this provider is receiving {reserved} bytes of other uploads; its blob cache holds {}",
                self.max_bytes
            )));
        }
        // Unique among this daemon's uploads (two sessions may send the same blob at once).
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!(".incoming-{}-{}-{n}", hex(&hash), std::process::id()));
        let reserved = self.reserved.clone();
        let file = match std::fs::File::create(&temp) {
            Ok(f) => f,
            Err(e) => {
                reserved.fetch_sub(len, Ordering::SeqCst);
                return Err(Refusal::Full(format!("this provider cannot store an upload now: {e}")));
            }
        };
        Ok(Incoming { hash, len, got: 0, hasher: Sha256::new(), file, temp, reserved })
    }

    /// Checks a complete blob against its announced hash and puts it in place, trimming the
    /// oldest others to stay within the cache's size. A blob whose bytes do not hash to what was
    /// announced is refused and removed.
    pub fn finish(&self, incoming: Incoming) -> Result<Pinned, String> {
        if !incoming.complete() {
            return Err(format!("the init blob ended after {} of its {} bytes", incoming.got, incoming.len));
        }
        let got: [u8; 32] = incoming.hasher.clone().finalize().into();
        if got != incoming.hash {
            return Err(format!(
                "the init blob's bytes hash to {}, not the {} announced: refused",
                hex(&got),
                hex(&incoming.hash)
            ));
        }
        incoming.file.sync_all().map_err(|e| format!("writing the init blob: {e}"))?;
        let _one = self.trim.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.path(&incoming.hash);
        std::fs::rename(&incoming.temp, &path).map_err(|e| format!("storing the init blob: {e}"))?;
        self.trim_to(self.max_bytes, &path);
        self.pin(&path, &incoming.hash).map_err(|e| format!("storing the init blob: {e}"))
    }

    /// Removes the least recently used blobs (never `keep`) until the rest fit in `max`.
    fn trim_to(&self, max: u64, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut blobs: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                meta.is_file().then(|| (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        for (_, len, path) in blobs {
            if total <= max {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::msg::sha256;

    fn store(cache: &BlobCache, bytes: &[u8]) -> Result<Pinned, String> {
        let mut incoming = cache.receive(sha256(bytes), bytes.len() as u64).map_err(|e| format!("{e:?}"))?;
        for chunk in bytes.chunks(3) {
            incoming.push(chunk)?;
        }
        cache.finish(incoming)
    }

    #[test]
    fn blobs_are_kept_by_hash_checked_and_trimmed_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path(), 25).unwrap();
        let a = b"first blob, ten";
        let pinned = store(&cache, a).unwrap();
        assert_eq!(std::fs::read(pinned.path()).unwrap(), a);
        drop(pinned);
        let again = cache.get(&sha256(a), a.len() as u64).unwrap();
        assert_eq!(std::fs::read(again.path()).unwrap(), a);
        drop(again);
        assert!(cache.get(&sha256(a), 3).is_none(), "another length is another blob");

        // Bytes that do not hash to what was announced are refused and leave nothing behind.
        let mut lying = cache.receive(sha256(b"something else"), 5).unwrap();
        lying.push(b"12345").unwrap();
        assert!(cache.finish(lying).unwrap_err().contains("not the"));
        let mut short = cache.receive(sha256(b"abc"), 3).unwrap();
        short.push(b"ab").unwrap();
        assert!(cache.finish(short).unwrap_err().contains("ended after 2"));
        let mut long = cache.receive(sha256(b"abc"), 3).unwrap();
        assert!(long.push(b"abcd").is_err());
        drop(long);
        assert!(matches!(cache.receive([0; 32], 26), Err(Refusal::TooLarge(m)) if m.contains("over this provider's")));
        // Uploads under way hold their room: a second that would pass the bound waits its turn.
        let first = cache.receive([1; 32], 20).unwrap();
        assert!(matches!(cache.receive([2; 32], 10), Err(Refusal::Full(_))));
        drop(first);
        drop(cache.receive([2; 32], 10).unwrap());
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(names, [hex(&sha256(a))], "no temporary or pinning file left");

        // A second blob fits beside the first; a third pushes out the least recently used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = b"second";
        drop(store(&cache, b).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A session holding b keeps its bytes even when trimming takes b from the cache.
        let held = cache.get(&sha256(b), b.len() as u64).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(cache.get(&sha256(a), a.len() as u64).is_some(), "a is used again: b is the oldest");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let c = b"third one";
        drop(store(&cache, c).unwrap());
        assert!(cache.get(&sha256(b), b.len() as u64).is_none(), "b went");
        assert_eq!(std::fs::read(held.path()).unwrap(), b, "but not from the session holding it");
        drop(held);
        assert!(cache.get(&sha256(a), a.len() as u64).is_some());
        assert!(cache.get(&sha256(c), c.len() as u64).is_some());
        cache.forget(&sha256(c));
        assert!(cache.get(&sha256(c), c.len() as u64).is_none(), "forgotten");

        // A crash's leftovers go when the cache is opened again.
        std::fs::write(dir.path().join(".incoming-x-1"), b"partial").unwrap();
        BlobCache::open(dir.path(), 25).unwrap();
        assert!(!dir.path().join(".incoming-x-1").exists());
    }
}
