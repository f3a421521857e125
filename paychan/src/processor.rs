//! The program: every instruction checks every account it touches (owner, signer, writable,
//! the address its seeds or the channel name) before it moves anything.

use pinocchio::address::Address;
use pinocchio::cpi::{Seed, Signer};
use pinocchio::error::ProgramError;
use pinocchio::sysvars::Sysvar;
use pinocchio::sysvars::clock::Clock;
use pinocchio::sysvars::instructions::{INSTRUCTIONS_ID, Instructions};
use pinocchio::sysvars::rent::Rent;
use pinocchio::{AccountView, ProgramResult, no_allocator, nostd_panic_handler, program_entrypoint};
use pinocchio_system::instructions::{Allocate, Assign, CreateAccount, Transfer as SystemTransfer};
use pinocchio_token::instructions::{CloseAccount, InitializeAccount3, Transfer};
use pinocchio_token::state::Account as TokenAccount;

use crate::state::{
    CHANNEL_SEED, Channel, Error, Instruction, MAX_WINDOW_SECS, MIN_WINDOW_SECS, VAULT_SEED, VOUCHER_LEN,
};

use solana_compiler_builtins as _;

program_entrypoint!(process_instruction, 10);
no_allocator!();
nostd_panic_handler!();

/// "Ed25519SigVerify111111111111111111111111111".
const ED25519_PROGRAM: Address = Address::new_from_array([
    0x03, 0x7d, 0x46, 0xd6, 0x7c, 0x93, 0xfb, 0xbe, 0x12, 0xf9, 0x42, 0x8f, 0x83, 0x8d, 0x40, 0xff, 0x05, 0x70, 0x74,
    0x49, 0x27, 0xf4, 0x8a, 0x64, 0xfc, 0xca, 0x70, 0x44, 0x80, 0x00, 0x00, 0x00,
]);

/// The SPL Token account length.
const TOKEN_ACCOUNT_LEN: u64 = 165;

impl From<Error> for ProgramError {
    fn from(e: Error) -> ProgramError {
        ProgramError::Custom(e as u32)
    }
}

#[inline(never)]
pub fn process_instruction(program_id: &Address, accounts: &mut [AccountView], data: &[u8]) -> ProgramResult {
    match Instruction::decode(data)? {
        Instruction::Open { id, deposit, window, voucher_key } => {
            open(program_id, accounts, &OpenArgs { id, deposit, window, voucher_key })
        }
        Instruction::TopUp { amount } => top_up(program_id, accounts, amount),
        Instruction::Claim { cumulative, receipt_digest } => claim(program_id, accounts, cumulative, &receipt_digest),
        Instruction::StartClose => start_close(program_id, accounts),
        Instruction::Finalize => finalize(program_id, accounts),
        Instruction::CooperativeClose => cooperative_close(program_id, accounts),
    }
}

fn signer(a: &AccountView) -> Result<(), Error> {
    if a.is_signer() { Ok(()) } else { Err(Error::NotSigned) }
}

fn writable(a: &AccountView) -> Result<(), Error> {
    if a.is_writable() { Ok(()) } else { Err(Error::NotWritable) }
}

fn is(a: &AccountView, want: &Address) -> Result<(), Error> {
    if a.address() == want { Ok(()) } else { Err(Error::WrongAccount) }
}

fn now() -> Result<i64, ProgramError> {
    Ok(Clock::get()?.unix_timestamp)
}

/// A channel account of this program, writable, and what it holds.
fn load(program_id: &Address, channel: &AccountView) -> Result<Channel, ProgramError> {
    if !channel.owned_by(program_id) {
        return Err(Error::WrongOwner.into());
    }
    writable(channel)?;
    let data = channel.try_borrow()?;
    Ok(Channel::decode(&data)?)
}

fn store(channel: &mut AccountView, c: &Channel) -> ProgramResult {
    let mut data = channel.try_borrow_mut()?;
    c.encode(&mut data)?;
    Ok(())
}

/// A token account of the SPL Token program, of `mint`, owned by `owner`.
fn token_account(a: &AccountView, mint: &[u8; 32], owner: &[u8; 32]) -> Result<u64, ProgramError> {
    let t = TokenAccount::from_account_view(a)?;
    if t.mint().as_ref() != mint {
        return Err(Error::WrongMint.into());
    }
    if t.owner().as_ref() != owner {
        return Err(Error::WrongAccount.into());
    }
    Ok(t.amount())
}

