//! SPL Token plumbing: mints, associated token accounts, balances, and sending instructions.

use solana_program_pack::Pack;
use solana_sdk::instruction::Instruction;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signature, Signer};
use solana_sdk::transaction::Transaction;

use crate::chain::{Chain, ChainError};

pub(crate) fn ix(r: Result<Instruction, solana_sdk::program_error::ProgramError>) -> Result<Instruction, ChainError> {
    r.map_err(|e| ChainError::Instruction(e.to_string()))
}

/// Signs `instructions` with `signers` (the first pays the fee) against a recent blockhash
/// and sends them as one transaction.
pub fn send(chain: &dyn Chain, instructions: &[Instruction], signers: &[&Keypair]) -> Result<Signature, ChainError> {
    let payer = signers.first().ok_or_else(|| ChainError::Instruction("no signer".into()))?;
    let tx =
        Transaction::new_signed_with_payer(instructions, Some(&payer.pubkey()), signers, chain.latest_blockhash()?);
    chain.send(&tx)
}

/// An instruction creating an account of `len` bytes owned by `program`, rent-exempt.
pub(crate) fn create_account(
    chain: &dyn Chain,
    payer: &Pubkey,
    account: &Pubkey,
    len: usize,
    program: &Pubkey,
) -> Result<Instruction, ChainError> {
    Ok(solana_system_interface::instruction::create_account(payer, account, chain.rent(len)?, len as u64, program))
}

/// A new SPL mint with `decimals`, its authority `authority`.
pub fn create_mint(chain: &dyn Chain, payer: &Keypair, authority: &Pubkey, decimals: u8) -> Result<Pubkey, ChainError> {
    let mint = Keypair::new();
    let token = spl_token_interface::id();
    let instructions = [
        create_account(chain, &payer.pubkey(), &mint.pubkey(), spl_token_interface::state::Mint::LEN, &token)?,
        ix(spl_token_interface::instruction::initialize_mint2(&token, &mint.pubkey(), authority, None, decimals))?,
    ];
    send(chain, &instructions, &[payer, &mint])?;
    Ok(mint.pubkey())
}

/// The associated token account of `owner` for `mint`: where it is paid and refunded.
pub fn token_account(owner: &Pubkey, mint: &Pubkey) -> Pubkey {
    spl_associated_token_account_interface::address::get_associated_token_address(owner, mint)
}

/// Creates `owner`'s associated token account for `mint` unless it exists; `payer` pays rent.
pub fn ensure_token_account(
    chain: &dyn Chain,
    payer: &Keypair,
    owner: &Pubkey,
    mint: &Pubkey,
) -> Result<Pubkey, ChainError> {
    let address = token_account(owner, mint);
    if chain.account(&address)?.is_none() {
        let i = spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent(
            &payer.pubkey(),
            owner,
            mint,
            &spl_token_interface::id(),
        );
        send(chain, &[i], &[payer])?;
    }
    Ok(address)
}

/// Mints `amount` into the token account `to`.
pub fn mint_to(
    chain: &dyn Chain,
    authority: &Keypair,
    mint: &Pubkey,
    to: &Pubkey,
    amount: u64,
) -> Result<Signature, ChainError> {
    let i = ix(spl_token_interface::instruction::mint_to(
        &spl_token_interface::id(),
        mint,
        to,
        &authority.pubkey(),
        &[],
        amount,
    ))?;
    send(chain, &[i], &[authority])
}

/// The state of an SPL token account.
pub fn token_state(chain: &dyn Chain, account: &Pubkey) -> Result<spl_token_interface::state::Account, ChainError> {
    let acc = chain.account(account)?.ok_or(ChainError::Account(*account, "a token account"))?;
    if acc.owner != spl_token_interface::id() {
        return Err(ChainError::Account(*account, "a token account"));
    }
    spl_token_interface::state::Account::unpack(&acc.data).map_err(|_| ChainError::Account(*account, "a token account"))
}

/// The token balance of an SPL token account.
pub fn token_balance(chain: &dyn Chain, account: &Pubkey) -> Result<u64, ChainError> {
    token_state(chain, account).map(|s| s.amount)
}

/// The decimals of an SPL mint.
pub fn mint_decimals(chain: &dyn Chain, mint: &Pubkey) -> Result<u8, ChainError> {
    let acc = chain.account(mint)?.ok_or(ChainError::Account(*mint, "an SPL mint"))?;
    if acc.owner != spl_token_interface::id() {
        return Err(ChainError::Account(*mint, "an SPL mint"));
    }
    spl_token_interface::state::Mint::unpack(&acc.data)
        .map(|m| m.decimals)
        .map_err(|_| ChainError::Account(*mint, "an SPL mint"))
}
