//! The ticket a renter shows a provider to open an inference session: the scheduler's signature
//! over who may use whom, for which module, at what price, until when.

use serde::{Deserialize, Serialize};

use crate::identity::{Keypair, PublicKey, Signature};
use crate::msg::ModuleHash;

/// Domain separation: a ticket signature can never be mistaken for any other signed message.
const DOMAIN: &[u8] = b"wasmgrid-session-ticket-v1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub session_id: [u8; 16],
    pub renter: PublicKey,
    pub provider: PublicKey,
    pub module_hash: ModuleHash,
    pub price_per_inference: u64,
    /// Milliseconds since the Unix epoch after which the ticket is void.
    pub expires_at_ms: u64,
    pub scheduler: PublicKey,
    pub signature: Signature,
}

/// Why a provider refuses a ticket.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is not signed by the scheduler this provider trusts")]
    WrongScheduler,
    #[error("the ticket's signature does not verify")]
    BadSignature,
    #[error("the ticket expired {0} ms ago")]
    Expired(u64),
    #[error("the ticket is for another provider")]
    WrongProvider,
    #[error("the ticket was issued to another renter than the one connected")]
    WrongRenter,
}

impl Ticket {
    /// The fixed layout the scheduler signs.
    pub fn signing_bytes(
        session_id: &[u8; 16],
        renter: &PublicKey,
        provider: &PublicKey,
        module_hash: &ModuleHash,
        price_per_inference: u64,
        expires_at_ms: u64,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + 16 + 32 * 3 + 16);
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(session_id);
        out.extend_from_slice(&renter.0);
        out.extend_from_slice(&provider.0);
        out.extend_from_slice(module_hash);
        out.extend_from_slice(&price_per_inference.to_le_bytes());
        out.extend_from_slice(&expires_at_ms.to_le_bytes());
        out
    }

    pub fn issue(
        scheduler: &Keypair,
        session_id: [u8; 16],
        renter: PublicKey,
        provider: PublicKey,
        module_hash: ModuleHash,
        price_per_inference: u64,
        expires_at_ms: u64,
    ) -> Ticket {
        let bytes =
            Ticket::signing_bytes(&session_id, &renter, &provider, &module_hash, price_per_inference, expires_at_ms);
        Ticket {
            session_id,
            renter,
            provider,
            module_hash,
            price_per_inference,
            expires_at_ms,
            scheduler: scheduler.public(),
            signature: scheduler.sign(&bytes),
        }
    }

    /// Checks the ticket as the provider `me` must before doing any work for `peer` (the key the
    /// renter's connection authenticated with), at time `now_ms`.
    pub fn check(&self, trusted: &PublicKey, me: &PublicKey, peer: &PublicKey, now_ms: u64) -> Result<(), TicketError> {
        if &self.scheduler != trusted {
            return Err(TicketError::WrongScheduler);
        }
        let bytes = Ticket::signing_bytes(
            &self.session_id,
            &self.renter,
            &self.provider,
            &self.module_hash,
            self.price_per_inference,
            self.expires_at_ms,
        );
        if !trusted.verify(&bytes, &self.signature) {
            return Err(TicketError::BadSignature);
        }
        if now_ms > self.expires_at_ms {
            return Err(TicketError::Expired(now_ms - self.expires_at_ms));
        }
        if &self.provider != me {
            return Err(TicketError::WrongProvider);
        }
        if &self.renter != peer {
            return Err(TicketError::WrongRenter);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_check_every_field() {
        let (sched, renter, provider) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let t = Ticket::issue(&sched, [1; 16], renter.public(), provider.public(), [2; 32], 5, 1_000);
        let (s, p, r) = (sched.public(), provider.public(), renter.public());
        assert_eq!(t.check(&s, &p, &r, 999), Ok(()));
        assert_eq!(t.check(&s, &p, &r, 1_500), Err(TicketError::Expired(500)));
        assert_eq!(t.check(&Keypair::generate().public(), &p, &r, 0), Err(TicketError::WrongScheduler));
        assert_eq!(t.check(&s, &r, &r, 0), Err(TicketError::WrongProvider));
        assert_eq!(t.check(&s, &p, &p, 0), Err(TicketError::WrongRenter));
        let mut forged = t.clone();
        forged.price_per_inference = 0;
        assert_eq!(forged.check(&s, &p, &r, 0), Err(TicketError::BadSignature));
        let mut later = t;
        later.expires_at_ms = u64::MAX;
        assert_eq!(later.check(&s, &p, &r, 0), Err(TicketError::BadSignature));
    }
}
