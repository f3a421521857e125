//! The money invariants, on the in-process chain with the real SPL programs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use proto::receipt::{Counts, Receipt, Signer as ReceiptSigner};
use settlement::token::{self, ensure_token_account, mint_to, token_balance};
use settlement::{Chain, LocalChain, PayError, Payee, Payer, Terms, open_escrow, signer};
use solana_sdk::hash::Hash;
use solana_sdk::signature::{Keypair, Signer};

const PRICE: u64 = 100;
const BUDGET: u64 = 10_000;
const FUNDS: u64 = 50_000;

struct World {
    chain: LocalChain,
    renter: proto::Keypair,
    provider: proto::Keypair,
    mint: solana_sdk::pubkey::Pubkey,
}

impl World {
    fn new() -> World {
        let chain = LocalChain::new();
        let (issuer, renter, provider) = (Keypair::new(), proto::Keypair::generate(), proto::Keypair::generate());
        for k in [issuer.pubkey(), signer(&renter).pubkey(), signer(&provider).pubkey()] {
            chain.airdrop(&k, 10_000_000_000).unwrap();
        }
        let mint = token::create_mint(&chain, &issuer, &issuer.pubkey(), 6).unwrap();
        let r = ensure_token_account(&chain, &signer(&renter), &signer(&renter).pubkey(), &mint).unwrap();
        ensure_token_account(&chain, &signer(&provider), &signer(&provider).pubkey(), &mint).unwrap();
        mint_to(&chain, &issuer, &mint, &r, FUNDS).unwrap();
        World { chain, renter, provider, mint }
    }

    fn renter_tokens(&self) -> u64 {
        token_balance(&self.chain, &token::token_account(&signer(&self.renter).pubkey(), &self.mint)).unwrap()
    }

    fn provider_tokens(&self) -> u64 {
        token_balance(&self.chain, &token::token_account(&signer(&self.provider).pubkey(), &self.mint)).unwrap()
    }

    /// Opens an escrow and both sides of its payment.
    fn session(&self) -> Session {
        let terms =
            open_escrow(&self.chain, &signer(&self.renter), &signer(&self.provider).pubkey(), &self.mint, BUDGET)
                .unwrap();
        let payer = Payer::new(&self.chain, terms.clone()).unwrap();
        let mut payee = Payee::open(&self.chain, self.renter.public(), self.provider.public(), terms.wire()).unwrap();
        payee.check_funded(&self.chain).unwrap();
        let mut s =
            Session { session_id: rand_id(), terms, payer, payee, receipts: None, last: None, saved: Vec::new() };
        let refund = s.payee.refund(&self.provider).unwrap();
        s.payer.accept_refund(&refund).unwrap();
        s
    }
}

fn rand_id() -> [u8; 16] {
    let k = proto::Keypair::generate();
    let mut id = [0; 16];
    id.copy_from_slice(&k.public().0[..16]);
    id
}

struct Session {
    session_id: [u8; 16],
    terms: Terms,
    payer: Payer,
    payee: Payee,
    receipts: Option<ReceiptSigner>,
    last: Option<Receipt>,
    saved: Vec<Payee>,
}

impl Session {
    /// The provider serves one inference and signs its receipt.
    fn serve(&mut self, w: &World) -> Receipt {
        let signer = self.receipts.get_or_insert_with(|| ReceiptSigner::new(self.session_id, w.renter.public(), PRICE));
        let call = Counts { inferences: 1, fuel: 1000, ..Counts::default() };
        let r = signer.next(&w.provider, &call, b"request", b"response");
        self.payee.served(&r);
        self.last = Some(r.clone());
        r
    }

    fn settle(&mut self, w: &World) -> Result<Option<proto::voucher::Settled>, PayError> {
        let saved = &mut self.saved;
        let s = self.payee.settle(&w.chain, &w.provider, &mut |p| {
            saved.push(p.clone());
            Ok(())
        })?;
        if let Some(s) = &s {
            self.payer.settled(&w.chain, s).unwrap();
        }
        Ok(s)
    }

    /// One inference, vouched for and settled.
    fn paid_inference(&mut self, w: &World) {
        let r = self.serve(w);
        let v = self.payer.voucher(&w.renter, &r).unwrap();
        self.payee.accept(&v).unwrap();
        self.settle(w).unwrap().unwrap();
    }
}

