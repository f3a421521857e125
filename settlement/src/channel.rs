//! The payment channel seen from off the chain: its addresses, the program's instructions as
//! transactions, the channel's state as the chain shows it, and vouchers (signing, checking).
//! Layouts and encodings come from `paychan-state`, the code the program itself runs.

use paychan_state::{CHANNEL_SEED, Channel as State, Instruction as Ix, VAULT_SEED, VOUCHER_LEN};
use solana_sdk::instruction::{AccountMeta, Instruction};
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signature};

use crate::chain::{Chain, ChainError};
use crate::token;

/// The program as `scripts/build-paychan.sh` built it (the build script finds it).
pub const PROGRAM_ELF: &[u8] = include_bytes!(env!("WASMGRID_PAYCHAN_SO"));

/// Where the in-process chain (and `wasmgrid chain`) loads the program; hosts and renters on a
/// cluster where it was deployed elsewhere pass that address (`--program-id`).
pub const LOCAL_PROGRAM_ID: Pubkey = Pubkey::new_from_array(*b"wasmgrid-payment-channel-prog-v1");

/// The dispute window a renter's new channel gets unless told otherwise: a provider's watcher
/// has this long to claim after the renter starts a close, and a renter whose provider vanished
/// waits this long for its deposit.
pub const DEFAULT_WINDOW_SECS: i64 = 3600;

/// One channel: the program it lives in and the four things its address is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelId {
    pub program: Pubkey,
    pub renter: Pubkey,
    pub provider: Pubkey,
    pub mint: Pubkey,
    pub id: u64,
}

impl ChannelId {
    /// The channel account's address (a PDA of the program).
    pub fn address(&self) -> Pubkey {
        let seeds: [&[u8]; 5] =
            [CHANNEL_SEED, self.renter.as_ref(), self.provider.as_ref(), self.mint.as_ref(), &self.id.to_le_bytes()];
        Pubkey::find_program_address(&seeds, &self.program).0
    }

    /// The vault: the token account the channel's address owns.
    pub fn vault(&self) -> Pubkey {
        Pubkey::find_program_address(&[VAULT_SEED, self.address().as_ref()], &self.program).0
    }
}

/// A channel as the chain shows it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnChain {
    pub address: Pubkey,
    pub state: State,
}

impl OnChain {
    /// What the vault still holds for vouchers not yet claimed.
    pub fn unclaimed(&self) -> u64 {
        self.state.deposited.saturating_sub(self.state.claimed)
    }

    /// The renter started a close (the provider must claim before `close_at`).
    pub fn closing(&self) -> bool {
        self.state.close_at != 0
    }
}

/// Reads channel `c` from the chain: `None` where it does not exist (never opened, or closed).
/// An account at the address that is not the program's channel is an error, not `None`.
pub fn read(chain: &dyn Chain, c: &ChannelId) -> Result<Option<OnChain>, ChainError> {
    let address = c.address();
    let Some(acc) = chain.account(&address)? else { return Ok(None) };
    let bad = ChainError::Account(address, "a payment channel of this program");
    if acc.owner != c.program {
        return Err(bad);
    }
    let state = State::decode(&acc.data).map_err(|_| bad.clone())?;
    let same = state.renter == c.renter.to_bytes()
        && state.provider == c.provider.to_bytes()
        && state.mint == c.mint.to_bytes()
        && state.id == c.id;
    if !same {
        return Err(bad);
    }
    Ok(Some(OnChain { address, state }))
}

/// Reads the channel at `address` in `program` (when only its address is known): `None`
/// where nothing is there; an account that is not the program's channel is an error.
pub fn read_at(chain: &dyn Chain, program: &Pubkey, address: &Pubkey) -> Result<Option<OnChain>, ChainError> {
    let Some(acc) = chain.account(address)? else { return Ok(None) };
    let bad = ChainError::Account(*address, "a payment channel of this program");
    if acc.owner != *program {
        return Err(bad);
    }
    let state = State::decode(&acc.data).map_err(|_| bad)?;
    Ok(Some(OnChain { address: *address, state }))
}

/// The chain's clock (Unix seconds), from the clock sysvar: what a dispute window is measured
/// by, which may differ from this machine's clock.
pub fn chain_time(chain: &dyn Chain) -> Result<i64, ChainError> {
    let id = solana_sdk::sysvar::clock::ID;
    let acc = chain.account(&id)?.ok_or(ChainError::Account(id, "the clock sysvar"))?;
    // Clock: slot, epoch_start_timestamp, epoch, leader_schedule_epoch, unix_timestamp.
    acc.data
        .get(32..40)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_le_bytes)
        .ok_or(ChainError::Account(id, "the clock sysvar"))
}

fn program_ix(c: &ChannelId, accounts: Vec<AccountMeta>, ix: Ix) -> Instruction {
    let mut data = [0u8; Ix::MAX_LEN];
    let n = ix.encode(&mut data);
    Instruction { program_id: c.program, accounts, data: data.get(..n).unwrap_or_default().to_vec() }
}

