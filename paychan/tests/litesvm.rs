//! The payment-channel program, as scripts/build-paychan.sh builds it, run in LiteSVM: every
//! instruction's path and every refusal, with the program's own error codes.
//!
//! This file is the test of the `tests/litesvm` package (see its Cargo.toml for why it cannot
//! be a dev-dependency test of paychan itself). Run it from paychan/ with
//!
//!     ../scripts/build-paychan.sh   # once the program changed
//!     OPENSSL_NO_VENDOR=1 cargo +stable test --target x86_64-unknown-linux-gnu \
//!         --manifest-path tests/litesvm/Cargo.toml --test litesvm -- --nocapture
//!
//! `PAYCHAN_SO=/path/to/libpaychan.so` runs another build instead (a patched copy, say).
//!
//! paychan's own `cargo test` sees this file too, without the `litesvm` feature: it compiles
//! to an empty test there.
#![allow(unexpected_cfgs)]
#![cfg(feature = "litesvm")]

/// The layouts, instruction encodings and voucher message the program itself uses.
use paychan_state as state;

use ed25519_dalek::Signer as _;
use litesvm::LiteSVM;
use litesvm::types::{TransactionMetadata, TransactionResult};
use solana_account::Account;
use solana_address::Address;
use solana_clock::Clock;
use solana_instruction::error::InstructionError;
use solana_instruction::{AccountMeta, Instruction};
use solana_keypair::Keypair;
use solana_signer::Signer;
use solana_transaction::Transaction;
use solana_transaction_error::TransactionError;
use state::{CHANNEL_SEED, Channel, Error, Instruction as Ix, MAX_WINDOW_SECS, MIN_WINDOW_SECS, VAULT_SEED};

const PROGRAM_ID: Address = Address::new_from_array(*b"wasmgrid-paychan-test-program-id");
const TOKEN_PROGRAM: Address = Address::from_str_const("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA");
const SYSTEM_PROGRAM: Address = Address::from_str_const("11111111111111111111111111111111");
const INSTRUCTIONS_SYSVAR: Address = Address::from_str_const("Sysvar1nstructions1111111111111111111111111");
const ED25519_PROGRAM: Address = Address::from_str_const("Ed25519SigVerify111111111111111111111111111");

const SOL: u64 = 1_000_000_000;
const TOKEN_ACCOUNT_LEN: usize = 165;
const MINT_LEN: usize = 82;
/// What the renter holds before it opens anything.
const MINTED: u64 = 1_000_000;
const DEPOSIT: u64 = 1_000;
const WINDOW: i64 = 3_600;
const DIGEST: [u8; 32] = [0xd1; 32];

/// The built program; the test cannot run without it. `PAYCHAN_SO` names another build (a
/// patched copy, say) to run instead.
fn program_bytes() -> Vec<u8> {
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bpfel-unknown-none/release/libpaychan.so");
    let other = std::env::var("PAYCHAN_SO").ok().filter(|p| !p.is_empty());
    let path = other.as_deref().unwrap_or(built);
    std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "cannot read the program at {path} ({e}): build it first with scripts/build-paychan.sh (from /work/main)"
        )
    })
}

// ---------------------------------------------------------------------------------------------
// SPL Token and System instructions, encoded by hand (a few bytes each).

fn create_account_ix(from: &Address, to: &Address, lamports: u64, space: usize, owner: &Address) -> Instruction {
    let mut data = 0u32.to_le_bytes().to_vec();
    data.extend_from_slice(&lamports.to_le_bytes());
    data.extend_from_slice(&(space as u64).to_le_bytes());
    data.extend_from_slice(owner.as_ref());
    Instruction {
        program_id: SYSTEM_PROGRAM,
        accounts: vec![AccountMeta::new(*from, true), AccountMeta::new(*to, true)],
        data,
    }
}

fn system_transfer_ix(from: &Address, to: &Address, lamports: u64) -> Instruction {
    let mut data = 2u32.to_le_bytes().to_vec();
    data.extend_from_slice(&lamports.to_le_bytes());
    Instruction {
        program_id: SYSTEM_PROGRAM,
        accounts: vec![AccountMeta::new(*from, true), AccountMeta::new(*to, false)],
        data,
    }
}

fn initialize_mint2_ix(mint: &Address, authority: &Address) -> Instruction {
    let mut data = vec![20, 6];
    data.extend_from_slice(authority.as_ref());
    data.push(0); // no freeze authority
    Instruction { program_id: TOKEN_PROGRAM, accounts: vec![AccountMeta::new(*mint, false)], data }
}

fn initialize_account3_ix(account: &Address, mint: &Address, owner: &Address) -> Instruction {
    let mut data = vec![18];
    data.extend_from_slice(owner.as_ref());
    Instruction {
        program_id: TOKEN_PROGRAM,
        accounts: vec![AccountMeta::new(*account, false), AccountMeta::new_readonly(*mint, false)],
        data,
    }
}

fn mint_to_ix(mint: &Address, to: &Address, authority: &Address, amount: u64) -> Instruction {
    let mut data = vec![7];
    data.extend_from_slice(&amount.to_le_bytes());
    Instruction {
        program_id: TOKEN_PROGRAM,
        accounts: vec![
            AccountMeta::new(*mint, false),
            AccountMeta::new(*to, false),
            AccountMeta::new_readonly(*authority, true),
        ],
        data,
    }
}

/// The Ed25519 program's check of one signature, everything inside the instruction itself:
/// offsets at 2, public key at 16, signature at 48, message at 112.
fn ed25519_ix(pubkey: &[u8; 32], signature: &[u8; 64], message: &[u8]) -> Instruction {
    const PK: u16 = 16;
    const SIG: u16 = 48;
    const MSG: u16 = 112;
    let mut data = vec![1u8, 0];
    for v in [SIG, u16::MAX, PK, u16::MAX, MSG, message.len() as u16, u16::MAX] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(data.len(), PK as usize);
    data.extend_from_slice(pubkey);
    data.extend_from_slice(signature);
    data.extend_from_slice(message);
    Instruction { program_id: ED25519_PROGRAM, accounts: vec![], data }
}

// ---------------------------------------------------------------------------------------------
// The program's instructions.

fn data(ix: Ix) -> Vec<u8> {
    let mut buf = [0u8; Ix::MAX_LEN];
    let n = ix.encode(&mut buf);
    buf[..n].to_vec()
}

fn program_ix(accounts: Vec<AccountMeta>, ix: Ix) -> Instruction {
    Instruction { program_id: PROGRAM_ID, accounts, data: data(ix) }
}

