//! The money invariants of the payment channel, on the in-process chain: the real SVM, the real
//! SPL programs, the Ed25519 precompile and our program as `scripts/build-paychan.sh` built it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use proto::voucher::Voucher;
use settlement::channel::{self, DEFAULT_WINDOW_SECS, LOCAL_PROGRAM_ID};
use settlement::token::{self, ensure_token_account, mint_to, token_balance};
use settlement::{Chain, ChainError, Ids, LocalChain, PayError, Payee, Payer, signer, wire_key};
use solana_sdk::signature::{Keypair, Signer};

const PRICE: u64 = 100;
const DEPOSIT: u64 = 10_000;
const FUNDS: u64 = 50_000;

struct World {
    chain: LocalChain,
    issuer: Keypair,
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
        World { chain, issuer, renter, provider, mint }
    }

    fn ids(&self, id: u64) -> Ids {
        Ids {
            program: settlement::wire_address(&LOCAL_PROGRAM_ID),
            renter: self.renter.public(),
            provider: self.provider.public(),
            mint: wire_key(&self.mint),
            id,
        }
    }

    fn renter_tokens(&self) -> u64 {
        token_balance(&self.chain, &token::token_account(&signer(&self.renter).pubkey(), &self.mint)).unwrap()
    }

    fn provider_tokens(&self) -> u64 {
        token_balance(&self.chain, &token::token_account(&signer(&self.provider).pubkey(), &self.mint)).unwrap()
    }

    /// Opens channel `id` (the renter's side) and the provider's view of it.
    fn pair(&self, id: u64) -> (Payer, Payee) {
        let payer = Payer::ensure(&self.chain, &self.renter, self.ids(id), None, DEPOSIT, 0).unwrap();
        let payee = Payee::open(&self.chain, self.ids(id), None).unwrap();
        (payer, payee)
    }
}

/// A receipt digest standing for the provider's receipt of call `n`.
fn digest(n: u64) -> [u8; 32] {
    let mut d = [0; 32];
    d[..8].copy_from_slice(&n.to_le_bytes());
    d
}

/// `n` inferences, each vouched for by the renter and taken by the provider.
fn serve(w: &World, payer: &mut Payer, payee: &mut Payee, base: u64, n: u64) -> Voucher {
    let mut last = None;
    for i in 1..=n {
        let want = base + i * PRICE;
        let v = payer.sign(&w.renter, want, digest(i)).unwrap();
        payee.accept(&v, want, &digest(i)).unwrap();
        last = Some(v);
    }
    last.unwrap()
}

#[test]
fn a_channel_pays_the_provider_its_newest_voucher_once_and_returns_the_rest_after_the_window() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    assert_eq!(w.renter_tokens(), FUNDS - DEPOSIT);
    serve(&w, &mut payer, &mut payee, 0, 7);
    // One claim for seven inferences; a second claim of the same voucher pays nothing.
    let claimed = payee.claim(&w.chain, &w.provider).unwrap().expect("a claim");
    assert_eq!(claimed.cumulative, 7 * PRICE);
    assert_eq!(payee.claim(&w.chain, &w.provider).unwrap(), None);
    assert_eq!(w.provider_tokens(), 7 * PRICE);
    // Three more, claimed: the claim pays only the difference.
    serve(&w, &mut payer, &mut payee, 7 * PRICE, 3);
    payee.claim(&w.chain, &w.provider).unwrap().expect("a claim");
    assert_eq!(w.provider_tokens(), 10 * PRICE);

    payer.start_close(&w.chain, &w.renter).unwrap();
    assert!(matches!(payer.finalize(&w.chain, &w.renter), Err(PayError::Chain(ChainError::Failed(_)))));
    w.chain.advance_clock(DEFAULT_WINDOW_SECS + 1);
    payer.finalize(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - 10 * PRICE);
    assert_eq!(channel::read(&w.chain, &w.ids(0).channel()).unwrap(), None, "closed, rent returned");
}