/// Opens channel `c` with `deposit` from the renter's associated token account, vouchers to be
/// signed by `voucher_key`, and a dispute window of `window` seconds. The renter pays the rent.
pub fn open(
    chain: &dyn Chain,
    renter: &Keypair,
    c: &ChannelId,
    deposit: u64,
    window: i64,
    voucher_key: &Pubkey,
) -> Result<Signature, ChainError> {
    let ix = program_ix(
        c,
        vec![
            AccountMeta::new(c.renter, true),
            AccountMeta::new_readonly(c.provider, false),
            AccountMeta::new_readonly(c.mint, false),
            AccountMeta::new(c.address(), false),
            AccountMeta::new(c.vault(), false),
            AccountMeta::new(token::token_account(&c.renter, &c.mint), false),
            AccountMeta::new_readonly(spl_token_interface::id(), false),
            AccountMeta::new_readonly(solana_system_interface::program::ID, false),
        ],
        Ix::Open { id: c.id, deposit, window, voucher_key: voucher_key.to_bytes() },
    );
    token::send(chain, &[ix], &[renter])
}

/// Adds `amount` to the channel's deposit.
pub fn top_up(chain: &dyn Chain, renter: &Keypair, c: &ChannelId, amount: u64) -> Result<Signature, ChainError> {
    let ix = program_ix(
        c,
        vec![
            AccountMeta::new_readonly(c.renter, true),
            AccountMeta::new(c.address(), false),
            AccountMeta::new(c.vault(), false),
            AccountMeta::new(token::token_account(&c.renter, &c.mint), false),
            AccountMeta::new_readonly(spl_token_interface::id(), false),
        ],
        Ix::TopUp { amount },
    );
    token::send(chain, &[ix], &[renter])
}

/// The renter starts a close: the provider has the window to claim, then [`finalize`].
pub fn start_close(chain: &dyn Chain, renter: &Keypair, c: &ChannelId) -> Result<Signature, ChainError> {
    let ix = program_ix(
        c,
        vec![AccountMeta::new_readonly(c.renter, true), AccountMeta::new(c.address(), false)],
        Ix::StartClose,
    );
    token::send(chain, &[ix], &[renter])
}

/// After the window: the rest of the vault and both accounts' rent go back to the renter.
pub fn finalize(chain: &dyn Chain, renter: &Keypair, c: &ChannelId) -> Result<Signature, ChainError> {
    let ix = program_ix(
        c,
        vec![
            AccountMeta::new(c.renter, true),
            AccountMeta::new(c.address(), false),
            AccountMeta::new(c.vault(), false),
            AccountMeta::new(token::token_account(&c.renter, &c.mint), false),
            AccountMeta::new_readonly(spl_token_interface::id(), false),
        ],
        Ix::Finalize,
    );
    token::send(chain, &[ix], &[renter])
}

/// The provider closes at once (after claiming what it wants): the rest goes to the renter.
pub fn cooperative_close(chain: &dyn Chain, provider: &Keypair, c: &ChannelId) -> Result<Signature, ChainError> {
    let ix = program_ix(
        c,
        vec![
            AccountMeta::new_readonly(c.provider, true),
            AccountMeta::new(c.renter, false),
            AccountMeta::new(c.address(), false),
            AccountMeta::new(c.vault(), false),
            AccountMeta::new(token::token_account(&c.renter, &c.mint), false),
            AccountMeta::new_readonly(spl_token_interface::id(), false),
        ],
        Ix::CooperativeClose,
    );
    token::send(chain, &[ix], &[provider])
}

/// A voucher: the voucher key's signature over the cumulative amount owed on one generation of
/// one channel, naming the digest of the provider's newest receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Voucher {
    pub cumulative: u64,
    pub receipt_digest: [u8; 32],
    pub signature: [u8; 64],
}

/// The bytes a voucher signs.
pub fn voucher_message(
    c: &ChannelId,
    generation: u64,
    cumulative: u64,
    receipt_digest: &[u8; 32],
) -> [u8; VOUCHER_LEN] {
    voucher_message_at(c, &c.address(), generation, cumulative, receipt_digest)
}

/// The message for a channel whose address is already known (saves deriving it per voucher).
pub fn voucher_message_at(
    c: &ChannelId,
    address: &Pubkey,
    generation: u64,
    cumulative: u64,
    receipt_digest: &[u8; 32],
) -> [u8; VOUCHER_LEN] {
    State::voucher_message(
        &c.program.to_bytes(),
        &address.to_bytes(),
        generation,
        &c.mint.to_bytes(),
        cumulative,
        receipt_digest,
    )
}

