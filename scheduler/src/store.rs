//! Where the scheduler keeps its state so a restart loses nothing. One trait, so that a
//! PostgreSQL store can later serve several scheduler replicas; today one embedded database
//! file (redb).

use std::path::Path;

use proto::api::{JobRecord, ProviderView};
use proto::msg::ModuleHash;
use redb::{Database, ReadableTable, TableDefinition};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const MODULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("modules");
const PROVIDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("providers");

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

/// The scheduler's persistent state.
pub trait Store: Send + Sync {
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError>;
    fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_provider(&self, provider: &ProviderView) -> Result<(), StoreError>;
    fn providers(&self) -> Result<Vec<ProviderView>, StoreError>;
}

/// The embedded store: one redb file.
pub struct RedbStore {
    db: Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let database =
            Database::create(path).map_err(|e| StoreError::Db(format!("opening {}: {e}", path.display())))?;
        let tx = database.begin_write().map_err(db_err)?;
        tx.open_table(JOBS).map_err(db)?;
        tx.open_table(MODULES).map_err(db)?;
        tx.open_table(PROVIDERS).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(RedbStore { db: database })
    }

    fn put(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(table).map_err(db)?.insert(key, value).map_err(db)?;
        tx.commit().map_err(db)
    }

    fn all<T: serde::de::DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(table).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            out.push(rmp_serde::from_slice(v.value()).map_err(|e| StoreError::Decode(e.to_string()))?);
        }
        Ok(out)
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
        self.put(JOBS, &job.view.id, &encode(job)?)
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.all(JOBS)
    }

    fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(MODULES).map_err(db)?.insert(&hash[..], bytes).map_err(db)?;
        tx.commit().map_err(db)
    }

    fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(MODULES).map_err(db)?;
        Ok(t.get(&hash[..]).map_err(db)?.map(|v| v.value().to_vec()))
    }

    fn put_provider(&self, provider: &ProviderView) -> Result<(), StoreError> {
        self.put(PROVIDERS, &provider.key.to_base58(), &encode(provider)?)
    }

    fn providers(&self) -> Result<Vec<ProviderView>, StoreError> {
        self.all(PROVIDERS)
    }
}
