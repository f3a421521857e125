//! Where the scheduler keeps its state so a restart loses nothing. One trait, so that a
//! PostgreSQL store can later serve several scheduler replicas; today one embedded database
//! file (redb).

use std::path::Path;

use proto::api::{JobRecord, ProviderView, SessionView};
use proto::msg::{Checkpoint, ModuleHash};
use redb::{Database, ReadableTable, TableDefinition};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const MODULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("modules");
const PROVIDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("providers");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Db(String),
    #[error("job store holds a record this version cannot read: {0}")]
    Decode(String),
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A job's newest checkpoint as kept: its bytes and what the job's record shows of it. Kept
/// apart from the record, so that a checkpoint never rewrites the record (and its input).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptCheckpoint {
    pub checkpoint: Checkpoint,
    pub view: proto::api::CheckpointView,
}

/// The scheduler's persistent state.
///
/// A job's checkpoint (the newest its kernel saved) is kept beside its record, and dropped
/// when the record is written in a final state: nothing will run the job again. The record's
/// `checkpoint` view is what the kept one says ([`crate::State::load`] reads it back).
///
/// Writes may return before they are on disk; [`Store::sync`] returns once every write made
/// before it is. The scheduler calls it, outside its lock, before answering a submission or an
/// upload, so many requests share one disk flush (group commit).
pub trait Store: Send + Sync {
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// Makes every earlier write durable.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError>;
    fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether the module is stored, without reading it.
    fn has_module(&self, hash: &ModuleHash) -> Result<bool, StoreError> {
        self.module(hash).map(|m| m.is_some())
    }
    fn put_provider(&self, provider: &ProviderView) -> Result<(), StoreError>;
    fn providers(&self) -> Result<Vec<ProviderView>, StoreError>;
    fn put_session(&self, session: &SessionView) -> Result<(), StoreError>;
    fn sessions(&self) -> Result<Vec<SessionView>, StoreError>;
    fn put_checkpoint(&self, job_id: &str, checkpoint: &KeptCheckpoint) -> Result<(), StoreError>;
    fn checkpoint(&self, job_id: &str) -> Result<Option<KeptCheckpoint>, StoreError>;
}

/// Whether writing `job` drops its checkpoint: it ended, and had one.
fn ends_checkpoint(job: &JobRecord) -> bool {
    job.view.state.is_final() && job.view.checkpoint.is_some()
}

/// A write waiting for the next flush.
#[derive(Clone, Debug)]
enum Pending {
    Job(String, Vec<u8>),
    Module(ModuleHash, Vec<u8>),
    Provider(String, Vec<u8>),
    Session(String, Vec<u8>),
    /// A checkpoint to keep, or (`None`) to drop.
    Checkpoint(String, Option<Vec<u8>>),
}

#[derive(Debug, Default)]
struct Queue {
    writes: Vec<Pending>,
    /// The writes a flush took and has not yet committed: still read from here until they are
    /// on disk, so a lookup never falls between the queue and the database.
    flushing: Option<std::sync::Arc<Vec<Pending>>>,
    /// Sequence number of the last write queued.
    queued: u64,
}

impl Queue {
    /// The newest write `pick` finds, queued or being flushed.
    fn newest<T>(&self, pick: impl Fn(&Pending) -> Option<T>) -> Option<T> {
        let flushing = self.flushing.iter().flat_map(|w| w.iter().rev());
        self.writes.iter().rev().chain(flushing).find_map(pick)
    }
}

struct Inner {
    db: Database,
    queue: std::sync::Mutex<Queue>,
    /// Sequence number of the last write on disk.
    durable: std::sync::atomic::AtomicU64,
    /// One flush at a time; writers waiting behind it usually find theirs already flushed.
    flush: std::sync::Mutex<()>,
}