#[test]
fn a_session_of_n_inferences_pays_n_times_the_price_and_refunds_the_rest() {
    let w = World::new();
    let mut s = w.session();
    assert_eq!(w.renter_tokens(), FUNDS - BUDGET);
    let n = 7;
    for _ in 0..n {
        s.paid_inference(&w);
    }
    assert_eq!(w.provider_tokens(), n * PRICE);
    assert_eq!(s.payer.settlements().len(), n as usize);
    s.payer.recover(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - n * PRICE);
    assert!(w.chain.account(&s.terms.escrow).unwrap().is_none(), "the emptied escrow is closed for its rent");
}

#[test]
fn settling_every_few_inferences_pays_the_newest_voucher_once() {
    let w = World::new();
    let mut s = w.session();
    for _ in 0..3 {
        let r = s.serve(&w);
        let v = s.payer.voucher(&w.renter, &r).unwrap();
        s.payee.accept(&v).unwrap();
    }
    assert_eq!(s.payee.unsettled(), (3, 3 * PRICE));
    s.settle(&w).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 3 * PRICE);
    assert_eq!(s.payee.unsettled(), (0, 0));
    assert_eq!(s.settle(&w).unwrap(), None, "nothing more to settle");
    s.paid_inference(&w);
    assert_eq!(w.provider_tokens(), 4 * PRICE);
}

#[test]
fn bad_vouchers_are_each_refused() {
    let w = World::new();
    let mut s = w.session();
    let r1 = s.serve(&w);
    let v1 = s.payer.voucher(&w.renter, &r1).unwrap();

    // Tampered: a larger amount, or a signature flipped.
    let mut more = v1.clone();
    more.cumulative += PRICE;
    assert!(matches!(s.payee.accept(&more), Err(PayError::Amount { .. })));
    let mut flipped = v1.clone();
    flipped.signature.0[0] ^= 1;
    assert_eq!(s.payee.accept(&flipped), Err(PayError::BadSignature));
    // Signed by someone else than the renter.
    let mut forged = v1.clone();
    forged.signature = proto::Keypair::generate().sign(b"anything");
    assert_eq!(s.payee.accept(&forged), Err(PayError::BadSignature));
    // For a receipt never signed.
    let mut unknown = v1.clone();
    unknown.sequence = 9;
    assert_eq!(s.payee.accept(&unknown), Err(PayError::UnknownReceipt(9)));
    // For another session: same renter and provider, another escrow.
    let mut other = w.session();
    let v_other = other.payer.voucher(&w.renter, &r1).unwrap();
    assert_eq!(
        s.payee.accept(&v_other),
        Err(PayError::StaleNonce {
            want: Hash::new_from_array(v1.nonce).to_string(),
            got: Hash::new_from_array(v_other.nonce).to_string(),
        })
    );
    let mut v_other_here = v_other.clone();
    v_other_here.nonce = v1.nonce;
    assert_eq!(s.payee.accept(&v_other_here), Err(PayError::BadSignature));

    // The real one passes; sent again (a retried request) it changes nothing and pays once.
    s.payee.accept(&v1).unwrap();
    s.payee.accept(&v1).unwrap();
    s.settle(&w).unwrap().unwrap();
    s.payee.accept(&v1).unwrap();
    assert_eq!(s.settle(&w).unwrap(), None);

    // An old voucher on a spent nonce, made newer by its sequence, is refused too.
    let r2 = s.serve(&w);
    let mut stale = v1.clone();
    stale.sequence = r2.sequence;
    stale.cumulative = r2.amount_due;
    assert!(matches!(s.payee.accept(&stale), Err(PayError::StaleNonce { .. })));
    // Once a newer voucher is in, an older one is a replay.
    let v2 = s.payer.voucher(&w.renter, &r2).unwrap();
    s.payee.accept(&v2).unwrap();
    assert_eq!(s.payee.accept(&v1), Err(PayError::NotNewer { have: 2, got: 1 }));
    s.settle(&w).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 2 * PRICE);
}

#[test]
fn a_voucher_over_budget_is_refused_by_both_sides_and_the_provider_stops_first() {
    let w = World::new();
    let mut s = w.session();
    let n = BUDGET / PRICE;
    for _ in 0..n {
        s.paid_inference(&w);
    }
    // The budget is spent: the provider will not serve another inference.
    let err = s.payee.may_serve((n + 1) * PRICE, 1).unwrap_err();
    assert!(err.contains("budget"), "{err}");
    // Nor will the renter sign, or the provider accept, past the budget.
    let r = s.serve(&w);
    assert!(matches!(s.payer.voucher(&w.renter, &r), Err(PayError::OverBudget { .. })));
    let v = proto::voucher::Voucher {
        sequence: r.sequence,
        cumulative: r.amount_due,
        nonce: s.payer.refund().unwrap().nonce,
        signature: w.renter.sign(b"x"),
    };
    assert!(matches!(s.payee.accept(&v), Err(PayError::OverBudget { .. })));
    assert_eq!(w.provider_tokens(), BUDGET);
}

