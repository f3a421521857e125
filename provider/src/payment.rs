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
            let mut s = SessionPay::new(self.clone(), payee, book);
            // Each session on its own: one that cannot settle (its escrow refunded, the chain
            // away) must not keep the others, or new sessions, from being served.
            let resumed = s.payee.resume(self.chain.as_ref(), keypair, &mut |_| Ok(())).map_err(|e| e.to_string());
            if let Ok(Some(done)) = &resumed {
                s.record(done);
            }
            let closed = s.payee.is_closed();
            match resumed.and_then(|_| if closed { Ok(None) } else { s.settle(keypair) }) {
                Ok(Some(_)) => settled += 1,
                Ok(None) => {}
                Err(e) => log::warn!("session {}: {e}; left for a later run", s.book.session),
            }
            s.sync();
            s.save(true);
        }
        Ok(settled)
    }
}

impl SessionPay {
    fn new(config: PaymentConfig, payee: Payee, book: Book) -> SessionPay {
        SessionPay { config, payee, book, oldest_unsettled: None, recent: Default::default() }
    }
}

/// One paid session.
pub(crate) struct SessionPay {
    config: PaymentConfig,
    payee: Payee,
    book: Book,
    /// When the oldest vouched and unsettled inference was vouched.
    oldest_unsettled: Option<Instant>,
    /// The newest settlement transactions, for reports to the scheduler.
    recent: std::collections::VecDeque<proto::Signature>,
}

