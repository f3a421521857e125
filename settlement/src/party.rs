//! Each party's side of one payment channel. Both are plain data that the caller saves (the
//! ledger), so a restart picks up where it was; neither trusts the other's word for anything
//! the chain or a signature can say.
//!
//! - [`Payer`] (renter): opens the channel on first use and tops it up, signs vouchers for the
//!   cumulative amount owed (never less than it already signed, never more than it deposited),
//!   and closes (start, then finalize after the dispute window) whenever it likes.
//! - [`Payee`] (provider): reads the channel from the chain, takes only vouchers that the chain
//!   would pay (the channel's voucher key over the exact message, growing, within the deposit),
//!   and claims the newest when its policy says, or at once when the renter starts a close.
//!
//! A voucher is cumulative over everything on the channel, so a renter and a provider meeting
//! again (a new session, a job) start from the larger of the newest vouchers each holds: each
//! checks the other's copy, which carries the renter's signature.

use proto::voucher::{ChannelTerms, Voucher};
use proto::{Address, Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use solana_sdk::pubkey::Pubkey;

use crate::chain::{Chain, ChainError};
use crate::channel::{self, ChannelId, OnChain};
use crate::pay::{address, address_of, signer, wire_address};

/// Why a channel, a voucher or a claim was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the payment channel {0} does not exist on the chain (the renter opens it before the session)")]
    NoChannel(String),
    #[error("the payment channel {0} is closing: no more work is paid through it (open another channel id)")]
    Closing(String),
    #[error("the channel is not as promised: {0}")]
    Channel(String),
    #[error("the voucher's signature does not verify (tampered, or made for another channel or amount)")]
    BadSignature,
    #[error("the voucher for {got} is not above the newest one, for {have} (replayed or older)")]
    NotNewer { have: u64, got: u64 },
    #[error("the voucher is for {got} where the receipt it answers makes it {want}")]
    Amount { want: u64, got: u64 },
    #[error("the voucher names another receipt than the one it answers")]
    WrongReceipt,
    #[error("{want} is over the channel's deposit of {deposited}: top the channel up")]
    OverDeposit { deposited: u64, want: u64 },
    #[error("the voucher for {got} is below the {have} this renter already signed")]
    Backwards { have: u64, got: u64 },
}

/// Whether `key` signed voucher `v` for this channel's generation.
fn verify(c: &ChannelId, at: &Pubkey, generation: u64, key: &PublicKey, v: &Voucher) -> bool {
    let message = channel::voucher_message_at(c, at, generation, v.cumulative, &v.receipt_digest);
    key.verify(&message, &v.signature)
}

/// The channel's identity as the ledger saves it (wire keys serialise as base58).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ids {
    pub program: Address,
    pub renter: PublicKey,
    pub provider: PublicKey,
    pub mint: PublicKey,
    pub id: u64,
}

impl Ids {
    pub fn channel(&self) -> ChannelId {
        ChannelId {
            program: address_of(&self.program),
            renter: address(&self.renter),
            provider: address(&self.provider),
            mint: address(&self.mint),
            id: self.id,
        }
    }
}

/// The renter's side of one channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payer {
    pub ids: Ids,
    /// The channel's address.
    pub address: Address,
    /// The slot the channel was opened in: vouchers name it.
    pub generation: u64,
    /// As the chain showed last.
    pub deposited: u64,
    pub claimed: u64,
    /// The most this renter signed for, and that voucher.
    pub vouched: u64,
    pub newest: Option<Voucher>,
    /// Transactions this renter sent for the channel (open, top-ups, close), base58, oldest first.
    pub transactions: Vec<String>,
    /// Unix time after which the renter may finalize, once it started a close.
    pub close_at: i64,
}

impl Payer {
    /// The channel with `provider` in `mint` under `id`, ready to pay: opened with `deposit`
    /// when the chain has none, and topped up to `deposit` of room when less than `low` is
    /// left (so most sessions need nothing on the chain). `saved` is this renter's last state
    /// for it (the ledger), if any.
    pub fn ensure(
        chain: &dyn Chain,
        renter: &Keypair,
        ids: Ids,
        saved: Option<Payer>,
        deposit: u64,
        low: u64,
    ) -> Result<Payer, PayError> {
        let c = ids.channel();
        let wallet = signer(renter);
        let mut sent = saved.as_ref().map(|s| s.transactions.clone()).unwrap_or_default();
        let on = match channel::read(chain, &c)? {
            Some(on) => on,
            None => {
                let sig = channel::open(chain, &wallet, &c, deposit.max(low), channel::DEFAULT_WINDOW_SECS, &c.renter)?;
                sent.push(sig.to_string());
                channel::read(chain, &c)?.ok_or_else(|| PayError::NoChannel(c.address().to_string()))?
            }
        };
        if on.closing() {
            return Err(PayError::Closing(on.address.to_string()));
        }
        let mut p = Payer::from_chain(ids, &on, saved.filter(|s| s.generation == on.state.generation));
        p.transactions = sent;
        let free = p.deposited.saturating_sub(p.vouched);
        if free < low {
            let sig = channel::top_up(chain, &wallet, &c, deposit.max(low) - free)?;
            p.transactions.push(sig.to_string());
            p.refresh(chain)?;
        }
        Ok(p)
    }

