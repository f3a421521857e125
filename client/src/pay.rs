//! The renter's side of a paid session with one provider, through the payment channel between
//! them: opens the channel on first use (or tops it up), answers every checked receipt with a
//! voucher for the channel's cumulative amount, and keeps its channel state and vouchers in the
//! ledger. Nothing needs doing on the chain when a session ends or a provider vanishes: the
//! deposit stays in the channel for the next session, and `wasmgrid spend --close` takes it back.

use std::path::PathBuf;
use std::sync::Arc;

use proto::api::SessionGrant;
use proto::receipt::Receipt;
use proto::voucher::{ChannelTerms, Claimed, Voucher};
use proto::{Address, Keypair, PublicKey};
use settlement::ledger::{self, Book, Role};
use settlement::{Chain, Ids, Payer};

/// How a renter pays for its sessions.
#[derive(Clone)]
pub struct Payment {
    pub chain: Arc<dyn Chain>,
    /// The payment-channel program.
    pub program: Address,
    /// The SPL mint to pay in; the renter's associated token account for it holds the funds.
    pub mint: PublicKey,
    /// What a new channel gets, and what it is topped up to before a session once half of it
    /// is spent.
    pub deposit: u64,
    /// Which of this renter's channels with a provider pays (a second session with the same
    /// provider at the same time needs another).
    pub channel_id: u64,
    /// Where the ledger goes (`wasmgrid spend` reads it, `spend --close` closes from it).
    pub ledger: Option<PathBuf>,
}

impl std::fmt::Debug for Payment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payment")
            .field("program", &self.program)
            .field("mint", &self.mint)
            .field("deposit", &self.deposit)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("the chain thread failed: {e}"))
}

/// The renter's channel with `provider`, from its ledger and the chain: opened with `deposit`
/// if it is not there, topped up to it when less than `low` is free.
async fn channel_with(
    payment: &Payment,
    renter: &Arc<Keypair>,
    provider: PublicKey,
    deposit: u64,
    low: u64,
) -> Result<(Payer, Address), String> {
    let ids =
        Ids { program: payment.program, renter: renter.public(), provider, mint: payment.mint, id: payment.channel_id };
    let address = settlement::wire_address(&ids.channel().address());
    let saved = match &payment.ledger {
        Some(dir) => ledger::load_channel::<Payer>(dir, &address).unwrap_or_else(|e| {
            log::warn!("channel {address}: {e}; starting from the chain");
            None
        }),
        None => None,
    };
    let (chain, r) = (payment.chain.clone(), renter.clone());
    let payer = blocking(move || Payer::ensure(chain.as_ref(), &r, ids, saved, deposit, low))
        .await?
        .map_err(|e| format!("the payment channel with provider {provider}: {e}"))?;
    Ok((payer, address))
}

/// Writes a renter's book and channel state to its ledger, if it keeps one.
fn save_renter(payment: &Payment, book: &Book, payer: &Payer, durable: bool) {
    if let Some(dir) = &payment.ledger {
        let mut book = book.clone();
        book.updated_ms = ledger::now_ms();
        if let Err(e) = ledger::save(dir, &book, durable).and_then(|()| ledger::save_payer(dir, payer, durable)) {
            log::warn!("writing the ledger in {}: {e}", dir.display());
        }
    }
}

/// Vouchers signed between (non-durable) saves of the channel state; it is saved durably when
/// a session ends. A lost voucher costs the renter nothing: the provider brings its copy back.
const SAVE_EVERY: u64 = 16;

pub(crate) struct LinkPay {
    payment: Payment,
    renter: Arc<Keypair>,
    payer: Payer,
    /// The channel's cumulative amount when the session opened.
    base: u64,
    /// The voucher for the newest receipt, sent with the next request or the close.
    next: Option<Voucher>,
    /// The provider signs a receipt (to answer with a voucher) every this many calls.
    vouch_every: u64,
    since_save: u64,
    book: Book,
}

impl LinkPay {
    /// The channel with the granted provider, opened (or topped up) when needed.
    pub(crate) async fn create(
        payment: &Payment,
        renter: Arc<Keypair>,
        grant: &SessionGrant,
    ) -> Result<LinkPay, String> {
        // Topped up back to the deposit once half of it is vouched for.
        let (payer, address) =
            channel_with(payment, &renter, grant.provider, payment.deposit, payment.deposit / 2).await?;
        let book = Book::open(Role::Renter, &grant.ticket, payment.mint, address);
        let pay = LinkPay {
            payment: payment.clone(),
            renter,
            base: payer.vouched,
            payer,
            next: None,
            vouch_every: 1,
            since_save: 0,
            book,
        };
        pay.save(true);
        Ok(pay)
    }

