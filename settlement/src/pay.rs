//! Keys shared by wasmgrid and Solana, and batch jobs' payment: a plain SPL transfer the renter
//! signs for a finished job's receipt (sessions pay through the payment channel, [`crate::party`]).

use solana_sdk::hash::Hash;
use solana_sdk::message::Message;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::Keypair;
use solana_sdk::transaction::Transaction;

use crate::chain::{Chain, ChainError};
use crate::party::PayError;
use crate::token::{self, ix};

/// A wire key as a Solana address (the same 32 bytes).
pub fn address(key: &proto::PublicKey) -> Pubkey {
    Pubkey::new_from_array(key.0)
}

/// An address (any 32 bytes: a program's, a derived one) as a Solana address.
pub fn address_of(a: &proto::Address) -> Pubkey {
    Pubkey::new_from_array(a.0)
}

/// A Solana address as a wire address.
pub fn wire_address(key: &Pubkey) -> proto::Address {
    proto::Address(key.to_bytes())
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