    fn from_chain(ids: Ids, on: &OnChain, saved: Option<Payer>) -> Payer {
        let (vouched, newest) = saved.map_or((0, None), |s| (s.vouched, s.newest));
        Payer {
            ids,
            address: wire_address(&on.address),
            generation: on.state.generation,
            deposited: on.state.deposited,
            claimed: on.state.claimed,
            vouched: vouched.max(on.state.claimed),
            newest,
            transactions: Vec::new(),
            close_at: on.state.close_at,
        }
    }

    /// Reads the channel's deposit, claims and close from the chain.
    pub fn refresh(&mut self, chain: &dyn Chain) -> Result<Option<OnChain>, PayError> {
        let on = channel::read(chain, &self.ids.channel())?;
        if let Some(on) = &on
            && on.state.generation == self.generation
        {
            self.deposited = on.state.deposited;
            self.claimed = on.state.claimed;
            self.vouched = self.vouched.max(on.state.claimed);
            self.close_at = on.state.close_at;
        }
        Ok(on)
    }

    /// What the renter names when it opens a session on this channel.
    pub fn terms(&self) -> ChannelTerms {
        ChannelTerms { program: self.ids.program, mint: self.ids.mint, id: self.ids.id, newest: self.newest }
    }

    /// Takes the provider's copy of the newest voucher, when it is this renter's own signature
    /// on this channel and above what its own record says (a record lost in a crash).
    pub fn adopt(&mut self, v: &Voucher) -> Result<(), PayError> {
        if v.cumulative <= self.vouched {
            return Ok(());
        }
        let c = self.ids.channel();
        if !verify(&c, &address_of(&self.address), self.generation, &self.ids.renter, v) {
            return Err(PayError::BadSignature);
        }
        if v.cumulative > self.deposited {
            return Err(PayError::OverDeposit { deposited: self.deposited, want: v.cumulative });
        }
        self.vouched = v.cumulative;
        self.newest = Some(*v);
        Ok(())
    }

    /// Signs a voucher for `cumulative` in all, answering the receipt with `receipt_digest`.
    pub fn sign(&mut self, renter: &Keypair, cumulative: u64, receipt_digest: [u8; 32]) -> Result<Voucher, PayError> {
        if cumulative < self.vouched {
            return Err(PayError::Backwards { have: self.vouched, got: cumulative });
        }
        if cumulative > self.deposited {
            return Err(PayError::OverDeposit { deposited: self.deposited, want: cumulative });
        }
        let c = self.ids.channel();
        let message =
            channel::voucher_message_at(&c, &address_of(&self.address), self.generation, cumulative, &receipt_digest);
        let v = Voucher { cumulative, receipt_digest, signature: renter.sign(&message) };
        self.vouched = cumulative;
        self.newest = Some(v);
        Ok(v)
    }

    /// Room left for vouchers: deposited and not yet vouched.
    pub fn room(&self) -> u64 {
        self.deposited.saturating_sub(self.vouched)
    }

    /// Starts the close: the provider has the dispute window to claim its newest voucher, then
    /// [`Payer::finalize`] returns the rest.
    pub fn start_close(&mut self, chain: &dyn Chain, renter: &Keypair) -> Result<(), PayError> {
        let sig = channel::start_close(chain, &signer(renter), &self.ids.channel())?;
        self.transactions.push(sig.to_string());
        self.refresh(chain)?;
        Ok(())
    }

    /// After the window: the rest of the deposit and the accounts' rent come back.
    pub fn finalize(&mut self, chain: &dyn Chain, renter: &Keypair) -> Result<(), PayError> {
        let sig = channel::finalize(chain, &signer(renter), &self.ids.channel())?;
        self.transactions.push(sig.to_string());
        Ok(())
    }
}

/// The provider's side of one channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payee {
    pub ids: Ids,
    pub address: Address,
    pub generation: u64,
    /// Whose signature makes a voucher, as the channel says.
    pub voucher_key: PublicKey,
    /// As the chain showed last.
    pub deposited: u64,
    pub claimed: u64,
    pub close_at: i64,
    /// The newest valid voucher.
    pub newest: Option<Voucher>,
    /// Claim transactions, base58: the newest few, and how many in all.
    pub claims: Vec<String>,
    pub claim_count: u64,
}

/// Claim signatures a payee keeps (the newest).
const CLAIMS_KEPT: usize = 64;