fn token_program(a: &AccountView) -> Result<(), Error> {
    is(a, &pinocchio_token::ID)
}

fn vault_of(program_id: &Address, channel: &AccountView, vault: &AccountView, c: &Channel) -> Result<(), ProgramError> {
    if vault.address().as_ref() != &c.vault {
        return Err(Error::WrongAccount.into());
    }
    writable(vault)?;
    // The vault's address was derived at open; check it is still the PDA of this channel.
    let bump = [c.vault_bump];
    let derived = Address::create_program_address(&[VAULT_SEED, channel.address().as_ref(), &bump], program_id)?;
    if &derived != vault.address() {
        return Err(Error::WrongAccount.into());
    }
    Ok(())
}

/// Runs `f` with the channel's signer seeds.
fn with_channel_signer<R>(c: &Channel, f: impl FnOnce(&[Signer]) -> R) -> R {
    let id = c.id.to_le_bytes();
    let bump = [c.bump];
    let seeds = [
        Seed::from(CHANNEL_SEED),
        Seed::from(&c.renter),
        Seed::from(&c.provider),
        Seed::from(&c.mint),
        Seed::from(&id),
        Seed::from(&bump),
    ];
    f(&[Signer::from(&seeds)])
}

/// Open's fields, passed by reference: BPF passes five argument words in registers and the rest
/// on the stack (`accounts` alone takes two), and registers are cheaper.
#[derive(Clone, Copy)]
struct OpenArgs {
    id: u64,
    deposit: u64,
    window: i64,
    voucher_key: [u8; 32],
}

#[inline(never)]
fn open(program_id: &Address, accounts: &mut [AccountView], args: &OpenArgs) -> ProgramResult {
    let OpenArgs { id, deposit, window, voucher_key } = *args;
    let [renter, provider, mint, channel, vault, renter_token, token, system, ..] = accounts else {
        return Err(ProgramError::NotEnoughAccountKeys);
    };
    signer(renter)?;
    writable(renter)?;
    writable(channel)?;
    writable(vault)?;
    writable(renter_token)?;
    token_program(token)?;
    is(system, &pinocchio_system::ID)?;
    if !(MIN_WINDOW_SECS..=MAX_WINDOW_SECS).contains(&window) {
        return Err(Error::WindowOutOfRange.into());
    }
    if deposit == 0 {
        return Err(Error::ZeroAmount.into());
    }
    if !mint.owned_by(&pinocchio_token::ID) {
        return Err(Error::WrongOwner.into());
    }
    let id_bytes = id.to_le_bytes();
    let (want_channel, bump) = Address::find_program_address(
        &[CHANNEL_SEED, renter.address().as_ref(), provider.address().as_ref(), mint.address().as_ref(), &id_bytes],
        program_id,
    );
    is(channel, &want_channel)?;
    let (want_vault, vault_bump) = Address::find_program_address(&[VAULT_SEED, channel.address().as_ref()], program_id);
    is(vault, &want_vault)?;
    // The renter's tokens: its own account of this mint.
    token_account(renter_token, &mint.address().to_bytes(), &renter.address().to_bytes())?;

    let rent = Rent::get()?;
    let bump_bytes = [bump];
    let channel_seeds = [
        Seed::from(CHANNEL_SEED),
        Seed::from(renter.address().as_ref()),
        Seed::from(provider.address().as_ref()),
        Seed::from(mint.address().as_ref()),
        Seed::from(&id_bytes),
        Seed::from(&bump_bytes),
    ];
    // An account that already exists (a channel open at this address) makes this fail.
    create_pda(
        renter,
        channel,
        Channel::LEN as u64,
        program_id,
        rent.try_minimum_balance(Channel::LEN)?,
        &[Signer::from(&channel_seeds)],
    )?;
    let vault_bump_bytes = [vault_bump];
    let vault_seeds = [Seed::from(VAULT_SEED), Seed::from(channel.address().as_ref()), Seed::from(&vault_bump_bytes)];
    create_pda(
        renter,
        vault,
        TOKEN_ACCOUNT_LEN,
        &pinocchio_token::ID,
        rent.try_minimum_balance(TOKEN_ACCOUNT_LEN as usize)?,
        &[Signer::from(&vault_seeds)],
    )?;
    InitializeAccount3::new(vault, mint, channel.address()).invoke()?;
    Transfer::new(renter_token, vault, renter, deposit).invoke()?;

    let c = Channel {
        renter: renter.address().to_bytes(),
        provider: provider.address().to_bytes(),
        voucher_key,
        mint: mint.address().to_bytes(),
        vault: vault.address().to_bytes(),
        id,
        deposited: deposit,
        claimed: 0,
        close_at: 0,
        window,
        generation: Clock::get()?.slot,
        bump,
        vault_bump,
    };
    store(channel, &c)
}