/// The Ed25519 program's check of one signature, with the key, signature and message all inside
/// the instruction itself (the only form the channel program accepts).
fn ed25519_check(key: &[u8; 32], signature: &[u8; 64], message: &[u8]) -> Instruction {
    const KEY_AT: u16 = 16;
    const SIG_AT: u16 = KEY_AT + 32;
    const MSG_AT: u16 = SIG_AT + 64;
    // Offsets point into this instruction: u16::MAX as the instruction index says so.
    let here = u16::MAX;
    let mut data = Vec::with_capacity(usize::from(MSG_AT) + message.len());
    data.extend_from_slice(&[1, 0]);
    for v in [SIG_AT, here, KEY_AT, here, MSG_AT, message.len() as u16, here] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    data.extend_from_slice(key);
    data.extend_from_slice(signature);
    data.extend_from_slice(message);
    Instruction { program_id: solana_sdk::ed25519_program::ID, accounts: Vec::new(), data }
}

/// The two instructions of a claim: the signature check, then the claim paying `to` (a token
/// account of the mint the provider owns).
pub fn claim_instructions(
    c: &ChannelId,
    voucher_key: &[u8; 32],
    generation: u64,
    v: &Voucher,
    to: &Pubkey,
) -> [Instruction; 2] {
    let message = voucher_message(c, generation, v.cumulative, &v.receipt_digest);
    let claim = program_ix(
        c,
        vec![
            AccountMeta::new(c.address(), false),
            AccountMeta::new(c.vault(), false),
            AccountMeta::new(*to, false),
            AccountMeta::new_readonly(solana_sdk::sysvar::instructions::ID, false),
            AccountMeta::new_readonly(spl_token_interface::id(), false),
        ],
        Ix::Claim { cumulative: v.cumulative, receipt_digest: v.receipt_digest },
    );
    [ed25519_check(voucher_key, &v.signature, &message), claim]
}

/// Claims voucher `v` on the channel as `on` shows it, into the provider's associated token
/// account; `payer` (the provider, or anyone) pays the fee.
pub fn claim(
    chain: &dyn Chain,
    payer: &Keypair,
    c: &ChannelId,
    on: &OnChain,
    v: &Voucher,
) -> Result<Signature, ChainError> {
    let to = token::token_account(&c.provider, &c.mint);
    let ixs = claim_instructions(c, &on.state.voucher_key, on.state.generation, v, &to);
    token::send(chain, &ixs, &[payer])
}

/// What [`deploy`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployed {
    /// The program's address (the program keypair's public key).
    pub program: Pubkey,
    /// Transactions sent: the buffer's creation, its writes, the deploy.
    pub transactions: usize,
}

/// Bytes of the program written per transaction: a write instruction's data and accounts, one
/// signature and the message header stay well inside a transaction's 1232 bytes.
const WRITE_CHUNK: usize = 900;

/// Deploys `elf` through the upgradeable loader as `program` (a new keypair's address), `payer`
/// paying the rent and fees and holding the upgrade authority: a buffer account is created
/// and written in chunks, then deployed with room for a program twice the size. The program is
/// callable from the next slot.
pub fn deploy(chain: &dyn Chain, payer: &Keypair, program: &Keypair, elf: &[u8]) -> Result<Deployed, ChainError> {
    use solana_loader_v3_interface::instruction as loader;
    use solana_loader_v3_interface::state::UpgradeableLoaderState;
    use solana_sdk::signature::Signer;
    let bad = |e: solana_sdk::instruction::InstructionError| ChainError::Instruction(e.to_string());
    if chain.account(&program.pubkey())?.is_some() {
        return Err(ChainError::Instruction(format!(
            "account {} already exists: deploy under a new program keypair",
            program.pubkey()
        )));
    }
    let buffer = Keypair::new();
    let me = payer.pubkey();
    let rent = chain.rent(UpgradeableLoaderState::size_of_buffer(elf.len()))?;
    let create = loader::create_buffer(&me, &buffer.pubkey(), &me, rent, elf.len()).map_err(bad)?;
    token::send(chain, &create, &[payer, &buffer])?;
    let mut transactions = 1;
    for (i, chunk) in elf.chunks(WRITE_CHUNK).enumerate() {
        let offset =
            u32::try_from(i * WRITE_CHUNK).map_err(|_| ChainError::Instruction("the program is too large".into()))?;
        token::send(chain, &[loader::write(&buffer.pubkey(), &me, offset, chunk.to_vec())], &[payer])?;
        transactions += 1;
    }
    let program_rent = chain.rent(UpgradeableLoaderState::size_of_program())?;
    // The buffer is closed by the deploy, its rent back to the payer.
    let deploy = loader::deploy_with_max_program_len(
        &me,
        &program.pubkey(),
        &buffer.pubkey(),
        &me,
        program_rent,
        elf.len() * 2,
        true,
    )
    .map_err(bad)?;
    token::send(chain, &deploy, &[payer, program])?;
    Ok(Deployed { program: program.pubkey(), transactions: transactions + 1 })
}
