//! A cluster job's roster: the scheduler's signature over which provider runs which rank of
//! which job, for which module, until when. Members dial each other directly; each shows the
//! roster, and each takes a connection only from a peer the roster names (the QUIC handshake
//! proves the peer's key) at a rank the roster gives that key. Nothing else is believed before
//! any work: a forged roster, one of another scheduler, an expired one, or a peer it does not
//! name is refused.

use serde::{Deserialize, Serialize};

use crate::identity::{Keypair, PublicKey, Signature};
use crate::msg::ModuleHash;

/// Domain separation: a roster's signature is never mistaken for any other signed message.
const DOMAIN: &[u8] = b"wasmgrid-cluster-roster-v1";

/// The most members a roster may name: a roster is a member's ticket, shown in the first frame
/// of a link, which a provider reads before it knows the peer ([`crate::msg::OPEN_CAP`]), and
/// the largest roster fits there.
pub const MAX_MEMBERS: usize = 64;

/// The bytes each member of a cluster may move to and from its peers when the renter names no
/// limit: the scheduler sets it on the cluster when submitted, so a member's deposit and its
/// bill for bytes are always bounded by the renter's terms.
pub const DEFAULT_NET_BYTES: u64 = 64 << 30;

/// The longest job id a roster carries.
const MAX_TEXT: usize = 128;

/// The longest member address (`[IPv6]:port` is at most 47 bytes).
const MAX_ADDR: usize = 64;

/// One rank of a cluster job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterMember {
    pub rank: u32,
    pub provider: PublicKey,
    /// Which of the provider's GPUs.
    pub gpu: u32,
    /// Where peers reach it (`ip:port`), or `None` when it takes no connections (reached
    /// through the scheduler instead).
    pub addr: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub job_id: String,
    pub module_hash: ModuleHash,
    /// Every member, by rank (0 to world size - 1, each once).
    pub members: Vec<RosterMember>,
    /// Milliseconds since the Unix epoch after which the roster is void.
    pub expires_at_ms: u64,
    pub scheduler: PublicKey,
    pub signature: Signature,
}

/// Cap of one [`PeerFrame`]: a collective's largest frame (a chunk of 2^18 f32 and its
/// header) with room for the encoding.
pub const PEER_FRAME_CAP: usize = (1 << 20) + 4096;

/// One collective frame between two members' daemons, as their workers made it: the daemons
/// move it and count it; the receiving worker checks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFrame {
    #[serde(with = "crate::msg::bytes")]
    pub bytes: Vec<u8>,
}

/// One rank of a cluster job as its provider is told it, with the job's `Run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAssign {
    pub rank: u32,
    pub roster: Roster,
}

/// The member after `rank` in the ring (which `rank` sends to), and the one before it.
pub fn ring_next(rank: u32, world: u32) -> u32 {
    if world == 0 { 0 } else { (rank + 1) % world }
}

pub fn ring_prev(rank: u32, world: u32) -> u32 {
    if world == 0 { 0 } else { (rank + world - 1) % world }
}

/// Why a member refuses a roster, or a peer under it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    #[error("the roster is not signed by the scheduler this provider trusts")]
    WrongScheduler,
    #[error("the roster's signature does not verify")]
    BadSignature,
    #[error("the roster expired {0} ms ago")]
    Expired(u64),
    #[error("the roster is malformed: {0}")]
    Malformed(String),
    #[error("the roster names no rank on this provider")]
    NotAMember,
    #[error("the peer {0} is not a member of this cluster")]
    UnknownPeer(PublicKey),
    #[error("the peer {peer} claims rank {rank}, which the roster gives another provider")]
    WrongRank { peer: PublicKey, rank: u32 },
}

