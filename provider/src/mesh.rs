//! The links between a cluster job's members. Each member's daemon dials the member after it in
//! the ring (the roster's address, pinned to the roster's key for that rank) and shows the
//! roster the scheduler signed with the rank it speaks as; the member after checks both before
//! anything else is read (its own scheduler's signature, not expired, naming this provider at
//! the rank after the dialler's, and the dialler's key, proved in the handshake, at the rank it
//! claims). So each member has one stream out (to the next) and one in (from the one before),
//! and frames move between a worker and those streams: the daemons count and cap them, the
//! workers check what they mean.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::cluster::{PEER_FRAME_CAP, PeerFrame, Roster, ring_next, ring_prev};
use proto::frame::CONTROL_CAP;
use proto::msg::{SessionMsg, SessionReply};
use proto::{Keypair, PublicKey};
use quic::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot};

/// How long a member waits for its links (the dial out, the member before dialling in): long
/// enough for every member's payment channel to be checked first (up to a minute each).
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Inbound links kept for a rank not started here yet (its `Run` may come after the member
/// before dialled), and how long each is kept.
const MAX_PARKED: usize = 256;
const PARKED_FOR: Duration = Duration::from_secs(60);

/// Frames in flight between the daemon's job task and each link's task.
const LINK_QUEUE: usize = 16;

/// The member before's link, as it came in: a QUIC stream from another provider, or frames
/// handed over inside this daemon (both ranks run here).
pub(crate) enum Inbound {
    Quic { conn: Connection, recv: RecvStream },
    Local(mpsc::Receiver<Vec<u8>>),
}

enum Slot {
    Waiting(oneshot::Sender<Inbound>),
    Parked(Inbound, Instant),
}

/// Inbound links by (cluster job, the rank they go to).
#[derive(Default)]
pub(crate) struct Mesh {
    slots: Mutex<HashMap<(String, u32), Slot>>,
}

impl Mesh {
    fn purge(slots: &mut HashMap<(String, u32), Slot>, now: Instant) {
        slots.retain(|_, s| match s {
            Slot::Parked(_, at) => now.duration_since(*at) <= PARKED_FOR,
            Slot::Waiting(tx) => !tx.is_closed(),
        });
    }

    /// The link into `rank` of `job`, once the member before has dialled.
    fn expect(&self, job: &str, rank: u32) -> oneshot::Receiver<Inbound> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        Self::purge(&mut slots, Instant::now());
        match slots.remove(&(job.to_string(), rank)) {
            Some(Slot::Parked(inbound, _)) => {
                let _ = tx.send(inbound);
            }
            _ => {
                slots.insert((job.to_string(), rank), Slot::Waiting(tx));
            }
        }
        rx
    }

    fn forget(&self, job: &str, rank: u32) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(slots.get(&(job.to_string(), rank)), Some(Slot::Waiting(_))) {
            slots.remove(&(job.to_string(), rank));
        }
    }

    /// A checked link into `rank` of `job`: to the member waiting for it, or kept a while.
    fn arrive(&self, job: &str, rank: u32, inbound: Inbound) -> Result<(), String> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        Self::purge(&mut slots, now);
        let key = (job.to_string(), rank);
        let parked = slots.values().filter(|s| matches!(s, Slot::Parked(..))).count();
        match slots.remove(&key) {
            Some(Slot::Waiting(tx)) => tx.send(inbound).map_err(|_| "the member stopped waiting".to_string()),
            _ if parked >= MAX_PARKED => Err("too many cluster links waiting for their jobs".into()),
            _ => {
                slots.insert(key, Slot::Parked(inbound, now));
                Ok(())
            }
        }
    }
}

/// Which ring a link belongs to: the cluster job and the roster of this try (each try of a
/// cluster gets a roster of its own), so a link of an earlier try never joins a later one.
fn ring_id(roster: &Roster) -> String {
    let tag: String = roster.signature.0.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{}/{tag}", roster.job_id)
}