/// A channel's two addresses.
#[derive(Clone, Copy, Debug)]
struct Chan {
    id: u64,
    address: Address,
    vault: Address,
}

fn channel_address(renter: &Address, provider: &Address, mint: &Address, id: u64) -> Chan {
    let (address, _) = Address::find_program_address(
        &[CHANNEL_SEED, renter.as_ref(), provider.as_ref(), mint.as_ref(), &id.to_le_bytes()],
        &PROGRAM_ID,
    );
    let (vault, _) = Address::find_program_address(&[VAULT_SEED, address.as_ref()], &PROGRAM_ID);
    Chan { id, address, vault }
}

/// The world a channel lives in: a mint, a renter holding tokens, a provider, their token
/// accounts, and the key the renter signs vouchers with.
struct Env {
    svm: LiteSVM,
    mint_authority: Keypair,
    mint: Address,
    renter: Keypair,
    provider: Keypair,
    renter_token: Address,
    provider_token: Address,
    voucher_key: ed25519_dalek::SigningKey,
    /// The seed of the last key `key` made.
    keys: u8,
}

impl Env {
    fn new() -> Env {
        let mut svm = LiteSVM::new();
        svm.add_program(PROGRAM_ID, &program_bytes()).expect("the program loads");
        // A clock that looks like a cluster's.
        let mut clock: Clock = svm.get_sysvar();
        clock.slot = 1_000;
        clock.unix_timestamp = 1_750_000_000;
        svm.set_sysvar(&clock);

        // Fixed keys, so that the addresses, and the bump searches for them, and so the
        // compute units, are the same on every run.
        let mint_authority = Keypair::new_from_array([1; 32]);
        let renter = Keypair::new_from_array([2; 32]);
        let provider = Keypair::new_from_array([3; 32]);
        for k in [&mint_authority, &renter, &provider] {
            svm.airdrop(&k.pubkey(), 10 * SOL).unwrap();
        }
        let mut env = Env {
            svm,
            mint: Address::default(),
            renter_token: Address::default(),
            provider_token: Address::default(),
            mint_authority,
            renter,
            provider,
            voucher_key: ed25519_dalek::SigningKey::from_bytes(&[0x5e; 32]),
            keys: 16,
        };
        env.mint = env.new_mint();
        let (mint, renter, provider) = (env.mint, env.renter.pubkey(), env.provider.pubkey());
        env.renter_token = env.new_token_account(&mint, &renter);
        env.provider_token = env.new_token_account(&mint, &provider);
        env.mint_to(&mint, &env.renter_token.clone(), MINTED);
        env
    }

    /// Sends one transaction under a fresh blockhash (so that a transaction may repeat another
    /// byte for byte, as a replay does).
    fn send(&mut self, ixs: &[Instruction], payer: &Keypair, others: &[&Keypair]) -> TransactionResult {
        self.svm.expire_blockhash();
        let mut signers: Vec<&Keypair> = vec![payer];
        signers.extend_from_slice(others);
        let tx = Transaction::new_signed_with_payer(ixs, Some(&payer.pubkey()), &signers, self.svm.latest_blockhash());
        self.svm.send_transaction(tx)
    }

    fn by_renter(&mut self, ixs: &[Instruction]) -> TransactionResult {
        let renter = self.renter.insecure_clone();
        self.send(ixs, &renter, &[])
    }

    fn by_provider(&mut self, ixs: &[Instruction]) -> TransactionResult {
        let provider = self.provider.insecure_clone();
        self.send(ixs, &provider, &[])
    }

    /// Another fixed key.
    fn key(&mut self) -> Keypair {
        self.keys += 1;
        Keypair::new_from_array([self.keys; 32])
    }

    fn new_mint(&mut self) -> Address {
        let mint = self.key();
        let lamports = self.svm.minimum_balance_for_rent_exemption(MINT_LEN);
        let authority = self.mint_authority.insecure_clone();
        let ixs = [
            create_account_ix(&authority.pubkey(), &mint.pubkey(), lamports, MINT_LEN, &TOKEN_PROGRAM),
            initialize_mint2_ix(&mint.pubkey(), &authority.pubkey()),
        ];
        ok(self.send(&ixs, &authority, &[&mint]));
        mint.pubkey()
    }

    fn new_token_account(&mut self, mint: &Address, owner: &Address) -> Address {
        let account = self.key();
        let lamports = self.svm.minimum_balance_for_rent_exemption(TOKEN_ACCOUNT_LEN);
        let authority = self.mint_authority.insecure_clone();
        let ixs = [
            create_account_ix(&authority.pubkey(), &account.pubkey(), lamports, TOKEN_ACCOUNT_LEN, &TOKEN_PROGRAM),
            initialize_account3_ix(&account.pubkey(), mint, owner),
        ];
        ok(self.send(&ixs, &authority, &[&account]));
        account.pubkey()
    }

    fn mint_to(&mut self, mint: &Address, to: &Address, amount: u64) {
        let authority = self.mint_authority.insecure_clone();
        ok(self.send(&[mint_to_ix(mint, to, &authority.pubkey(), amount)], &authority, &[]));
    }

    fn balance(&self, token_account: &Address) -> u64 {
        let a = self.svm.get_account(token_account).expect("the token account exists");
        u64::from_le_bytes(a.data[64..72].try_into().unwrap())
    }

    fn lamports(&self, a: &Address) -> u64 {
        self.svm.get_account(a).map_or(0, |a| a.lamports)
    }

    fn gone(&self, a: &Address) -> bool {
        self.svm.get_account(a).is_none_or(|a| a.lamports == 0 && a.data.is_empty())
    }

    fn clock(&self) -> Clock {
        self.svm.get_sysvar()
    }

    /// Moves time on by `secs`, and the slot with it (400 ms slots).
    fn advance(&mut self, secs: i64) {
        let mut clock = self.clock();
        clock.unix_timestamp += secs;
        clock.slot += (secs as u64 * 5).div_ceil(2).max(1);
        self.svm.set_sysvar(&clock);
    }

    fn chan(&self, id: u64) -> Chan {
        channel_address(&self.renter.pubkey(), &self.provider.pubkey(), &self.mint, id)
    }

    fn state(&self, chan: &Chan) -> Channel {
        let a = self.svm.get_account(&chan.address).expect("the channel exists");
        assert_eq!(a.owner, PROGRAM_ID);
        Channel::decode(&a.data).expect("a channel")
    }

    fn voucher_pubkey(&self) -> [u8; 32] {
        self.voucher_key.verifying_key().to_bytes()
    }

