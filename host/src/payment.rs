//! The provider's side of paid sessions: checks the renter's escrow on the chain, takes a
//! voucher with each request, serves no more than the configured number of inferences beyond
//! the last valid voucher, settles when its policy says (and always when a session ends), and
//! keeps a ledger that survives restarts. Chain calls block: call these off async threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use proto::receipt::Receipt;
use proto::voucher::{EscrowTerms, Refund, Settled, Voucher};
use proto::{Keypair, PublicKey};
use settlement::ledger::{self, Book, Role};
use settlement::{Chain, Payee, Policy};

/// How a provider is paid.
#[derive(Clone)]
pub struct PaymentConfig {
    pub chain: Arc<dyn Chain>,
    /// The SPL mint it takes payment in.
    pub mint: PublicKey,
    pub policy: Policy,
    /// Inferences served beyond the last valid voucher before serving stops (at least 1).
    pub max_unvouched: u64,
    /// Where the per-session ledger goes (`wasmgrid earnings` reads it); `None` keeps none,
    /// and a restart then cannot resume a settlement it was making.
    pub ledger: Option<PathBuf>,
}

impl std::fmt::Debug for PaymentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentConfig")
            .field("mint", &self.mint)
            .field("policy", &self.policy)
            .field("max_unvouched", &self.max_unvouched)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

impl PaymentConfig {
    /// Creates this provider's token account for the mint, where settlements pay to.
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

    /// Finishes settlements a previous run sent but did not see confirmed, and settles what
    /// was vouched and left unsettled when it stopped.
    pub fn resume(&self, keypair: &Keypair) -> Result<usize, String> {
        let Some(dir) = &self.ledger else { return Ok(0) };
        let (books, bad) = ledger::load(dir).map_err(|e| format!("reading the ledger {}: {e}", dir.display()))?;
        for (path, e) in bad {
            log::warn!("ledger file {} unreadable: {e}", path.display());
        }
        let mut settled = 0;
        for book in books.into_iter().filter(|b| b.role == Role::Provider && !b.closed) {
            let Some(payee) = book.payee.clone() else { continue };
            let mut s = SessionPay { config: self.clone(), payee, book, oldest_unsettled: None };
            s.payee.resume(self.chain.as_ref(), keypair, &mut |_| Ok(())).map_err(|e| e.to_string())?;
            if s.settle(keypair).map_err(|e| format!("session {}: {e}", s.book.session))?.is_some() {
                settled += 1;
            }
            s.sync();
            s.save(true);
        }
        Ok(settled)
    }
}

/// One paid session.
pub(crate) struct SessionPay {
    config: PaymentConfig,
    payee: Payee,
    book: Book,
    /// When the oldest vouched and unsettled inference was vouched.
    oldest_unsettled: Option<Instant>,
}

impl SessionPay {
    /// Checks the escrow on the chain; returns the session's payment state and the refund of
    /// the whole budget for the renter to hold.
    pub(crate) fn open(
        config: &PaymentConfig,
        keypair: &Keypair,
        ticket: &proto::ticket::Ticket,
        escrow: Option<EscrowTerms>,
        device: &str,
    ) -> Result<(SessionPay, Refund), String> {
        let escrow = escrow.ok_or_else(|| {
            format!(
                "this provider takes payment in mint {}: open the session with an escrow (a client with a chain)",
                config.mint
            )
        })?;
        if escrow.mint != config.mint {
            return Err(format!("the escrow is in mint {}, this provider takes {}", escrow.mint, config.mint));
        }
        if escrow.budget < ticket.price_per_inference {
            return Err(format!(
                "the escrow's budget of {} does not cover one inference at {}",
                escrow.budget, ticket.price_per_inference
            ));
        }
        let payee = Payee::open(config.chain.as_ref(), ticket.renter, keypair.public(), escrow.clone())
            .map_err(|e| e.to_string())?;
        let refund = payee.refund(keypair).map_err(|e| e.to_string())?;
        let mut book = Book::open(Role::Provider, ticket, &escrow);
        book.device = device.to_string();
        book.payee = Some(payee.clone());
        let s = SessionPay { config: config.clone(), payee, book, oldest_unsettled: None };
        s.save(false);
        Ok((s, refund))
    }