#[test]
fn bad_vouchers_are_each_refused_by_the_provider_before_the_chain_sees_them() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    let good = payer.sign(&w.renter, PRICE, digest(1)).unwrap();

    let mut tampered = good;
    tampered.cumulative += 1;
    assert_eq!(payee.accept(&tampered, PRICE + 1, &digest(1)), Err(PayError::BadSignature));
    let mut other_receipt = good;
    other_receipt.receipt_digest = digest(9);
    assert_eq!(payee.accept(&other_receipt, PRICE, &digest(9)), Err(PayError::BadSignature));
    assert_eq!(payee.accept(&good, PRICE, &digest(2)), Err(PayError::WrongReceipt));
    assert_eq!(payee.accept(&good, 2 * PRICE, &digest(1)), Err(PayError::Amount { want: 2 * PRICE, got: PRICE }));
    // Signed by someone else, or for another channel of the same two parties.
    let stranger = proto::Keypair::generate();
    let mut forged = good;
    forged.signature =
        stranger.sign(&channel::voucher_message(&w.ids(0).channel(), payee.generation, PRICE, &digest(1)));
    assert_eq!(payee.accept(&forged, PRICE, &digest(1)), Err(PayError::BadSignature));
    let (mut other, _) = w.pair(1);
    let elsewhere = other.sign(&w.renter, PRICE, digest(1)).unwrap();
    assert_eq!(payee.accept(&elsewhere, PRICE, &digest(1)), Err(PayError::BadSignature));

    payee.accept(&good, PRICE, &digest(1)).unwrap();
    assert_eq!(payee.accept(&good, PRICE, &digest(1)), Ok(()), "the same voucher again is a no-op");
    let older = payer.sign(&w.renter, PRICE, digest(1)).unwrap();
    assert_eq!(older, good, "ed25519 is deterministic");
    // Over the deposit: the renter will not sign it, nor the provider take it.
    assert!(matches!(payer.sign(&w.renter, DEPOSIT + 1, digest(2)), Err(PayError::OverDeposit { .. })));
    assert!(matches!(payer.sign(&w.renter, 0, digest(2)), Err(PayError::Backwards { .. })));
}

#[test]
fn the_provider_cannot_claim_more_than_the_renter_signed() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    let v = serve(&w, &mut payer, &mut payee, 0, 2);
    // The provider edits the amount of the voucher it holds: the chain's Ed25519 check and
    // the program's comparison of the signed message refuse it, and nothing moves.
    let on = channel::read(&w.chain, &w.ids(0).channel()).unwrap().unwrap();
    let more = channel::Voucher { cumulative: 50 * PRICE, receipt_digest: v.receipt_digest, signature: v.signature.0 };
    assert!(channel::claim(&w.chain, &signer(&w.provider), &w.ids(0).channel(), &on, &more).is_err());
    assert_eq!(w.provider_tokens(), 0);
    payee.claim(&w.chain, &w.provider).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 2 * PRICE);
}

#[test]
fn one_deposit_backs_one_channel_and_vouchers_count_across_its_sessions() {
    // Finding: one escrow deposit could back several sessions. A channel's vouchers are
    // cumulative over every session on it, so a second session continues from the first's
    // newest voucher and can never be paid from the same tokens twice.
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    serve(&w, &mut payer, &mut payee, 0, 3);
    // The next session: both sides start from the newest voucher they hold.
    let mut payer2 = Payer::ensure(&w.chain, &w.renter, w.ids(0), Some(payer.clone()), DEPOSIT, 0).unwrap();
    let mut payee2 = Payee::open(&w.chain, w.ids(0), Some(payee.clone())).unwrap();
    assert_eq!((payer2.vouched, payee2.vouched()), (3 * PRICE, 3 * PRICE));
    serve(&w, &mut payer2, &mut payee2, 3 * PRICE, 2);
    payee2.claim(&w.chain, &w.provider).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 5 * PRICE);
    assert_eq!(w.renter_tokens(), FUNDS - DEPOSIT, "one deposit");
}