    // The program's instructions, with the accounts each documents.

    fn open_ix(&self, chan: &Chan, deposit: u64, window: i64) -> Instruction {
        program_ix(
            vec![
                AccountMeta::new(self.renter.pubkey(), true),
                AccountMeta::new_readonly(self.provider.pubkey(), false),
                AccountMeta::new_readonly(self.mint, false),
                AccountMeta::new(chan.address, false),
                AccountMeta::new(chan.vault, false),
                AccountMeta::new(self.renter_token, false),
                AccountMeta::new_readonly(TOKEN_PROGRAM, false),
                AccountMeta::new_readonly(SYSTEM_PROGRAM, false),
            ],
            Ix::Open { id: chan.id, deposit, window, voucher_key: self.voucher_pubkey() },
        )
    }

    fn top_up_ix(&self, chan: &Chan, amount: u64) -> Instruction {
        program_ix(
            vec![
                AccountMeta::new_readonly(self.renter.pubkey(), true),
                AccountMeta::new(chan.address, false),
                AccountMeta::new(chan.vault, false),
                AccountMeta::new(self.renter_token, false),
                AccountMeta::new_readonly(TOKEN_PROGRAM, false),
            ],
            Ix::TopUp { amount },
        )
    }

    fn claim_ix(&self, chan: &Chan, to: &Address, cumulative: u64, receipt_digest: [u8; 32]) -> Instruction {
        program_ix(
            vec![
                AccountMeta::new(chan.address, false),
                AccountMeta::new(chan.vault, false),
                AccountMeta::new(*to, false),
                AccountMeta::new_readonly(INSTRUCTIONS_SYSVAR, false),
                AccountMeta::new_readonly(TOKEN_PROGRAM, false),
            ],
            Ix::Claim { cumulative, receipt_digest },
        )
    }

    fn start_close_ix(&self, chan: &Chan) -> Instruction {
        program_ix(
            vec![AccountMeta::new_readonly(self.renter.pubkey(), true), AccountMeta::new(chan.address, false)],
            Ix::StartClose,
        )
    }

    fn finalize_ix(&self, chan: &Chan) -> Instruction {
        program_ix(
            vec![
                AccountMeta::new(self.renter.pubkey(), true),
                AccountMeta::new(chan.address, false),
                AccountMeta::new(chan.vault, false),
                AccountMeta::new(self.renter_token, false),
                AccountMeta::new_readonly(TOKEN_PROGRAM, false),
            ],
            Ix::Finalize,
        )
    }

    fn cooperative_close_ix(&self, chan: &Chan) -> Instruction {
        program_ix(
            vec![
                AccountMeta::new_readonly(self.provider.pubkey(), true),
                AccountMeta::new(self.renter.pubkey(), false),
                AccountMeta::new(chan.address, false),
                AccountMeta::new(chan.vault, false),
                AccountMeta::new(self.renter_token, false),
                AccountMeta::new_readonly(TOKEN_PROGRAM, false),
            ],
            Ix::CooperativeClose,
        )
    }

    /// The message a voucher for `cumulative` on `chan` (at `generation`) signs.
    fn message(&self, chan: &Chan, generation: u64, cumulative: u64, digest: [u8; 32]) -> Vec<u8> {
        Channel::voucher_message(
            PROGRAM_ID.as_array(),
            chan.address.as_array(),
            generation,
            self.mint.as_array(),
            cumulative,
            &digest,
        )
        .to_vec()
    }

    /// The Ed25519 check of the voucher key's signature over `message`.
    fn signed(&self, message: &[u8]) -> Instruction {
        ed25519_ix(&self.voucher_pubkey(), &self.voucher_key.sign(message).to_bytes(), message)
    }

    /// The two instructions of an honest claim: the signature check of the voucher for
    /// `cumulative` on the channel as it is now, and the claim to the provider's account.
    fn voucher(&self, chan: &Chan, cumulative: u64) -> [Instruction; 2] {
        let message = self.message(chan, self.state(chan).generation, cumulative, DIGEST);
        [self.signed(&message), self.claim_ix(chan, &self.provider_token, cumulative, DIGEST)]
    }

    fn claim(&mut self, chan: &Chan, cumulative: u64) -> TransactionResult {
        let ixs = self.voucher(chan, cumulative);
        self.by_provider(&ixs)
    }

    /// Opens channel `id` with `DEPOSIT` and `WINDOW`.
    fn open(&mut self, id: u64) -> Chan {
        let chan = self.chan(id);
        ok(self.by_renter(&[self.open_ix(&chan, DEPOSIT, WINDOW)]));
        chan
    }
}

#[track_caller]
fn ok(r: TransactionResult) -> TransactionMetadata {
    match r {
        Ok(meta) => meta,
        Err(e) => panic!("the transaction failed: {:?}\n{}", e.err, e.meta.pretty_logs()),
    }
}

/// The transaction failed in instruction `index` with `err`.
#[track_caller]
fn refused(r: TransactionResult, index: u8, err: InstructionError) {
    match r {
        Ok(meta) => panic!("the transaction succeeded; expected {err:?}\n{}", meta.pretty_logs()),
        Err(e) => assert_eq!(
            e.err,
            TransactionError::InstructionError(index, err.clone()),
            "expected {err:?} in instruction {index}\n{}",
            e.meta.pretty_logs()
        ),
    }
}

/// The program refused instruction `index` with its own error `code`.
#[track_caller]
fn refused_with(r: TransactionResult, index: u8, code: Error) {
    refused(r, index, InstructionError::Custom(code as u32));
}

// ---------------------------------------------------------------------------------------------