/// The embedded store: one redb file. Writes queue in memory and reach the disk together, in
/// one durable transaction per flush: when someone calls [`Store::sync`] (the scheduler does
/// before answering a submission), and every 50 ms in the background. Many concurrent
/// submissions share one flush (group commit).
pub struct RedbStore {
    inner: std::sync::Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = lock(&self.flush);
        let batch = self.take_batch();
        self.commit(batch)
    }

    /// Takes the queued writes for a flush; they stay readable until [`Inner::commit`].
    fn take_batch(&self) -> (std::sync::Arc<Vec<Pending>>, u64) {
        let mut q = lock(&self.queue);
        let writes = std::sync::Arc::new(std::mem::take(&mut q.writes));
        q.flushing = Some(writes.clone());
        (writes, q.queued)
    }

    /// Writes a batch in one durable transaction. A batch that fails goes back to the head of
    /// the queue, for the next flush.
    fn commit(&self, (writes, upto): (std::sync::Arc<Vec<Pending>>, u64)) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let written = if writes.is_empty() { Ok(()) } else { self.write(&writes) };
        let mut q = lock(&self.queue);
        q.flushing = None;
        match written {
            Ok(()) => {
                self.durable.fetch_max(upto, SeqCst);
                Ok(())
            }
            Err(e) => {
                let failed = std::sync::Arc::try_unwrap(writes).unwrap_or_else(|shared| shared.as_ref().clone());
                q.writes.splice(0..0, failed);
                Err(e)
            }
        }
    }

    fn write(&self, writes: &[Pending]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut jobs = tx.open_table(JOBS).map_err(db)?;
            let mut modules = tx.open_table(MODULES).map_err(db)?;
            let mut providers = tx.open_table(PROVIDERS).map_err(db)?;
            let mut sessions = tx.open_table(SESSIONS).map_err(db)?;
            let mut checkpoints = tx.open_table(CHECKPOINTS).map_err(db)?;
            for w in writes {
                match w {
                    Pending::Job(k, v) => jobs.insert(k.as_str(), v.as_slice()).map(drop),
                    Pending::Module(k, v) => modules.insert(&k[..], v.as_slice()).map(drop),
                    Pending::Provider(k, v) => providers.insert(k.as_str(), v.as_slice()).map(drop),
                    Pending::Session(k, v) => sessions.insert(k.as_str(), v.as_slice()).map(drop),
                    Pending::Checkpoint(k, Some(v)) => checkpoints.insert(k.as_str(), v.as_slice()).map(drop),
                    Pending::Checkpoint(k, None) => checkpoints.remove(k.as_str()).map(drop),
                }
                .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }
}

impl RedbStore {
    /// Opens (or creates) the database at `path`, and starts its background flusher.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let database =
            Database::create(path).map_err(|e| StoreError::Db(format!("opening {}: {e}", path.display())))?;
        let tx = database.begin_write().map_err(db_err)?;
        tx.open_table(JOBS).map_err(db)?;
        tx.open_table(MODULES).map_err(db)?;
        tx.open_table(PROVIDERS).map_err(db)?;
        tx.open_table(SESSIONS).map_err(db)?;
        tx.open_table(CHECKPOINTS).map_err(db)?;
        tx.commit().map_err(db)?;
        let inner = std::sync::Arc::new(Inner {
            db: database,
            queue: std::sync::Mutex::new(Queue::default()),
            durable: std::sync::atomic::AtomicU64::new(0),
            flush: std::sync::Mutex::new(()),
        });
        let weak = std::sync::Arc::downgrade(&inner);
        let _ = std::thread::Builder::new().name("wasmgrid-store-flush".into()).spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = inner.flush() {
                    log::error!("flushing the job store: {e}");
                }
            }
        });
        Ok(RedbStore { inner })
    }

    fn queue(&self, write: Pending) {
        let mut q = lock(&self.inner.queue);
        q.writes.push(write);
        q.queued += 1;
    }

    fn all<T: serde::de::DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>, StoreError> {
        self.inner.flush()?;
        let tx = self.inner.db.begin_read().map_err(db)?;
        let t = tx.open_table(table).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            out.push(rmp_serde::from_slice(v.value()).map_err(|e| StoreError::Decode(e.to_string()))?);
        }
        Ok(out)
    }

    /// A module not yet on disk (queued, or in a flush not yet committed).
    fn pending_module(&self, hash: &ModuleHash) -> Option<Vec<u8>> {
        lock(&self.inner.queue).newest(|w| match w {
            Pending::Module(h, v) if h == hash => Some(v.clone()),
            _ => None,
        })
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Err(e) = self.inner.flush() {
            log::error!("flushing the job store on close: {e}");
        }
    }
}

