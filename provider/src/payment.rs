//! The provider's side of paid sessions, through payment channels: reads the channel the renter
//! names from the chain, takes a voucher with each request (for the receipt of the call before),
//! serves no more than the configured number of inferences past the newest valid voucher, claims
//! when its policy says, and watches every channel it holds vouchers on so that a close the
//! renter starts is answered by a claim inside the dispute window. Its state per channel is in
//! the ledger, so a restart resumes (and a renter that comes back brings its own copy of the
//! newest voucher). Chain calls block: call these off async threads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::receipt::Receipt;
use proto::voucher::{ChannelTerms, Claimed, Voucher};
use proto::{Address, Keypair, PublicKey};
use settlement::ledger::{self, Book, Role};
use settlement::{Chain, Ids, Payee, Policy};

/// Inferences a provider serves past the newest valid voucher by default: a paid session then
/// signs a receipt and asks a voucher every 16 calls, as often as an unpaid one signs its
/// receipts, so paying costs a call next to nothing (two ed25519 operations per 16 calls;
/// BENCHMARKS.md), and the provider risks 16 calls' price at most.
pub const DEFAULT_MAX_UNVOUCHED: u64 = 16;

/// How a provider is paid.
#[derive(Clone)]
pub struct PaymentConfig {
    pub chain: Arc<dyn Chain>,
    /// The payment-channel program it takes vouchers for.
    pub program: Address,
    /// The SPL mint it takes payment in.
    pub mint: PublicKey,
    pub policy: Policy,
    /// Inferences served beyond the newest valid voucher before serving stops (at least 1).
    pub max_unvouched: u64,
    /// Where the ledger goes (`wasmgrid earnings` reads it); `None` keeps none, and a restart
    /// then knows only what renters bring back.
    pub ledger: Option<PathBuf>,
    /// Every channel this provider holds vouchers on, shared by sessions and the watcher.
    pub channels: Arc<Channels>,
    /// A paid batch job gets a receipt every this much of its time, and is stopped when one
    /// is not answered by a voucher within the next.
    pub job_slice: Duration,
}

/// What a job's slice is unless configured.
pub const DEFAULT_JOB_SLICE: Duration = Duration::from_secs(10);

impl std::fmt::Debug for PaymentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentConfig")
            .field("program", &self.program)
            .field("mint", &self.mint)
            .field("policy", &self.policy)
            .field("max_unvouched", &self.max_unvouched)
            .field("job_slice", &self.job_slice)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// How often a session re-reads its channel (a close the renter started, a top-up).
const READ_EVERY: Duration = Duration::from_secs(10);

/// How long a session goes on serving while the chain does not answer: half the shortest
/// dispute window the program allows. A voucher is only as good as a claim that can land in
/// the window of a close, which a provider that cannot read the chain would not see start.
const CHAIN_SILENCE: Duration = Duration::from_secs(30);

/// Vouchers taken between saves of the session's book (its inferences and amounts, for
/// `earnings`); the channel's state, which holds the money, is saved after every voucher.
const BOOK_EVERY: u64 = 64;

/// The channels a provider holds vouchers on. A channel serves one session at a time: vouchers
/// are cumulative over the channel, so two sessions on it at once would race for the amount.
#[derive(Debug, Default)]
pub struct Channels {
    inner: Mutex<HashMap<Address, Slot>>,
    saver: Saver,
}

/// Writes channel states to the ledger off the serving path, one thread for all: the newest
/// state of each channel waits in a slot (a newer one replaces it, so a file never goes back to
/// an older state) until the thread writes it, at most every [`SAVE_PAUSE`]. A killed daemon
/// loses at most the states not yet written (that long's worth, and the renter brings its copy
/// of the newest voucher back); after a claim and at a session's end the write waits for the
/// disk.
#[derive(Debug, Default)]
struct Saver {
    pending: Arc<(Mutex<HashMap<Address, Pending>>, std::sync::Condvar)>,
    started: std::sync::OnceLock<()>,
}

/// The pause between two writes of the ledger writer (for states that need not wait for the
/// disk): what a killed daemon can lose of its newest vouchers, at most.
const SAVE_PAUSE: Duration = Duration::from_millis(50);

/// A channel state waiting to be written: where, what, and whether to wait for the disk.
type Pending = (PathBuf, Payee, bool);

impl Saver {
    fn save(&self, dir: PathBuf, payee: Payee, durable: bool) {
        let pending = self.pending.clone();
        self.started.get_or_init(|| {
            let pending = pending.clone();
            let spawned = std::thread::Builder::new().name("wasmgrid-ledger".into()).spawn(move || {
                loop {
                    let batch: Vec<Pending> = {
                        let (lock, ready) = &*pending;
                        let mut map = lock.lock().unwrap_or_else(PoisonError::into_inner);
                        while map.is_empty() {
                            map = ready.wait(map).unwrap_or_else(PoisonError::into_inner);
                        }
                        map.drain().map(|(_, v)| v).collect()
                    };
                    let waited = batch.iter().any(|(_, _, durable)| *durable);
                    for (dir, p, durable) in batch {
                        if let Err(e) = ledger::save_payee(&dir, &p, durable) {
                            log::warn!("writing the ledger in {}: {e}", dir.display());
                        }
                    }
                    // A busy channel is written a few times a second, not after every call:
                    // its newest state waits in the slot meanwhile.
                    if !waited {
                        std::thread::sleep(SAVE_PAUSE);
                    }
                }
            });
            if let Err(e) = spawned {
                log::error!("no ledger writer thread: {e}");
            }
        });
        let (lock, ready) = &*self.pending;
        let mut map = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let durable = durable || map.get(&payee.address).is_some_and(|(_, _, d)| *d);
        map.insert(payee.address, (dir, payee, durable));
        ready.notify_one();
    }
}

