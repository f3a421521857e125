//! Each party's own record of its sessions' money, one JSON file per session in a folder: what
//! was served or bought (from the receipts), what settled on the chain and under which
//! transactions, what is pending, and on the provider the state a restart resumes from.
//! `wasmgrid earnings` and `wasmgrid spend` read these folders.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pay::Payee;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Provider,
    Renter,
}

/// One session with one counterparty, as one party saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    /// Hex session id.
    pub session: String,
    pub role: Role,
    pub renter: proto::PublicKey,
    pub provider: proto::PublicKey,
    /// The GPU that served the session (as the provider names it).
    pub device: String,
    pub mint: proto::PublicKey,
    pub price_per_inference: u64,
    pub budget: u64,
    /// Inferences and amount due per the newest receipt.
    pub inferences: u64,
    pub amount_due: u64,
    /// Vouched for by the renter (cumulative).
    pub vouched: u64,
    /// Paid out of escrow on the chain (cumulative).
    pub paid: u64,
    /// Settlement transactions, base58, oldest first.
    pub settlements: Vec<String>,
    /// The refund transaction, once the renter submitted it, and what it returned.
    pub refund: Option<String>,
    pub refunded: u64,
    pub closed: bool,
    /// Milliseconds since the Unix epoch.
    pub opened_ms: u64,
    pub updated_ms: u64,
    /// The provider's settlement state, for a restart to resume from.
    pub payee: Option<Payee>,
}

impl Book {
    /// A new session's book, nothing served yet.
    pub fn open(role: Role, ticket: &proto::ticket::Ticket, escrow: &proto::voucher::EscrowTerms) -> Book {
        let now = now_ms();
        Book {
            session: crate::pay::hex(&ticket.session_id),
            role,
            renter: ticket.renter,
            provider: ticket.provider,
            device: String::new(),
            mint: escrow.mint,
            price_per_inference: ticket.price_per_inference,
            budget: escrow.budget,
            inferences: 0,
            amount_due: 0,
            vouched: 0,
            paid: 0,
            settlements: Vec::new(),
            refund: None,
            refunded: 0,
            closed: false,
            opened_ms: now,
            updated_ms: now,
            payee: None,
        }
    }

    /// The file name: session and counterparty (a renter's session may move to another
    /// provider, each with its own escrow).
    fn file_name(&self) -> String {
        let other = match self.role {
            Role::Provider => self.renter,
            Role::Renter => self.provider,
        };
        format!("{}-{}.json", self.session, &other.to_string())
    }

    /// Amount due and not yet paid on the chain.
    pub fn pending(&self) -> u64 {
        self.amount_due.saturating_sub(self.paid)
    }
}

/// Writes `book` into `dir` (replacing its earlier state atomically). `durable` waits for the
/// disk, as a provider must before it sends a settlement.
pub fn save(dir: &Path, book: &Book, durable: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(book.file_name());
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(book).map_err(std::io::Error::other)?;
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

/// Ledger files that could not be read, and why.
pub type Unreadable = Vec<(PathBuf, String)>;

/// Every book in `dir`, oldest session first, with the files that could not be read.
pub fn load(dir: &Path) -> std::io::Result<(Vec<Book>, Unreadable)> {
    let mut books = Vec::new();
    let mut bad = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((books, bad)),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Book>(&b).map_err(|e| e.to_string()))
        {
            Ok(b) => books.push(b),
            Err(e) => bad.push((path, e)),
        }
    }
    books.sort_by(|a, b| (a.opened_ms, &a.session).cmp(&(b.opened_ms, &b.session)));
    Ok((books, bad))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
