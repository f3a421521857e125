//! Settlement benchmarks, each beside its baseline from the same run:
//! - receipts plus vouchers per second on one core (provider signs a receipt, renter checks it
//!   and signs a voucher, provider checks the voucher), against receipts alone (an unpaid
//!   session's cost);
//! - settlements per second on the in-process chain (accept a voucher, co-sign, run it on the
//!   SVM: nonce advance, Memo, multisig transfer; read the escrow back), against plain SPL token
//!   transfers on the same chain;
//! - fee lamports per inference for each settlement policy, from the provider's SOL balance
//!   over a 200-inference session.
//!
//! Run: `cargo bench -p settlement --bench settlement`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use proto::receipt::{Checker, Counts, Signer as ReceiptSigner};
use settlement::token::{self, ensure_token_account, mint_to};
use settlement::{Chain, LocalChain, Payee, Payer, Policy, open_escrow, signer};
use solana_sdk::signature::{Keypair, Signer};

const PRICE: u64 = 100;

struct World {
    chain: LocalChain,
    issuer: Keypair,
    renter: proto::Keypair,
    provider: proto::Keypair,
    mint: solana_sdk::pubkey::Pubkey,
}

fn world() -> World {
    let chain = LocalChain::new();
    let (issuer, renter, provider) = (Keypair::new(), proto::Keypair::generate(), proto::Keypair::generate());
    for k in [issuer.pubkey(), signer(&renter).pubkey(), signer(&provider).pubkey()] {
        chain.airdrop(&k, 1_000_000_000_000).unwrap();
    }
    let mint = token::create_mint(&chain, &issuer, &issuer.pubkey(), 6).unwrap();
    let r = ensure_token_account(&chain, &signer(&renter), &signer(&renter).pubkey(), &mint).unwrap();
    ensure_token_account(&chain, &signer(&provider), &signer(&provider).pubkey(), &mint).unwrap();
    mint_to(&chain, &issuer, &mint, &r, u64::MAX / 4).unwrap();
    World { chain, issuer, renter, provider, mint }
}

fn session(w: &World, budget: u64) -> (Payer, Payee) {
    let terms = open_escrow(&w.chain, &signer(&w.renter), &signer(&w.provider).pubkey(), &w.mint, budget).unwrap();
    let mut payer = Payer::new(&w.chain, terms.clone()).unwrap();
    let mut payee = Payee::open(&w.chain, w.renter.public(), w.provider.public(), terms.wire()).unwrap();
    payee.check_funded(&w.chain).unwrap();
    payer.accept_refund(&payee.refund(&w.provider).unwrap()).unwrap();
    (payer, payee)
}

fn per_second(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn receipts_and_vouchers() {
    let w = world();
    let n = 5_000u64;
    let call = Counts { inferences: 1, fuel: 1_000_000, invocations: 4096, ..Counts::default() };

    // Baseline: an unpaid session still signs and checks a receipt per inference.
    let (provider, renter) = (&w.provider, w.renter.public());
    let mut signer_ = ReceiptSigner::new([1; 16], renter, PRICE);
    let mut checker = Checker::new([1; 16], provider.public(), renter, PRICE);
    let t = Instant::now();
    for _ in 0..n {
        let r = signer_.next(provider, &call, b"request", b"response");
        checker.check(&r, b"request", b"response").unwrap();
    }
    let receipts = per_second(n, t.elapsed());

    // Paid: the same, plus the renter's voucher and the provider's check of it.
    let (mut payer, mut payee) = session(&w, u64::MAX / 8);
    let mut signer_ = ReceiptSigner::new([2; 16], renter, PRICE);
    let mut checker = Checker::new([2; 16], provider.public(), renter, PRICE);
    let t = Instant::now();
    for _ in 0..n {
        let r = signer_.next(provider, &call, b"request", b"response");
        payee.served(&r);
        checker.check(&r, b"request", b"response").unwrap();
        let v = payer.voucher(&w.renter, &r).unwrap();
        payee.accept(&v).unwrap();
    }
    let paid = per_second(n, t.elapsed());
    println!("receipts + vouchers per second, one core, {n} inferences");
    println!("  {:<44} {:>12}", "", "per second");
    println!("  {:<44} {:>12.0}", "receipt signed + checked (baseline, unpaid)", receipts);
    println!("  {:<44} {:>12.0}", "receipt + voucher signed + both checked", paid);
    println!("  voucher overhead: {:.1} us per inference", (1e6 / paid) - (1e6 / receipts));
}

fn settlements() {
    let w = world();
    let rounds = 2_000u64;
    // Baseline: plain SPL transfers (one signature, no nonce, no memo) on the same chain.
    let r = token::token_account(&signer(&w.renter).pubkey(), &w.mint);
    let p = token::token_account(&signer(&w.provider).pubkey(), &w.mint);
    let renter = signer(&w.renter);
    let t = Instant::now();
    for i in 0..rounds {
        let ix = spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &r,
            &w.mint,
            &p,
            &renter.pubkey(),
            &[],
            1 + i,
            6,
        )
        .unwrap();
        token::send(&w.chain, &[ix], &[&renter]).unwrap();
    }
    let transfers = per_second(rounds, t.elapsed());

    // Settlements: each inference vouched and settled at once (the `every` policy).
    let (mut payer, mut payee) = session(&w, u64::MAX / 8);
    let mut receipts = ReceiptSigner::new([3; 16], w.renter.public(), PRICE);
    let call = Counts { inferences: 1, ..Counts::default() };
    let mut chain_time = Duration::ZERO;
    let t = Instant::now();
    for _ in 0..rounds {
        let r = receipts.next(&w.provider, &call, b"q", b"a");
        payee.served(&r);
        payee.accept(&payer.voucher(&w.renter, &r).unwrap()).unwrap();
        let c = Instant::now();
        let s = payee.settle(&w.chain, &w.provider, &mut |_| Ok(())).unwrap().unwrap();
        chain_time += c.elapsed();
        payer.settled(&w.chain, &s).unwrap();
    }
    let total = t.elapsed();
    println!("\nsettlements per second on the in-process chain (LiteSVM), one core, {rounds} in a row");
    println!("  {:<58} {:>12}", "", "per second");
    println!("  {:<58} {:>12.0}", "plain SPL transfer_checked (baseline)", transfers);
    println!(
        "  {:<58} {:>12.0}",
        "settlement: co-sign + nonce + memo + multisig transfer",
        per_second(rounds, chain_time)
    );
    println!(
        "  {:<58} {:>12.0}",
        "whole loop: receipt, voucher, settlement, renter follows",
        per_second(rounds, total)
    );
    println!("  target: >= 2,000 settlements/s");
}

