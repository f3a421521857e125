//! The renter's side of a paid session with one provider: creates the escrow, takes the
//! provider's refund before depositing, answers every checked receipt with a voucher, follows
//! settlements on the chain, and at the end (or when the provider vanishes) submits the refund.

use std::path::PathBuf;
use std::sync::Arc;

use proto::api::SessionGrant;
use proto::receipt::Receipt;
use proto::voucher::{EscrowTerms, Refund, Settled, Voucher};
use proto::{Keypair, PublicKey};
use settlement::ledger::{self, Book, Role};
use settlement::{Chain, PayError, Payer};

/// How a renter pays for its sessions.
#[derive(Clone)]
pub struct Payment {
    pub chain: Arc<dyn Chain>,
    /// The SPL mint to pay in; the renter's associated token account for it holds the funds.
    pub mint: PublicKey,
    /// Deposited in each provider's escrow: the most a session with it can cost.
    pub budget: u64,
    /// Where the per-session ledger goes (`wasmgrid spend` reads it).
    pub ledger: Option<PathBuf>,
}

impl std::fmt::Debug for Payment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payment").field("mint", &self.mint).field("budget", &self.budget).finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("the chain thread failed: {e}"))
}

pub(crate) struct LinkPay {
    payment: Payment,
    renter: Arc<Keypair>,
    payer: Payer,
    /// The voucher for the newest receipt, sent with the next request or the close.
    next: Option<Voucher>,
    book: Book,
}

impl LinkPay {
    /// Creates the (empty) escrow with the granted provider.
    pub(crate) async fn create(
        payment: &Payment,
        renter: Arc<Keypair>,
        grant: &SessionGrant,
    ) -> Result<LinkPay, String> {
        let (chain, p, r, mint, budget) =
            (payment.chain.clone(), grant.provider, renter.clone(), payment.mint, payment.budget);
        let payer = blocking(move || {
            let terms = settlement::create_escrow(
                chain.as_ref(),
                &settlement::signer(&r),
                &settlement::address(&p),
                &settlement::address(&mint),
                budget,
            )?;
            Payer::new(chain.as_ref(), terms)
        })
        .await?
        .map_err(|e| format!("opening the escrow: {e}"))?;
        let book = Book::open(Role::Renter, &grant.ticket, &payer.terms().wire());
        let pay = LinkPay { payment: payment.clone(), renter, payer, next: None, book };
        pay.save();
        Ok(pay)
    }

    pub(crate) fn terms(&self) -> EscrowTerms {
        self.payer.terms().wire()
    }

    /// The provider accepted the session: check its refund of the whole budget, then deposit.
    pub(crate) async fn opened(&mut self, refund: Option<Box<Refund>>) -> Result<(), String> {
        let refund = refund.ok_or("the provider sent no refund: not depositing")?;
        self.payer.accept_refund(&refund).map_err(|e| e.to_string())?;
        let (chain, r, terms) = (self.payment.chain.clone(), self.renter.clone(), self.payer.terms().clone());
        blocking(move || {
            let funded = settlement::fund_escrow(chain.as_ref(), &settlement::signer(&r), &terms);
            // No answer is not no deposit: a deposit that landed anyway must not be made twice.
            match funded {
                Err(e)
                    if settlement::token::token_balance(chain.as_ref(), &terms.escrow).ok() == Some(terms.budget) =>
                {
                    log::info!("the deposit landed though its answer was lost: {e}");
                    Ok(())
                }
                other => other,
            }
        })
        .await?
        .map_err(|e| format!("depositing the budget: {e}"))?;
        Ok(())
    }

    /// The voucher to send with the next request.
    pub(crate) fn voucher(&self) -> Option<Box<Voucher>> {
        self.next.clone().map(Box::new)
    }

    /// A checked receipt and the settlement that came with it: follow the settlement on the
    /// chain, then sign the voucher for the receipt.
    pub(crate) async fn answered(&mut self, receipt: &Receipt, settled: Option<Box<Settled>>) -> Result<(), String> {
        if let Some(s) = settled {
            self.follow(&s).await?;
        }
        self.next = Some(self.payer.voucher(&self.renter, receipt).map_err(|e| e.to_string())?);
        self.book.inferences = receipt.counts.inferences;
        self.book.amount_due = receipt.amount_due;
        self.book.vouched = receipt.amount_due;
        self.book.updated_ms = ledger::now_ms();
        self.save();
        Ok(())
    }

    async fn follow(&mut self, s: &Settled) -> Result<(), String> {
        let (chain, mut payer, s2) = (self.payment.chain.clone(), self.payer.clone(), s.clone());
        let payer =
            blocking(move || payer.settled(chain.as_ref(), &s2).map(|()| payer)).await?.map_err(|e| e.to_string())?;
        self.payer = payer;
        self.book.paid = self.payer.paid();
        self.book.settlements.push(settlement::signature_text(&s.transaction));
        Ok(())
    }

    /// The provider's answer to `Close`: follow its last settlement, take its refund, and
    /// submit the refund.
    pub(crate) async fn closed(
        &mut self,
        settled: Option<Box<Settled>>,
        refund: Option<Box<Refund>>,
    ) -> Result<(), String> {
        if let Some(s) = settled {
            self.follow(&s).await?;
        } else if let Some(r) = refund
            && self.payer.accept_refund(&r).is_err()
        {
            // A settlement whose news was lost moved the nonce: take the current refund after
            // checking the chain.
            let (chain, mut payer) = (self.payment.chain.clone(), self.payer.clone());
            let payer =
                blocking(move || payer.resync(chain.as_ref(), &r).map(|()| payer)).await?.map_err(|e| e.to_string())?;
            self.book.paid = payer.paid();
            self.payer = payer;
        }
        self.recover().await
    }

    /// Submits the newest refund: the rest of the escrow comes back; unsettled vouchers die.
    pub(crate) async fn recover(&mut self) -> Result<(), String> {
        if self.book.closed {
            return Ok(());
        }
        let (chain, payer, r) = (self.payment.chain.clone(), self.payer.clone(), self.renter.clone());
        let refunded = self.payer.refund().map_or(0, |r| r.amount);
        let sig = blocking(move || payer.recover(chain.as_ref(), &r)).await?;
        match sig {
            Ok(sig) => {
                self.book.refund = Some(sig.to_string());
                self.book.refunded = refunded;
            }
            Err(PayError::Chain(e)) if self.escrow_gone().await => {
                log::info!("the escrow was already closed: {e}");
            }
            Err(e) => return Err(format!("submitting the refund: {e}")),
        }
        self.book.closed = true;
        self.book.updated_ms = ledger::now_ms();
        self.save();
        Ok(())
    }

    async fn escrow_gone(&self) -> bool {
        let (chain, escrow) = (self.payment.chain.clone(), self.payer.terms().escrow);
        matches!(blocking(move || chain.account(&escrow)).await, Ok(Ok(None)))
    }

    pub(crate) fn book(&self) -> &Book {
        &self.book
    }

    fn save(&self) {
        if let Some(dir) = &self.payment.ledger
            && let Err(e) = ledger::save(dir, &self.book, false)
        {
            log::warn!("writing the ledger in {}: {e}", dir.display());
        }
    }
}