#[derive(Debug)]
struct Slot {
    payee: Option<Payee>,
    /// A session holds the channel (and its payee) now.
    in_use: bool,
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Address, Slot>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes channel `address` for one session, with the state held for it, if any.
    fn lease(&self, address: Address) -> Result<Option<Payee>, String> {
        let mut map = self.lock();
        let slot = map.entry(address).or_insert(Slot { payee: None, in_use: false });
        if slot.in_use {
            return Err(format!(
                "payment channel {address} is paying for another session with this provider now: \
                 pay this one through another channel id"
            ));
        }
        slot.in_use = true;
        Ok(slot.payee.take())
    }

    fn give_back(&self, address: Address, payee: Payee) {
        self.lock().insert(address, Slot { payee: Some(payee), in_use: false });
    }

    fn release(&self, address: Address) {
        if let Some(slot) = self.lock().get_mut(&address) {
            slot.in_use = false;
        }
    }

    /// The state of every channel no session holds now, taken out (the watcher puts them back).
    fn idle(&self) -> Vec<Payee> {
        self.lock().values_mut().filter(|s| !s.in_use).filter_map(|s| s.payee.take()).collect()
    }

    fn put_back(&self, payee: Payee) {
        let mut map = self.lock();
        match map.get_mut(&payee.address) {
            // A session leased it meanwhile (with no state): hand it the state now would race;
            // the session's own state wins, the watcher's copy is dropped.
            Some(slot) if slot.in_use => {}
            _ => {
                map.insert(payee.address, Slot { payee: Some(payee), in_use: false });
            }
        }
    }
}

impl PaymentConfig {
    /// The channel a renter named, checked against this provider's program and mint: its ids
    /// and address.
    fn channel_of(&self, renter: PublicKey, keypair: &Keypair, terms: &ChannelTerms) -> Result<(Ids, Address), String> {
        if terms.program != self.program {
            return Err(format!(
                "the channel is in program {}, this provider takes vouchers for program {} only",
                terms.program, self.program
            ));
        }
        if terms.mint != self.mint {
            return Err(format!("the channel is in mint {}, this provider takes {}", terms.mint, self.mint));
        }
        let ids = Ids { program: self.program, renter, provider: keypair.public(), mint: self.mint, id: terms.id };
        Ok((ids, settlement::wire_address(&ids.channel().address())))
    }

    /// A leased channel's state (`held` by the registry, else the ledger's), read from the
    /// chain (blocks), with the renter's copy of its newest voucher adopted when it is newer.
    fn open_payee(&self, ids: Ids, held: Option<Payee>, terms: &ChannelTerms) -> Result<Payee, String> {
        let address = settlement::wire_address(&ids.channel().address());
        let saved = held.or_else(|| self.load(&address));
        let mut payee = Payee::open(self.chain.as_ref(), ids, saved).map_err(|e| e.to_string())?;
        if let Some(v) = &terms.newest
            && let Err(e) = payee.adopt(v)
        {
            return Err(format!("the renter's copy of its newest voucher is refused: {e}"));
        }
        Ok(payee)
    }

    /// Creates this provider's token account for the mint, where claims pay to.
    pub fn prepare(&self, keypair: &Keypair) -> Result<(), String> {
        let me = settlement::signer(keypair);
        let mint = settlement::address(&self.mint);
        settlement::token::ensure_token_account(
            self.chain.as_ref(),
            &me,
            &settlement::address(&keypair.public()),
            &mint,
        )
        .map(drop)
        .map_err(|e| format!("creating the provider's token account for mint {}: {e}", self.mint))
    }

    /// Loads the channels the ledger holds (a restart), for the watcher to look after.
    pub fn resume(&self) -> Result<usize, String> {
        let Some(dir) = &self.ledger else { return Ok(0) };
        let (payees, bad) =
            ledger::load_channels::<Payee>(dir).map_err(|e| format!("reading the ledger {}: {e}", dir.display()))?;
        for (path, e) in bad {
            log::warn!("ledger file {} unreadable: {e}", path.display());
        }
        let mut n = 0;
        for p in
            payees.into_iter().filter(|p| p.ids.program == self.program && p.ids.mint == self.mint && p.unclaimed() > 0)
        {
            self.channels.put_back(p);
            n += 1;
        }
        Ok(n)
    }

    /// One round of the watcher: every channel no session holds, with vouchers not yet claimed,
    /// is read from the chain and claimed when the renter started closing it, or when the policy
    /// says (for an idle channel, an end claim that failed is due again, and an interval has
    /// passed). Returns the claims made.
    pub fn watch(&self, keypair: &Keypair) -> Vec<Claimed> {
        let mut claims = Vec::new();
        for mut p in self.channels.idle() {
            if p.unclaimed() > 0 {
                let read = p.refresh(self.chain.as_ref());
                if matches!(read, Err(settlement::PayError::Closing(_))) {
                    // Gone from the chain (finalized after its window, or opened again as a new
                    // generation): its vouchers can never be claimed. Said once, not every round.
                    log::warn!(
                        "channel {}: closed on the chain with {} vouched and not claimed; those vouchers can no longer be claimed",
                        p.address,
                        p.unclaimed()
                    );
                    p.newest = None;
                    self.save(&p, true);
                    continue;
                }
                let closing = p.closing() || read.is_err();
                if closing || self.policy == Policy::End || self.policy.due(u64::MAX, p.unclaimed(), Duration::MAX) {
                    match p.claim(self.chain.as_ref(), keypair) {
                        Ok(Some(c)) => {
                            log::info!(
                                "channel {}: claimed {} in all ({})",
                                p.address,
                                c.cumulative,
                                solana_signature(&c.transaction)
                            );
                            claims.push(c);
                        }
                        Ok(None) => {}
                        Err(e) => log::warn!("channel {}: claiming failed: {e}; trying again", p.address),
                    }
                    self.save(&p, true);
                }
            }
            self.channels.put_back(p);
        }
        claims
    }