#[test]
fn a_party_that_lost_its_record_takes_the_others_copy_of_the_newest_voucher() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    let newest = serve(&w, &mut payer, &mut payee, 0, 4);
    // The renter lost its ledger: it checks its own signature on the provider's copy.
    let mut fresh = Payer::ensure(&w.chain, &w.renter, w.ids(0), None, DEPOSIT, 0).unwrap();
    assert_eq!(fresh.vouched, 0);
    fresh.adopt(&newest).unwrap();
    assert_eq!(fresh.vouched, 4 * PRICE);
    // A copy the renter never signed is refused.
    let mut forged = newest;
    forged.cumulative = 9 * PRICE;
    assert_eq!(fresh.adopt(&forged), Err(PayError::BadSignature));
    // The provider lost its record: it takes the renter's.
    let mut restarted = Payee::open(&w.chain, w.ids(0), None).unwrap();
    restarted.adopt(&newest).unwrap();
    assert_eq!(restarted.vouched(), 4 * PRICE);
    assert_eq!(restarted.adopt(&forged), Err(PayError::BadSignature));
    restarted.claim(&w.chain, &w.provider).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 4 * PRICE);
}

#[test]
fn a_renter_whose_provider_vanished_or_refused_its_last_voucher_gets_the_rest_back() {
    // Finding: a close whose last voucher was refused got no refund. The renter closes on its
    // own: after the window, everything not claimed comes back.
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    serve(&w, &mut payer, &mut payee, 0, 2);
    payee.claim(&w.chain, &w.provider).unwrap().unwrap();
    payer.sign(&w.renter, 3 * PRICE, digest(3)).unwrap();
    payer.start_close(&w.chain, &w.renter).unwrap();
    w.chain.advance_clock(DEFAULT_WINDOW_SECS + 1);
    payer.finalize(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - 2 * PRICE);
    assert_eq!(w.provider_tokens(), 2 * PRICE);
}

#[test]
fn a_renter_that_starts_a_close_still_pays_every_voucher_the_watcher_claims_in_the_window() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    serve(&w, &mut payer, &mut payee, 0, 5);
    payer.start_close(&w.chain, &w.renter).unwrap();
    // The provider's watcher reads the channel, sees the close, claims at once.
    assert_eq!(payee.refresh(&w.chain), Ok(()));
    assert!(payee.closing());
    payee.claim(&w.chain, &w.provider).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 5 * PRICE);
    // A session on a closing channel is refused on both sides.
    assert!(matches!(Payee::open(&w.chain, w.ids(0), None), Err(PayError::Closing(_))));
    assert!(matches!(
        Payer::ensure(&w.chain, &w.renter, w.ids(0), Some(payer.clone()), DEPOSIT, 0),
        Err(PayError::Closing(_))
    ));
    w.chain.advance_clock(DEFAULT_WINDOW_SECS + 1);
    payer.finalize(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - 5 * PRICE);
}

#[test]
fn vouchers_of_a_closed_channel_never_pay_on_the_channel_reopened_at_its_address() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    let old = serve(&w, &mut payer, &mut payee, 0, 3);
    payer.start_close(&w.chain, &w.renter).unwrap();
    w.chain.advance_clock(DEFAULT_WINDOW_SECS + 1);
    payer.finalize(&w.chain, &w.renter).unwrap();
    // Same address, a new generation.
    let (_, mut reopened) = w.pair(0);
    assert_ne!(reopened.generation, payee.generation);
    assert_eq!(reopened.adopt(&old), Err(PayError::BadSignature));
    assert_eq!(reopened.accept(&old, 3 * PRICE, &old.receipt_digest), Err(PayError::BadSignature));
    // Claimed directly, the chain refuses it too.
    let c = w.ids(0).channel();
    let on = channel::read(&w.chain, &c).unwrap().unwrap();
    let v =
        channel::Voucher { cumulative: old.cumulative, receipt_digest: old.receipt_digest, signature: old.signature.0 };
    assert!(channel::claim(&w.chain, &signer(&w.provider), &c, &on, &v).is_err());
    // And the saved state of the old generation is dropped, not carried over.
    let carried = Payee::open(&w.chain, w.ids(0), Some(payee.clone())).unwrap();
    assert_eq!(carried.newest, None);
}

