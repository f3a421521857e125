//! Payment-channel benchmarks, each beside its baseline from the same run:
//! - vouchers signed and checked per second on one core (the provider signs a receipt, the
//!   renter checks it and signs a voucher, the provider checks the voucher), against receipts
//!   alone (what an unpaid session costs);
//! - claims per second on the in-process chain (LiteSVM: the Ed25519 check and our program's
//!   claim, a token transfer inside), against plain SPL token transfers on the same chain;
//! - compute units and fee lamports per claim, as the chain reports them;
//! - the fee per inference at $0.0001 with a claim every $1, next to settling every inference.
//!
//! Run: `cargo bench -p settlement --bench settlement`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use proto::receipt::{Checker, Counts, Signer as ReceiptSigner};
use settlement::channel::{self, LOCAL_PROGRAM_ID};
use settlement::token::{self, ensure_token_account, mint_to};
use settlement::{Chain, Ids, LocalChain, Payee, Payer, signer, wire_address, wire_key};
use sha2::{Digest, Sha256};
use solana_sdk::signature::{Keypair, Signer};
use solana_sdk::transaction::Transaction;

/// $0.0001 in a mint of 6 decimals.
const PRICE: u64 = 100;

struct World {
    chain: LocalChain,
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
    World { chain, renter, provider, mint }
}

fn channel(w: &World, deposit: u64) -> (Payer, Payee) {
    channel_numbered(w, deposit, 0)
}

fn channel_numbered(w: &World, deposit: u64, id: u64) -> (Payer, Payee) {
    let ids = Ids {
        program: wire_address(&LOCAL_PROGRAM_ID),
        renter: w.renter.public(),
        provider: w.provider.public(),
        mint: wire_key(&w.mint),
        id,
    };
    let payer = Payer::ensure(&w.chain, &w.renter, ids, None, deposit, 0).unwrap();
    let payee = Payee::open(&w.chain, ids, None).unwrap();
    (payer, payee)
}

