//! Paying for a session with the System, SPL Token and Memo programs alone.
//!
//! - **Escrow.** The renter deposits the session's budget in a token account owned by a 2-of-2
//!   SPL multisig of renter and provider, and creates a durable nonce account whose authority is
//!   the provider. No token leaves the escrow without both signatures.
//! - **Voucher.** After each receipt it checked, the renter signs a transaction that advances the
//!   nonce, names the receipt's digest in a Memo and transfers the receipt's cumulative amount
//!   less what was already paid from escrow to the provider. The signature covers that exact
//!   transfer; changing any byte of it (amount, nonce, accounts, memo) breaks it.
//! - **Settling.** The provider adds its signature (fee payer, nonce authority, second multisig
//!   signer) to the newest voucher and submits it. The nonce advances, which voids every other
//!   voucher signed on it: nothing pays twice, and nothing pays more than the renter signed.
//! - **Refund.** After each settlement (and when the session opens) the provider signs a refund
//!   of everything left, on the current nonce, and hands it to the renter, who submits it when
//!   the session ends or the provider vanishes. Submitted early, it voids the vouchers not yet
//!   settled: the provider's exposure is the inferences since its last settlement.
//!
//! Both sides build each transaction message with the functions here, from the same fields, so
//! a signature sent over the wire can be checked against the exact transfer it authorizes.

use std::collections::BTreeMap;

use proto::receipt::Receipt;
use proto::voucher::{EscrowTerms, Refund, Settled, Voucher};
use serde::{Deserialize, Serialize};
use solana_program_pack::Pack;
use solana_sdk::hash::Hash;
use solana_sdk::message::Message;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signer};
use solana_sdk::transaction::Transaction;

use crate::chain::{Chain, ChainError};
use crate::token::{self, ix};

/// A wire key as a Solana address (the same 32 bytes).
pub fn address(key: &proto::PublicKey) -> Pubkey {
    Pubkey::new_from_array(key.0)
}

/// A Solana address as a wire key.
pub fn wire_key(key: &Pubkey) -> proto::PublicKey {
    proto::PublicKey(key.to_bytes())
}

fn sol_signature(s: &proto::Signature) -> solana_sdk::signature::Signature {
    solana_sdk::signature::Signature::from(s.0)
}

/// A party's Solana signer: the same ed25519 key as its wasmgrid identity.
pub fn signer(key: &proto::Keypair) -> Keypair {
    Keypair::new_from_array(key.seed())
}

/// Why an escrow, a voucher, a refund or a settlement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the escrow is not as promised: {0}")]
    Escrow(String),
    #[error("the voucher's signature does not match the transfer it names (tampered, or made for another session)")]
    BadSignature,
    #[error("voucher for receipt {got} refused: receipt {have} is already covered (a replayed or older voucher)")]
    NotNewer { have: u64, got: u64 },
    #[error(
        "the voucher is on nonce {got}, not the escrow's current nonce {want} (replayed, or signed before a settlement)"
    )]
    StaleNonce { want: String, got: String },
    #[error("the voucher names receipt {0}, which this provider did not sign")]
    UnknownReceipt(u64),
    #[error("the voucher pays {got} cumulatively where receipt {sequence} says {want}")]
    Amount { sequence: u64, want: u64, got: u64 },
    #[error("{got} is over the escrow's budget of {budget}")]
    OverBudget { budget: u64, got: u64 },
    #[error("the provider's refund is not valid: {0}")]
    BadRefund(String),
    #[error("the provider reports a settlement the chain does not show: {0}")]
    BadSettlement(String),
    #[error("the session's escrow was already closed")]
    Closed,
    #[error("saving the settlement state: {0}")]
    Persist(String),
}

/// The escrow and the parties, as Solana addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    pub renter: Pubkey,
    pub provider: Pubkey,
    pub mint: Pubkey,
    pub decimals: u8,
    pub multisig: Pubkey,
    pub escrow: Pubkey,
    pub nonce_account: Pubkey,
    pub budget: u64,
}

impl Terms {
    pub fn from_wire(renter: &proto::PublicKey, provider: &proto::PublicKey, t: &EscrowTerms) -> Terms {
        Terms {
            renter: address(renter),
            provider: address(provider),
            mint: address(&t.mint),
            decimals: t.decimals,
            multisig: address(&t.multisig),
            escrow: address(&t.account),
            nonce_account: address(&t.nonce_account),
            budget: t.budget,
        }
    }

    pub fn wire(&self) -> EscrowTerms {
        EscrowTerms {
            mint: wire_key(&self.mint),
            decimals: self.decimals,
            multisig: wire_key(&self.multisig),
            account: wire_key(&self.escrow),
            nonce_account: wire_key(&self.nonce_account),
            budget: self.budget,
        }
    }

