#![doc = include_str!("../README.md")]

use litesvm::LiteSVM;
use solana_program_pack::Pack;
use solana_sdk::instruction::Instruction;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signer};
use solana_sdk::transaction::Transaction;

/// What went wrong on the chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("building an instruction: {0}")]
    Instruction(String),
    #[error("the transaction failed: {0}")]
    Failed(String),
    #[error("account {0} is missing or not a token account")]
    NotTokenAccount(Pubkey),
}

/// A party's Solana signer: the same ed25519 key as its wasmgrid identity.
pub fn signer(key: &proto::Keypair) -> Keypair {
    Keypair::new_from_array(key.seed())
}

/// The in-process chain: LiteSVM with the real SPL Token program.
pub struct LocalChain {
    svm: LiteSVM,
}

impl std::fmt::Debug for LocalChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalChain").finish_non_exhaustive()
    }
}

impl Default for LocalChain {
    fn default() -> Self {
        LocalChain::new()
    }
}

impl LocalChain {
    pub fn new() -> LocalChain {
        LocalChain { svm: LiteSVM::new() }
    }

    /// Gives `to` lamports for fees and rent (a local chain only).
    pub fn airdrop(&mut self, to: &Pubkey, lamports: u64) -> Result<(), ChainError> {
        self.svm.airdrop(to, lamports).map(drop).map_err(|e| ChainError::Failed(format!("{:?}", e.err)))
    }

    /// Signs `instructions` with `signers` (the first pays the fee) and runs them as one
    /// transaction.
    pub fn send(&mut self, instructions: &[Instruction], signers: &[&Keypair]) -> Result<(), ChainError> {
        let payer = signers.first().ok_or_else(|| ChainError::Instruction("no signer".into()))?;
        let tx = Transaction::new_signed_with_payer(
            instructions,
            Some(&payer.pubkey()),
            signers,
            self.svm.latest_blockhash(),
        );
        self.svm
            .send_transaction(tx)
            .map(drop)
            .map_err(|e| ChainError::Failed(format!("{:?} {:?}", e.err, e.meta.logs)))
    }

    fn rent(&self, len: usize) -> u64 {
        self.svm.minimum_balance_for_rent_exemption(len)
    }

    /// The token balance of an SPL token account.
    pub fn token_balance(&self, account: &Pubkey) -> Result<u64, ChainError> {
        let acc = self.svm.get_account(account).ok_or(ChainError::NotTokenAccount(*account))?;
        let state = spl_token_interface::state::Account::unpack(&acc.data)
            .map_err(|_| ChainError::NotTokenAccount(*account))?;
        Ok(state.amount)
    }
}

fn ix(r: Result<Instruction, solana_sdk::program_error::ProgramError>) -> Result<Instruction, ChainError> {
    r.map_err(|e| ChainError::Instruction(e.to_string()))
}

fn create(chain: &LocalChain, payer: &Pubkey, account: &Pubkey, len: usize) -> Instruction {
    solana_system_interface::instruction::create_account(
        payer,
        account,
        chain.rent(len),
        len as u64,
        &spl_token_interface::id(),
    )
}

/// A new SPL mint with `decimals`, its authority `authority`.
pub fn create_mint(
    chain: &mut LocalChain,
    payer: &Keypair,
    authority: &Pubkey,
    decimals: u8,
) -> Result<Pubkey, ChainError> {
    let mint = Keypair::new();
    let len = spl_token_interface::state::Mint::LEN;
    let instructions = [
        create(chain, &payer.pubkey(), &mint.pubkey(), len),
        ix(spl_token_interface::instruction::initialize_mint2(
            &spl_token_interface::id(),
            &mint.pubkey(),
            authority,
            None,
            decimals,
        ))?,
    ];
    chain.send(&instructions, &[payer, &mint])?;
    Ok(mint.pubkey())
}

/// A new token account of `mint` owned by `owner` (a wallet or a multisig).
pub fn create_token_account(
    chain: &mut LocalChain,
    payer: &Keypair,
    mint: &Pubkey,
    owner: &Pubkey,
) -> Result<Pubkey, ChainError> {
    let account = Keypair::new();
    let len = spl_token_interface::state::Account::LEN;
    let instructions = [
        create(chain, &payer.pubkey(), &account.pubkey(), len),
        ix(spl_token_interface::instruction::initialize_account3(
            &spl_token_interface::id(),
            &account.pubkey(),
            mint,
            owner,
        ))?,
    ];
    chain.send(&instructions, &[payer, &account])?;
    Ok(account.pubkey())
}