impl Roster {
    /// The fixed layout the scheduler signs: every field, each length-prefixed.
    fn signing_bytes(job_id: &str, module_hash: &ModuleHash, members: &[RosterMember], expires_at_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + 64 + members.len() * 64);
        let text = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        out.extend_from_slice(DOMAIN);
        text(&mut out, job_id);
        out.extend_from_slice(module_hash);
        out.extend_from_slice(&expires_at_ms.to_le_bytes());
        out.extend_from_slice(&(members.len() as u64).to_le_bytes());
        for m in members {
            out.extend_from_slice(&m.rank.to_le_bytes());
            out.extend_from_slice(&m.provider.0);
            out.extend_from_slice(&m.gpu.to_le_bytes());
            match &m.addr {
                Some(a) => {
                    out.push(1);
                    text(&mut out, a);
                }
                None => out.push(0),
            }
        }
        out
    }

    /// The scheduler's roster for a cluster job (members by rank).
    pub fn issue(
        scheduler: &Keypair,
        job_id: String,
        module_hash: ModuleHash,
        members: Vec<RosterMember>,
        expires_at_ms: u64,
    ) -> Roster {
        let signature = scheduler.sign(&Roster::signing_bytes(&job_id, &module_hash, &members, expires_at_ms));
        Roster { job_id, module_hash, members, expires_at_ms, scheduler: scheduler.public(), signature }
    }

    /// The world size.
    pub fn world(&self) -> u32 {
        self.members.len() as u32
    }

    /// Checks the roster as provider `me` must before running any rank of it: the trusted
    /// scheduler's signature over exactly this roster, not expired, well formed (ranks 0 to
    /// n - 1 each once, bounded), naming `me`. Returns the ranks it gives `me`.
    pub fn check(&self, trusted: &PublicKey, me: &PublicKey, now_ms: u64) -> Result<Vec<u32>, RosterError> {
        if &self.scheduler != trusted {
            return Err(RosterError::WrongScheduler);
        }
        // The cheap checks first: a malformed roster costs no signature check.
        if self.members.is_empty() || self.members.len() > MAX_MEMBERS {
            return Err(RosterError::Malformed(format!("{} members (1 to {MAX_MEMBERS})", self.members.len())));
        }
        if self.job_id.len() > MAX_TEXT {
            return Err(RosterError::Malformed(format!("a job id over {MAX_TEXT} bytes")));
        }
        if self.members.iter().any(|m| m.addr.as_ref().is_some_and(|a| a.len() > MAX_ADDR)) {
            return Err(RosterError::Malformed(format!("an address over {MAX_ADDR} bytes")));
        }
        for (at, m) in self.members.iter().enumerate() {
            if m.rank as usize != at {
                return Err(RosterError::Malformed(format!("rank {} listed at place {at}", m.rank)));
            }
        }
        let bytes = Roster::signing_bytes(&self.job_id, &self.module_hash, &self.members, self.expires_at_ms);
        if !trusted.verify(&bytes, &self.signature) {
            return Err(RosterError::BadSignature);
        }
        if now_ms > self.expires_at_ms {
            return Err(RosterError::Expired(now_ms - self.expires_at_ms));
        }
        let mine: Vec<u32> = self.members.iter().filter(|m| m.provider == *me).map(|m| m.rank).collect();
        if mine.is_empty() {
            return Err(RosterError::NotAMember);
        }
        Ok(mine)
    }

    /// Whether a peer whose connection proved key `peer` may speak as rank `rank` (on a roster
    /// already checked).
    pub fn admit(&self, peer: &PublicKey, rank: u32) -> Result<(), RosterError> {
        if !self.members.iter().any(|m| m.provider == *peer) {
            return Err(RosterError::UnknownPeer(*peer));
        }
        match self.members.get(rank as usize) {
            Some(m) if m.provider == *peer => Ok(()),
            _ => Err(RosterError::WrongRank { peer: *peer, rank }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(keys: &[&Keypair]) -> Vec<RosterMember> {
        keys.iter()
            .zip(0u32..)
            .map(|(k, rank)| RosterMember {
                rank,
                provider: k.public(),
                gpu: 0,
                addr: Some(format!("10.0.0.{rank}:7000")),
            })
            .collect()
    }

    /// A change made to a signed roster.
    type Forgery<'a> = Box<dyn Fn(&mut Roster) + 'a>;

    #[test]
    fn a_roster_is_believed_only_whole_signed_fresh_and_naming_this_provider() {
        let (sched, a, b, outsider) =
            (Keypair::generate(), Keypair::generate(), Keypair::generate(), Keypair::generate());
        // a runs ranks 0 and 2 (two GPUs), b rank 1.
        let mut list = members(&[&a, &b, &a]);
        if let Some(m) = list.get_mut(2) {
            m.gpu = 1;
        }
        let r = Roster::issue(&sched, "job-1".into(), [7; 32], list, 1_000);
        let s = sched.public();
        assert_eq!(r.check(&s, &a.public(), 999), Ok(vec![0, 2]));
        assert_eq!(r.check(&s, &b.public(), 0), Ok(vec![1]));
        assert_eq!(r.world(), 3);
        assert_eq!(r.check(&s, &outsider.public(), 0), Err(RosterError::NotAMember));
        assert_eq!(r.check(&s, &a.public(), 1_500), Err(RosterError::Expired(500)));
        assert_eq!(r.check(&outsider.public(), &a.public(), 0), Err(RosterError::WrongScheduler));
        // Any field changed after signing: a rank moved to the outsider, another module, a later
        // expiry, a member added or taken away, an address redirected.
        let forgeries: Vec<Forgery> = vec![
            Box::new(|f| {
                f.members.iter_mut().for_each(|m| {
                    if m.rank == 1 {
                        m.provider = outsider.public()
                    }
                })
            }),
            Box::new(|f| f.module_hash = [8; 32]),
            Box::new(|f| f.expires_at_ms = u64::MAX),
            Box::new(|f| f.job_id = "job-2".into()),
            Box::new(|f| {
                f.members.pop();
            }),
            Box::new(|f| f.members.iter_mut().for_each(|m| m.addr = Some("6.6.6.6:1".into()))),
        ];
        for forge in &forgeries {
            let mut f = r.clone();
            forge(&mut f);
            assert_eq!(f.check(&s, &a.public(), 0), Err(RosterError::BadSignature), "{f:?}");
        }
        // Signed but malformed (a scheduler bug, or a key gone bad): refused before the rest.
        let gap =
            Roster::issue(&sched, "j".into(), [7; 32], vec![RosterMember { rank: 1, ..members(&[&a])[0].clone() }], 9);
        assert!(matches!(gap.check(&s, &a.public(), 0), Err(RosterError::Malformed(_))));
        let empty = Roster::issue(&sched, "j".into(), [7; 32], Vec::new(), 9);
        assert!(matches!(empty.check(&s, &a.public(), 0), Err(RosterError::Malformed(_))));
        let huge: Vec<&Keypair> = std::iter::repeat_n(&a, MAX_MEMBERS + 1).collect();
        let huge = Roster::issue(&sched, "j".into(), [7; 32], members(&huge), 9);
        assert!(matches!(huge.check(&s, &a.public(), 0), Err(RosterError::Malformed(_))));
        let long = Roster::issue(&sched, "j".repeat(MAX_TEXT + 1), [7; 32], members(&[&a]), 9);
        assert!(matches!(long.check(&s, &a.public(), 0), Err(RosterError::Malformed(_))));
    }

    #[test]
    fn the_largest_roster_fits_the_first_frame_of_a_link() {
        let sched = Keypair::generate();
        let keys: Vec<Keypair> = (0..MAX_MEMBERS).map(|_| Keypair::generate()).collect();
        let members = keys
            .iter()
            .zip(0u32..)
            .map(|(k, rank)| RosterMember {
                rank,
                provider: k.public(),
                gpu: u32::MAX,
                addr: Some("9".repeat(MAX_ADDR)),
            })
            .collect();
        let roster = Roster::issue(&sched, "j".repeat(MAX_TEXT), [0xff; 32], members, u64::MAX);
        assert_eq!(roster.check(&sched.public(), &keys[0].public(), 0), Ok(vec![0]));
        let hello = crate::msg::SessionMsg::Peer { roster: Box::new(roster), from_rank: u32::MAX };
        let frame = crate::frame::encode(&hello, crate::msg::OPEN_CAP).expect("fits the first frame's cap");
        assert!(frame.len() <= crate::msg::OPEN_CAP, "{} bytes", frame.len());
    }

    #[test]
    fn a_peer_speaks_only_as_a_rank_the_roster_gives_its_key() {
        let (sched, a, b, outsider) =
            (Keypair::generate(), Keypair::generate(), Keypair::generate(), Keypair::generate());
        let r = Roster::issue(&sched, "job".into(), [1; 32], members(&[&a, &b]), 1_000);
        assert_eq!(r.admit(&b.public(), 1), Ok(()));
        assert_eq!(r.admit(&a.public(), 0), Ok(()));
        assert_eq!(r.admit(&b.public(), 0), Err(RosterError::WrongRank { peer: b.public(), rank: 0 }));
        assert_eq!(r.admit(&b.public(), 7), Err(RosterError::WrongRank { peer: b.public(), rank: 7 }));
        assert_eq!(r.admit(&outsider.public(), 1), Err(RosterError::UnknownPeer(outsider.public())));
    }
}