    fn transfer_out(&self, to: &Pubkey, amount: u64) -> Result<solana_sdk::instruction::Instruction, ChainError> {
        ix(spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &self.escrow,
            &self.mint,
            to,
            &self.multisig,
            &[&self.renter, &self.provider],
            amount,
            self.decimals,
        ))
    }

    /// The voucher transaction's message: advance the nonce, name the receipt, pay `amount`
    /// to the provider's token account. The provider pays the fee.
    pub fn voucher_message(&self, nonce: &Hash, amount: u64, receipt_digest: &[u8; 32]) -> Result<Message, ChainError> {
        let memo = format!("wasmgrid receipt {}", hex(receipt_digest));
        let instructions = [
            solana_system_interface::instruction::advance_nonce_account(&self.nonce_account, &self.provider),
            spl_memo_interface::instruction::build_memo(&spl_memo_interface::v3::id(), memo.as_bytes(), &[]),
            self.transfer_out(&token::token_account(&self.provider, &self.mint), amount)?,
        ];
        Ok(Message::new_with_blockhash(&instructions, Some(&self.provider), nonce))
    }

    /// The refund transaction's message: advance the nonce, return `amount` to the renter's
    /// token account, and hand the escrow account to the renter (whatever else landed in it,
    /// and its rent, are then the renter's to take). The renter pays the fee. It does not
    /// close the account: a stranger's dust in it would make a close, and so the refund, fail.
    pub fn refund_message(&self, nonce: &Hash, amount: u64) -> Result<Message, ChainError> {
        let mut instructions =
            vec![solana_system_interface::instruction::advance_nonce_account(&self.nonce_account, &self.provider)];
        if amount > 0 {
            instructions.push(self.transfer_out(&token::token_account(&self.renter, &self.mint), amount)?);
        }
        instructions.push(ix(spl_token_interface::instruction::set_authority(
            &spl_token_interface::id(),
            &self.escrow,
            Some(&self.renter),
            spl_token_interface::instruction::AuthorityType::AccountOwner,
            &self.multisig,
            &[&self.renter, &self.provider],
        ))?);
        Ok(Message::new_with_blockhash(&instructions, Some(&self.renter), nonce))
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A transaction for `message` carrying the given signatures (in any order).
fn assemble(message: Message, sigs: &[(Pubkey, proto::Signature)]) -> Transaction {
    let mut tx = Transaction::new_unsigned(message);
    let required = usize::from(tx.message.header.num_required_signatures);
    for (key, sig) in sigs {
        if let Some(i) = tx.message.account_keys.iter().take(required).position(|k| k == key)
            && let Some(slot) = tx.signatures.get_mut(i)
        {
            *slot = sol_signature(sig);
        }
    }
    tx
}

/// The state of a durable nonce account: its authority and current nonce.
pub fn read_nonce(chain: &dyn Chain, account: &Pubkey) -> Result<(Pubkey, Hash), ChainError> {
    let bad = ChainError::Account(*account, "an initialized nonce account");
    let acc = chain.account(account)?.ok_or(bad.clone())?;
    if acc.owner != solana_system_interface::program::ID {
        return Err(bad);
    }
    // bincode of nonce::Versions::Current(State::Initialized(Data { authority, durable_nonce, .. })).
    let d = &acc.data;
    let tag = |at: usize| d.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes);
    let key = |at: usize| d.get(at..at + 32).and_then(|b| <[u8; 32]>::try_from(b).ok());
    match (tag(0), tag(4), key(8), key(40)) {
        (Some(1), Some(1), Some(authority), Some(nonce)) => {
            Ok((Pubkey::new_from_array(authority), Hash::new_from_array(nonce)))
        }
        _ => Err(bad),
    }
}

/// Size of a nonce account.
const NONCE_LEN: usize = 80;