/// Creates the PDA `to`, even when someone sent lamports to its address first (CreateAccount
/// refuses an account with lamports): tops it up to `lamports`, allocates and assigns it. An
/// account with data or another owner (a channel already open there) still makes this fail.
#[inline(always)]
fn create_pda(
    from: &AccountView,
    to: &AccountView,
    space: u64,
    owner: &Address,
    lamports: u64,
    signers: &[Signer],
) -> ProgramResult {
    let have = to.lamports();
    if have == 0 {
        return CreateAccount { from, to, lamports, space, owner }.invoke_signed(signers);
    }
    if have < lamports {
        SystemTransfer { from, to, lamports: lamports - have }.invoke()?;
    }
    Allocate { account: to, space }.invoke_signed(signers)?;
    Assign { account: to, owner }.invoke_signed(signers)
}

#[inline(never)]
fn top_up(program_id: &Address, accounts: &mut [AccountView], amount: u64) -> ProgramResult {
    let [renter, channel, vault, renter_token, token, ..] = accounts else {
        return Err(ProgramError::NotEnoughAccountKeys);
    };
    signer(renter)?;
    token_program(token)?;
    let mut c = load(program_id, channel)?;
    if renter.address().as_ref() != &c.renter {
        return Err(Error::WrongAccount.into());
    }
    if c.close_at != 0 {
        return Err(Error::AlreadyClosing.into());
    }
    if amount == 0 {
        return Err(Error::ZeroAmount.into());
    }
    vault_of(program_id, channel, vault, &c)?;
    writable(renter_token)?;
    token_account(renter_token, &c.mint, &c.renter)?;
    c.deposited = c.deposited.checked_add(amount).ok_or(Error::Overflow)?;
    Transfer::new(renter_token, vault, renter, amount).invoke()?;
    store(channel, &c)
}