#[test]
fn receipts_out_of_order_or_tampered_are_refused_before_any_voucher() {
    let w = World::new();
    let mut s = w.session();
    let mut checker = proto::receipt::Checker::new(s.session_id, w.provider.public(), w.renter.public(), PRICE);
    let r1 = s.serve(&w);
    let r2 = s.serve(&w);
    assert!(checker.check(&r2, b"request", b"response").is_err(), "out of order");
    let mut tampered = r1.clone();
    tampered.amount_due += 1;
    assert!(checker.check(&tampered, b"request", b"response").is_err(), "tampered");
    checker.check(&r1, b"request", b"response").unwrap();
    checker.check(&r2, b"request", b"response").unwrap();
}

#[test]
fn the_provider_cannot_collect_more_than_the_voucher_says() {
    let w = World::new();
    let mut s = w.session();
    let r = s.serve(&w);
    let v = s.payer.voucher(&w.renter, &r).unwrap();
    // The provider rewrites the transfer to ten times the amount and keeps the renter's
    // signature: the chain refuses it.
    let msg = s.terms.voucher_message(&Hash::new_from_array(v.nonce), 10 * PRICE, &r.digest()).unwrap();
    let mut tx = solana_sdk::transaction::Transaction::new_unsigned(msg.clone());
    let mine = w.provider.sign(&msg.serialize());
    tx.signatures = vec![mine.0.into(), v.signature.0.into()];
    assert!(w.chain.send(&tx).is_err());
    assert_eq!(w.provider_tokens(), 0);
}

#[test]
fn the_renter_cannot_void_a_voucher_it_signed() {
    let w = World::new();
    let mut s = w.session();
    let r = s.serve(&w);
    let v = s.payer.voucher(&w.renter, &r).unwrap();
    s.payee.accept(&v).unwrap();
    // Advancing the nonce would void the voucher; only the provider is its authority.
    let advance = solana_system_interface::instruction::advance_nonce_account(
        &s.terms.nonce_account,
        &signer(&w.renter).pubkey(),
    );
    assert!(token::send(&w.chain, &[advance], &[&signer(&w.renter)]).is_err());
    // Nor can it take the escrow back alone.
    let back = spl_token_interface::instruction::transfer_checked(
        &spl_token_interface::id(),
        &s.terms.escrow,
        &s.terms.mint,
        &token::token_account(&signer(&w.renter).pubkey(), &w.mint),
        &s.terms.multisig,
        &[&signer(&w.renter).pubkey()],
        BUDGET,
        6,
    )
    .unwrap();
    assert!(token::send(&w.chain, &[back], &[&signer(&w.renter)]).is_err());
    s.settle(&w).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), PRICE);
}

#[test]
fn a_provider_crash_between_submit_and_confirm_pays_nothing_twice() {
    let w = World::new();
    let mut s = w.session();
    s.paid_inference(&w);
    let r = s.serve(&w);
    let v = s.payer.voucher(&w.renter, &r).unwrap();
    s.payee.accept(&v).unwrap();
    // The provider saves its state, sends, and dies before it learns the outcome: what is on
    // disk is the state saved just before sending.
    let mut on_disk = None;
    let _ = s.payee.settle(&w.chain, &w.provider, &mut |p| {
        if on_disk.is_none() {
            on_disk = Some(serde_json::to_string(p).unwrap());
        }
        Ok(())
    });
    assert_eq!(w.provider_tokens(), 2 * PRICE);
    // Restarted from disk: it finishes the settlement, sending it again, and is paid once.
    let mut restarted: Payee = serde_json::from_str(&on_disk.unwrap()).unwrap();
    let settled = restarted.resume(&w.chain, &w.provider, &mut |_| Ok(())).unwrap().unwrap();
    assert_eq!(settled.paid, 2 * PRICE);
    assert_eq!(w.provider_tokens(), 2 * PRICE);
    // And settling again, or resuming again, pays nothing.
    assert_eq!(restarted.settle(&w.chain, &w.provider, &mut |_| Ok(())).unwrap(), None);
    assert_eq!(restarted.resume(&w.chain, &w.provider, &mut |_| Ok(())).unwrap(), None);
    assert_eq!(w.provider_tokens(), 2 * PRICE);

    // A crash before the transaction reached the chain: the restart sends it, once.
    s.payer.settled(&w.chain, &settled).unwrap();
    let r = s.serve(&w);
    restarted.served(&r);
    let v = s.payer.voucher(&w.renter, &r).unwrap();
    restarted.accept(&v).unwrap();
    let mut before_send = None;
    let chain_down = FailingChain(&w.chain);
    let _ = restarted.settle(&chain_down, &w.provider, &mut |p| {
        before_send.get_or_insert_with(|| p.clone());
        Ok(())
    });
    assert_eq!(w.provider_tokens(), 2 * PRICE, "nothing reached the chain");
    let mut again = before_send.unwrap();
    again.resume(&w.chain, &w.provider, &mut |_| Ok(())).unwrap().unwrap();
    again.resume(&w.chain, &w.provider, &mut |_| Ok(())).unwrap();
    assert_eq!(w.provider_tokens(), 3 * PRICE);
}