    pub(crate) fn terms(&self) -> ChannelTerms {
        self.payer.terms()
    }

    /// The provider opened the session, with its copy of the newest voucher on the channel:
    /// counted from, if it is this renter's own signature above its record.
    pub(crate) fn opened(&mut self, newest: Option<Box<Voucher>>, vouch_every: u64) -> Result<(), String> {
        if let Some(v) = newest {
            self.payer.adopt(&v).map_err(|e| format!("the provider's copy of the newest voucher: {e}"))?;
        }
        if vouch_every == 0 {
            return Err("the provider opened the session as unpaid".into());
        }
        self.base = self.payer.vouched;
        self.vouch_every = vouch_every;
        Ok(())
    }

    /// Whether the answer to call `sequence` must carry a receipt to vouch for.
    pub(crate) fn receipt_due(&self, sequence: u64) -> bool {
        sequence.is_multiple_of(self.vouch_every.max(1))
    }

    /// The voucher for every call followed (`expected`: the digest and amount of the receipt
    /// the provider signs at the close; `inferences`: the calls followed), sent with the close:
    /// calls since the newest receipt are paid too.
    pub(crate) fn closing_voucher(
        &mut self,
        (digest, amount_due): ([u8; 32], u64),
        inferences: u64,
    ) -> Option<Box<Voucher>> {
        let cumulative = self.base.saturating_add(amount_due);
        if cumulative > self.payer.vouched {
            match self.payer.sign(&self.renter, cumulative, digest) {
                Ok(v) => {
                    self.next = Some(v);
                    self.book.vouched = amount_due;
                    self.book.amount_due = amount_due;
                    self.book.inferences = inferences;
                }
                Err(e) => log::warn!("not vouching for the last calls: {e}"),
            }
        }
        self.voucher()
    }

    /// The voucher to send with the next request.
    pub(crate) fn voucher(&self) -> Option<Box<Voucher>> {
        self.next.map(Box::new)
    }

    /// A checked receipt (and the claim the provider says it made): sign the voucher for it.
    pub(crate) fn answered(&mut self, receipt: &Receipt, claimed: Option<Box<Claimed>>) -> Result<(), String> {
        let cumulative = self.base.saturating_add(receipt.amount_due);
        self.next = Some(self.payer.sign(&self.renter, cumulative, receipt.digest()).map_err(|e| e.to_string())?);
        self.book.inferences = receipt.counts.inferences;
        self.book.amount_due = receipt.amount_due;
        self.book.vouched = receipt.amount_due;
        if let Some(c) = claimed {
            // The provider's word only: the chain decides what it shows (`wasmgrid spend`).
            self.book.claims.push(settlement::signature_text(&c.transaction));
        }
        self.since_save += 1;
        if self.since_save >= SAVE_EVERY {
            self.since_save = 0;
            self.save(false);
        }
        Ok(())
    }

    /// The session ended (closed, or the provider went): the channel stays for the next one.
    pub(crate) fn ended(&mut self, claimed: Option<Box<Claimed>>) {
        if let Some(c) = claimed {
            self.book.claims.push(settlement::signature_text(&c.transaction));
        }
        self.book.closed = true;
        self.save(true);
    }

    pub(crate) fn book(&self) -> &Book {
        &self.book
    }

    fn save(&self, durable: bool) {
        save_renter(&self.payment, &self.book, &self.payer, durable);
    }
}

/// The renter's side of one paid batch job, through its channel with the job's provider: the
/// channel opened (or topped up) to hold what the job may cost, and every receipt the provider
/// signs checked and answered by a voucher.
pub(crate) struct JobPayer {
    payment: Payment,
    renter: Arc<Keypair>,
    payer: Payer,
    provider: PublicKey,
    job_id: String,
    /// Most the job may cost (its cost at its wall-time limit, as the provider asked).
    need: u64,
    /// The channel's cumulative amount the job counts from, once the provider took it.
    base: Option<u64>,
    /// The newest receipt checked (and vouched for).
    last: Option<proto::receipt::JobReceipt>,
    /// Its voucher, until the scheduler took it.
    unsent: Option<Voucher>,
    book: Book,
}