/// The renter creates a session's escrow with the provider, empty: a 2-of-2 multisig, a
/// token account of `mint` it owns, and a nonce account whose authority is the provider. The
/// renter pays their rent. It deposits (see [`fund_escrow`]) only once it holds the provider's
/// signed refund, so a provider that refuses or vanishes at the start strands nothing but rent.
pub fn create_escrow(
    chain: &dyn Chain,
    renter: &Keypair,
    provider: &Pubkey,
    mint: &Pubkey,
    budget: u64,
) -> Result<Terms, PayError> {
    let decimals = token::mint_decimals(chain, mint)?;
    let (multisig, escrow, nonce) = (Keypair::new(), Keypair::new(), Keypair::new());
    let token_program = spl_token_interface::id();
    let me = renter.pubkey();
    let mut instructions = vec![
        token::create_account(
            chain,
            &me,
            &multisig.pubkey(),
            spl_token_interface::state::Multisig::LEN,
            &token_program,
        )?,
        ix(spl_token_interface::instruction::initialize_multisig2(
            &token_program,
            &multisig.pubkey(),
            &[&me, provider],
            2,
        ))?,
        token::create_account(chain, &me, &escrow.pubkey(), spl_token_interface::state::Account::LEN, &token_program)?,
        ix(spl_token_interface::instruction::initialize_account3(
            &token_program,
            &escrow.pubkey(),
            mint,
            &multisig.pubkey(),
        ))?,
    ];
    instructions.extend(solana_system_interface::instruction::create_nonce_account(
        &me,
        &nonce.pubkey(),
        provider,
        chain.rent(NONCE_LEN)?,
    ));
    token::send(chain, &instructions, &[renter, &multisig, &escrow, &nonce])?;
    Ok(Terms {
        renter: me,
        provider: *provider,
        mint: *mint,
        decimals,
        multisig: multisig.pubkey(),
        escrow: escrow.pubkey(),
        nonce_account: nonce.pubkey(),
        budget,
    })
}

/// Deposits the budget from the renter's associated token account into the escrow.
pub fn fund_escrow(chain: &dyn Chain, renter: &Keypair, t: &Terms) -> Result<(), PayError> {
    let deposit = ix(spl_token_interface::instruction::transfer_checked(
        &spl_token_interface::id(),
        &token::token_account(&renter.pubkey(), &t.mint),
        &t.mint,
        &t.escrow,
        &renter.pubkey(),
        &[],
        t.budget,
        t.decimals,
    ))?;
    token::send(chain, &[deposit], &[renter])?;
    Ok(())
}

/// [`create_escrow`] and [`fund_escrow`] at once (when the refund is not needed first).
pub fn open_escrow(
    chain: &dyn Chain,
    renter: &Keypair,
    provider: &Pubkey,
    mint: &Pubkey,
    budget: u64,
) -> Result<Terms, PayError> {
    let t = create_escrow(chain, renter, provider, mint, budget)?;
    fund_escrow(chain, renter, &t)?;
    Ok(t)
}

/// Checks on the chain that the escrow is what `terms` says: a 2-of-2 multisig of exactly the
/// two parties owns a token account of the mint holding the whole budget, with no delegate or
/// close authority, and the nonce's authority is the provider. With `funded` false the deposit
/// may still be missing (the escrow must hold nothing else then). Returns the current nonce.
pub fn verify_escrow(chain: &dyn Chain, t: &Terms, funded: bool) -> Result<Hash, PayError> {
    let bad = |what: String| PayError::Escrow(what);
    let decimals = token::mint_decimals(chain, &t.mint)?;
    if decimals != t.decimals {
        return Err(bad(format!("the mint has {decimals} decimals, not {}", t.decimals)));
    }
    let ms = chain.account(&t.multisig)?.ok_or_else(|| bad("the multisig account does not exist".into()))?;
    let ms = (ms.owner == spl_token_interface::id())
        .then(|| spl_token_interface::state::Multisig::unpack(&ms.data).ok())
        .flatten()
        .ok_or_else(|| bad("the multisig account is not an SPL Token multisig".into()))?;
    let signers: Vec<Pubkey> = ms.signers.iter().take(usize::from(ms.n)).copied().collect();
    let both = signers.len() == 2 && signers.contains(&t.renter) && signers.contains(&t.provider);
    if ms.m != 2 || !both {
        return Err(bad(format!("the multisig is {} of {:?}, not 2 of renter and provider", ms.m, signers)));
    }
    let acc = token::token_state(chain, &t.escrow)?;
    if acc.mint != t.mint || acc.owner != t.multisig {
        return Err(bad("the escrow account is not of the mint or not owned by the multisig".into()));
    }
    if acc.delegate.is_some() || acc.close_authority.is_some() {
        return Err(bad("the escrow account has a delegate or a close authority".into()));
    }
    let empty_allowed = !funded && acc.amount == 0;
    if acc.amount != t.budget && !empty_allowed {
        return Err(bad(format!("the escrow holds {}, not the budget of {}", acc.amount, t.budget)));
    }
    let (authority, nonce) = read_nonce(chain, &t.nonce_account)?;
    if authority != t.provider {
        return Err(bad(format!("the nonce authority is {authority}, not the provider")));
    }
    Ok(nonce)
}