#[test]
fn open_then_claim_pays_exactly_the_difference_and_claims_are_cumulative() {
    let mut env = Env::new();
    let chan = env.chan(7);
    let opened_at = env.clock().slot;
    ok(env.by_renter(&[env.open_ix(&chan, DEPOSIT, WINDOW)]));

    let c = env.state(&chan);
    assert_eq!(c.renter, env.renter.pubkey().to_bytes());
    assert_eq!(c.provider, env.provider.pubkey().to_bytes());
    assert_eq!(c.voucher_key, env.voucher_pubkey());
    assert_eq!(c.mint, env.mint.to_bytes());
    assert_eq!(c.vault, chan.vault.to_bytes());
    assert_eq!((c.id, c.deposited, c.claimed, c.close_at, c.window), (7, DEPOSIT, 0, 0, WINDOW));
    assert_eq!(c.generation, opened_at);
    assert_eq!(env.balance(&chan.vault), DEPOSIT);
    assert_eq!(env.balance(&env.renter_token), MINTED - DEPOSIT);
    // The vault is a token account of the mint that the channel owns.
    let vault = env.svm.get_account(&chan.vault).unwrap();
    assert_eq!(vault.owner, TOKEN_PROGRAM);
    assert_eq!(&vault.data[..32], env.mint.as_ref());
    assert_eq!(&vault.data[32..64], chan.address.as_ref());

    ok(env.claim(&chan, 300));
    assert_eq!(env.balance(&env.provider_token), 300);
    assert_eq!(env.balance(&chan.vault), DEPOSIT - 300);
    assert_eq!(env.state(&chan).claimed, 300);

    // A second voucher, for 750 all told, pays only the 450 more.
    ok(env.claim(&chan, 750));
    assert_eq!(env.balance(&env.provider_token), 750);
    assert_eq!(env.balance(&chan.vault), DEPOSIT - 750);
    assert_eq!(env.state(&chan).claimed, 750);

    // The whole deposit, at last.
    ok(env.claim(&chan, DEPOSIT));
    assert_eq!(env.balance(&env.provider_token), DEPOSIT);
    assert_eq!(env.balance(&chan.vault), 0);
    assert_eq!(env.balance(&env.renter_token), MINTED - DEPOSIT);
}

#[test]
fn a_replayed_or_smaller_voucher_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    ok(env.claim(&chan, 400));
    // The very same transaction again (a fresh blockhash, the same instructions).
    refused_with(env.claim(&chan, 400), 1, Error::VoucherAmount);
    // An older, smaller voucher.
    refused_with(env.claim(&chan, 399), 1, Error::VoucherAmount);
    refused_with(env.claim(&chan, 1), 1, Error::VoucherAmount);
    assert_eq!(env.balance(&env.provider_token), 400);
    assert_eq!(env.state(&chan).claimed, 400);
}

#[test]
fn a_voucher_of_zero_or_above_the_deposit_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    refused_with(env.claim(&chan, DEPOSIT + 1), 1, Error::VoucherAmount);
    refused_with(env.claim(&chan, u64::MAX), 1, Error::VoucherAmount);
    refused_with(env.claim(&chan, 0), 1, Error::VoucherAmount);
    assert_eq!(env.balance(&env.provider_token), 0);
    ok(env.claim(&chan, DEPOSIT));
}

#[test]
fn a_claim_without_the_ed25519_instruction_just_before_it_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    let [sig, claim] = env.voucher(&chan, 100);

    // The claim alone, first in its transaction.
    refused_with(env.by_provider(&[claim.clone()]), 0, Error::NoVoucherSignature);

    // The signature check, then another instruction, then the claim.
    let provider = env.provider.pubkey();
    let other = system_transfer_ix(&provider, &provider, 1);
    refused_with(env.by_provider(&[sig.clone(), other.clone(), claim.clone()]), 2, Error::NoVoucherSignature);
    // Another instruction first, then the check and the claim: that is fine.
    ok(env.by_provider(&[other, sig.clone(), claim.clone()]));
    assert_eq!(env.balance(&env.provider_token), 100);

    // One signature check pays one claim: a second claim right after the first one sees a
    // claim, not a signature check, before it.
    let [sig2, claim2] = env.voucher(&chan, 200);
    let claim3 = env.claim_ix(&chan, &env.provider_token, 300, DIGEST);
    refused_with(env.by_provider(&[sig2, claim2, claim3]), 2, Error::NoVoucherSignature);
    assert_eq!(env.balance(&env.provider_token), 100);

    // The instructions sysvar must be the real one.
    let [sig, mut claim] = env.voucher(&chan, 200);
    claim.accounts[3] = AccountMeta::new_readonly(env.renter.pubkey(), false);
    refused_with(env.by_provider(&[sig, claim]), 1, Error::WrongAccount);
}

#[test]
fn a_signature_by_another_key_or_over_another_message_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    let other_chan = env.open(2);
    let generation = env.state(&chan).generation;
    let claim = env.claim_ix(&chan, &env.provider_token, 100, DIGEST);
    let message = env.message(&chan, generation, 100, DIGEST);

    // A valid signature by another key over the right message: the precompile passes, the
    // program refuses the key.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[0x77; 32]);
    let by_stranger = ed25519_ix(&stranger.verifying_key().to_bytes(), &stranger.sign(&message).to_bytes(), &message);
    refused_with(env.by_provider(&[by_stranger, claim.clone()]), 1, Error::VoucherMismatch);

    // Another key's signature presented as the voucher key's: the precompile refuses it
    // (PrecompileError::InvalidSignature).
    let forged = ed25519_ix(&env.voucher_pubkey(), &stranger.sign(&message).to_bytes(), &message);
    refused(env.by_provider(&[forged, claim.clone()]), 0, InstructionError::Custom(2));
    // A voucher signature with a flipped bit, likewise.
    let mut flipped = env.voucher_key.sign(&message).to_bytes();
    flipped[5] ^= 1;
    let flipped = ed25519_ix(&env.voucher_pubkey(), &flipped, &message);
    refused(env.by_provider(&[flipped, claim.clone()]), 0, InstructionError::Custom(2));

    // Valid signatures by the voucher key over other bytes than this claim's message.
    let others = [
        ("another cumulative", env.message(&chan, generation, 1_000, DIGEST)),
        ("another channel", env.message(&other_chan, generation, 100, DIGEST)),
        ("another generation", env.message(&chan, generation + 1, 100, DIGEST)),
        ("another receipt", env.message(&chan, generation, 100, [0xee; 32])),
        ("a message cut short", message[..message.len() - 1].to_vec()),
    ];
    for (what, m) in others {
        let r = env.by_provider(&[env.signed(&m), claim.clone()]);
        assert!(r.is_err(), "a voucher over {what} was paid");
        refused_with(r, 1, Error::VoucherMismatch);
    }
    // Another program's voucher.
    let mut m = message.clone();
    m[17..49].copy_from_slice(&[9; 32]);
    refused_with(env.by_provider(&[env.signed(&m), claim.clone()]), 1, Error::VoucherMismatch);
    // Another mint's.
    let mut m = message.clone();
    m[17 + 72..17 + 104].copy_from_slice(&[9; 32]);
    refused_with(env.by_provider(&[env.signed(&m), claim.clone()]), 1, Error::VoucherMismatch);

    // The signature check pointing at its key, signature or message in another instruction.
    let mut elsewhere = env.signed(&message);
    elsewhere.data[14..16].copy_from_slice(&1u16.to_le_bytes()); // message "in" the claim
    // The precompile finds no message at that offset in the claim's data
    // (PrecompileError::InvalidDataOffsets).
    refused(env.by_provider(&[elsewhere, claim.clone()]), 0, InstructionError::Custom(3));
    // A check whose key, signature and message the precompile takes from instruction 0 (a
    // real check of the real voucher for 100) while its own bytes hold a voucher for the whole
    // deposit: the precompile passes, and the program, which compares the check's own bytes,
    // refuses it for naming another instruction.
    let big = env.message(&chan, generation, DEPOSIT, DIGEST);
    let mut borrowed = ed25519_ix(&env.voucher_pubkey(), &[0; 64], &big);
    for at in [4, 8, 14] {
        borrowed.data[at..at + 2].copy_from_slice(&0u16.to_le_bytes());
    }
    let claim_all = env.claim_ix(&chan, &env.provider_token, DEPOSIT, DIGEST);
    refused_with(env.by_provider(&[env.signed(&message), borrowed, claim_all]), 2, Error::VoucherMismatch);
    // The check naming its own index explicitly (rather than u16::MAX) is the same check.
    let mut explicit = env.signed(&message);
    for at in [4, 8, 14] {
        explicit.data[at..at + 2].copy_from_slice(&0u16.to_le_bytes());
    }
    let r = env.by_provider(&[explicit.clone(), claim.clone()]);
    ok(r);
    assert_eq!(env.balance(&env.provider_token), 100);
    // Replayed, it pays nothing more.
    refused_with(env.by_provider(&[explicit, claim.clone()]), 1, Error::VoucherAmount);

    // Two signatures in one check: the precompile reads a second header from the key bytes.
    let message = env.message(&chan, generation, 200, DIGEST);
    let claim = env.claim_ix(&chan, &env.provider_token, 200, DIGEST);
    let mut two = env.signed(&message);
    two.data[0] = 2;
    let r = env.by_provider(&[two, claim.clone()]);
    assert!(matches!(r.as_ref().map_err(|e| &e.err), Err(TransactionError::InstructionError(0, _))), "{r:?}");

    assert_eq!(env.balance(&env.provider_token), 100);
    // And the right one pays.
    ok(env.by_provider(&[env.signed(&message), claim]));
    assert_eq!(env.balance(&env.provider_token), 200);
}

