//! The chain below the settlement code: one trait, two transports. [`LocalChain`] is the real
//! SVM with the real SPL programs in this process (LiteSVM); [`crate::rpc::RpcChain`] speaks
//! JSON-RPC to a cluster. Everything above (escrow, vouchers, settling, refunds) is written
//! against [`Chain`] alone.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use litesvm::LiteSVM;
use solana_sdk::account::Account;
use solana_sdk::hash::Hash;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::Signature;
use solana_sdk::transaction::{Transaction, TransactionError, VersionedTransaction};

/// What went wrong on the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("building an instruction: {0}")]
    Instruction(String),
    /// The chain ran the transaction and it failed; nothing it held moved.
    #[error("the transaction failed: {0}")]
    Failed(String),
    /// The chain could not be reached or answered nonsense; the transaction may or may not
    /// have landed (ask [`Chain::status`]).
    #[error("the chain could not be reached: {0}")]
    Unreachable(String),
    #[error("account {0} is missing or is not {1}")]
    Account(Pubkey, &'static str),
}

/// Where a transaction stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The chain has no record of it: it never landed (or the record is gone).
    Unknown,
    Succeeded,
    Failed(String),
}

/// The operations settlement needs from a chain. Blocking: call it off async threads.
pub trait Chain: Send + Sync + std::fmt::Debug {
    /// A recent blockhash to sign transactions against.
    fn latest_blockhash(&self) -> Result<Hash, ChainError>;
    /// Submits a signed transaction and waits until it is confirmed or has failed.
    fn send(&self, tx: &Transaction) -> Result<Signature, ChainError>;
    /// Where the transaction with this signature stands.
    fn status(&self, signature: &Signature) -> Result<Status, ChainError>;
    /// An account's current state, `None` where it does not exist.
    fn account(&self, key: &Pubkey) -> Result<Option<Account>, ChainError>;
    /// Whether a transaction signed against `blockhash` could still land.
    fn is_blockhash_valid(&self, blockhash: &Hash) -> Result<bool, ChainError>;
    /// Lamports that keep an account of `len` bytes rent-exempt.
    fn rent(&self, len: usize) -> Result<u64, ChainError>;
    /// Lamports per signature in fees.
    fn fee_per_signature(&self) -> u64 {
        5_000
    }
    /// Gives `to` lamports; only test chains can.
    fn airdrop(&self, to: &Pubkey, lamports: u64) -> Result<(), ChainError>;
}

/// Statuses kept for lookups, oldest dropped first.
const KEPT_STATUSES: usize = 1 << 20;

struct Local {
    svm: LiteSVM,
    /// Seconds added to the wall clock (tests move time forward to end a dispute window).
    clock_offset: i64,
    statuses: HashMap<Signature, Result<(), TransactionError>>,
    order: VecDeque<Signature>,
    /// Blockhashes of the last blocks, newest last: a transaction signed against any of them
    /// is accepted, as a cluster accepts one for about 150 blocks.
    recent: VecDeque<Hash>,
}

/// Most lamports an account may hold after an airdrop: about 1.8 billion SOL, well inside u64.
const MAX_LAMPORTS: u64 = 1 << 60;

/// Blocks a blockhash stays usable for.
const RECENT_BLOCKS: usize = 150;

/// The in-process chain: LiteSVM, the real SVM with the real System, SPL Token, Associated
/// Token Account and Memo programs and the Ed25519 precompile, with our payment-channel program
/// loaded at [`crate::channel::LOCAL_PROGRAM_ID`]. Each landed transaction starts a new block
/// (a new slot, so durable nonces can advance again); the clock is the wall clock (plus what
/// [`LocalChain::advance_clock`] added).
pub struct LocalChain {
    inner: Mutex<Local>,
}

impl std::fmt::Debug for LocalChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalChain").finish_non_exhaustive()
    }
}

impl Default for LocalChain {
    fn default() -> Self {
        LocalChain::new()
    }
}

impl LocalChain {
    pub fn new() -> LocalChain {
        let mut svm = LiteSVM::new();
        // The program was built for this SVM (SBPF v3) and checked by its own tests; a failure
        // to load it is a broken build, and the chain would refuse every channel.
        if let Err(e) = svm.add_program(crate::channel::LOCAL_PROGRAM_ID, crate::channel::PROGRAM_ELF) {
            log::error!("the payment-channel program does not load: {e:?}");
        }
        let recent = VecDeque::from([svm.latest_blockhash()]);
        let mut local = Local { svm, clock_offset: 0, statuses: HashMap::new(), order: VecDeque::new(), recent };
        local.set_clock();
        LocalChain { inner: Mutex::new(local) }
    }

    /// Moves the chain's clock `secs` forward (a dispute window can end in a test).
    pub fn advance_clock(&self, secs: i64) {
        let mut l = self.lock();
        l.clock_offset = l.clock_offset.saturating_add(secs);
        l.set_clock();
    }