/// What the escrow shows now: its nonce, and at least how much was paid out of it (tokens sent
/// into it by anyone else make this an underestimate, never more), or `None` once the refund
/// went through (the multisig no longer owns it).
fn on_chain(chain: &dyn Chain, t: &Terms) -> Result<Option<(Hash, u64)>, ChainError> {
    if chain.account(&t.escrow)?.is_none() {
        return Ok(None);
    }
    let state = token::token_state(chain, &t.escrow)?;
    if state.owner != t.multisig {
        return Ok(None);
    }
    let balance = state.amount;
    let (_, nonce) = read_nonce(chain, &t.nonce_account)?;
    Ok(Some((nonce, t.budget.saturating_sub(balance))))
}

fn check_refund(t: &Terms, r: &Refund, want_amount: u64) -> Result<(), PayError> {
    if r.amount != want_amount {
        return Err(PayError::BadRefund(format!("it returns {} where {want_amount} is left", r.amount)));
    }
    let msg = t.refund_message(&Hash::new_from_array(r.nonce), r.amount)?;
    if !wire_key(&t.provider).verify(&msg.serialize(), &r.signature) {
        return Err(PayError::BadRefund("its signature does not verify".into()));
    }
    Ok(())
}

/// The renter's side of a session's payment.
#[derive(Clone, Debug)]
pub struct Payer {
    terms: Terms,
    nonce: Hash,
    paid: u64,
    refund: Option<Refund>,
    settled: Vec<Settled>,
    /// The most this renter ever signed for, cumulatively.
    vouched: u64,
}

impl Payer {
    /// After [`create_escrow`]: the renter's view, on the escrow's first nonce.
    pub fn new(chain: &dyn Chain, terms: Terms) -> Result<Payer, PayError> {
        let nonce = verify_escrow(chain, &terms, false)?;
        Ok(Payer { terms, nonce, paid: 0, refund: None, settled: Vec::new(), vouched: 0 })
    }

    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    /// Paid to the provider so far, as the chain showed at the last settlement.
    pub fn paid(&self) -> u64 {
        self.paid
    }

    /// The provider's settlements so far.
    pub fn settlements(&self) -> &[Settled] {
        &self.settled
    }

    /// The newest refund the provider signed.
    pub fn refund(&self) -> Option<&Refund> {
        self.refund.as_ref()
    }

    /// Signs the voucher for a receipt the caller checked (signature, order, counts, price:
    /// `proto::receipt::Checker`). Refuses one over the budget.
    pub fn voucher(&mut self, renter: &proto::Keypair, r: &Receipt) -> Result<Voucher, PayError> {
        if r.amount_due > self.terms.budget {
            return Err(PayError::OverBudget { budget: self.terms.budget, got: r.amount_due });
        }
        let amount = r.amount_due.saturating_sub(self.paid);
        let msg = self.terms.voucher_message(&self.nonce, amount, &r.digest())?;
        self.vouched = self.vouched.max(r.amount_due);
        Ok(Voucher {
            sequence: r.sequence,
            cumulative: r.amount_due,
            nonce: self.nonce.to_bytes(),
            signature: renter.sign(&msg.serialize()),
        })
    }

    /// Takes a refund the provider signed, after checking it returns everything not paid.
    pub fn accept_refund(&mut self, r: &Refund) -> Result<(), PayError> {
        if r.nonce != self.nonce.to_bytes() {
            return Err(PayError::BadRefund("it is not on the escrow's current nonce".into()));
        }
        check_refund(&self.terms, r, self.terms.budget.saturating_sub(self.paid))?;
        self.refund = Some(r.clone());
        Ok(())
    }

    /// Takes a settlement the provider reports, after reading the chain: what was paid and the
    /// new nonce come from the chain, not from the provider.
    pub fn settled(&mut self, chain: &dyn Chain, s: &Settled) -> Result<(), PayError> {
        let Some((nonce, at_least)) = on_chain(chain, &self.terms)? else { return Err(PayError::Closed) };
        self.check_paid(s.paid)?;
        // The transaction it names landed, the nonce moved to the refund's, and the amount is
        // one this renter signed for, no less than before and no less than the chain shows.
        let landed = chain.status(&sol_signature(&s.transaction))? == crate::chain::Status::Succeeded;
        if !landed || nonce.to_bytes() != s.refund.nonce || s.paid < self.paid || s.paid < at_least {
            return Err(PayError::BadSettlement(format!(
                "it says {} paid by {} on nonce {}; the chain shows {} on {nonce} (at least {at_least} paid)",
                s.paid,
                crate::signature_text(&s.transaction),
                Hash::new_from_array(s.refund.nonce),
                if landed { "that transaction" } else { "no such transaction" }
            )));
        }
        self.nonce = nonce;
        self.paid = s.paid;
        self.accept_refund(&s.refund)?;
        self.settled.push(s.clone());
        Ok(())
    }