    /// Saves a channel's state soon, off this thread (see [`Saver`]); `durable` waits for the
    /// disk there.
    fn save(&self, p: &Payee, durable: bool) {
        if let Some(dir) = &self.ledger {
            self.channels.saver.save(dir.clone(), p.clone(), durable);
        }
    }

    fn load(&self, address: &Address) -> Option<Payee> {
        let dir = self.ledger.as_ref()?;
        ledger::load_channel::<Payee>(dir, address).unwrap_or_else(|e| {
            log::warn!("channel {address}: {e}; starting from the chain");
            None
        })
    }
}

/// The newest receipt of a session and how much of it is vouched for.
#[derive(Debug, Default)]
struct Served {
    inferences: u64,
    amount_due: u64,
    digest: [u8; 32],
    receipt: Option<Receipt>,
    /// Inferences covered by the newest voucher taken in this session.
    vouched_inferences: u64,
}

/// One paid session.
pub(crate) struct SessionPay {
    config: PaymentConfig,
    payee: Option<Payee>,
    address: Address,
    /// The channel's cumulative amount when the session started: its vouchers are for this
    /// plus the session's amount due.
    base: u64,
    served: Served,
    book: Book,
    /// When the channel was last read from the chain (tried), and last read successfully.
    read_at: Instant,
    read_ok_at: Instant,
    /// When the oldest unclaimed voucher of this session was taken.
    oldest_unclaimed: Option<Instant>,
    since_save: u64,
    /// Claims made during the session.
    claims: Vec<proto::Signature>,
    /// The renter's newest voucher taken in this session, with the receipt it answers: what
    /// the reports show the scheduler.
    vouched: Option<Box<proto::msg::SessionVouched>>,
    /// Once the renter closed: the channel went back to the registry (the renter may open its
    /// next session at once).
    released: bool,
}

impl std::fmt::Debug for SessionPay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPay").field("address", &self.address).field("base", &self.base).finish_non_exhaustive()
    }
}

impl Drop for SessionPay {
    fn drop(&mut self) {
        if !self.released {
            self.release();
        }
    }
}

impl SessionPay {
    /// Gives the channel back: saved, in the registry for the watcher and the next session.
    fn release(&mut self) {
        self.released = true;
        match self.payee.take() {
            Some(p) => {
                self.config.save(&p, true);
                self.config.channels.give_back(self.address, p);
            }
            None => self.config.channels.release(self.address),
        }
    }
}

/// Claim signatures a report carries at most (the newest): reports are cumulative and a
/// channel may be claimed from many times, more than a control frame holds.
pub const REPORTED_SETTLEMENTS: usize = 256;

impl SessionPay {
    /// Checks the channel the renter named on the chain; returns the session's payment state
    /// and the newest voucher this provider holds on the channel (for the renter to count on
    /// from).
    pub(crate) fn open(
        config: &PaymentConfig,
        keypair: &Keypair,
        ticket: &proto::ticket::Ticket,
        terms: Option<Box<ChannelTerms>>,
        device: &str,
    ) -> Result<(SessionPay, Option<Voucher>), String> {
        let terms = terms.ok_or_else(|| {
            format!(
                "this provider takes payment in mint {} through payment channels: open the session with a channel (a client with a chain)",
                config.mint
            )
        })?;
        let (ids, address) = config.channel_of(ticket.renter, keypair, &terms)?;
        let held = config.channels.lease(address)?;
        // From here on the lease is the session's: dropping `pay` gives it back.
        let mut pay = SessionPay {
            config: config.clone(),
            payee: None,
            address,
            base: 0,
            served: Served::default(),
            book: Book::open(Role::Provider, ticket, config.mint, address),
            read_at: Instant::now(),
            read_ok_at: Instant::now(),
            oldest_unclaimed: None,
            since_save: 0,
            claims: Vec::new(),
            vouched: None,
            released: false,
        };
        let payee = config.open_payee(ids, held, &terms)?;
        let room = payee.deposited.saturating_sub(payee.vouched());
        if room < ticket.price_per_inference {
            return Err(format!(
                "the channel has {room} left of its deposit of {}, less than one inference at {}: top it up",
                payee.deposited, ticket.price_per_inference
            ));
        }
        pay.base = payee.vouched();
        pay.book.device = device.to_string();
        let newest = payee.newest;
        pay.payee = Some(payee);
        pay.save_book(false);
        Ok((pay, newest))
    }

    fn payee(&mut self) -> Result<&mut Payee, String> {
        self.payee.as_mut().ok_or_else(|| "the session's channel state is gone".to_string())
    }