/// Mints `amount` into `to`.
pub fn mint_to(
    chain: &mut LocalChain,
    authority: &Keypair,
    mint: &Pubkey,
    to: &Pubkey,
    amount: u64,
) -> Result<(), ChainError> {
    let i = ix(spl_token_interface::instruction::mint_to(
        &spl_token_interface::id(),
        mint,
        to,
        &authority.pubkey(),
        &[],
        amount,
    ))?;
    chain.send(&[i], &[authority])
}

/// A session's escrow: a token account owned by a 2-of-2 multisig of renter and provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Escrow {
    pub multisig: Pubkey,
    pub account: Pubkey,
    pub mint: Pubkey,
}

/// Opens a session's escrow and moves `budget` from the renter's token account into it. The
/// renter pays and signs.
pub fn open_escrow(
    chain: &mut LocalChain,
    renter: &Keypair,
    renter_tokens: &Pubkey,
    provider: &Pubkey,
    mint: &Pubkey,
    decimals: u8,
    budget: u64,
) -> Result<Escrow, ChainError> {
    let multisig = Keypair::new();
    let token = spl_token_interface::id();
    let instructions = [
        create(chain, &renter.pubkey(), &multisig.pubkey(), spl_token_interface::state::Multisig::LEN),
        ix(spl_token_interface::instruction::initialize_multisig2(
            &token,
            &multisig.pubkey(),
            &[&renter.pubkey(), provider],
            2,
        ))?,
    ];
    chain.send(&instructions, &[renter, &multisig])?;
    let account = create_token_account(chain, renter, mint, &multisig.pubkey())?;
    let deposit = ix(spl_token_interface::instruction::transfer_checked(
        &token,
        renter_tokens,
        mint,
        &account,
        &renter.pubkey(),
        &[],
        budget,
        decimals,
    ))?;
    chain.send(&[deposit], &[renter])?;
    Ok(Escrow { multisig: multisig.pubkey(), account, mint: *mint })
}

/// A transfer out of the escrow, authorized by the multisig; it needs both parties' signatures.
pub fn escrow_transfer(
    escrow: &Escrow,
    to: &Pubkey,
    signers: &[&Pubkey],
    amount: u64,
    decimals: u8,
) -> Result<Instruction, ChainError> {
    ix(spl_token_interface::instruction::transfer_checked(
        &spl_token_interface::id(),
        &escrow.account,
        &escrow.mint,
        to,
        &escrow.multisig,
        signers,
        amount,
        decimals,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_escrow_moves_only_with_both_signatures() {
        let mut chain = LocalChain::new();
        let (issuer, renter, provider) =
            (Keypair::new(), signer(&proto::Keypair::generate()), signer(&proto::Keypair::generate()));
        for k in [&issuer, &renter, &provider] {
            chain.airdrop(&k.pubkey(), 1_000_000_000).unwrap();
        }
        let mint = create_mint(&mut chain, &issuer, &issuer.pubkey(), 6).unwrap();
        let renter_tokens = create_token_account(&mut chain, &renter, &mint, &renter.pubkey()).unwrap();
        let provider_tokens = create_token_account(&mut chain, &provider, &mint, &provider.pubkey()).unwrap();
        mint_to(&mut chain, &issuer, &mint, &renter_tokens, 10_000_000).unwrap();

        let escrow = open_escrow(&mut chain, &renter, &renter_tokens, &provider.pubkey(), &mint, 6, 4_000_000).unwrap();
        assert_eq!(chain.token_balance(&escrow.account).unwrap(), 4_000_000);
        assert_eq!(chain.token_balance(&renter_tokens).unwrap(), 6_000_000);

        // Neither side alone can take the escrow.
        let renter_alone = escrow_transfer(&escrow, &renter_tokens, &[&renter.pubkey()], 4_000_000, 6).unwrap();
        assert!(chain.send(&[renter_alone], &[&renter]).is_err());
        let provider_alone = escrow_transfer(&escrow, &provider_tokens, &[&provider.pubkey()], 4_000_000, 6).unwrap();
        assert!(chain.send(&[provider_alone], &[&provider]).is_err());
        assert_eq!(chain.token_balance(&escrow.account).unwrap(), 4_000_000);

        // Together they can: the renter's signature over an amount, co-signed by the provider.
        let both =
            escrow_transfer(&escrow, &provider_tokens, &[&renter.pubkey(), &provider.pubkey()], 1_500_000, 6).unwrap();
        chain.send(&[both], &[&provider, &renter]).unwrap();
        assert_eq!(chain.token_balance(&provider_tokens).unwrap(), 1_500_000);
        assert_eq!(chain.token_balance(&escrow.account).unwrap(), 2_500_000);
    }
}