    /// Takes a refund on the escrow's current nonce after reading the chain: for when a
    /// settlement's news was lost (the provider hands the current refund on close).
    pub fn resync(&mut self, chain: &dyn Chain, r: &Refund) -> Result<(), PayError> {
        let Some((nonce, at_least)) = on_chain(chain, &self.terms)? else { return Err(PayError::Closed) };
        if r.nonce != nonce.to_bytes() {
            return Err(PayError::BadRefund("it is not on the escrow's current nonce".into()));
        }
        // The refund says what was paid: no more than this renter signed for, no less than
        // before or than the chain shows.
        let paid = self.terms.budget.saturating_sub(r.amount);
        self.check_paid(paid)?;
        if paid < self.paid || paid < at_least {
            return Err(PayError::BadRefund(format!("it returns {} where more is left", r.amount)));
        }
        check_refund(&self.terms, r, r.amount)?;
        self.nonce = nonce;
        self.paid = paid;
        self.refund = Some(r.clone());
        Ok(())
    }

    fn check_paid(&self, paid: u64) -> Result<(), PayError> {
        if paid > self.vouched {
            return Err(PayError::BadSettlement(format!(
                "the chain shows {paid} paid out of escrow, more than the {} this renter signed for",
                self.vouched
            )));
        }
        Ok(())
    }

    /// Submits the newest refund: everything not paid goes back to the renter and the escrow
    /// closes. Any voucher not yet settled is void after this.
    pub fn recover(
        &self,
        chain: &dyn Chain,
        renter: &proto::Keypair,
    ) -> Result<solana_sdk::signature::Signature, PayError> {
        let r = self.refund.as_ref().ok_or_else(|| PayError::BadRefund("the provider never signed one".into()))?;
        let msg = self.terms.refund_message(&Hash::new_from_array(r.nonce), r.amount)?;
        let mine = renter.sign(&msg.serialize());
        let tx = assemble(msg, &[(self.terms.provider, r.signature), (self.terms.renter, mine)]);
        let sig = chain.send(&tx)?;
        // The emptied escrow account is the renter's now: close it for its rent, unless tokens
        // sent from outside are still in it (then it stays, the renter's to empty).
        let me = signer(renter);
        if token::token_balance(chain, &self.terms.escrow).ok() == Some(0) {
            let close = spl_token_interface::instruction::close_account(
                &spl_token_interface::id(),
                &self.terms.escrow,
                &me.pubkey(),
                &me.pubkey(),
                &[],
            );
            if let Err(e) = ix(close).and_then(|i| token::send(chain, &[i], &[&me])) {
                log::info!("the emptied escrow stays open: {e}");
            }
        }
        Ok(sig)
    }
}

/// A receipt the provider signed and not yet paid for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Served {
    digest: [u8; 32],
    inferences: u64,
    amount_due: u64,
}

/// The provider's side of a session's payment. It is plain data, saved by the caller after each
/// change (see [`Payee::settle`]) so a restart picks up where it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payee {
    renter: proto::PublicKey,
    provider: proto::PublicKey,
    escrow: EscrowTerms,
    nonce: [u8; 32],
    /// Paid out of escrow, as the chain showed last.
    paid: u64,
    /// Receipts signed and not yet paid, by sequence.
    served: BTreeMap<u64, Served>,
    /// Inferences served, by the newest receipt.
    inferences: u64,
    /// The newest valid voucher and the inferences its receipt counts.
    best: Option<(Voucher, u64)>,
    /// A voucher submitted and not yet seen confirmed.
    pending: Option<Voucher>,
    /// The newest settlement and how many there were (the full list is the caller's record:
    /// this state is saved after every inference, so it must not grow with the session).
    last_settled: Option<Settled>,
    settlement_count: u64,
    /// Inferences the settled vouchers paid for.
    settled_inferences: u64,
    /// The chain showed the whole budget in escrow.
    funded: bool,
    closed: bool,
}

impl Payee {
    /// Checks the escrow the renter created on the chain (funded or not yet) and starts on its
    /// nonce. Nothing is served until [`Payee::check_funded`] sees the deposit.
    pub fn open(
        chain: &dyn Chain,
        renter: proto::PublicKey,
        provider: proto::PublicKey,
        escrow: EscrowTerms,
    ) -> Result<Payee, PayError> {
        let nonce = verify_escrow(chain, &Terms::from_wire(&renter, &provider, &escrow), false)?;
        Ok(Payee {
            renter,
            provider,
            escrow,
            nonce: nonce.to_bytes(),
            paid: 0,
            served: BTreeMap::new(),
            inferences: 0,
            best: None,
            pending: None,
            last_settled: None,
            settlement_count: 0,
            settled_inferences: 0,
            funded: false,
            closed: false,
        })
    }