    /// The chain's clock, Unix seconds.
    pub fn unix_time(&self) -> i64 {
        self.lock().svm.get_sysvar::<solana_sdk::clock::Clock>().unix_timestamp
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `tx` in a new block, returning the chain's own metadata (fee, compute units) on
    /// success. A transaction already run is refused, whatever its blockhash.
    pub fn execute(&self, tx: impl Into<VersionedTransaction>) -> Result<(Signature, u64, u64), ChainError> {
        let tx: VersionedTransaction = tx.into();
        let signature = tx.signatures.first().copied().unwrap_or_default();
        let mut l = self.lock();
        if l.statuses.contains_key(&signature) {
            return Err(ChainError::Failed(format!("{:?}", TransactionError::AlreadyProcessed)));
        }
        let latest = l.svm.latest_blockhash();
        let blockhash = *tx.message.recent_blockhash();
        // LiteSVM takes only its latest blockhash (or a durable nonce); one of the last blocks'
        // is as good on a cluster, so run the transaction as of that block.
        // Never for a transaction touching a nonce: the System program derives a nonce from the
        // block's hash, and an older one would let a nonce be rewound (and old vouchers paid).
        let older = blockhash != latest && l.recent.contains(&blockhash) && !touches_nonce(&tx);
        if older {
            l.svm.set_latest_blockhash(blockhash);
        }
        let result = l.svm.send_transaction(tx);
        if older {
            l.svm.set_latest_blockhash(latest);
        }
        let status = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.err.clone()),
        };
        // A duplicate is refused without running; it must not overwrite what the first did.
        let duplicate = matches!(&result, Err(e) if e.err == TransactionError::AlreadyProcessed);
        if !duplicate {
            if l.statuses.insert(signature, status).is_none() {
                l.order.push_back(signature);
            }
            while l.order.len() > KEPT_STATUSES {
                if let Some(old) = l.order.pop_front() {
                    l.statuses.remove(&old);
                }
            }
        }
        // A failed transaction ends its block too, as on a cluster: the same request retried
        // is a new transaction, not a duplicate of the failed one.
        if !duplicate {
            l.next_block();
        }
        match result {
            Ok(meta) => Ok((signature, meta.fee, meta.compute_units_consumed)),
            Err(e) => Err(ChainError::Failed(format!("{:?} {}", e.err, e.meta.logs.join(" | ")))),
        }
    }
}

/// Whether a transaction has a System instruction that reads the block's hash for a nonce
/// (advance, withdraw, initialize).
fn touches_nonce(tx: &VersionedTransaction) -> bool {
    let keys = tx.message.static_account_keys();
    tx.message.instructions().iter().any(|ix| {
        let system = keys.get(usize::from(ix.program_id_index)) == Some(&solana_system_interface::program::ID);
        let tag = ix.data.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes);
        system && matches!(tag, Some(4..=6))
    })
}

impl Local {
    /// The clock sysvar: the next slot, the wall clock's time (never going back).
    fn set_clock(&mut self) {
        let mut clock = self.svm.get_sysvar::<solana_sdk::clock::Clock>();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        clock.slot = clock.slot.saturating_add(1);
        clock.unix_timestamp = clock.unix_timestamp.max(wall.saturating_add(self.clock_offset));
        self.svm.set_sysvar(&clock);
    }

    /// Starts a new block (so a durable nonce can advance again).
    fn next_block(&mut self) {
        self.svm.expire_blockhash();
        self.set_clock();
        let latest = self.svm.latest_blockhash();
        self.recent.push_back(latest);
        while self.recent.len() > RECENT_BLOCKS {
            self.recent.pop_front();
        }
    }
}

impl LocalChain {
    /// Whether `hash` is one of the last blocks' blockhashes.
    pub fn is_recent(&self, hash: &Hash) -> bool {
        self.lock().recent.contains(hash)
    }

    /// How the transaction with this signature ended, if it ran.
    pub fn outcome(&self, signature: &Signature) -> Option<Result<(), TransactionError>> {
        self.lock().statuses.get(signature).cloned()
    }

    /// Gives `to` lamports, returning the airdrop transaction's signature.
    pub fn airdrop_signed(&self, to: &Pubkey, lamports: u64) -> Result<Signature, ChainError> {
        let mut l = self.lock();
        let has = l.svm.get_account(to).map_or(0, |a| a.lamports);
        if has.checked_add(lamports).is_none_or(|total| total > MAX_LAMPORTS) {
            return Err(ChainError::Failed(format!("an airdrop of {lamports} lamports is too large")));
        }
        let r =
            l.svm.airdrop(to, lamports).map(|m| m.signature).map_err(|e| ChainError::Failed(format!("{:?}", e.err)));
        if let Ok(sig) = &r {
            l.statuses.insert(*sig, Ok(()));
            l.order.push_back(*sig);
        }
        l.next_block();
        r
    }

    /// Transactions run so far: the local chain's slot.
    pub fn slot(&self) -> u64 {
        self.lock().order.len() as u64
    }
}

impl Chain for LocalChain {
    fn latest_blockhash(&self) -> Result<Hash, ChainError> {
        Ok(self.lock().svm.latest_blockhash())
    }

    fn send(&self, tx: &Transaction) -> Result<Signature, ChainError> {
        self.execute(tx.clone()).map(|(s, _, _)| s)
    }

    fn status(&self, signature: &Signature) -> Result<Status, ChainError> {
        Ok(match self.outcome(signature) {
            None => Status::Unknown,
            Some(Ok(())) => Status::Succeeded,
            Some(Err(e)) => Status::Failed(format!("{e:?}")),
        })
    }

    fn account(&self, key: &Pubkey) -> Result<Option<Account>, ChainError> {
        Ok(self.lock().svm.get_account(key).filter(|a| a.lamports > 0))
    }

    fn rent(&self, len: usize) -> Result<u64, ChainError> {
        Ok(self.lock().svm.minimum_balance_for_rent_exemption(len))
    }

    fn is_blockhash_valid(&self, blockhash: &Hash) -> Result<bool, ChainError> {
        Ok(self.is_recent(blockhash))
    }

    fn airdrop(&self, to: &Pubkey, lamports: u64) -> Result<(), ChainError> {
        self.airdrop_signed(to, lamports).map(drop)
    }
}