    /// Before serving a request, with `served` calls served so far: takes its voucher (for the
    /// newest receipt) and checks that one more call may be served. An error stops the
    /// session, with its reason.
    /// `may_read` false: the caller runs on an async thread and must not wait for the chain (a
    /// re-read that came due since [`SessionPay::before_needs_chain`] waits for the next call).
    pub(crate) fn before_serve(
        &mut self,
        voucher: Option<&Voucher>,
        served: u64,
        may_read: bool,
    ) -> Result<(), String> {
        if let Some(v) = voucher {
            self.take(v)?;
        }
        let unvouched = served.max(self.served.inferences).saturating_sub(self.served.vouched_inferences);
        let most = self.config.max_unvouched.max(1);
        if unvouched >= most {
            return Err(format!(
                "{unvouched} inference(s) served without a voucher (at most {most} allowed): the renter stopped paying"
            ));
        }
        let next_due = self
            .base
            .saturating_add((served.max(self.served.inferences) + 1).saturating_mul(self.book.price_per_inference));
        let stale = self.read_at.elapsed() >= READ_EVERY;
        let short = next_due > self.payee()?.deposited;
        if (stale || short) && may_read {
            self.read_at = Instant::now();
            let chain = self.config.chain.clone();
            let p = self.payee()?;
            match p.refresh(chain.as_ref()) {
                Ok(()) => self.read_ok_at = Instant::now(),
                Err(settlement::PayError::Chain(e)) => {
                    log::warn!("channel {}: the chain did not answer: {e}", p.address);
                    let silent = self.read_ok_at.elapsed();
                    if silent >= CHAIN_SILENCE {
                        return Err(format!(
                            "the chain has not answered for {} s: serving stops until it does (a voucher is only good while a \
                             claim can land)",
                            silent.as_secs()
                        ));
                    }
                }
                Err(e) => log::warn!("channel {}: {e}", p.address),
            }
        }
        let p = self.payee()?;
        if p.closing() {
            return Err(format!("the renter is closing payment channel {}: no more work is served on it", p.address));
        }
        if next_due > p.deposited {
            return Err(format!(
                "the channel's deposit of {} is spent ({next_due} due after this inference): top it up and open a new session",
                p.deposited
            ));
        }
        Ok(())
    }

    fn take(&mut self, v: &Voucher) -> Result<(), String> {
        let want = self.base.saturating_add(self.served.amount_due);
        let digest = self.served.digest;
        let inferences = self.served.inferences;
        let p = self.payee()?;
        // Calls that cost nothing (a price of 0) owe nothing new: there is no newer voucher to
        // take, and none is needed.
        if want != p.vouched() {
            p.accept(v, want, &digest).map_err(|e| format!("voucher refused: {e}"))?;
            let channel = proto::voucher::ChannelRef {
                program: p.ids.program,
                mint: p.ids.mint,
                id: p.ids.id,
                generation: p.generation,
            };
            if let Some(receipt) = self.served.receipt.clone() {
                self.vouched = Some(Box::new(proto::msg::SessionVouched { channel, receipt, voucher: *v }));
            }
        }
        self.served.vouched_inferences = inferences;
        self.book.vouched = self.served.amount_due;
        self.oldest_unclaimed.get_or_insert_with(Instant::now);
        if let Some(p) = &self.payee {
            self.config.save(p, false);
        }
        self.since_save += 1;
        if self.since_save >= BOOK_EVERY {
            self.since_save = 0;
            self.save_book(false);
        }
        Ok(())
    }

    /// Notes the receipt just signed: the next voucher must answer it.
    pub(crate) fn served(&mut self, r: &Receipt) {
        self.served.inferences = r.counts.inferences;
        self.served.amount_due = r.amount_due;
        self.served.digest = r.digest();
        self.served.receipt = Some(r.clone());
        self.book.inferences = r.counts.inferences;
        self.book.amount_due = r.amount_due;
    }

    /// After a request was served (and its receipt noted): claims if the policy says so. A
    /// chain that cannot be reached now is not fatal: the voucher keeps.
    pub(crate) fn after_serve(&mut self, keypair: &Keypair) -> Option<Claimed> {
        if !self.claim_due() {
            return None;
        }
        self.claim(keypair)
    }

    /// Whether the policy says to claim now.
    pub(crate) fn claim_due(&self) -> bool {
        let unclaimed_inferences = self.served.vouched_inferences;
        let amount = self.payee.as_ref().map_or(0, Payee::unclaimed);
        let age = self.oldest_unclaimed.map(|t| t.elapsed()).unwrap_or_default();
        self.config.policy.due(unclaimed_inferences, amount, age)
    }

    /// Whether the next [`SessionPay::before_serve`] may read the chain (a re-read is due, or
    /// the deposit looks spent): the caller runs it off the async threads then, and inline
    /// otherwise (checking a voucher is a signature check, microseconds).
    pub(crate) fn before_needs_chain(&self) -> bool {
        let next_due =
            self.base.saturating_add((self.served.inferences + 1).saturating_mul(self.book.price_per_inference));
        let deposited = self.payee.as_ref().map_or(0, |p| p.deposited);
        self.read_at.elapsed() >= READ_EVERY || next_due > deposited
    }

    fn claim(&mut self, keypair: &Keypair) -> Option<Claimed> {
        let chain = self.config.chain.clone();
        let p = self.payee.as_mut()?;
        match p.claim(chain.as_ref(), keypair) {
            Ok(Some(c)) => {
                log::info!(
                    "session {}: claimed {} in all from channel {} ({})",
                    self.book.session,
                    c.cumulative,
                    p.address,
                    solana_signature(&c.transaction)
                );
                self.config.save(p, true);
                self.oldest_unclaimed = None;
                self.claims.push(c.transaction);
                self.book.claims.push(solana_signature(&c.transaction));
                self.save_book(false);
                Some(c)
            }
            Ok(None) => None,
            Err(e) => {
                log::warn!("session {}: claiming failed: {e}; the voucher keeps", self.book.session);
                None
            }
        }
    }