fn per_second(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn receipts_and_vouchers() {
    let w = world();
    let n = 10_000u64;
    let call = Counts { inferences: 1, fuel: 1_000_000, invocations: 4096, ..Counts::default() };
    let (provider, renter) = (&w.provider, w.renter.public());

    // Baseline: every call of a paid session brings a signed receipt the renter checks.
    let mut signer_ = ReceiptSigner::new([1; 16], renter, PRICE);
    let mut checker = Checker::new([1; 16], provider.public(), renter, PRICE);
    let t = Instant::now();
    for _ in 0..n {
        let r = signer_.next(provider, &call, b"request", b"response");
        checker.check(&r, b"request", b"response").unwrap();
    }
    let receipts = t.elapsed();

    // Paid: the same, plus the renter's voucher and the provider's check of it.
    let (mut payer, mut payee) = channel(&w, u64::MAX / 8);
    let mut signer_ = ReceiptSigner::new([2; 16], renter, PRICE);
    let mut checker = Checker::new([2; 16], provider.public(), renter, PRICE);
    let (mut signing, mut checking) = (Duration::ZERO, Duration::ZERO);
    let t = Instant::now();
    for _ in 0..n {
        let r = signer_.next(provider, &call, b"request", b"response");
        checker.check(&r, b"request", b"response").unwrap();
        let s = Instant::now();
        let v = payer.sign(&w.renter, r.amount_due, r.digest()).unwrap();
        let c = Instant::now();
        payee.accept(&v, r.amount_due, &r.digest()).unwrap();
        checking += c.elapsed();
        signing += c - s;
    }
    let paid = t.elapsed();
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!("vouchers per second, one core, {n} inferences");
    println!("  {:<52} {:>12} {:>10}", "", "per second", "us each");
    println!(
        "  {:<52} {:>12.0} {:>10.1}",
        "receipt signed + checked (baseline)",
        per_second(n, receipts),
        us(receipts)
    );
    println!("  {:<52} {:>12.0} {:>10.1}", "voucher signed (renter)", per_second(n, signing), us(signing));
    println!("  {:<52} {:>12.0} {:>10.1}", "voucher checked (provider)", per_second(n, checking), us(checking));
    println!("  {:<52} {:>12.0} {:>10.1}", "receipt + voucher, signed and checked", per_second(n, paid), us(paid));
    println!("  voucher overhead: {:.1} us per inference at a voucher every call", us(paid) - us(receipts));

    // The default (`--max-unvouched 16`): every call followed on both sides (the hash chain),
    // a receipt signed and checked every 16 calls, unpaid (the baseline: an unpaid session's
    // receipts come as often) and paid (plus the voucher answering each receipt).
    let every = DEFAULT_EVERY;
    let batched = |paid: bool, session: u8| {
        let (mut payer, mut payee) = channel_numbered(&w, 1 << 40, u64::from(session));
        let mut signer_ = ReceiptSigner::new([session; 16], renter, PRICE);
        let mut checker = Checker::new([session; 16], provider.public(), renter, PRICE);
        let request_digest: [u8; 32] = Sha256::digest(b"request").into();
        let t = Instant::now();
        for i in 1..=n {
            let sequence = signer_.record(&call, &request_digest, b"response");
            checker.call(sequence, &call, b"request", b"response").unwrap();
            if i % every == 0 {
                let r = signer_.sign(provider);
                checker.signed(&r).unwrap();
                if paid {
                    let v = payer.sign(&w.renter, r.amount_due, r.digest()).unwrap();
                    payee.accept(&v, r.amount_due, &r.digest()).unwrap();
                }
            }
        }
        t.elapsed()
    };
    let (unpaid16, paid16) = (batched(false, 3), batched(true, 4));
    println!(
        "  {:<52} {:>12.0} {:>10.1}",
        format!("calls, a receipt every {every} (baseline)"),
        per_second(n, unpaid16),
        us(unpaid16)
    );
    println!(
        "  {:<52} {:>12.0} {:>10.1}",
        format!("calls, a receipt + voucher every {every} (the default)"),
        per_second(n, paid16),
        us(paid16)
    );
    println!("  voucher overhead: {:.1} us per inference at the default (target <= 30 us)", us(paid16) - us(unpaid16));
}

/// Calls per voucher by default (`provider::payment::DEFAULT_MAX_UNVOUCHED`, which this crate
/// cannot name: the provider depends on it).
const DEFAULT_EVERY: u64 = 16;

/// A claim of `v` as one signed transaction.
fn claim_tx(w: &World, payee: &Payee, v: &proto::voucher::Voucher) -> Transaction {
    let c = payee.ids.channel();
    let on = channel::read(&w.chain, &c).unwrap().unwrap();
    let voucher =
        channel::Voucher { cumulative: v.cumulative, receipt_digest: v.receipt_digest, signature: v.signature.0 };
    let to = token::token_account(&c.provider, &c.mint);
    let ixs = channel::claim_instructions(&c, &on.state.voucher_key, on.state.generation, &voucher, &to);
    let payer = signer(&w.provider);
    Transaction::new_signed_with_payer(&ixs, Some(&payer.pubkey()), &[&payer], w.chain.latest_blockhash().unwrap())
}

/// Claims per second, and what one claim costs; returns the fee lamports of one claim.
fn claims() -> u64 {
    let w = world();
    let rounds = 2_000u64;
    // Baseline: plain SPL transfers (one signature) on the same chain.
    let r = token::token_account(&signer(&w.renter).pubkey(), &w.mint);
    let p = token::token_account(&signer(&w.provider).pubkey(), &w.mint);
    let renter = signer(&w.renter);
    let (mut transfer_cu, mut transfer_fee) = (0, 0);
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
        let tx = Transaction::new_signed_with_payer(
            &[ix],
            Some(&renter.pubkey()),
            &[&renter],
            w.chain.latest_blockhash().unwrap(),
        );
        (_, transfer_fee, transfer_cu) = w.chain.execute(tx).unwrap();
    }
    let transfers = t.elapsed();

    // Claims: the provider claims a new voucher every time (the chain checks the Ed25519
    // signature, the program reads it through the instructions sysvar and transfers).
    let (mut payer, payee) = channel(&w, u64::MAX / 8);
    let (mut claim_cu, mut claim_fee) = (0, 0);
    let mut chain_time = Duration::ZERO;
    for i in 1..=rounds {
        let v = payer.sign(&w.renter, i * PRICE, [i as u8; 32]).unwrap();
        let tx = claim_tx(&w, &payee, &v);
        let c = Instant::now();
        (_, claim_fee, claim_cu) = w.chain.execute(tx).unwrap();
        chain_time += c.elapsed();
    }
    println!("\nclaims per second on the in-process chain (LiteSVM), one core, {rounds} in a row");
    println!("  {:<52} {:>12} {:>10} {:>10}", "", "per second", "CU", "fee (lam)");
    println!(
        "  {:<52} {:>12.0} {:>10} {:>10}",
        "plain SPL transfer_checked (baseline)",
        per_second(rounds, transfers),
        transfer_cu,
        transfer_fee
    );
    println!(
        "  {:<52} {:>12.0} {:>10} {:>10}",
        "claim: Ed25519 check + program + token transfer",
        per_second(rounds, chain_time),
        claim_cu,
        claim_fee
    );
    claim_fee
}

fn fee_per_inference(claim_fee: u64) {
    // At $150 per SOL (an assumed rate, for scale only: the ratio to the price is what counts).
    let usd_per_lamport = 150.0 * 1e-9;
    let price_usd = PRICE as f64 / 1e6;
    let claim_every = 1_000_000 / PRICE; // a claim every $1 of inferences
    let per_inference_settlement = claim_fee as f64; // the old design: one two-signature transaction per inference
    println!("\nfee per inference at $0.0001 (a claim is {claim_fee} lamports as measured above; $150/SOL assumed)");
    println!("  {:<52} {:>14} {:>12} {:>10}", "", "lamports/inf", "$/inf", "of price");
    for (what, lamports) in [
        ("settle every inference (baseline: the old design)", per_inference_settlement),
        ("channel, a claim every $1 (10,000 inferences)", claim_fee as f64 / claim_every as f64),
    ] {
        let usd = lamports * usd_per_lamport;
        println!("  {:<52} {:>14.2} {:>12.8} {:>9.3}%", what, lamports, usd, 100.0 * usd / price_usd);
    }
    println!("  target: <= 0.2% of the price");
}

fn main() {
    receipts_and_vouchers();
    let fee = claims();
    fee_per_inference(fee);
}