#[test]
fn a_claim_to_a_token_account_the_provider_does_not_own_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    let generation = env.state(&chan).generation;
    let sig = env.signed(&env.message(&chan, generation, 100, DIGEST));

    // The renter's own account (of the right mint), and a stranger's.
    let renter_token = env.renter_token;
    refused_with(
        env.by_provider(&[sig.clone(), env.claim_ix(&chan, &renter_token, 100, DIGEST)]),
        1,
        Error::WrongAccount,
    );
    let strangers = env.new_token_account(&env.mint.clone(), &Keypair::new().pubkey());
    refused_with(env.by_provider(&[sig.clone(), env.claim_ix(&chan, &strangers, 100, DIGEST)]), 1, Error::WrongAccount);
    // The vault itself.
    refused_with(
        env.by_provider(&[sig.clone(), env.claim_ix(&chan, &chan.vault, 100, DIGEST)]),
        1,
        Error::WrongAccount,
    );
    // The provider's account of another mint.
    let other_mint = env.new_mint();
    let wrong_mint = env.new_token_account(&other_mint, &env.provider.pubkey());
    refused_with(env.by_provider(&[sig.clone(), env.claim_ix(&chan, &wrong_mint, 100, DIGEST)]), 1, Error::WrongMint);
    // Not a token account at all (the provider's wallet).
    let wallet = env.provider.pubkey();
    let r = env.by_provider(&[sig.clone(), env.claim_ix(&chan, &wallet, 100, DIGEST)]);
    refused(r, 1, InstructionError::InvalidAccountData);

    assert_eq!(env.balance(&chan.vault), DEPOSIT);
    assert_eq!(env.balance(&strangers), 0);
    assert_eq!(env.balance(&renter_token), MINTED - DEPOSIT);
}

#[test]
fn top_up_raises_the_deposit_and_is_refused_once_closing() {
    let mut env = Env::new();
    let chan = env.open(1);
    refused_with(env.claim(&chan, 1_200), 1, Error::VoucherAmount);

    ok(env.by_renter(&[env.top_up_ix(&chan, 500)]));
    assert_eq!(env.state(&chan).deposited, DEPOSIT + 500);
    assert_eq!(env.balance(&chan.vault), DEPOSIT + 500);
    assert_eq!(env.balance(&env.renter_token), MINTED - DEPOSIT - 500);
    // The voucher above the old deposit pays now.
    ok(env.claim(&chan, 1_200));
    assert_eq!(env.balance(&env.provider_token), 1_200);

    refused_with(env.by_renter(&[env.top_up_ix(&chan, 0)]), 0, Error::ZeroAmount);
    // Someone else than the renter.
    let mut by_provider = env.top_up_ix(&chan, 10);
    by_provider.accounts[0] = AccountMeta::new_readonly(env.provider.pubkey(), true);
    refused_with(env.by_provider(&[by_provider]), 0, Error::WrongAccount);

    ok(env.by_renter(&[env.start_close_ix(&chan)]));
    refused_with(env.by_renter(&[env.top_up_ix(&chan, 100)]), 0, Error::AlreadyClosing);
    refused_with(env.by_renter(&[env.start_close_ix(&chan)]), 0, Error::AlreadyClosing);
    assert_eq!(env.state(&chan).deposited, DEPOSIT + 500);
    assert_eq!(env.balance(&chan.vault), DEPOSIT + 500 - 1_200);
}

#[test]
fn finalize_is_refused_before_the_window_ends_and_after_it_returns_the_rest_and_the_rent() {
    let mut env = Env::new();
    let chan = env.open(1);
    ok(env.claim(&chan, 300));
    refused_with(env.by_renter(&[env.finalize_ix(&chan)]), 0, Error::NotClosing);

    let started = env.clock().unix_timestamp;
    ok(env.by_renter(&[env.start_close_ix(&chan)]));
    assert_eq!(env.state(&chan).close_at, started + WINDOW);
    refused_with(env.by_renter(&[env.finalize_ix(&chan)]), 0, Error::TooEarly);
    env.advance(WINDOW - 1);
    refused_with(env.by_renter(&[env.finalize_ix(&chan)]), 0, Error::TooEarly);
    env.advance(1);

    let rent = env.lamports(&chan.address) + env.lamports(&chan.vault);
    assert_eq!(
        rent,
        env.svm.minimum_balance_for_rent_exemption(Channel::LEN)
            + env.svm.minimum_balance_for_rent_exemption(TOKEN_ACCOUNT_LEN)
    );
    let before = env.lamports(&env.renter.pubkey());
    let meta = ok(env.by_renter(&[env.finalize_ix(&chan)]));
    assert_eq!(env.lamports(&env.renter.pubkey()), before + rent - meta.fee);
    assert_eq!(env.balance(&env.renter_token), MINTED - 300);
    assert_eq!(env.balance(&env.provider_token), 300);
    assert!(env.gone(&chan.address), "the channel is closed");
    assert!(env.gone(&chan.vault), "the vault is closed");
    // Nothing is left to finalize or claim.
    refused_with(env.by_renter(&[env.finalize_ix(&chan)]), 0, Error::WrongOwner);
    refused_with(env.claim_after_close(&chan, 400), 1, Error::WrongOwner);
}