/// A chain that cannot be reached for sending.
#[derive(Debug)]
struct FailingChain<'a>(&'a LocalChain);

impl Chain for FailingChain<'_> {
    fn latest_blockhash(&self) -> Result<Hash, settlement::ChainError> {
        self.0.latest_blockhash()
    }
    fn send(
        &self,
        _: &solana_sdk::transaction::Transaction,
    ) -> Result<solana_sdk::signature::Signature, settlement::ChainError> {
        Err(settlement::ChainError::Unreachable("connection refused".into()))
    }
    fn status(&self, s: &solana_sdk::signature::Signature) -> Result<settlement::Status, settlement::ChainError> {
        self.0.status(s)
    }
    fn account(
        &self,
        key: &solana_sdk::pubkey::Pubkey,
    ) -> Result<Option<solana_sdk::account::Account>, settlement::ChainError> {
        self.0.account(key)
    }
    fn rent(&self, len: usize) -> Result<u64, settlement::ChainError> {
        self.0.rent(len)
    }
    fn is_blockhash_valid(&self, h: &solana_sdk::hash::Hash) -> Result<bool, settlement::ChainError> {
        self.0.is_blockhash_valid(h)
    }
    fn airdrop(&self, to: &solana_sdk::pubkey::Pubkey, lamports: u64) -> Result<(), settlement::ChainError> {
        self.0.airdrop(to, lamports)
    }
}

#[test]
fn a_renter_that_vanishes_leaves_every_signed_inference_payable() {
    let w = World::new();
    let mut s = w.session();
    // Vouchers come in, the policy settles nothing yet, then the renter is gone.
    for _ in 0..5 {
        let r = s.serve(&w);
        let v = s.payer.voucher(&w.renter, &r).unwrap();
        s.payee.accept(&v).unwrap();
    }
    // A sixth inference served, never vouched: that is the provider's exposure (one inference).
    s.serve(&w);
    assert!(s.payee.may_serve(7 * PRICE, 1).is_err(), "no seventh without a voucher");
    let settled = s.payee.settle(&w.chain, &w.provider, &mut |_| Ok(())).unwrap().unwrap();
    assert_eq!(settled.paid, 5 * PRICE);
    assert_eq!(w.provider_tokens(), 5 * PRICE);
}

#[test]
fn a_provider_that_vanishes_leaves_the_renter_able_to_recover_the_rest() {
    let w = World::new();
    // Before any settlement: the refund signed at open returns everything.
    let s = w.session();
    s.payer.recover(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS);

    // After some settlements and a voucher never settled: the renter gets all but what was
    // settled; the unsettled voucher is void (the provider's exposure, bounded by its policy).
    let mut s = w.session();
    s.paid_inference(&w);
    s.paid_inference(&w);
    let r = s.serve(&w);
    let v = s.payer.voucher(&w.renter, &r).unwrap();
    s.payee.accept(&v).unwrap();
    s.payer.recover(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - 2 * PRICE);
    assert_eq!(w.provider_tokens(), 2 * PRICE);
    assert!(s.settle(&w).is_err(), "the escrow is closed");
    assert_eq!(w.provider_tokens(), 2 * PRICE);
}

#[test]
fn a_refund_that_does_not_return_everything_is_refused() {
    let w = World::new();
    let mut s = w.session();
    s.paid_inference(&w);
    let mut short = s.payee.refund(&w.provider).unwrap();
    short.amount -= 1;
    assert!(matches!(s.payer.accept_refund(&short), Err(PayError::BadRefund(_))));
    let mut forged = s.payee.refund(&w.provider).unwrap();
    forged.signature.0[5] ^= 1;
    assert!(matches!(s.payer.accept_refund(&forged), Err(PayError::BadRefund(_))));
}