impl JobPayer {
    /// The channel with `provider` for job `job_id`, as its provider asked for it (`asked`:
    /// its program and mint must be the renter's, and it must hold `asked.need`).
    pub(crate) async fn create(
        payment: &Payment,
        renter: Arc<Keypair>,
        job_id: &str,
        provider: PublicKey,
        asked: &proto::api::JobChannel,
    ) -> Result<JobPayer, crate::Error> {
        let refuse = |m: String| crate::Error::Payment(format!("job {job_id}: {m}"));
        if asked.program != payment.program || asked.mint != payment.mint {
            return Err(refuse(format!(
                "the provider takes payment through program {} in mint {}, not the renter's {} in {}",
                asked.program, asked.mint, payment.program, payment.mint
            )));
        }
        let need = asked.need;
        // The channel must hold the job's cost at its limit beyond what is vouched on it.
        let (payer, address) =
            channel_with(payment, &renter, provider, payment.deposit.max(need), need).await.map_err(refuse)?;
        let book = Book::for_job(Role::Renter, job_id, renter.public(), provider, payment.mint, address);
        let p = JobPayer {
            payment: payment.clone(),
            renter,
            payer,
            provider,
            job_id: job_id.to_string(),
            need,
            base: None,
            last: None,
            unsent: None,
            book,
        };
        p.save(true);
        Ok(p)
    }

    pub(crate) fn provider(&self) -> PublicKey {
        self.provider
    }

    pub(crate) fn terms(&self) -> ChannelTerms {
        self.payer.terms()
    }

    /// What the job's view shows now: the provider took the channel (its copy of the newest
    /// voucher is adopted if it is this renter's own and newer), and a receipt waits for a
    /// voucher: checked, and the voucher for it returned, to send.
    pub(crate) fn follow(&mut self, view: &proto::api::JobView) -> Result<Option<Voucher>, crate::Error> {
        let refuse = |m: String| crate::Error::Payment(format!("job {}: {m}", self.job_id));
        let Some(c) = &view.channel else { return Ok(None) };
        if self.base.is_none()
            && let Some(base) = c.base
        {
            if let Some(v) = &c.newest {
                self.payer.adopt(v).map_err(|e| refuse(format!("the provider's copy of the newest voucher: {e}")))?;
            }
            if base != self.payer.vouched {
                return Err(refuse(format!(
                    "the provider counts the job from {base} on the channel, this renter from {}",
                    self.payer.vouched
                )));
            }
            self.base = Some(base);
        }
        let (Some(base), Some(r)) = (self.base, c.unvouched()) else { return Ok(None) };
        if self.last.as_ref().is_some_and(|l| l.sequence >= r.sequence) {
            return Ok(self.unsent.filter(|_| self.last.as_ref().is_some_and(|l| l.sequence == r.sequence)));
        }
        // The time the scheduler saw it run so far (or in all, once it ended).
        let observed = view.attempts.last().map(|a| {
            let end = a.ended_at_ms.unwrap_or_else(ledger::now_ms);
            end.saturating_sub(a.started_at_ms)
        });
        // Bytes a cluster member sent: never past its limit, and on the last receipt never
        // past what its provider reported.
        let reported = view.usage.as_ref().filter(|_| r.done).map(|u| u.net_bytes_sent);
        r.check_terms(&self.job_id, &self.provider)
            .and_then(|()| r.check_time(view.limits.wall_time_ms, observed))
            .and_then(|()| r.check_net(view.net_limit(), reported))
            .and_then(|()| self.last.as_ref().map_or(Ok(()), |l| r.follows(l)))
            .map_err(|e| refuse(format!("not vouching for the provider's receipt {}: {e}", r.sequence)))?;
        if r.amount_due > self.need {
            return Err(refuse(format!(
                "not vouching for receipt {}: it bills {}, more than the {} the job may cost at its limit",
                r.sequence, r.amount_due, self.need
            )));
        }
        let voucher = self
            .payer
            .sign(&self.renter, base.saturating_add(r.amount_due), r.digest())
            .map_err(|e| refuse(e.to_string()))?;
        self.book.inferences = r.sequence;
        self.book.amount_due = r.amount_due;
        self.book.vouched = r.amount_due;
        self.last = Some(r.clone());
        self.unsent = Some(voucher);
        self.save(r.done);
        Ok(Some(voucher))
    }

    /// The scheduler took the newest voucher.
    pub(crate) fn sent(&mut self) {
        self.unsent = None;
    }

    /// The job is over: its book and channel state saved for good.
    pub(crate) fn ended(mut self) -> Book {
        self.book.closed = true;
        self.save(true);
        self.book
    }

    fn save(&self, durable: bool) {
        save_renter(&self.payment, &self.book, &self.payer, durable);
    }
}