impl Env {
    /// A claim on a channel that no longer exists (its generation is then unknown).
    fn claim_after_close(&mut self, chan: &Chan, cumulative: u64) -> TransactionResult {
        let message = self.message(chan, 0, cumulative, DIGEST);
        let ixs = [self.signed(&message), self.claim_ix(chan, &self.provider_token, cumulative, DIGEST)];
        self.by_provider(&ixs)
    }
}

#[test]
fn a_claim_during_the_window_succeeds_and_one_after_it_ended_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    ok(env.by_renter(&[env.start_close_ix(&chan)]));
    env.advance(WINDOW - 1);
    ok(env.claim(&chan, 500));
    assert_eq!(env.balance(&env.provider_token), 500);
    env.advance(1);
    refused_with(env.claim(&chan, 600), 1, Error::TooLate);
    env.advance(1_000);
    refused_with(env.claim(&chan, 600), 1, Error::TooLate);
    assert_eq!(env.balance(&env.provider_token), 500);
    ok(env.by_renter(&[env.finalize_ix(&chan)]));
    assert_eq!(env.balance(&env.renter_token), MINTED - 500);
}

#[test]
fn cooperative_close_needs_the_providers_signature_and_returns_the_rest_at_once() {
    let mut env = Env::new();
    let chan = env.open(1);
    ok(env.claim(&chan, 250));
    env.advance(60);

    // The provider's key, not signing.
    let mut unsigned = env.cooperative_close_ix(&chan);
    unsigned.accounts[0].is_signer = false;
    refused_with(env.by_renter(&[unsigned]), 0, Error::NotSigned);
    // The renter signing in the provider's place.
    let mut by_renter = env.cooperative_close_ix(&chan);
    by_renter.accounts[0] = AccountMeta::new_readonly(env.renter.pubkey(), true);
    refused_with(env.by_renter(&[by_renter]), 0, Error::WrongAccount);
    // The rent to someone else than the renter.
    let mut elsewhere = env.cooperative_close_ix(&chan);
    elsewhere.accounts[1] = AccountMeta::new(env.provider.pubkey(), false);
    refused_with(env.by_provider(&[elsewhere]), 0, Error::WrongAccount);
    // The tokens to someone else's account.
    let mut to_provider = env.cooperative_close_ix(&chan);
    to_provider.accounts[4] = AccountMeta::new(env.provider_token, false);
    refused_with(env.by_provider(&[to_provider]), 0, Error::WrongAccount);

    let rent = env.lamports(&chan.address) + env.lamports(&chan.vault);
    let before = env.lamports(&env.renter.pubkey());
    ok(env.by_provider(&[env.cooperative_close_ix(&chan)]));
    assert_eq!(env.lamports(&env.renter.pubkey()), before + rent, "the provider paid the fee");
    assert_eq!(env.balance(&env.renter_token), MINTED - 250);
    assert_eq!(env.balance(&env.provider_token), 250);
    assert!(env.gone(&chan.address) && env.gone(&chan.vault));
}

#[test]
fn cooperative_close_works_while_closing_too() {
    let mut env = Env::new();
    let chan = env.open(1);
    ok(env.by_renter(&[env.start_close_ix(&chan)]));
    env.advance(60);
    ok(env.claim(&chan, 100));
    ok(env.by_provider(&[env.cooperative_close_ix(&chan)]));
    assert_eq!(env.balance(&env.renter_token), MINTED - 100);
    assert!(env.gone(&chan.address) && env.gone(&chan.vault));
}

#[test]
fn open_with_a_window_out_of_range_a_zero_deposit_or_a_wrong_address_is_refused() {
    let mut env = Env::new();
    let chan = env.chan(1);
    for window in [MIN_WINDOW_SECS - 1, MAX_WINDOW_SECS + 1, 0, -1, i64::MIN, i64::MAX] {
        refused_with(env.by_renter(&[env.open_ix(&chan, DEPOSIT, window)]), 0, Error::WindowOutOfRange);
    }
    refused_with(env.by_renter(&[env.open_ix(&chan, 0, WINDOW)]), 0, Error::ZeroAmount);

    // The channel of another id, or another provider, in this channel's place.
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[3].pubkey = env.chan(2).address;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongAccount);
    let strangers = channel_address(&env.renter.pubkey(), &Keypair::new().pubkey(), &env.mint, 1);
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[3].pubkey = strangers.address;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongAccount);
    // Another vault.
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[4].pubkey = env.chan(2).vault;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongAccount);
    // Another token program, or system program.
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[6].pubkey = SYSTEM_PROGRAM;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongAccount);
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[7].pubkey = TOKEN_PROGRAM;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongAccount);
    // A mint that is not a token program's account.
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[2].pubkey = env.provider.pubkey();
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongOwner);
    // The tokens from the provider's account, or from an account of another mint.
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[5].pubkey = env.provider_token;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongAccount);
    let other_mint = env.new_mint();
    let other_token = env.new_token_account(&other_mint, &env.renter.pubkey());
    let mut wrong = env.open_ix(&chan, DEPOSIT, WINDOW);
    wrong.accounts[5].pubkey = other_token;
    refused_with(env.by_renter(&[wrong]), 0, Error::WrongMint);
    // More than the renter holds: the token program refuses (TokenError::InsufficientFunds).
    refused(env.by_renter(&[env.open_ix(&chan, MINTED + 1, WINDOW)]), 0, InstructionError::Custom(1));

    assert!(env.gone(&chan.address) && env.gone(&chan.vault));
    assert_eq!(env.balance(&env.renter_token), MINTED);
    // The edges of the range are fine.
    ok(env.by_renter(&[env.open_ix(&chan, DEPOSIT, MIN_WINDOW_SECS)]));
    let chan2 = env.chan(2);
    ok(env.by_renter(&[env.open_ix(&chan2, DEPOSIT, MAX_WINDOW_SECS)]));
    assert_eq!(env.state(&chan2).window, MAX_WINDOW_SECS);
}