#[test]
fn tokens_sent_into_the_vault_from_outside_block_nothing_and_go_back_to_the_renter() {
    // Finding: one token unit of dust sent to the escrow blocked the session.
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    let vault = w.ids(0).channel().vault();
    mint_to(&w.chain, &w.issuer, &w.mint, &vault, 1).unwrap();
    serve(&w, &mut payer, &mut payee, 0, 2);
    payee.claim(&w.chain, &w.provider).unwrap().unwrap();
    assert_eq!(w.provider_tokens(), 2 * PRICE);
    payer.start_close(&w.chain, &w.renter).unwrap();
    w.chain.advance_clock(DEFAULT_WINDOW_SECS + 1);
    payer.finalize(&w.chain, &w.renter).unwrap();
    assert_eq!(w.renter_tokens(), FUNDS - 2 * PRICE + 1, "the dust too");
}

#[test]
fn a_channel_is_topped_up_back_to_its_deposit_only_when_it_runs_low() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    serve(&w, &mut payer, &mut payee, 0, 40);
    // Plenty left: the next session needs nothing on the chain.
    let again = Payer::ensure(&w.chain, &w.renter, w.ids(0), Some(payer.clone()), DEPOSIT, DEPOSIT / 2).unwrap();
    assert_eq!(again.transactions.len(), 1, "only the open");
    serve(&w, &mut payer, &mut payee, 40 * PRICE, 50);
    assert_eq!(payer.room(), DEPOSIT - 90 * PRICE);
    let topped = Payer::ensure(&w.chain, &w.renter, w.ids(0), Some(payer), DEPOSIT, DEPOSIT / 2).unwrap();
    assert_eq!(topped.room(), DEPOSIT);
    assert_eq!(topped.transactions.len(), 2, "the open and one top-up");
    assert_eq!(w.renter_tokens(), FUNDS - (DEPOSIT + 90 * PRICE));
    payee.refresh(&w.chain).unwrap();
    assert_eq!(payee.deposited, DEPOSIT + 90 * PRICE);
}

/// A chain whose sends land and whose answers are lost.
#[derive(Debug)]
struct LosesAnswers<'a>(&'a LocalChain);

impl Chain for LosesAnswers<'_> {
    fn latest_blockhash(&self) -> Result<solana_sdk::hash::Hash, ChainError> {
        self.0.latest_blockhash()
    }
    fn send(&self, tx: &solana_sdk::transaction::Transaction) -> Result<solana_sdk::signature::Signature, ChainError> {
        let _ = self.0.send(tx);
        Err(ChainError::Unreachable("the answer was lost".into()))
    }
    fn status(&self, s: &solana_sdk::signature::Signature) -> Result<settlement::Status, ChainError> {
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
fn a_claim_whose_answer_was_lost_is_found_on_the_chain_and_never_pays_twice() {
    let w = World::new();
    let (mut payer, mut payee) = w.pair(0);
    serve(&w, &mut payer, &mut payee, 0, 4);
    assert_eq!(payee.claim(&LosesAnswers(&w.chain), &w.provider), Ok(None));
    assert_eq!(payee.claimed, 4 * PRICE, "read back from the chain");
    assert_eq!(payee.claim(&w.chain, &w.provider), Ok(None));
    assert_eq!(w.provider_tokens(), 4 * PRICE);
}

#[test]
fn a_channel_that_is_not_the_programs_is_refused() {
    let w = World::new();
    // Nothing there.
    assert!(matches!(Payee::open(&w.chain, w.ids(5), None), Err(PayError::NoChannel(_))));
    // Another program's id: the provider derives its own address and finds nothing, and the
    // renter cannot open in a program that does not exist.
    let mut ids = w.ids(0);
    ids.program = proto::Keypair::generate().public().into();
    assert!(Payer::ensure(&w.chain, &w.renter, ids, None, DEPOSIT, 0).is_err());
    assert!(matches!(Payee::open(&w.chain, ids, None), Err(PayError::NoChannel(_))));
}

#[test]
fn the_chains_clock_is_what_a_window_is_measured_by() {
    let w = World::new();
    let before = channel::chain_time(&w.chain).unwrap();
    assert_eq!(before, w.chain.unix_time());
    w.chain.advance_clock(100);
    assert!(channel::chain_time(&w.chain).unwrap() >= before + 100);
}