    /// The renter is done: takes its last voucher, which answers `receipt` (the receipt of
    /// every call served, signed at the close), and claims if the policy claims at the end.
    pub(crate) fn close(
        &mut self,
        keypair: &Keypair,
        voucher: Option<&Voucher>,
        receipt: Option<&Receipt>,
    ) -> Result<Option<Claimed>, String> {
        if let Some(r) = receipt {
            self.served(r);
        }
        if let Some(v) = voucher {
            self.take(v)?;
        }
        Ok(self.end_claim(keypair))
    }

    fn end_claim(&mut self, keypair: &Keypair) -> Option<Claimed> {
        let claimed = if self.config.policy == Policy::End { self.claim(keypair) } else { None };
        self.book.closed = true;
        self.save_book(true);
        // The session is over: the channel is free for the renter's next one at once, not
        // only once this connection is torn down.
        self.release();
        claimed
    }

    /// The connection ended: claim if the policy claims at the end; save.
    pub(crate) fn ended(&mut self, keypair: &Keypair) {
        if !self.book.closed {
            self.end_claim(keypair);
        }
    }

    /// The renter's newest voucher of this session with the receipt it answers, and the
    /// session's newest claims.
    pub(crate) fn vouched_and_settlements(&self) -> (Option<Box<proto::msg::SessionVouched>>, Vec<proto::Signature>) {
        let from = self.claims.len().saturating_sub(REPORTED_SETTLEMENTS);
        (self.vouched.clone(), self.claims.get(from..).unwrap_or_default().to_vec())
    }

    fn save_book(&mut self, durable: bool) {
        self.book.updated_ms = ledger::now_ms();
        if let Some(dir) = &self.config.ledger
            && let Err(e) = ledger::save(dir, &self.book, durable)
        {
            log::warn!("writing the ledger in {}: {e}", dir.display());
        }
    }
}

pub use settlement::signature_text as solana_signature;

/// One paid batch job: the channel it pays through (leased for the job, like a session's), the
/// receipts signed for it and not yet vouched for, and the vouchers that answer them. Every
/// receipt is cumulative over the job, so a voucher for a later one covers the earlier ones.
pub(crate) struct JobPay {
    config: PaymentConfig,
    payee: Option<Payee>,
    address: Address,
    /// The channel's cumulative amount when the job started.
    base: u64,
    /// Receipts signed and not yet vouched for: (sequence, amount due, digest), oldest first.
    unvouched: Vec<(u64, u64, [u8; 32])>,
    vouched_sequence: u64,
    book: Book,
    read_at: Instant,
    read_ok_at: Instant,
    released: bool,
}

impl Drop for JobPay {
    fn drop(&mut self) {
        self.release();
    }
}

impl JobPay {
    /// Checks the channel the renter named for job `job_id` on the chain: this program and
    /// mint, open, and holding `need` beyond what is vouched on it. Returns the job's payment
    /// state and the newest voucher this provider holds on the channel.
    pub(crate) fn open(
        config: &PaymentConfig,
        keypair: &Keypair,
        job_id: &str,
        renter: PublicKey,
        terms: &ChannelTerms,
        need: u64,
    ) -> Result<(JobPay, Option<Voucher>), String> {
        let (ids, address) = config.channel_of(renter, keypair, terms)?;
        let held = config.channels.lease(address)?;
        let mut pay = JobPay {
            config: config.clone(),
            payee: None,
            address,
            base: 0,
            unvouched: Vec::new(),
            vouched_sequence: 0,
            book: Book::for_job(Role::Provider, job_id, renter, keypair.public(), config.mint, address),
            read_at: Instant::now(),
            read_ok_at: Instant::now(),
            released: false,
        };
        let payee = config.open_payee(ids, held, terms)?;
        if payee.closing() {
            return Err(format!("the renter is closing payment channel {address}: no work is run on it"));
        }
        let room = payee.deposited.saturating_sub(payee.vouched());
        if room < need {
            return Err(format!(
                "the channel has {room} left of its deposit of {}, less than the job's {need} at its wall-time limit: top it up",
                payee.deposited
            ));
        }
        pay.base = payee.vouched();
        let newest = payee.newest;
        pay.payee = Some(payee);
        pay.save_book(false);
        Ok((pay, newest))
    }

    /// The cumulative amount the job's vouchers count from.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// Notes a receipt just signed for the job: a voucher must answer it (or a later one).
    pub(crate) fn signed(&mut self, r: &proto::receipt::JobReceipt) {
        self.unvouched.push((r.sequence, r.amount_due, r.digest()));
        self.book.amount_due = r.amount_due;
        self.book.inferences = r.sequence;
    }