fn db_err(e: redb::TransactionError) -> StoreError {
    StoreError::Db(e.to_string())
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(v).map_err(|e| StoreError::Db(e.to_string()))
}

impl Store for RedbStore {
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.queue(Pending::Job(job.view.id.clone(), encode(job)?));
        if ends_checkpoint(job) {
            self.queue(Pending::Checkpoint(job.view.id.clone(), None));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let mine = lock(&self.inner.queue).queued;
        if self.inner.durable.load(SeqCst) >= mine {
            return Ok(());
        }
        // Whoever flushes first takes everyone's writes; the rest find theirs on disk.
        let _wait = lock(&self.inner.flush);
        if self.inner.durable.load(SeqCst) >= mine {
            return Ok(());
        }
        drop(_wait);
        self.inner.flush()
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.all(JOBS)
    }

    fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError> {
        self.queue(Pending::Module(*hash, bytes.to_vec()));
        Ok(())
    }

    fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(m) = self.pending_module(hash) {
            return Ok(Some(m));
        }
        let tx = self.inner.db.begin_read().map_err(db)?;
        let t = tx.open_table(MODULES).map_err(db)?;
        Ok(t.get(&hash[..]).map_err(db)?.map(|v| v.value().to_vec()))
    }

    fn has_module(&self, hash: &ModuleHash) -> Result<bool, StoreError> {
        let pending = lock(&self.inner.queue).newest(|w| matches!(w, Pending::Module(h, _) if h == hash).then_some(()));
        if pending.is_some() {
            return Ok(true);
        }
        let tx = self.inner.db.begin_read().map_err(db)?;
        let t = tx.open_table(MODULES).map_err(db)?;
        Ok(t.get(&hash[..]).map_err(db)?.is_some())
    }

    fn put_provider(&self, provider: &ProviderView) -> Result<(), StoreError> {
        // Never synced on its own: providers register again whenever they reconnect.
        self.queue(Pending::Provider(provider.key.to_base58(), encode(provider)?));
        Ok(())
    }

    fn providers(&self) -> Result<Vec<ProviderView>, StoreError> {
        self.all(PROVIDERS)
    }

    fn put_session(&self, session: &SessionView) -> Result<(), StoreError> {
        // Not synced on its own: the provider reports again, cumulatively.
        self.queue(Pending::Session(session.id.clone(), encode(session)?));
        Ok(())
    }

    fn sessions(&self) -> Result<Vec<SessionView>, StoreError> {
        self.all(SESSIONS)
    }

    fn put_checkpoint(&self, job_id: &str, checkpoint: &KeptCheckpoint) -> Result<(), StoreError> {
        // Not synced on its own: losing the newest to a crash costs the job some steps.
        self.queue(Pending::Checkpoint(job_id.to_string(), Some(encode(checkpoint)?)));
        Ok(())
    }

    fn checkpoint(&self, job_id: &str) -> Result<Option<KeptCheckpoint>, StoreError> {
        let pending = lock(&self.inner.queue).newest(|w| match w {
            Pending::Checkpoint(k, v) if k == job_id => Some(v.clone()),
            _ => None,
        });
        let bytes = match pending {
            Some(v) => v,
            None => {
                let tx = self.inner.db.begin_read().map_err(db)?;
                let t = tx.open_table(CHECKPOINTS).map_err(db)?;
                t.get(job_id).map_err(db)?.map(|v| v.value().to_vec())
            }
        };
        bytes.map(|b| rmp_serde::from_slice(&b).map_err(|e| StoreError::Decode(e.to_string()))).transpose()
    }
}