/// Checks that the instruction just before this one is the Ed25519 program's check of exactly
/// one signature by `key` over exactly `message`, with every offset inside that instruction.
fn voucher_signed(sysvar: &AccountView, key: &[u8; 32], message: &[u8; VOUCHER_LEN]) -> Result<(), ProgramError> {
    if sysvar.address() != &INSTRUCTIONS_ID {
        return Err(Error::WrongAccount.into());
    }
    let ixs = Instructions::try_from(sysvar)?;
    let current = ixs.load_current_index() as usize;
    if current == 0 {
        return Err(Error::NoVoucherSignature.into());
    }
    let prev = ixs.load_instruction_at(current - 1).map_err(|_| Error::NoVoucherSignature)?;
    if prev.get_program_id() != &ED25519_PROGRAM {
        return Err(Error::NoVoucherSignature.into());
    }
    let data = prev.get_instruction_data();
    let u16_at = |at: usize| -> Result<u16, Error> {
        let b = data.get(at..at + 2).ok_or(Error::VoucherMismatch)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    if data.first() != Some(&1) {
        return Err(Error::VoucherMismatch.into());
    }
    // One Ed25519SignatureOffsets at byte 2: signature offset and instruction index, public
    // key offset and index, message offset, size and index.
    let (key_at, msg_at, msg_len) = (u16_at(6)? as usize, u16_at(10)? as usize, u16_at(12)? as usize);
    for index_at in [4, 8, 14] {
        let index = u16_at(index_at)?;
        if index != u16::MAX && index as usize != current - 1 {
            return Err(Error::VoucherMismatch.into());
        }
    }
    if data.get(key_at..key_at + 32) != Some(&key[..]) {
        return Err(Error::VoucherMismatch.into());
    }
    if msg_len != VOUCHER_LEN || data.get(msg_at..msg_at + msg_len) != Some(&message[..]) {
        return Err(Error::VoucherMismatch.into());
    }
    Ok(())
}

#[inline(never)]
fn claim(
    program_id: &Address,
    accounts: &mut [AccountView],
    cumulative: u64,
    receipt_digest: &[u8; 32],
) -> ProgramResult {
    let [channel, vault, provider_token, sysvar, token, ..] = accounts else {
        return Err(ProgramError::NotEnoughAccountKeys);
    };
    token_program(token)?;
    let mut c = load(program_id, channel)?;
    if c.close_at != 0 && now()? >= c.close_at {
        return Err(Error::TooLate.into());
    }
    vault_of(program_id, channel, vault, &c)?;
    writable(provider_token)?;
    // Pays only the provider: a token account of the channel's mint that the provider owns.
    token_account(provider_token, &c.mint, &c.provider)?;
    if cumulative <= c.claimed || cumulative > c.deposited {
        return Err(Error::VoucherAmount.into());
    }
    let message = Channel::voucher_message(
        &program_id.to_bytes(),
        &channel.address().to_bytes(),
        c.generation,
        &c.mint,
        cumulative,
        receipt_digest,
    );
    voucher_signed(sysvar, &c.voucher_key, &message)?;
    let amount = cumulative - c.claimed;
    c.claimed = cumulative;
    store(channel, &c)?;
    with_channel_signer(&c, |s| Transfer::new(vault, provider_token, channel, amount).invoke_signed(s))
}

#[inline(never)]
fn start_close(program_id: &Address, accounts: &mut [AccountView]) -> ProgramResult {
    let [renter, channel, ..] = accounts else {
        return Err(ProgramError::NotEnoughAccountKeys);
    };
    signer(renter)?;
    let mut c = load(program_id, channel)?;
    if renter.address().as_ref() != &c.renter {
        return Err(Error::WrongAccount.into());
    }
    if c.close_at != 0 {
        return Err(Error::AlreadyClosing.into());
    }
    c.close_at = now()?.checked_add(c.window).ok_or(Error::Overflow)?;
    store(channel, &c)
}

/// Everything left in the vault to the renter, then the vault and the channel closed with
/// their rent to the renter.
fn wind_up(
    c: &Channel,
    renter: &mut AccountView,
    channel: &mut AccountView,
    vault: &AccountView,
    renter_token: &AccountView,
) -> ProgramResult {
    let left = token_account(vault, &c.mint, &channel.address().to_bytes())?;
    if left > 0 {
        with_channel_signer(c, |s| Transfer::new(vault, renter_token, channel, left).invoke_signed(s))?;
    }
    with_channel_signer(c, |s| CloseAccount::new(vault, renter, channel).invoke_signed(s))?;
    let lamports = channel.lamports();
    renter.set_lamports(renter.lamports().checked_add(lamports).ok_or(Error::Overflow)?);
    channel.set_lamports(0);
    channel.close()
}

#[inline(never)]
fn finalize(program_id: &Address, accounts: &mut [AccountView]) -> ProgramResult {
    let [renter, channel, vault, renter_token, token, ..] = accounts else {
        return Err(ProgramError::NotEnoughAccountKeys);
    };
    signer(renter)?;
    writable(renter)?;
    token_program(token)?;
    let c = load(program_id, channel)?;
    if renter.address().as_ref() != &c.renter {
        return Err(Error::WrongAccount.into());
    }
    if c.close_at == 0 {
        return Err(Error::NotClosing.into());
    }
    if now()? < c.close_at {
        return Err(Error::TooEarly.into());
    }
    vault_of(program_id, channel, vault, &c)?;
    writable(renter_token)?;
    token_account(renter_token, &c.mint, &c.renter)?;
    wind_up(&c, renter, channel, vault, renter_token)
}

#[inline(never)]
fn cooperative_close(program_id: &Address, accounts: &mut [AccountView]) -> ProgramResult {
    let [provider, renter, channel, vault, renter_token, token, ..] = accounts else {
        return Err(ProgramError::NotEnoughAccountKeys);
    };
    signer(provider)?;
    writable(renter)?;
    token_program(token)?;
    let c = load(program_id, channel)?;
    if provider.address().as_ref() != &c.provider || renter.address().as_ref() != &c.renter {
        return Err(Error::WrongAccount.into());
    }
    // A channel closed in the slot it was opened in could be opened again at this address in
    // that slot, with the same generation: its vouchers would pay again. (finalize cannot
    // come in the opening slot: the window is at least a minute.)
    if Clock::get()?.slot == c.generation {
        return Err(Error::TooEarly.into());
    }
    vault_of(program_id, channel, vault, &c)?;
    writable(renter_token)?;
    token_account(renter_token, &c.mint, &c.renter)?;
    wind_up(&c, renter, channel, vault, renter_token)
}