#[test]
fn a_second_open_at_the_same_address_fails() {
    let mut env = Env::new();
    let chan = env.open(1);
    ok(env.claim(&chan, 100));
    let before = env.state(&chan);
    env.advance(10);
    // The system program refuses to create an account in use (SystemError::AccountAlreadyInUse).
    refused(env.by_renter(&[env.open_ix(&chan, 5 * DEPOSIT, WINDOW)]), 0, InstructionError::Custom(0));
    assert_eq!(env.state(&chan), before);
    assert_eq!(env.balance(&chan.vault), DEPOSIT - 100);
    assert_eq!(env.balance(&env.renter_token), MINTED - DEPOSIT);
    // Another id is another channel.
    let chan2 = env.open(2);
    assert_ne!(chan2.address, chan.address);
}

#[test]
fn accounts_passed_as_non_writable_or_not_signed_are_refused() {
    let mut env = Env::new();
    let chan1 = env.chan(1);

    // open: the renter not signing, then each writable account passed read-only.
    let mut ix = env.open_ix(&chan1, DEPOSIT, WINDOW);
    ix.accounts[0].is_signer = false;
    refused_with(env.by_provider(&[ix]), 0, Error::NotSigned);
    for i in [3, 4, 5] {
        let mut ix = env.open_ix(&chan1, DEPOSIT, WINDOW);
        ix.accounts[i].is_writable = false;
        refused_with(env.by_renter(&[ix]), 0, Error::NotWritable);
    }
    // The renter read-only: it cannot pay the fee then, so the provider does.
    let mut ix = env.open_ix(&chan1, DEPOSIT, WINDOW);
    ix.accounts[0].is_writable = false;
    let renter = env.renter.insecure_clone();
    let provider = env.provider.insecure_clone();
    refused_with(env.send(&[ix], &provider, &[&renter]), 0, Error::NotWritable);

    let chan = env.open(1);

    // top_up
    let mut ix = env.top_up_ix(&chan, 10);
    ix.accounts[0].is_signer = false;
    refused_with(env.by_provider(&[ix]), 0, Error::NotSigned);
    for i in [1, 2, 3] {
        let mut ix = env.top_up_ix(&chan, 10);
        ix.accounts[i].is_writable = false;
        refused_with(env.by_renter(&[ix]), 0, Error::NotWritable);
    }

    // claim
    for i in [0, 1, 2] {
        let [sig, mut claim] = env.voucher(&chan, 100);
        claim.accounts[i].is_writable = false;
        refused_with(env.by_provider(&[sig, claim]), 1, Error::NotWritable);
    }

    // start_close
    let mut ix = env.start_close_ix(&chan);
    ix.accounts[0].is_signer = false;
    refused_with(env.by_provider(&[ix]), 0, Error::NotSigned);
    let mut ix = env.start_close_ix(&chan);
    ix.accounts[1].is_writable = false;
    refused_with(env.by_renter(&[ix]), 0, Error::NotWritable);
    // Someone else than the renter.
    let mut ix = env.start_close_ix(&chan);
    ix.accounts[0].pubkey = env.provider.pubkey();
    refused_with(env.by_provider(&[ix]), 0, Error::WrongAccount);

    ok(env.by_renter(&[env.start_close_ix(&chan)]));
    env.advance(WINDOW);

    // finalize
    let mut ix = env.finalize_ix(&chan);
    ix.accounts[0].is_signer = false;
    refused_with(env.by_provider(&[ix]), 0, Error::NotSigned);
    let mut ix = env.finalize_ix(&chan);
    ix.accounts[0].is_writable = false;
    refused_with(env.send(&[ix], &provider, &[&renter]), 0, Error::NotWritable);
    for i in [1, 2, 3] {
        let mut ix = env.finalize_ix(&chan);
        ix.accounts[i].is_writable = false;
        refused_with(env.by_renter(&[ix]), 0, Error::NotWritable);
    }
    // The provider finalizing in the renter's place.
    let mut ix = env.finalize_ix(&chan);
    ix.accounts[0] = AccountMeta::new(env.provider.pubkey(), true);
    refused_with(env.by_provider(&[ix]), 0, Error::WrongAccount);

    // cooperative_close (the provider's signature is covered by its own test).
    for i in [1, 2, 3, 4] {
        let mut ix = env.cooperative_close_ix(&chan);
        ix.accounts[i].is_writable = false;
        refused_with(env.by_provider(&[ix]), 0, Error::NotWritable);
    }

    // Nothing moved; finalize as it should be works.
    assert_eq!(env.balance(&chan.vault), DEPOSIT);
    ok(env.by_renter(&[env.finalize_ix(&chan)]));
    assert_eq!(env.balance(&env.renter_token), MINTED);
}