/// What comes in from the member before.
pub(crate) enum PeerEvent {
    Frame(Vec<u8>),
    Closed(String),
}

/// A member's two links, each served by its own task.
pub(crate) struct Links {
    pub(crate) out: mpsc::Sender<Vec<u8>>,
    /// Whether the next member is on another provider: only bytes sent to one are billed (a
    /// next member here gets its frames handed over in memory).
    pub(crate) remote_next: bool,
    pub(crate) inbound: mpsc::Receiver<PeerEvent>,
    _tasks: Vec<crate::daemon::AbortOnDrop>,
    _conns: Vec<Connection>,
}

/// Joins rank `rank` of the roster's ring: dials the next member, waits for the one before.
pub(crate) async fn join(mesh: &Mesh, keypair: &Keypair, roster: &Roster, rank: u32) -> Result<Links, String> {
    let world = roster.world();
    let (next, prev) = (ring_next(rank, world), ring_prev(rank, world));
    let incoming = mesh.expect(&ring_id(roster), rank);
    // However the join ends (an error, a timeout, the job cancelled and this future dropped),
    // the rank stops waiting.
    let _forget = Forget { mesh, ring: ring_id(roster), rank };
    // A next member on this provider gets its frames handed over here: no connection (and none
    // needed, so a provider that takes no connections runs a cluster of its own GPUs).
    let local = roster.members.get(next as usize).is_some_and(|m| m.provider == keypair.public());
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
    let joined = tokio::time::timeout(JOIN_TIMEOUT, async {
        let out = if local {
            mesh.arrive(&ring_id(roster), next, Inbound::Local(out_rx))?;
            None
        } else {
            Some((dial(keypair, roster, rank).await?, out_rx))
        };
        let inbound = incoming.await.map_err(|_| format!("the link from rank {prev} was dropped"))?;
        Ok::<_, String>((out, inbound))
    })
    .await;
    let (out, inbound) = match joined {
        Ok(Ok(j)) => j,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(format!("rank {prev} did not connect within {JOIN_TIMEOUT:?} (or rank {next} did not answer)"));
        }
    };
    let (mut tasks, mut conns) = (Vec::new(), Vec::new());
    if let Some(((conn_out, mut send), mut out_rx)) = out {
        conns.push(conn_out);
        tasks.push(crate::daemon::AbortOnDrop(tokio::spawn(async move {
            while let Some(bytes) = out_rx.recv().await {
                if quic::write_msg(&mut send, &PeerFrame { bytes }, PEER_FRAME_CAP).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        })));
    }
    let (in_tx, in_rx) = mpsc::channel::<PeerEvent>(LINK_QUEUE);
    let reader = match inbound {
        Inbound::Quic { conn, mut recv } => {
            conns.push(conn);
            tokio::spawn(async move {
                let why = loop {
                    match quic::read_msg::<PeerFrame>(&mut recv, PEER_FRAME_CAP).await {
                        Ok(Some(f)) => {
                            if in_tx.send(PeerEvent::Frame(f.bytes)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break format!("rank {prev} ended its link"),
                        Err(e) => break format!("rank {prev}'s link failed: {e}"),
                    }
                };
                let _ = in_tx.send(PeerEvent::Closed(why)).await;
            })
        }
        Inbound::Local(mut rx) => tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if in_tx.send(PeerEvent::Frame(bytes)).await.is_err() {
                    return;
                }
            }
            let _ = in_tx.send(PeerEvent::Closed(format!("rank {prev} ended its link"))).await;
        }),
    };
    tasks.push(crate::daemon::AbortOnDrop(reader));
    Ok(Links { out: out_tx, remote_next: !local, inbound: in_rx, _tasks: tasks, _conns: conns })
}

struct Forget<'a> {
    mesh: &'a Mesh,
    ring: String,
    rank: u32,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.mesh.forget(&self.ring, self.rank);
    }
}