    /// Whether the escrow holds the budget yet (the renter deposits once it holds the refund).
    /// Not fatal: the renter may still deposit.
    pub(crate) fn funded(&mut self) -> Result<(), String> {
        self.payee
            .check_funded(self.config.chain.as_ref())
            .map_err(|e| format!("the escrow was never funded, nothing is served until it is: {e}"))
    }

    /// Before serving a request: takes its voucher, settles if the policy says so, and checks
    /// that one more inference may be served. An error ends the session, with its reason.
    pub(crate) fn before_serve(
        &mut self,
        keypair: &Keypair,
        voucher: Option<&Voucher>,
    ) -> Result<Option<Settled>, String> {
        if let Some(v) = voucher {
            self.take(v)?;
        }
        let (n, amount) = self.payee.unsettled();
        let age = self.oldest_unsettled.map(|t| t.elapsed()).unwrap_or_default();
        let settled = if self.config.policy.due(n, amount, age) { self.settle(keypair)? } else { None };
        let next_due = (self.book.inferences + 1).saturating_mul(self.book.price_per_inference);
        self.payee.may_serve(next_due, self.config.max_unvouched.max(1))?;
        Ok(settled)
    }

    fn take(&mut self, v: &Voucher) -> Result<(), String> {
        self.payee.accept(v).map_err(|e| format!("voucher refused: {e}"))?;
        self.oldest_unsettled.get_or_insert_with(Instant::now);
        self.sync();
        self.save(false);
        Ok(())
    }

    /// Notes the receipt just signed.
    pub(crate) fn served(&mut self, r: &Receipt) {
        self.payee.served(r);
        self.book.inferences = r.counts.inferences;
        self.book.amount_due = r.amount_due;
        self.sync();
        self.save(false);
    }

    /// Settles what is vouched and unsettled, if anything.
    fn settle(&mut self, keypair: &Keypair) -> Result<Option<Settled>, String> {
        let (dir, book) = (self.config.ledger.clone(), &mut self.book);
        let mut save = |p: &Payee| {
            book.payee = Some(p.clone());
            match &dir {
                Some(d) => ledger::save(d, book, true).map_err(|e| e.to_string()),
                None => Ok(()),
            }
        };
        let settled = self
            .payee
            .settle(self.config.chain.as_ref(), keypair, &mut save)
            .map_err(|e| format!("settling on the chain failed: {e}"))?;
        if let Some(s) = &settled {
            self.oldest_unsettled = None;
            log::info!(
                "session {}: settled {} (receipt {}, {} paid) in {}",
                self.book.session,
                s.paid - self.book.paid,
                s.sequence,
                s.paid,
                solana_signature(&s.transaction)
            );
        }
        self.sync();
        self.save(true);
        Ok(settled)
    }

    /// The renter is done: takes its last voucher, settles, and returns the refund of the rest.
    pub(crate) fn close(
        &mut self,
        keypair: &Keypair,
        voucher: Option<&Voucher>,
    ) -> Result<(Option<Settled>, Refund), String> {
        if let Some(v) = voucher {
            self.take(v)?;
        }
        let settled = self.settle(keypair)?;
        let refund = self.payee.refund(keypair).map_err(|e| e.to_string())?;
        Ok((settled, refund))
    }

    /// Paid out of escrow so far, and the settlement transactions.
    pub(crate) fn paid_and_settlements(&self) -> (u64, Vec<proto::Signature>) {
        (self.payee.paid(), self.payee.settlements().iter().map(|s| s.transaction).collect())
    }

    /// The connection ended: settle whatever was vouched.
    pub(crate) fn ended(&mut self, keypair: &Keypair) {
        if let Err(e) = self.settle(keypair) {
            log::warn!("session {}: {e}; the ledger keeps the voucher for a later try", self.book.session);
        }
    }

    fn sync(&mut self) {
        self.book.vouched = self.payee.vouched();
        self.book.paid = self.payee.paid();
        self.book.settlements = self.payee.settlements().iter().map(|s| solana_signature(&s.transaction)).collect();
        self.book.closed = self.payee.is_closed();
        self.book.updated_ms = ledger::now_ms();
        self.book.payee = Some(self.payee.clone());
    }

    fn save(&self, durable: bool) {
        if let Some(dir) = &self.config.ledger
            && let Err(e) = ledger::save(dir, &self.book, durable)
        {
            log::warn!("writing the ledger in {}: {e}", dir.display());
        }
    }
}

pub use settlement::signature_text as solana_signature;
