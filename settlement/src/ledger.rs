//! Each party's own record of its money, as JSON files in a folder: one per session (what was
//! served or bought, by the receipts, and how much of it the renter's vouchers cover) and one
//! per payment channel (`channels/`: the party's [`Payer`] or [`Payee`] state, which a restart
//! resumes from and `wasmgrid spend --close` closes with). `wasmgrid earnings` and `wasmgrid
//! spend` read these folders and the chain.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::party::{Payee, Payer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Provider,
    Renter,
}

/// One session (or one batch job) with one counterparty, as one party saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    /// Hex session id, or the job's id.
    pub session: String,
    /// A batch job's book: `session` is the job's id, `inferences` counts its receipts and
    /// `price_per_inference` is 0.
    #[serde(default)]
    pub job: bool,
    pub role: Role,
    pub renter: proto::PublicKey,
    pub provider: proto::PublicKey,
    /// The GPU that served the session (as the provider names it).
    pub device: String,
    pub mint: proto::PublicKey,
    /// The payment channel's address.
    pub channel: proto::Address,
    pub price_per_inference: u64,
    /// Inferences and amount due per the newest receipt.
    pub inferences: u64,
    pub amount_due: u64,
    /// How much of the amount due the renter's vouchers cover.
    pub vouched: u64,
    /// Claims made on the channel during the session, base58, oldest first.
    pub claims: Vec<String>,
    pub closed: bool,
    /// Milliseconds since the Unix epoch.
    pub opened_ms: u64,
    pub updated_ms: u64,
}

impl Book {
    /// A new session's book, nothing served yet.
    pub fn open(role: Role, ticket: &proto::ticket::Ticket, mint: proto::PublicKey, channel: proto::Address) -> Book {
        let session = crate::pay::hex(&ticket.session_id);
        Book {
            job: false,
            price_per_inference: ticket.price_per_inference,
            ..Book::for_job(role, &session, ticket.renter, ticket.provider, mint, channel)
        }
    }

    /// A batch job's book, nothing billed yet.
    pub fn for_job(
        role: Role,
        job_id: &str,
        renter: proto::PublicKey,
        provider: proto::PublicKey,
        mint: proto::PublicKey,
        channel: proto::Address,
    ) -> Book {
        let now = now_ms();
        Book {
            session: job_id.to_string(),
            job: true,
            role,
            renter,
            provider,
            device: String::new(),
            mint,
            channel,
            price_per_inference: 0,
            inferences: 0,
            amount_due: 0,
            vouched: 0,
            claims: Vec::new(),
            closed: false,
            opened_ms: now,
            updated_ms: now,
        }
    }

    /// The file name: session and counterparty (a renter's session may move to another
    /// provider, each with its own channel).
    fn file_name(&self) -> String {
        let other = match self.role {
            Role::Provider => self.renter,
            Role::Renter => self.provider,
        };
        // A job's id comes from the scheduler: only its plain characters name a file.
        let name: String =
            self.session.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).take(64).collect();
        format!("{name}-{}.json", &other.to_string())
    }

    /// Amount due and not covered by a voucher.
    pub fn pending(&self) -> u64 {
        self.amount_due.saturating_sub(self.vouched)
    }
}

/// The folder of channel files under a ledger.
fn channels(dir: &Path) -> PathBuf {
    dir.join("channels")
}

/// Saves a renter's channel state (`durable` waits for the disk).
pub fn save_payer(dir: &Path, p: &Payer, durable: bool) -> std::io::Result<()> {
    write_json(&channels(dir), &format!("{}.json", p.address), p, durable)
}

/// Saves a provider's channel state.
pub fn save_payee(dir: &Path, p: &Payee, durable: bool) -> std::io::Result<()> {
    write_json(&channels(dir), &format!("{}.json", p.address), p, durable)
}

/// A channel's saved state, if there is one.
pub fn load_channel<T: DeserializeOwned>(dir: &Path, address: &proto::Address) -> std::io::Result<Option<T>> {
    let path = channels(dir).join(format!("{address}.json"));
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).map(Some).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every channel saved under `dir`, with the files that could not be read.
pub fn load_channels<T: DeserializeOwned>(dir: &Path) -> std::io::Result<(Vec<T>, Unreadable)> {
    load_all(&channels(dir))
}

/// Writes `value` as `dir/name` (replacing its earlier state atomically).
fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T, durable: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, &path)?;
    if durable && let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `book` into `dir` (replacing its earlier state atomically).
pub fn save(dir: &Path, book: &Book, durable: bool) -> std::io::Result<()> {
    write_json(dir, &book.file_name(), book, durable)
}

/// Ledger files that could not be read, and why.
pub type Unreadable = Vec<(PathBuf, String)>;

/// Every book in `dir`, oldest session first, with the files that could not be read.
pub fn load(dir: &Path) -> std::io::Result<(Vec<Book>, Unreadable)> {
    let (mut books, bad) = load_all::<Book>(dir)?;
    books.sort_by(|a, b| (a.opened_ms, &a.session).cmp(&(b.opened_ms, &b.session)));
    Ok((books, bad))
}

fn load_all<T: DeserializeOwned>(dir: &Path) -> std::io::Result<(Vec<T>, Unreadable)> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((out, bad)),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => out.push(v),
            Err(e) => bad.push((path, e)),
        }
    }
    Ok((out, bad))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