    /// Takes the renter's voucher for one of the receipts not yet vouched for; returns the
    /// sequence of the receipt it answers.
    pub(crate) fn take(&mut self, v: &Voucher) -> Result<u64, String> {
        let Some((at, &(sequence, amount, digest))) =
            self.unvouched.iter().enumerate().find(|(_, (_, _, d))| *d == v.receipt_digest)
        else {
            return Err("the voucher answers none of the job's receipts waiting for one".into());
        };
        let want = self.base.saturating_add(amount);
        let p = self.payee.as_mut().ok_or("the job's channel state is gone")?;
        if want != p.vouched() {
            p.accept(v, want, &digest).map_err(|e| format!("voucher refused: {e}"))?;
        }
        self.unvouched.drain(..=at);
        self.vouched_sequence = sequence;
        self.book.vouched = amount;
        if let Some(p) = &self.payee {
            self.config.save(p, false);
        }
        Ok(sequence)
    }

    /// Whether one more slice, making the job's amount `amount_due`, fits in the deposit.
    pub(crate) fn room_for(&self, amount_due: u64) -> Result<(), String> {
        let deposited = self.payee.as_ref().map_or(0, |p| p.deposited);
        if self.base.saturating_add(amount_due) > deposited {
            return Err(format!(
                "the channel's deposit of {deposited} is spent ({} due with the next slice): top it up",
                self.base.saturating_add(amount_due)
            ));
        }
        Ok(())
    }

    /// Whether the channel is due a re-read (a close the renter started, a top-up).
    pub(crate) fn read_due(&self) -> bool {
        self.read_at.elapsed() >= READ_EVERY
    }

    /// Re-reads the channel (off the async threads). An error stops the job: the renter is
    /// closing the channel, or the chain has been silent too long for a claim to be sure.
    pub(crate) async fn refresh(&mut self) -> Result<(), String> {
        self.read_at = Instant::now();
        let chain = self.config.chain.clone();
        let mut payee = self.payee.take().ok_or("the job's channel state is gone")?;
        let (payee, read) = tokio::task::spawn_blocking(move || {
            let read = payee.refresh(chain.as_ref());
            (payee, read)
        })
        .await
        .map_err(|e| format!("reading the channel failed: {e}"))?;
        let p = self.payee.insert(payee);
        match read {
            Ok(()) => self.read_ok_at = Instant::now(),
            Err(settlement::PayError::Chain(e)) => {
                log::warn!("channel {}: the chain did not answer: {e}", p.address);
                let silent = self.read_ok_at.elapsed();
                if silent >= CHAIN_SILENCE {
                    return Err(format!(
                        "the chain has not answered for {} s: the job stops (a voucher is only good while a claim can land)",
                        silent.as_secs()
                    ));
                }
            }
            Err(e) => log::warn!("channel {}: {e}", p.address),
        }
        if p.closing() {
            return Err(format!("the renter is closing payment channel {}: the job stops", p.address));
        }
        Ok(())
    }