/// A store in memory, for tests and benchmarks of everything but persistence.
#[derive(Debug, Default)]
pub struct MemoryStore {
    jobs: std::sync::Mutex<std::collections::BTreeMap<String, JobRecord>>,
    modules: std::sync::Mutex<std::collections::HashMap<ModuleHash, Vec<u8>>>,
    providers: std::sync::Mutex<std::collections::BTreeMap<String, ProviderView>>,
    sessions: std::sync::Mutex<std::collections::BTreeMap<String, SessionView>>,
    checkpoints: std::sync::Mutex<std::collections::HashMap<String, KeptCheckpoint>>,
}

impl Store for MemoryStore {
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        lock(&self.jobs).insert(job.view.id.clone(), job.clone());
        if ends_checkpoint(job) {
            lock(&self.checkpoints).remove(&job.view.id);
        }
        Ok(())
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        Ok(lock(&self.jobs).values().cloned().collect())
    }

    fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError> {
        lock(&self.modules).insert(*hash, bytes.to_vec());
        Ok(())
    }

    fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(lock(&self.modules).get(hash).cloned())
    }

    fn put_provider(&self, provider: &ProviderView) -> Result<(), StoreError> {
        lock(&self.providers).insert(provider.key.to_base58(), provider.clone());
        Ok(())
    }

    fn providers(&self) -> Result<Vec<ProviderView>, StoreError> {
        Ok(lock(&self.providers).values().cloned().collect())
    }

    fn put_session(&self, session: &SessionView) -> Result<(), StoreError> {
        lock(&self.sessions).insert(session.id.clone(), session.clone());
        Ok(())
    }

    fn sessions(&self) -> Result<Vec<SessionView>, StoreError> {
        Ok(lock(&self.sessions).values().cloned().collect())
    }

    fn put_checkpoint(&self, job_id: &str, checkpoint: &KeptCheckpoint) -> Result<(), StoreError> {
        lock(&self.checkpoints).insert(job_id.to_string(), checkpoint.clone());
        Ok(())
    }

    fn checkpoint(&self, job_id: &str) -> Result<Option<KeptCheckpoint>, StoreError> {
        Ok(lock(&self.checkpoints).get(job_id).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(step: u64) -> KeptCheckpoint {
        let view = proto::api::CheckpointView {
            step,
            bytes: 4,
            sha256: String::new(),
            saved_at_ms: step,
            provider: proto::PublicKey([1; 32]),
            rank: Some(1),
        };
        KeptCheckpoint { checkpoint: Checkpoint { step, bytes: vec![step as u8; 4] }, view }
    }

    #[test]
    fn what_a_flush_took_but_has_not_committed_is_still_read_and_a_newer_write_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db")).unwrap();
        let _one_at_a_time = lock(&store.inner.flush);
        store.put_checkpoint("job-1", &ck(1)).unwrap();
        store.put_module(&[7; 32], b"\0asm").unwrap();
        // A flush has taken the queue and is writing it: neither the queue nor the database
        // has them, and yet they are read.
        let batch = store.inner.take_batch();
        assert_eq!(store.checkpoint("job-1").unwrap(), Some(ck(1)));
        assert_eq!(store.module(&[7; 32]).unwrap().as_deref(), Some(&b"\0asm"[..]));
        assert!(store.has_module(&[7; 32]).unwrap());
        // A write queued meanwhile is newer than the one being flushed.
        store.put_checkpoint("job-1", &ck(2)).unwrap();
        assert_eq!(store.checkpoint("job-1").unwrap(), Some(ck(2)));
        store.inner.commit(batch).unwrap();
        assert_eq!(store.checkpoint("job-1").unwrap(), Some(ck(2)));
        let batch = store.inner.take_batch();
        store.inner.commit(batch).unwrap();
        assert!(lock(&store.inner.queue).writes.is_empty());
        assert_eq!(store.checkpoint("job-1").unwrap(), Some(ck(2)), "from disk");
        assert_eq!(store.module(&[7; 32]).unwrap().as_deref(), Some(&b"\0asm"[..]));
        assert_eq!(store.checkpoint("job-2").unwrap(), None);
    }
}