#[test]
fn an_escrow_not_as_promised_is_refused() {
    let w = World::new();
    let s = w.session();
    let mut t = s.terms.wire();
    t.budget = BUDGET + 1;
    assert!(matches!(Payee::open(&w.chain, w.renter.public(), w.provider.public(), t), Err(PayError::Escrow(_))));
    // A provider that is not in the multisig.
    let stranger = proto::Keypair::generate();
    assert!(Payee::open(&w.chain, w.renter.public(), stranger.public(), s.terms.wire()).is_err());
    let mut t = s.terms.wire();
    t.nonce_account = t.account;
    assert!(Payee::open(&w.chain, w.renter.public(), w.provider.public(), t).is_err());
}

#[test]
fn nothing_is_served_before_the_deposit_and_the_refund_comes_first() {
    let w = World::new();
    let terms = settlement::create_escrow(&w.chain, &signer(&w.renter), &signer(&w.provider).pubkey(), &w.mint, BUDGET)
        .unwrap();
    let mut payer = Payer::new(&w.chain, terms.clone()).unwrap();
    let mut payee = Payee::open(&w.chain, w.renter.public(), w.provider.public(), terms.wire()).unwrap();
    assert!(payee.check_funded(&w.chain).is_err());
    assert!(payee.may_serve(PRICE, 1).unwrap_err().contains("budget yet"));
    // The renter takes the refund of the whole budget before it deposits.
    payer.accept_refund(&payee.refund(&w.provider).unwrap()).unwrap();
    settlement::fund_escrow(&w.chain, &signer(&w.renter), &terms).unwrap();
    payee.check_funded(&w.chain).unwrap();
    payee.may_serve(PRICE, 1).unwrap();
    // The provider vanishes at once: the renter has it all back.
    payer.recover(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS);
}

#[test]
fn the_local_chain_never_runs_a_nonce_instruction_against_an_older_block() {
    let w = World::new();
    let s = w.session();
    let old = w.chain.latest_blockhash().unwrap();
    w.chain.airdrop(&Keypair::new().pubkey(), 10_000_000).unwrap();
    let (_, before) = settlement::pay::read_nonce(&w.chain, &s.terms.nonce_account).unwrap();
    // A provider trying to rewind the nonce to an earlier block's value (to replay old
    // vouchers) is refused.
    let provider = signer(&w.provider);
    let advance =
        solana_system_interface::instruction::advance_nonce_account(&s.terms.nonce_account, &provider.pubkey());
    let tx = solana_sdk::transaction::Transaction::new_signed_with_payer(
        &[advance],
        Some(&provider.pubkey()),
        &[&provider],
        old,
    );
    assert!(w.chain.send(&tx).is_err());
    assert_eq!(settlement::pay::read_nonce(&w.chain, &s.terms.nonce_account).unwrap().1, before);
    // An ordinary transaction signed against that block still runs, as on a cluster.
    let pay = solana_system_interface::instruction::transfer(&provider.pubkey(), &Keypair::new().pubkey(), 1_000_000);
    let tx = solana_sdk::transaction::Transaction::new_signed_with_payer(
        &[pay],
        Some(&provider.pubkey()),
        &[&provider],
        old,
    );
    w.chain.send(&tx).unwrap();
}

#[test]
fn tokens_sent_into_the_escrow_from_outside_neither_block_the_refund_nor_skew_payments() {
    let w = World::new();
    let mut s = w.session();
    s.paid_inference(&w);
    // Anyone can send tokens to any token account: 3 units land in the escrow from outside.
    let renter = signer(&w.renter);
    let dust = spl_token_interface::instruction::transfer_checked(
        &spl_token_interface::id(),
        &token::token_account(&renter.pubkey(), &w.mint),
        &w.mint,
        &s.terms.escrow,
        &renter.pubkey(),
        &[],
        3,
        6,
    )
    .unwrap();
    token::send(&w.chain, &[dust], &[&renter]).unwrap();
    s.paid_inference(&w);
    s.paid_inference(&w);
    assert_eq!(w.provider_tokens(), 3 * PRICE, "each settlement counted exactly");
    assert_eq!(s.payer.paid(), 3 * PRICE);
    s.payer.recover(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - 3 * PRICE - 3, "the rest came back; the 3 stay in the account");
    let escrow = token::token_state(&w.chain, &s.terms.escrow).unwrap();
    assert_eq!((escrow.owner, escrow.amount), (renter.pubkey(), 3), "and that account is now the renter's");
}