    /// The job is over (its last voucher taken, or not coming): claims what it vouched for
    /// (blocks on the chain; under `over:AMOUNT`, only once that much is unclaimed), saves,
    /// and gives the channel back.
    pub(crate) fn finish(&mut self, keypair: &Keypair) -> Option<Claimed> {
        let unclaimed = self.payee.as_ref().map_or(0, Payee::unclaimed);
        let due = match self.config.policy {
            Policy::Amount(a) => unclaimed >= a.max(1),
            _ => unclaimed > 0,
        };
        let mut claimed = None;
        if due {
            let chain = self.config.chain.clone();
            if let Some(p) = self.payee.as_mut() {
                match p.claim(chain.as_ref(), keypair) {
                    Ok(Some(c)) => {
                        log::info!(
                            "job {}: claimed {} in all from channel {} ({})",
                            self.book.session,
                            c.cumulative,
                            p.address,
                            solana_signature(&c.transaction)
                        );
                        self.book.claims.push(solana_signature(&c.transaction));
                        claimed = Some(c);
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!("job {}: claiming failed: {e}; the voucher keeps", self.book.session),
                }
            }
        }
        self.book.closed = true;
        self.save_book(true);
        self.release();
        claimed
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        match self.payee.take() {
            Some(p) => {
                self.config.save(&p, true);
                self.config.channels.give_back(self.address, p);
            }
            None => self.config.channels.release(self.address),
        }
    }

    fn save_book(&mut self, durable: bool) {
        self.book.updated_ms = ledger::now_ms();
        if let Some(dir) = &self.config.ledger
            && let Err(e) = ledger::save(dir, &self.book, durable)
        {
            log::warn!("writing the ledger in {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use proto::receipt::{Counts, Signer as ReceiptSigner};
    use settlement::solana::Signer as _;
    use settlement::{ChainError, LocalChain, Payer, Status};
    use solana_sdk::transaction::Transaction;

    use super::*;

    /// A chain that stops answering when told.
    #[derive(Debug)]
    struct Silent {
        chain: LocalChain,
        down: AtomicBool,
    }

    impl Silent {
        fn up(&self) -> Result<&LocalChain, ChainError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(ChainError::Unreachable("no answer".into()));
            }
            Ok(&self.chain)
        }
    }

    impl Chain for Silent {
        fn latest_blockhash(&self) -> Result<solana_sdk::hash::Hash, ChainError> {
            self.up()?.latest_blockhash()
        }
        fn send(&self, tx: &Transaction) -> Result<solana_sdk::signature::Signature, ChainError> {
            self.up()?.send(tx)
        }
        fn status(&self, s: &solana_sdk::signature::Signature) -> Result<Status, ChainError> {
            self.up()?.status(s)
        }
        fn account(&self, k: &solana_sdk::pubkey::Pubkey) -> Result<Option<solana_sdk::account::Account>, ChainError> {
            self.up()?.account(k)
        }
        fn rent(&self, len: usize) -> Result<u64, ChainError> {
            self.up()?.rent(len)
        }
        fn is_blockhash_valid(&self, h: &solana_sdk::hash::Hash) -> Result<bool, ChainError> {
            self.up()?.is_blockhash_valid(h)
        }
        fn airdrop(&self, to: &solana_sdk::pubkey::Pubkey, lamports: u64) -> Result<(), ChainError> {
            self.up()?.airdrop(to, lamports)
        }
    }

    fn ago(d: Duration) -> Instant {
        Instant::now().checked_sub(d).unwrap_or_else(Instant::now)
    }

    struct Fixture {
        silent: Arc<Silent>,
        renter: Keypair,
        provider: Keypair,
        payer: Payer,
        config: PaymentConfig,
        ids: Ids,
    }

    /// A renter with a channel of 5,000 to a provider on a chain that can go silent, and the
    /// provider's payment config.
    fn fixture() -> Fixture {
        let silent = Arc::new(Silent { chain: LocalChain::new(), down: AtomicBool::new(false) });
        let (issuer, renter, provider) = (settlement::solana::Keypair::new(), Keypair::generate(), Keypair::generate());
        let chain = &silent.chain;
        for k in [issuer.pubkey(), settlement::signer(&renter).pubkey(), settlement::signer(&provider).pubkey()] {
            chain.airdrop(&k, 10_000_000_000).unwrap();
        }
        let mint = settlement::token::create_mint(chain, &issuer, &issuer.pubkey(), 6).unwrap();
        let r = settlement::signer(&renter);
        let account = settlement::token::ensure_token_account(chain, &r, &r.pubkey(), &mint).unwrap();
        settlement::token::mint_to(chain, &issuer, &mint, &account, 10_000).unwrap();
        let program = settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID);
        let ids = Ids {
            program,
            renter: renter.public(),
            provider: provider.public(),
            mint: settlement::wire_key(&mint),
            id: 0,
        };
        let payer = Payer::ensure(chain, &renter, ids, None, 5_000, 0).unwrap();
        let config = PaymentConfig {
            chain: silent.clone(),
            program,
            mint: ids.mint,
            policy: Policy::End,
            max_unvouched: 1,
            ledger: None,
            channels: Default::default(),
            job_slice: DEFAULT_JOB_SLICE,
        };
        config.prepare(&provider).unwrap();
        Fixture { silent, renter, provider, payer, config, ids }
    }

    fn ticket(f: &Fixture, price: u64) -> proto::ticket::Ticket {
        let (renter, provider) = (f.renter.public(), f.provider.public());
        proto::ticket::Ticket::issue(&Keypair::generate(), [5; 16], renter, provider, [0; 32], price, u64::MAX)
    }

    #[test]
    fn a_provider_that_cannot_reach_the_chain_stops_serving_before_a_close_could_pass_unseen() {
        // Finding: a failing settlement did not stop service. A voucher is only as good as a
        // claim that can land within a close's window: a provider that cannot read the chain
        // serves on for a bounded time, then stops, with the reason.
        let f = fixture();
        let ticket = ticket(&f, 10);
        let Fixture { silent, renter, provider, mut payer, config, ids } = f;
        let chain = &silent.chain;
        let (mut pay, newest) =
            SessionPay::open(&config, &provider, &ticket, Some(Box::new(payer.terms())), "gpu0").unwrap();
        assert_eq!(newest, None);
        let mut receipts = ReceiptSigner::new([5; 16], renter.public(), 10);
        let one = Counts { inferences: 1, ..Counts::default() };
        let mut voucher = None;
        for _ in 0..2 {
            pay.before_serve(voucher.as_ref(), pay.served.inferences, true).unwrap();
            let r = receipts.next(&provider, &one, b"q", b"a");
            pay.served(&r);
            voucher = Some(payer.sign(&renter, r.amount_due, r.digest()).unwrap());
        }
        // The chain goes quiet: the next read fails, and serving goes on for a while ...
        silent.down.store(true, Ordering::SeqCst);
        pay.read_at = ago(READ_EVERY);
        pay.before_serve(voucher.as_ref(), pay.served.inferences, true).unwrap();
        let r = receipts.next(&provider, &one, b"q", b"a");
        pay.served(&r);
        let voucher = payer.sign(&renter, r.amount_due, r.digest()).unwrap();
        // ... until it has been silent for CHAIN_SILENCE.
        pay.read_at = ago(READ_EVERY);
        pay.read_ok_at = ago(CHAIN_SILENCE);
        let why = pay.before_serve(Some(&voucher), pay.served.inferences, true).unwrap_err();
        assert!(why.contains("the chain has not answered"), "{why}");
        // Back: served again, and the vouchers it holds are claimed at the end.
        silent.down.store(false, Ordering::SeqCst);
        pay.before_serve(None, pay.served.inferences, true).unwrap();
        pay.ended(&provider);
        let claimed = settlement::channel::read(chain, &ids.channel()).unwrap().unwrap().state.claimed;
        assert_eq!(claimed, 30);
    }

    #[test]
    fn calls_that_cost_nothing_need_no_new_voucher() {
        let f = fixture();
        let ticket = ticket(&f, 0);
        let (mut pay, _) =
            SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(f.payer.terms())), "gpu0").unwrap();
        let mut receipts = ReceiptSigner::new([5; 16], f.renter.public(), 0);
        let one = Counts { inferences: 1, ..Counts::default() };
        let mut last = None;
        for _ in 0..3 {
            pay.before_serve(last.as_ref(), pay.served.inferences, true).unwrap();
            let r = receipts.next(&f.provider, &one, b"q", b"a");
            pay.served(&r);
            last = Some(proto::voucher::Voucher {
                cumulative: 0,
                receipt_digest: r.digest(),
                signature: proto::Signature([0; 64]),
            });
        }
    }

    #[test]
    fn the_watcher_claims_when_a_close_starts_and_forgets_a_channel_gone_from_the_chain() {
        let mut f = fixture();
        f.config.policy = Policy::Amount(1_000_000);
        let ticket = ticket(&f, 10);
        let silent = f.silent.clone();
        let chain = &silent.chain;
        let serve = |f: &mut Fixture, pay: &mut SessionPay, receipts: &mut ReceiptSigner, n: u32| {
            let one = Counts { inferences: 1, ..Counts::default() };
            let mut last = None;
            for _ in 0..n {
                pay.before_serve(last.as_ref(), pay.served.inferences, true).unwrap();
                let r = receipts.next(&f.provider, &one, b"q", b"a");
                pay.served(&r);
                last = Some(f.payer.sign(&f.renter, r.amount_due, r.digest()).unwrap());
            }
            pay.close(&f.provider, last.as_ref(), None).unwrap();
        };
        let (mut pay, _) =
            SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(f.payer.terms())), "gpu0").unwrap();
        let mut receipts = ReceiptSigner::new([5; 16], f.renter.public(), 10);
        serve(&mut f, &mut pay, &mut receipts, 3);
        drop(pay);
        // Not due by the policy, and nobody closing: nothing claimed.
        assert!(f.config.watch(&f.provider).is_empty());
        // The renter starts a close: the next round claims.
        f.payer.start_close(chain, &f.renter).unwrap();
        let claims = f.config.watch(&f.provider);
        assert_eq!(claims.iter().map(|c| c.cumulative).collect::<Vec<_>>(), vec![30]);
        // A channel finalized while its provider held vouchers it never claimed is forgotten.
        chain.advance_clock(settlement::channel::DEFAULT_WINDOW_SECS + 1);
        f.payer.finalize(chain, &f.renter).unwrap();
        let mut reopened = Payer::ensure(chain, &f.renter, f.ids, None, 5_000, 0).unwrap();
        let ticket = proto::ticket::Ticket::issue(
            &Keypair::generate(),
            [6; 16],
            f.renter.public(),
            f.provider.public(),
            [0; 32],
            10,
            u64::MAX,
        );
        let (mut pay, _) =
            SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(reopened.terms())), "gpu0").unwrap();
        let one = Counts { inferences: 1, ..Counts::default() };
        let mut receipts = ReceiptSigner::new([6; 16], f.renter.public(), 10);
        pay.before_serve(None, pay.served.inferences, true).unwrap();
        let r = receipts.next(&f.provider, &one, b"q", b"a");
        pay.served(&r);
        let v = reopened.sign(&f.renter, r.amount_due, r.digest()).unwrap();
        pay.close(&f.provider, Some(&v), None).unwrap();
        drop(pay);
        reopened.start_close(chain, &f.renter).unwrap();
        chain.advance_clock(settlement::channel::DEFAULT_WINDOW_SECS + 1);
        // The watcher is away for the whole window (it does not run), and the renter finalizes.
        reopened.finalize(chain, &f.renter).unwrap();
        assert!(f.config.watch(&f.provider).is_empty());
        assert!(f.config.channels.idle().is_empty(), "forgotten, not tried again every round");
    }

    #[test]
    fn a_closed_session_frees_its_channel_for_the_renters_next_session_at_once() {
        let mut f = fixture();
        let ticket = ticket(&f, 10);
        let (mut first, _) =
            SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(f.payer.terms())), "gpu0").unwrap();
        // A second session on the channel while the first runs is refused, with the reason.
        let busy = SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(f.payer.terms())), "gpu0");
        assert!(busy.unwrap_err().contains("another session"));
        let mut receipts = ReceiptSigner::new([5; 16], f.renter.public(), 10);
        first.before_serve(None, 0, true).unwrap();
        let r = receipts.next(&f.provider, &Counts { inferences: 1, ..Counts::default() }, b"q", b"a");
        first.served(&r);
        let v = f.payer.sign(&f.renter, r.amount_due, r.digest()).unwrap();
        first.close(&f.provider, Some(&v), None).unwrap();
        // Closed, its connection not yet torn down: the next session opens, and the first's
        // report still says what it was paid.
        let (second, _) =
            SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(f.payer.terms())), "gpu0").unwrap();
        assert_eq!(second.base, 10, "it counts on from the first's voucher, claimed at its end");
        // What it reports is the renter's own voucher with the receipt it answers, which the
        // scheduler checks without the chain.
        let (vouched, claims) = first.vouched_and_settlements();
        let vouched = vouched.unwrap();
        assert_eq!(vouched.check(&r.session_id, &f.renter.public(), &f.provider.public()).map(|(due, _)| due), Ok(10));
        assert_eq!(
            vouched.check(&r.session_id, &f.provider.public(), &f.renter.public()).map_err(|e| e.contains("receipt")),
            Err(true),
            "nobody else's"
        );
        assert!(!claims.is_empty(), "claimed at its end");
        drop(first);
        let again = SessionPay::open(&f.config, &f.provider, &ticket, Some(Box::new(f.payer.terms())), "gpu0");
        assert!(again.unwrap_err().contains("another session"), "the first's end does not free the second's lease");
        drop(second);
    }
}