#[test]
fn accounts_that_are_not_a_channel_and_bad_instruction_data_are_refused() {
    let mut env = Env::new();
    let chan = env.open(1);

    // The vault in the channel's place: owned by the token program.
    let mut ix = env.start_close_ix(&chan);
    ix.accounts[1].pubkey = chan.vault;
    refused_with(env.by_renter(&[ix]), 0, Error::WrongOwner);
    // An account of the program that is not a channel.
    let fake = Address::new_unique();
    let lamports = env.svm.minimum_balance_for_rent_exemption(Channel::LEN);
    let account =
        Account { lamports, data: vec![0; Channel::LEN], owner: PROGRAM_ID, executable: false, rent_epoch: 0 };
    env.svm.set_account(fake, account).unwrap();
    let mut ix = env.start_close_ix(&chan);
    ix.accounts[1].pubkey = fake;
    refused_with(env.by_renter(&[ix]), 0, Error::NotAChannel);
    // A copy of this channel at another address: its vault is not that address's vault.
    let real = env.svm.get_account(&chan.address).unwrap();
    let copy = Address::new_unique();
    env.svm.set_account(copy, real).unwrap();
    let [sig, _] = env.voucher(&chan, 100);
    let message = env.message(&Chan { address: copy, ..chan }, env.state(&chan).generation, 100, DIGEST);
    let mut claim = env.claim_ix(&chan, &env.provider_token, 100, DIGEST);
    claim.accounts[0].pubkey = copy;
    // (WrongAccount, or InvalidSeeds where the vault's seeds with that address fall on the curve.)
    let r = env.by_provider(&[env.signed(&message), claim]).map_err(|e| e.err);
    assert!(
        [InstructionError::Custom(Error::WrongAccount as u32), InstructionError::InvalidSeeds]
            .iter()
            .any(|e| r == Err(TransactionError::InstructionError(1, e.clone()))),
        "{r:?}"
    );
    // The vault of another channel.
    let chan2 = env.open(2);
    let [_, mut claim] = env.voucher(&chan, 100);
    claim.accounts[1].pubkey = chan2.vault;
    refused_with(env.by_provider(&[sig.clone(), claim]), 1, Error::WrongAccount);
    // Another token program.
    let [_, mut claim] = env.voucher(&chan, 100);
    claim.accounts[4].pubkey = SYSTEM_PROGRAM;
    refused_with(env.by_provider(&[sig, claim]), 1, Error::WrongAccount);

    // Bad instruction data: an unknown tag, a short instruction, a trailing byte, none.
    let mut trailing = data(Ix::StartClose);
    trailing.push(0);
    for bad in [vec![6u8], vec![9], vec![1, 0, 0], trailing, vec![]] {
        let mut ix = env.start_close_ix(&chan);
        ix.data = bad;
        refused_with(env.by_renter(&[ix]), 0, Error::BadInstruction);
    }
    // Too few accounts.
    let mut ix = env.start_close_ix(&chan);
    ix.accounts.truncate(1);
    #[allow(deprecated)]
    refused(env.by_renter(&[ix]), 0, InstructionError::NotEnoughAccountKeys);
    assert_eq!(env.state(&chan).close_at, 0);
}

#[test]
fn after_finalize_and_re_open_at_the_same_address_an_old_voucher_is_refused() {
    let mut env = Env::new();
    let chan = env.open(1);
    let old_generation = env.state(&chan).generation;
    let old = env.voucher(&chan, 600);
    ok(env.claim(&chan, 300));
    ok(env.by_renter(&[env.start_close_ix(&chan)]));
    env.advance(WINDOW);
    ok(env.by_renter(&[env.finalize_ix(&chan)]));
    assert_eq!(env.balance(&env.renter_token), MINTED - 300);

    env.advance(5);
    let again = env.open(1);
    assert_eq!(again.address, chan.address);
    let c = env.state(&again);
    assert!(c.generation > old_generation);
    assert_eq!((c.deposited, c.claimed), (DEPOSIT, 0));
    // The old channel's voucher for 600, never claimed, and one for 300, claimed there.
    refused_with(env.by_provider(&old), 1, Error::VoucherMismatch);
    let m = env.message(&chan, old_generation, 300, DIGEST);
    refused_with(
        env.by_provider(&[env.signed(&m), env.claim_ix(&again, &env.provider_token, 300, DIGEST)]),
        1,
        Error::VoucherMismatch,
    );
    assert_eq!(env.balance(&env.provider_token), 300);
    // The new channel's own vouchers pay.
    ok(env.claim(&again, 200));
    assert_eq!(env.balance(&env.provider_token), 500);
}

#[test]
fn compute_units_of_open_claim_and_finalize() {
    let mut env = Env::new();
    let chan = env.chan(1);
    let open = ok(env.by_renter(&[env.open_ix(&chan, DEPOSIT, WINDOW)])).compute_units_consumed;
    let top_up = ok(env.by_renter(&[env.top_up_ix(&chan, 100)])).compute_units_consumed;
    let first_claim = ok(env.claim(&chan, 300)).compute_units_consumed;
    let claim = ok(env.claim(&chan, 400)).compute_units_consumed;
    let start_close = ok(env.by_renter(&[env.start_close_ix(&chan)])).compute_units_consumed;
    env.advance(WINDOW);
    let finalize = ok(env.by_renter(&[env.finalize_ix(&chan)])).compute_units_consumed;
    let chan2 = env.open(2);
    env.advance(60);
    let cooperative_close = ok(env.by_provider(&[env.cooperative_close_ix(&chan2)])).compute_units_consumed;
    println!("paychan compute units (whole transaction, LiteSVM 0.16):");
    println!("  open              {open:>6}");
    println!("  top_up            {top_up:>6}");
    println!("  claim (first)     {first_claim:>6}  (Ed25519 check + claim)");
    println!("  claim (next)      {claim:>6}  (Ed25519 check + claim)");
    println!("  start_close       {start_close:>6}");
    println!("  finalize          {finalize:>6}");
    println!("  cooperative_close {cooperative_close:>6}");
    for cu in [open, top_up, first_claim, claim, start_close, finalize, cooperative_close] {
        assert!(cu > 0 && cu < 200_000, "{cu} CU is more than one instruction's default budget");
    }
}

/// The program refuses opening when someone has sent lamports to the channel's (or vault's)
/// address first: the system program's CreateAccount fails on an account with lamports. Anyone
/// can compute the address from public seeds, so anyone can block a renter's channel id this
/// way. See the report; this is what the fix must make pass.
#[test]
fn open_succeeds_when_someone_funded_the_channel_address_first() {
    let mut env = Env::new();
    let chan = env.chan(1);
    let provider = env.provider.pubkey();
    ok(env.by_provider(&[system_transfer_ix(&provider, &chan.address, 1_000_000)]));
    ok(env.by_provider(&[system_transfer_ix(&provider, &chan.vault, 1_000_000)]));
    ok(env.by_renter(&[env.open_ix(&chan, DEPOSIT, WINDOW)]));
    ok(env.claim(&chan, 100));
}

/// A channel opened and cooperatively closed within one slot, then opened again at the same
/// address in that slot, would have the same generation as before, and the old vouchers would
/// pay again. Either the close in the opening slot is refused, or the old voucher is. See the
/// report; this is what the fix must make pass.
#[test]
fn an_old_voucher_is_refused_after_cooperative_close_and_re_open_in_the_same_slot() {
    let mut env = Env::new();
    let chan = env.open(1);
    let old = env.voucher(&chan, 300);
    ok(env.by_provider(&old));
    if env.by_provider(&[env.cooperative_close_ix(&chan)]).is_err() {
        // Refused in the opening slot: the channel is still there, and closes a slot later.
        assert_eq!(env.state(&chan).claimed, 300);
        env.advance(1);
        ok(env.by_provider(&[env.cooperative_close_ix(&chan)]));
    }
    let again = env.open(1);
    assert_eq!(again.address, chan.address);
    refused_with(env.by_provider(&old), 1, Error::VoucherMismatch);
    assert_eq!(env.balance(&env.provider_token), 300);
}