impl Payee {
    /// Reads the channel the renter named and checks it: it exists in `program` (this
    /// provider's), between these two parties, in `mint`, open; `saved` is this provider's
    /// last state for it, kept if the channel is the same generation.
    pub fn open(chain: &dyn Chain, ids: Ids, saved: Option<Payee>) -> Result<Payee, PayError> {
        let c = ids.channel();
        let on = channel::read(chain, &c)?.ok_or_else(|| PayError::NoChannel(c.address().to_string()))?;
        if on.closing() {
            return Err(PayError::Closing(on.address.to_string()));
        }
        let saved = saved.filter(|s| s.generation == on.state.generation && s.address == wire_address(&on.address));
        let (newest, claims, claim_count) =
            saved.map_or((None, Vec::new(), 0), |s| (s.newest, s.claims, s.claim_count));
        Ok(Payee {
            ids,
            address: wire_address(&on.address),
            generation: on.state.generation,
            voucher_key: PublicKey(on.state.voucher_key),
            deposited: on.state.deposited,
            claimed: on.state.claimed,
            close_at: on.state.close_at,
            newest: newest.filter(|v| v.cumulative > on.state.claimed),
            claims,
            claim_count,
        })
    }

    /// The most the renter has vouched for (claimed or not).
    pub fn vouched(&self) -> u64 {
        self.newest.map_or(self.claimed, |v| v.cumulative.max(self.claimed))
    }

    /// Vouched and not yet claimed.
    pub fn unclaimed(&self) -> u64 {
        self.vouched().saturating_sub(self.claimed)
    }

    /// Checks a voucher the chain would pay on this channel.
    pub fn check(&self, v: &Voucher) -> Result<(), PayError> {
        if v.cumulative > self.deposited {
            return Err(PayError::OverDeposit { deposited: self.deposited, want: v.cumulative });
        }
        let c = self.ids.channel();
        if !verify(&c, &address_of(&self.address), self.generation, &self.voucher_key, v) {
            return Err(PayError::BadSignature);
        }
        Ok(())
    }

    /// Takes the renter's copy of its newest voucher at a session's start, when it verifies
    /// and is above this provider's own.
    pub fn adopt(&mut self, v: &Voucher) -> Result<(), PayError> {
        if v.cumulative <= self.vouched() {
            return Ok(());
        }
        self.check(v)?;
        self.newest = Some(*v);
        Ok(())
    }

    /// Takes a voucher that must be for exactly `want` in all and name `receipt_digest` (the
    /// receipt it answers): growing, within the deposit, signed by the voucher key.
    pub fn accept(&mut self, v: &Voucher, want: u64, receipt_digest: &[u8; 32]) -> Result<(), PayError> {
        if self.newest.as_ref() == Some(v) {
            return Ok(());
        }
        if v.cumulative <= self.vouched() {
            return Err(PayError::NotNewer { have: self.vouched(), got: v.cumulative });
        }
        if v.cumulative != want {
            return Err(PayError::Amount { want, got: v.cumulative });
        }
        if v.receipt_digest != *receipt_digest {
            return Err(PayError::WrongReceipt);
        }
        self.check(v)?;
        self.newest = Some(*v);
        Ok(())
    }

    /// Reads the channel's deposit, claims and close from the chain. A channel gone, or opened
    /// again as a new generation, ends this one: `Closing`.
    pub fn refresh(&mut self, chain: &dyn Chain) -> Result<(), PayError> {
        match channel::read(chain, &self.ids.channel())? {
            Some(on) if on.state.generation == self.generation => {
                self.deposited = on.state.deposited;
                self.claimed = self.claimed.max(on.state.claimed);
                self.close_at = on.state.close_at;
                Ok(())
            }
            _ => {
                self.close_at = self.close_at.max(1);
                Err(PayError::Closing(self.address.to_string()))
            }
        }
    }

    /// Claims the newest voucher if it pays anything not yet claimed; `payer` (this provider)
    /// pays the fee. A claim whose answer was lost is found on the chain, never sent twice to
    /// pay twice: the program refuses a voucher not above what was claimed.
    pub fn claim(
        &mut self,
        chain: &dyn Chain,
        provider: &Keypair,
    ) -> Result<Option<proto::voucher::Claimed>, PayError> {
        let Some(v) = self.newest.filter(|v| v.cumulative > self.claimed) else { return Ok(None) };
        let c = self.ids.channel();
        let on = OnChain {
            address: address_of(&self.address),
            state: channel::read(chain, &c)?
                .filter(|on| on.state.generation == self.generation)
                .ok_or_else(|| PayError::Closing(self.address.to_string()))?
                .state,
        };
        let voucher =
            channel::Voucher { cumulative: v.cumulative, receipt_digest: v.receipt_digest, signature: v.signature.0 };
        let sig = match channel::claim(chain, &signer(provider), &c, &on, &voucher) {
            Ok(sig) => sig,
            Err(e) => {
                // No answer is not no claim: what the chain shows decides.
                self.refresh(chain)?;
                if self.claimed >= v.cumulative {
                    log::info!("a claim landed though its answer was lost: {e}");
                    return Ok(None);
                }
                return Err(e.into());
            }
        };
        self.claimed = v.cumulative;
        self.claims.push(sig.to_string());
        if self.claims.len() > CLAIMS_KEPT {
            self.claims.remove(0);
        }
        self.claim_count += 1;
        Ok(Some(proto::voucher::Claimed {
            transaction: proto::Signature(<[u8; 64]>::from(sig)),
            cumulative: v.cumulative,
        }))
    }

    /// The renter started a close: the newest voucher must be claimed before `close_at`.
    pub fn closing(&self) -> bool {
        self.close_at != 0
    }
}