fn fees() {
    let n = 200u64;
    println!("\nfee lamports per inference by policy ({n} inferences at {PRICE} units = $0.0001 each, one session)");
    println!(
        "  {:<14} {:>12} {:>14} {:>18} {:>20}",
        "policy", "settlements", "provider fee", "session overhead", "fee $ @ $150/SOL"
    );
    let policies = [
        Policy::Inferences(1),
        Policy::Inferences(10),
        Policy::Inferences(100),
        Policy::Amount(5_000),
        Policy::Interval(Duration::from_millis(20)),
    ];
    for policy in policies {
        let w = world();
        let before_r = w.chain.account(&signer(&w.renter).pubkey()).unwrap().unwrap().lamports;
        let before_p = w.chain.account(&signer(&w.provider).pubkey()).unwrap().unwrap().lamports;
        let (mut payer, mut payee) = session(&w, n * PRICE);
        let mut receipts = ReceiptSigner::new([4; 16], w.renter.public(), PRICE);
        let mut settlements = 0u64;
        let mut oldest: Option<Instant> = None;
        for _ in 0..n {
            // One inference every millisecond of (simulated) serving.
            std::thread::sleep(Duration::from_millis(1));
            let r = receipts.next(&w.provider, &Counts { inferences: 1, ..Counts::default() }, b"q", b"a");
            payee.served(&r);
            payee.accept(&payer.voucher(&w.renter, &r).unwrap()).unwrap();
            oldest.get_or_insert_with(Instant::now);
            let (k, amount) = payee.unsettled();
            if policy.due(k, amount, oldest.map(|t| t.elapsed()).unwrap_or_default()) {
                let s = payee.settle(&w.chain, &w.provider, &mut |_| Ok(())).unwrap().unwrap();
                payer.settled(&w.chain, &s).unwrap();
                settlements += 1;
                oldest = None;
            }
        }
        if let Some(s) = payee.settle(&w.chain, &w.provider, &mut |_| Ok(())).unwrap() {
            payer.settled(&w.chain, &s).unwrap();
            settlements += 1;
        }
        payer.recover(&w.chain, &w.renter).unwrap();
        let after_r = w.chain.account(&signer(&w.renter).pubkey()).unwrap().unwrap().lamports;
        let after_p = w.chain.account(&signer(&w.provider).pubkey()).unwrap().unwrap().lamports;
        let provider_fee = (before_p - after_p) as f64 / n as f64;
        // The renter's setup and refund (fees plus rent not returned: the multisig and nonce
        // accounts stay), spread over the session.
        let overhead = before_r.saturating_sub(after_r) as f64 / n as f64;
        let _ = &w.issuer;
        println!(
            "  {:<14} {:>12} {:>14.0} {:>18.0} {:>20.7}",
            policy.to_string(),
            settlements,
            provider_fee,
            overhead,
            provider_fee * 1e-9 * 150.0
        );
    }
    println!("  (a $0.0001 inference; the $150/SOL rate is an assumption for scale, not a measurement)");
}

fn main() {
    receipts_and_vouchers();
    settlements();
    fees();
}