    pub fn terms(&self) -> Terms {
        Terms::from_wire(&self.renter, &self.provider, &self.escrow)
    }

    pub fn budget(&self) -> u64 {
        self.escrow.budget
    }

    pub fn paid(&self) -> u64 {
        self.paid
    }

    /// The cumulative amount the newest valid voucher covers.
    pub fn vouched(&self) -> u64 {
        self.best.as_ref().map_or(self.paid, |(v, _)| v.cumulative.max(self.paid))
    }

    /// Inferences served and not covered by a valid voucher.
    pub fn unvouched(&self) -> u64 {
        self.inferences.saturating_sub(self.best.as_ref().map_or(0, |(_, n)| *n))
    }

    /// Inferences vouched for and not yet settled, and their amount.
    pub fn unsettled(&self) -> (u64, u64) {
        let vouched = self.best.as_ref().map_or(0, |(_, n)| *n);
        (vouched.saturating_sub(self.settled_inferences), self.vouched().saturating_sub(self.paid))
    }

    /// Inferences paid for on the chain.
    pub fn settled_inferences(&self) -> u64 {
        self.settled_inferences
    }

    /// The newest settlement.
    pub fn last_settlement(&self) -> Option<&Settled> {
        self.last_settled.as_ref()
    }

    /// Settlements so far.
    pub fn settlement_count(&self) -> u64 {
        self.settlement_count
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads the chain until the escrow holds the budget (once it has, it stays until paid
    /// out: only both parties together can move it).
    pub fn check_funded(&mut self, chain: &dyn Chain) -> Result<(), PayError> {
        if !self.funded {
            verify_escrow(chain, &self.terms(), true)?;
            self.funded = true;
        }
        Ok(())
    }

    /// Whether one more inference may be served: it must fit the budget at `amount_due`
    /// (cumulative, after it), and no more than `max_unvouched` inferences may go unvouched.
    pub fn may_serve(&self, amount_due: u64, max_unvouched: u64) -> Result<(), String> {
        if self.closed {
            return Err("the session's escrow was refunded and closed".into());
        }
        if !self.funded {
            return Err("the escrow does not hold the budget yet".into());
        }
        if amount_due > self.escrow.budget {
            return Err(format!(
                "the escrow's budget of {} is spent ({} due after this inference)",
                self.escrow.budget, amount_due
            ));
        }
        if self.unvouched() >= max_unvouched {
            return Err(format!(
                "{} inference(s) served without a voucher (at most {max_unvouched} allowed): the renter stopped paying",
                self.unvouched()
            ));
        }
        Ok(())
    }

    /// Notes a receipt just signed, so a voucher for it can be checked and settled.
    pub fn served(&mut self, r: &Receipt) {
        self.inferences = r.counts.inferences;
        self.served.insert(
            r.sequence,
            Served { digest: r.digest(), inferences: r.counts.inferences, amount_due: r.amount_due },
        );
    }

    /// Checks a voucher: it must be for a receipt this provider signed, newer than the last
    /// one, for that receipt's amount, within budget, on the current nonce, and signed by the
    /// renter over exactly the transfer it names. On success it is the one to settle.
    /// The newest voucher again is a no-op (a retried request carries it again).
    pub fn accept(&mut self, v: &Voucher) -> Result<(), PayError> {
        if self.best.as_ref().is_some_and(|(b, _)| b == v) {
            return Ok(());
        }
        let have = self.best.as_ref().map_or(0, |(b, _)| b.sequence);
        if v.sequence <= have {
            return Err(PayError::NotNewer { have, got: v.sequence });
        }
        let served = self.served.get(&v.sequence).ok_or(PayError::UnknownReceipt(v.sequence))?.clone();
        if v.cumulative > self.escrow.budget {
            return Err(PayError::OverBudget { budget: self.escrow.budget, got: v.cumulative });
        }
        if v.cumulative != served.amount_due {
            return Err(PayError::Amount { sequence: v.sequence, want: served.amount_due, got: v.cumulative });
        }
        if v.nonce != self.nonce {
            return Err(PayError::StaleNonce {
                want: Hash::new_from_array(self.nonce).to_string(),
                got: Hash::new_from_array(v.nonce).to_string(),
            });
        }
        let msg = self.voucher_message(v, self.paid)?;
        if !self.renter.verify(&msg.serialize(), &v.signature) {
            return Err(PayError::BadSignature);
        }
        self.best = Some((v.clone(), served.inferences));
        Ok(())
    }

    /// The message voucher `v` signs, with `paid_before` already paid out of escrow.
    fn voucher_message(&self, v: &Voucher, paid_before: u64) -> Result<Message, PayError> {
        let served = self.served.get(&v.sequence).ok_or(PayError::UnknownReceipt(v.sequence))?;
        let amount = v.cumulative.saturating_sub(paid_before);
        Ok(self.terms().voucher_message(&Hash::new_from_array(v.nonce), amount, &served.digest)?)
    }

    /// The voucher transaction, co-signed.
    fn transaction(&self, v: &Voucher, provider: &proto::Keypair) -> Result<Transaction, PayError> {
        let msg = self.voucher_message(v, self.paid)?;
        let mine = provider.sign(&msg.serialize());
        Ok(assemble(msg, &[(address(&self.provider), mine), (address(&self.renter), v.signature)]))
    }

    /// Settles the newest valid voucher, if it pays anything not yet paid. `save` is called
    /// with the state before the transaction is sent and after the outcome is known; a crash
    /// in between leaves a pending voucher that [`Payee::resume`] finishes without paying twice.
    pub fn settle(
        &mut self,
        chain: &dyn Chain,
        provider: &proto::Keypair,
        save: &mut dyn FnMut(&Payee) -> Result<(), String>,
    ) -> Result<Option<Settled>, PayError> {
        if self.closed {
            return Err(PayError::Closed);
        }
        let Some((v, _)) = self.best.clone().filter(|(v, _)| v.cumulative > self.paid) else {
            return Ok(None);
        };
        let tx = self.transaction(&v, provider)?;
        self.pending = Some(v);
        save(self).map_err(PayError::Persist)?;
        let sent = chain.send(&tx);
        let id = tx.signatures.first().map(|s| proto::Signature(<[u8; 64]>::from(*s)));
        // Landed as sent: the transaction's own status says so, no need to look further.
        let settled = match &sent {
            Ok(_) => self.reconcile_known(chain, provider, id)?,
            Err(_) => self.reconcile(chain, provider)?,
        };
        save(self).map_err(PayError::Persist)?;
        match (settled, sent) {
            (Some(s), _) => Ok(Some(s)),
            (None, Err(e)) => Err(e.into()),
            (None, Ok(_)) => Err(PayError::BadSettlement("the transaction landed but the escrow did not move".into())),
        }
    }

    /// After a restart: finishes a settlement that was sent but not seen confirmed. The nonce
    /// makes the transaction single-use, so sending it again can never pay twice.
    pub fn resume(
        &mut self,
        chain: &dyn Chain,
        provider: &proto::Keypair,
        save: &mut dyn FnMut(&Payee) -> Result<(), String>,
    ) -> Result<Option<Settled>, PayError> {
        let Some(v) = self.pending.clone() else { return Ok(None) };
        if let Some((nonce, _)) = on_chain(chain, &self.terms())?
            && nonce.to_bytes() == v.nonce
        {
            let tx = self.transaction(&v, provider)?;
            if let Err(e) = chain.send(&tx) {
                log::info!("resending a settlement: {e}");
            }
        }
        let settled = self.reconcile(chain, provider)?;
        save(self).map_err(PayError::Persist)?;
        Ok(settled)
    }

    /// Reads the chain and moves the state to it: what was paid, the nonce, whether the
    /// pending voucher went through.
    fn reconcile(&mut self, chain: &dyn Chain, provider: &proto::Keypair) -> Result<Option<Settled>, PayError> {
        self.reconcile_known(chain, provider, None)
    }

    /// [`Payee::reconcile`], given the pending transaction's id when it is known to have
    /// landed.
    fn reconcile_known(
        &mut self,
        chain: &dyn Chain,
        provider: &proto::Keypair,
        landed_as: Option<proto::Signature>,
    ) -> Result<Option<Settled>, PayError> {
        let Some((nonce, paid)) = on_chain(chain, &self.terms())? else {
            self.closed = true;
            self.pending = None;
            return Ok(None);
        };
        let pending = self.pending.take();
        let was_paid = self.paid;
        // The balance only underestimates what was paid (others may send tokens in).
        self.paid = self.paid.max(paid);
        self.nonce = nonce.to_bytes();
        let Some(v) = pending else { return Ok(None) };
        let (tx, landed) = match landed_as {
            Some(id) => (id, true),
            None => {
                let id = self.transaction_id(&v, provider, was_paid)?;
                (id, chain.status(&sol_signature(&id))? == crate::chain::Status::Succeeded)
            }
        };
        if landed || (paid >= v.cumulative && paid > was_paid) {
            self.paid = v.cumulative;
            let paid = v.cumulative;
            self.settled_inferences = self.served.get(&v.sequence).map_or(self.settled_inferences, |s| s.inferences);
            self.served.retain(|seq, _| *seq > v.sequence);
            let s = Settled { transaction: tx, sequence: v.sequence, paid, refund: self.refund(provider)? };
            self.last_settled = Some(s.clone());
            self.settlement_count += 1;
            return Ok(Some(s));
        }
        if nonce.to_bytes() == v.nonce {
            // Not landed and still valid: keep it pending for the next try.
            self.pending = Some(v);
        }
        Ok(None)
    }

    fn transaction_id(
        &self,
        v: &Voucher,
        provider: &proto::Keypair,
        paid_before: u64,
    ) -> Result<proto::Signature, PayError> {
        let msg = self.voucher_message(v, paid_before)?;
        // The fee payer's signature is the transaction's id; ed25519 signatures are
        // deterministic, so it is the same one that was sent.
        Ok(provider.sign(&msg.serialize()))
    }

    /// A refund of everything not paid, on the current nonce, for the renter to hold.
    pub fn refund(&self, provider: &proto::Keypair) -> Result<Refund, PayError> {
        let amount = self.escrow.budget.saturating_sub(self.paid);
        let msg = self.terms().refund_message(&Hash::new_from_array(self.nonce), amount)?;
        Ok(Refund { nonce: self.nonce, amount, signature: provider.sign(&msg.serialize()) })
    }
}

// ---- batch jobs: paid once, after the fact ----

/// The payment for a finished batch job: from the payer's associated token account, exactly the
/// receipt's amount to the provider's, with the receipt's digest in a Memo. The payer pays the
/// fee and signs alone.
pub fn job_payment_message(
    payer: &Pubkey,
    terms: &proto::api::JobPayment,
    blockhash: &Hash,
) -> Result<Message, ChainError> {
    let mint = address(&terms.mint);
    let pay_to: Pubkey = terms
        .pay_to
        .parse()
        .map_err(|_| ChainError::Instruction(format!("{:?} is not a base58 address", terms.pay_to)))?;
    let memo = format!("wasmgrid job receipt {}", terms.receipt_digest);
    let instructions = [
        spl_memo_interface::instruction::build_memo(&spl_memo_interface::v3::id(), memo.as_bytes(), &[]),
        ix(spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &token::token_account(payer, &mint),
            &mint,
            &pay_to,
            payer,
            &[],
            terms.amount,
            terms.decimals,
        ))?,
    ];
    Ok(Message::new_with_blockhash(&instructions, Some(payer), blockhash))
}

/// The renter's payment for a job, signed, as base64 of the wire-format transaction.
pub fn job_payment(
    chain: &dyn Chain,
    payer: &proto::Keypair,
    terms: &proto::api::JobPayment,
) -> Result<String, PayError> {
    use base64::Engine;
    let msg = job_payment_message(&address(&payer.public()), terms, &chain.latest_blockhash()?)?;
    let sig = payer.sign(&msg.serialize());
    let tx = assemble(msg, &[(address(&payer.public()), sig)]);
    let bytes = bincode::serialize(&tx).map_err(|e| PayError::Chain(ChainError::Instruction(e.to_string())))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Largest transaction on the wire.
const TX_CAP: usize = 1232;

/// A transaction from base64 of its wire format.
pub fn decode_transaction(b64: &str) -> Result<Transaction, String> {
    use base64::Engine;
    if b64.len() > TX_CAP * 2 {
        return Err("the transaction is over Solana's 1232-byte limit".into());
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| "the transaction is not base64")?;
    decode_transaction_bytes(&bytes)
}

/// A transaction from its wire format.
pub fn decode_transaction_bytes(bytes: &[u8]) -> Result<Transaction, String> {
    if bytes.len() > TX_CAP {
        return Err("the transaction is over Solana's 1232-byte limit".into());
    }
    bincode::deserialize(bytes).map_err(|e| format!("not a Solana transaction: {e}"))
}

/// Checks that `tx` is exactly the payment `terms` call for (any payer, any recent blockhash)
/// and that the payer signed it; returns the payer.
pub fn check_job_payment(tx: &Transaction, terms: &proto::api::JobPayment) -> Result<Pubkey, String> {
    let payer = *tx.message.account_keys.first().ok_or("the transaction has no fee payer")?;
    let want = job_payment_message(&payer, terms, &tx.message.recent_blockhash).map_err(|e| e.to_string())?;
    if tx.message != want {
        return Err(format!(
            "the transaction is not this job's payment: it must transfer exactly {} to {} with the memo of receipt {}, and nothing else",
            terms.amount, terms.pay_to, terms.receipt_digest
        ));
    }
    if tx.signatures.len() != 1 || !tx.verify_with_results().iter().all(|ok| *ok) {
        return Err("the payer's signature does not verify".into());
    }
    Ok(payer)
}