/// Settlement signatures a report carries at most (the newest): reports are cumulative and a
/// session may settle many thousand times, more than a control frame holds.
pub const REPORTED_SETTLEMENTS: usize = 256;

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
        let s = SessionPay::new(config.clone(), payee, book);
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

    /// Before serving a request: takes its voucher and checks that one more inference may be
    /// served. An error ends the session, with its reason.
    pub(crate) fn before_serve(&mut self, voucher: Option<&Voucher>) -> Result<(), String> {
        if let Some(v) = voucher {
            self.take(v)?;
        }
        let next_due = (self.book.inferences + 1).saturating_mul(self.book.price_per_inference);
        self.payee.may_serve(next_due, self.config.max_unvouched.max(1))
    }

    /// After a request was served (and its receipt noted): settles if the policy says so. The
    /// settlement, with the new refund, goes back with this response, so the renter always
    /// learns of it. A chain that cannot be reached now is not fatal: the voucher keeps.
    pub(crate) fn after_serve(&mut self, keypair: &Keypair) -> Option<Settled> {
        let (n, amount) = self.payee.unsettled();
        let age = self.oldest_unsettled.map(|t| t.elapsed()).unwrap_or_default();
        if !self.config.policy.due(n, amount, age) {
            return None;
        }
        self.settle(keypair).unwrap_or_else(|e| {
            log::warn!("session {}: {e}; settling later", self.book.session);
            None
        })
    }

    fn take(&mut self, v: &Voucher) -> Result<(), String> {
        self.payee.accept(v).map_err(|e| format!("voucher refused: {e}"))?;
        self.oldest_unsettled.get_or_insert_with(Instant::now);
        // Saved with the receipt of the call it came with, or durably before it is settled.
        self.sync();
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
            self.record(s);
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

    /// Paid out of escrow so far, the newest settlement transactions, and how many there were.
    pub(crate) fn paid_and_settlements(&self) -> (u64, Vec<proto::Signature>, u64) {
        (self.payee.paid(), self.recent.iter().copied().collect(), self.payee.settlement_count())
    }

    /// Adds a settlement to the session's record.
    fn record(&mut self, s: &Settled) {
        self.book.settlements.push(solana_signature(&s.transaction));
        self.recent.push_back(s.transaction);
        while self.recent.len() > REPORTED_SETTLEMENTS {
            self.recent.pop_front();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proto::receipt::{Counts, Signer as ReceiptSigner};
    use settlement::solana::Signer as _;
    use settlement::{ChainError, LocalChain, Status};
    use solana_sdk::transaction::Transaction;

    /// A chain whose sends land and then the process "dies" before it hears back.
    #[derive(Debug)]
    struct DiesAfterSend(Arc<LocalChain>);

    impl Chain for DiesAfterSend {
        fn latest_blockhash(&self) -> Result<solana_sdk::hash::Hash, ChainError> {
            self.0.latest_blockhash()
        }
        fn send(&self, tx: &Transaction) -> Result<solana_sdk::signature::Signature, ChainError> {
            let _ = self.0.send(tx);
            panic!("the provider died before the confirmation came back");
        }
        fn status(&self, s: &solana_sdk::signature::Signature) -> Result<Status, ChainError> {
            self.0.status(s)
        }
        fn account(&self, k: &solana_sdk::pubkey::Pubkey) -> Result<Option<solana_sdk::account::Account>, ChainError> {
            self.0.account(k)
        }
        fn rent(&self, len: usize) -> Result<u64, ChainError> {
            self.0.rent(len)
        }
        fn is_blockhash_valid(&self, h: &solana_sdk::hash::Hash) -> Result<bool, ChainError> {
            self.0.is_blockhash_valid(h)
        }
        fn airdrop(&self, to: &solana_sdk::pubkey::Pubkey, lamports: u64) -> Result<(), ChainError> {
            self.0.airdrop(to, lamports)
        }
    }

    #[test]
    fn a_restarted_provider_finishes_an_interrupted_settlement_and_is_paid_once() {
        let chain = Arc::new(LocalChain::new());
        let (issuer, renter, provider) = (settlement::solana::Keypair::new(), Keypair::generate(), Keypair::generate());
        for k in [issuer.pubkey(), settlement::signer(&renter).pubkey(), settlement::signer(&provider).pubkey()] {
            chain.airdrop(&k, 10_000_000_000).unwrap();
        }
        let mint = settlement::token::create_mint(chain.as_ref(), &issuer, &issuer.pubkey(), 6).unwrap();
        let r = settlement::signer(&renter);
        let renter_tokens = settlement::token::ensure_token_account(chain.as_ref(), &r, &r.pubkey(), &mint).unwrap();
        settlement::token::mint_to(chain.as_ref(), &issuer, &mint, &renter_tokens, 1_000).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = |chain: Arc<dyn Chain>| PaymentConfig {
            chain,
            mint: settlement::wire_key(&mint),
            policy: Policy::Inferences(1),
            max_unvouched: 1,
            ledger: Some(dir.path().to_path_buf()),
        };
        config(chain.clone()).prepare(&provider).unwrap();
        let dying = config(Arc::new(DiesAfterSend(chain.clone())));
        let terms = settlement::create_escrow(chain.as_ref(), &r, &settlement::address(&provider.public()), &mint, 500)
            .unwrap();
        let ticket = proto::ticket::Ticket::issue(
            &Keypair::generate(),
            [5; 16],
            renter.public(),
            provider.public(),
            [0; 32],
            10,
            u64::MAX,
        );
        let (mut pay, refund) = SessionPay::open(&dying, &provider, &ticket, Some(terms.wire()), "gpu0").unwrap();
        let mut payer = settlement::Payer::new(chain.as_ref(), terms.clone()).unwrap();
        payer.accept_refund(&refund).unwrap();
        settlement::fund_escrow(chain.as_ref(), &r, &terms).unwrap();
        pay.funded().unwrap();
        pay.before_serve(None).unwrap();
        let mut receipts = ReceiptSigner::new([5; 16], renter.public(), 10);
        let one = Counts { inferences: 1, ..Counts::default() };
        let first = receipts.next(&provider, &one, b"q", b"a");
        pay.served(&first);
        assert_eq!(pay.after_serve(&provider), None, "nothing vouched yet");
        // The next request brings the voucher for the first; serving it, the provider settles
        // that voucher, which lands, and the provider dies before it hears back.
        let voucher = payer.voucher(&renter, &first).unwrap();
        pay.before_serve(Some(&voucher)).unwrap();
        let second = receipts.next(&provider, &one, b"q", b"a");
        pay.served(&second);
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pay.after_serve(&provider)));
        assert!(died.is_err());
        let paid = |c: &LocalChain| {
            let mine = settlement::token::token_account(&settlement::address(&provider.public()), &mint);
            settlement::token::token_balance(c, &mine).unwrap()
        };
        assert_eq!(paid(&chain), 10);

        // Restarted on the same ledger: it finds the pending settlement, sees it landed, and
        // records it; nothing is paid twice.
        let restarted = config(chain.clone());
        restarted.resume(&provider).unwrap();
        restarted.resume(&provider).unwrap();
        assert_eq!(paid(&chain), 10);
        let (books, bad) = settlement::ledger::load(dir.path()).unwrap();
        assert!(bad.is_empty());
        let book = books.iter().find(|b| b.session == "05".repeat(16)).unwrap();
        assert_eq!((book.paid, book.settlements.len(), book.inferences), (10, 1, 2));
        assert_eq!(book.device, "gpu0");
    }
}