/// The stream to the member after `rank`, which has taken this member's roster.
async fn dial(keypair: &Keypair, roster: &Roster, rank: u32) -> Result<(Connection, SendStream), String> {
    let next = ring_next(rank, roster.world());
    let member = roster.members.get(next as usize).ok_or_else(|| format!("the roster has no rank {next}"))?;
    let addr: SocketAddr = member
        .addr
        .as_deref()
        .ok_or_else(|| format!("rank {next} takes no connections"))?
        .parse()
        .map_err(|e| format!("rank {next}'s address: {e}"))?;
    let bind = if addr.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let endpoint = quic::client(bind).map_err(|e| e.to_string())?;
    let identity = quic::Identity::new(keypair).map_err(|e| e.to_string())?;
    let conn = quic::connect(&endpoint, &identity, addr, member.provider)
        .await
        .map_err(|e| format!("reaching rank {next} at {addr}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("a stream to rank {next}: {e}"))?;
    let hello = SessionMsg::Peer { roster: Box::new(roster.clone()), from_rank: rank };
    quic::write_msg(&mut send, &hello, proto::msg::OPEN_CAP)
        .await
        .map_err(|e| format!("showing the roster to rank {next}: {e}"))?;
    match quic::read_msg::<SessionReply>(&mut recv, CONTROL_CAP).await {
        Ok(Some(SessionReply::PeerAccepted)) => Ok((conn, send)),
        Ok(Some(SessionReply::Refused { reason })) => Err(format!("rank {next} refused this member: {reason}")),
        Ok(other) => Err(format!("rank {next} answered {other:?}")),
        Err(e) => Err(format!("rank {next}'s answer: {e}")),
    }
}

/// Takes a member's dial-in on the session endpoint (its first frame was `Peer`), or says why
/// not. Nothing else of the connection was read.
/// `keys`: the scheduler this provider trusts, this provider, the peer the handshake proved.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn accept(
    mesh: &Mesh,
    (scheduler, me, peer): (&PublicKey, &PublicKey, &PublicKey),
    conn: &Connection,
    send: &mut SendStream,
    recv: RecvStream,
    roster: &Roster,
    from_rank: u32,
    now_ms: u64,
) -> Result<(), String> {
    let mine = roster.check(scheduler, me, now_ms).map_err(|e| e.to_string())?;
    roster.admit(peer, from_rank).map_err(|e| e.to_string())?;
    let to = ring_next(from_rank, roster.world());
    if !mine.contains(&to) {
        return Err(format!("rank {from_rank} sends to rank {to}, which this provider does not run"));
    }
    conn.authenticated();
    quic::write_msg(send, &SessionReply::PeerAccepted, CONTROL_CAP).await.map_err(|e| e.to_string())?;
    mesh.arrive(&ring_id(roster), to, Inbound::Quic { conn: conn.clone(), recv })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Inbound {
        Inbound::Local(mpsc::channel(1).1)
    }

    #[tokio::test]
    async fn ranks_that_stop_waiting_are_forgotten_and_only_parked_links_are_capped() {
        let mesh = Mesh::default();
        // Ranks whose joins ended (their receivers dropped) hold nothing.
        for rank in 0..(MAX_PARKED as u32 + 50) {
            drop(mesh.expect("gone", rank));
        }
        mesh.arrive("job", 1, local()).unwrap();
        // A rank that waits gets the link that arrives for it; one that came first is kept.
        let waiting = mesh.expect("job", 0);
        mesh.arrive("job", 0, local()).unwrap();
        assert!(waiting.await.is_ok());
        assert!(mesh.expect("job", 1).await.is_ok(), "the link parked before its rank's job came");
        // Links for ranks not here yet are capped.
        for rank in 0..MAX_PARKED as u32 {
            mesh.arrive("early", rank, local()).unwrap();
        }
        assert!(mesh.arrive("late", 0, local()).unwrap_err().contains("too many"));
        // A rank whose job ended stops waiting: a link for it then parks (and expires).
        let w = mesh.expect("ended", 0);
        mesh.forget("ended", 0);
        drop(w);
        assert!(mesh.slots.lock().unwrap().get(&("ended".to_string(), 0)).is_none());
    }
}
