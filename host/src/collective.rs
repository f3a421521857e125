//! Collectives between the members of a cluster job: barrier, broadcast and all-reduce (sum,
//! mean) of f32 values, with fp16 and int8 compression on the wire.
//!
//! The members form a ring; each sends only to the member after it and hears only from the one
//! before it ([`PeerLink`]: in a worker, frames through the daemon to a QUIC stream). All-reduce
//! is the ring algorithm: a reduce-scatter (in `world - 1` steps every member adds the segment it
//! hears into its own and passes the sum on, so each ends owning one segment summed over all
//! members) then an all-gather (`world - 1` steps passing the finished segments round). Each
//! segment goes in chunks of at most [`CHUNK_VALUES`] values, a frame each, so a member sends
//! chunk `i + 1` while the next member still adds chunk `i`.
//!
//! A peer's frames are untrusted: each carries the call's kind, its number, the step, the chunk
//! and the call's size, and each must be exactly the frame this member expects next, at exactly
//! the length that chunk has, or the call fails saying which member sent what. Members whose
//! calls differ (another size, another collective, one call more) fail the same way, on both
//! sides. A member waits for its peer as long as the call may run (a peer may compute for a
//! long time between collectives); a peer that is gone shows as its link closing (in a worker,
//! the daemon's QUIC link times out 10 s after the peer's last packet), and
//! [`Member::with_peer_timeout`] sets a shorter wait. Every byte sent and received counts
//! against the job's `net_bytes` limit.
//!
//! The result of an all-reduce is bit-identical on every member, whatever the compression: the
//! finished segments travel the all-gather as their owner encoded them once, and the owner keeps
//! the decoded values too.

use std::time::{Duration, Instant};

/// Values per chunk (1 MiB of f32).
pub const CHUNK_VALUES: usize = 1 << 18;

/// Bytes per chunk of a broadcast.
pub const CHUNK_BYTES: usize = 1 << 20;

/// A frame's header: kind, compression, two reserved bytes, the call's number (u64), step
/// (u32), chunk (u32), and the call's size in values or bytes (u64), little-endian.
pub const HEADER: usize = 28;

/// The largest frame a member ever sends: a header and a chunk of f32s.
pub const MAX_FRAME: usize = HEADER + CHUNK_BYTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
}

impl ReduceOp {
    pub fn from_abi(code: i32) -> Option<ReduceOp> {
        match code {
            abi::REDUCE_SUM => Some(ReduceOp::Sum),
            abi::REDUCE_MEAN => Some(ReduceOp::Mean),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    F16,
    Int8,
}

impl Compression {
    pub fn from_abi(code: i32) -> Option<Compression> {
        match code {
            abi::COMPRESS_NONE => Some(Compression::None),
            abi::COMPRESS_F16 => Some(Compression::F16),
            abi::COMPRESS_INT8 => Some(Compression::Int8),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::F16 => 1,
            Compression::Int8 => 2,
        }
    }

    /// Bytes `n` values take on the wire.
    fn encoded_len(self, n: usize) -> usize {
        match self {
            Compression::None => n * 4,
            Compression::F16 => n * 2,
            Compression::Int8 => 4 + n,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "f32",
            Compression::F16 => "f16",
            Compression::Int8 => "int8",
        }
    }
}

/// Why a collective failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank} sent nothing for {waited:?}: it stopped or its link is down")]
    Silent { rank: u32, waited: Duration },
    #[error("the link to rank {rank} closed")]
    Closed { rank: u32 },
    #[error("rank {rank} sent a frame this member cannot take: {why}")]
    BadFrame { rank: u32, why: String },
    /// The members called different collectives, or the same with different sizes: the
    /// kernel's doing, not a peer's fault.
    #[error("the members' collective calls differ: {0}")]
    Mismatch(String),
    #[error("limit net-bytes: {used} bytes to and from peers would pass the job's {limit}")]
    Limit { used: u64, limit: u64 },
    #[error("the call's wall time ran out waiting for rank {rank}")]
    Deadline { rank: u32 },
    #[error("the job was cancelled")]
    Cancelled,
}

/// What waiting for a peer's frame came to.
#[derive(Debug)]
pub enum Recv {
    Frame(Vec<u8>),
    Timeout,
    Closed,
    Cancelled,
}

/// The link to the next member is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkClosed;

/// A member's two links in the ring: to the next member and from the one before.
pub trait PeerLink: Send {
    /// Sends one frame to the next member; `Err` when the link is gone.
    fn send(&mut self, frame: Vec<u8>) -> Result<(), LinkClosed>;
    /// The next frame from the member before, waiting until `until` at the latest.
    fn recv(&mut self, until: Instant) -> Recv;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ReduceScatter = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::ReduceScatter | Kind::AllGather => "all-reduce",
            Kind::Broadcast => "broadcast",
            Kind::Barrier => "barrier",
        }
    }
}

/// A frame's header, as sent and as expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    kind: Kind,
    compression: u8,
    call: u64,
    step: u32,
    chunk: u32,
    size: u64,
}

impl Header {
    fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.push(self.kind as u8);
        out.push(self.compression);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.call.to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// One member of a cluster job.
pub struct Member {
    rank: u32,
    world: u32,
    link: Option<Box<dyn PeerLink>>,
    /// Collective calls made so far: every frame names its call.
    calls: u64,
    sent: u64,
    received: u64,
    max_bytes: u64,
    peer_timeout: Option<Duration>,
    /// Time spent handing frames to the link and waiting for the member before's.
    waited: Duration,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl Default for Member {
    fn default() -> Member {
        Member::solo()
    }
}

impl Member {
    /// The one member of a job on one GPU: every collective is the identity.
    pub fn solo() -> Member {
        Member {
            rank: 0,
            world: 1,
            link: None,
            calls: 0,
            sent: 0,
            received: 0,
            max_bytes: u64::MAX,
            peer_timeout: None,
            waited: Duration::ZERO,
        }
    }

    /// Rank `rank` of `world`, talking through `link`, with at most `max_bytes` to and from
    /// its peers together.
    pub fn new(rank: u32, world: u32, link: Box<dyn PeerLink>, max_bytes: u64) -> Member {
        Member { rank, world: world.max(1), link: Some(link), max_bytes, ..Member::solo() }
    }

    /// How long to wait for a peer's frame before calling it silent.
    pub fn with_peer_timeout(mut self, timeout: Duration) -> Member {
        self.peer_timeout = Some(timeout);
        self
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Time this member spent on the network: handing frames to its link (which waits when
    /// the link is full) and waiting for its peer's.
    pub fn network_wait(&self) -> Duration {
        self.waited
    }

    /// Sets the time counted as waiting on the network: after a collective that ran while the
    /// kernel computed, only the time the kernel waited for it counts.
    pub fn set_network_wait(&mut self, waited: Duration) {
        self.waited = waited;
    }

    fn prev(&self) -> u32 {
        (self.rank + self.world - 1) % self.world
    }

    fn next(&self) -> u32 {
        (self.rank + 1) % self.world
    }

    fn charge(&self, more: usize) -> Result<(), CollectiveError> {
        let used = self.sent.saturating_add(self.received).saturating_add(more as u64);
        if used > self.max_bytes {
            return Err(CollectiveError::Limit { used, limit: self.max_bytes });
        }
        Ok(())
    }

    fn send(&mut self, header: Header, payload: &[u8]) -> Result<(), CollectiveError> {
        let frame = header.encode(payload);
        self.charge(frame.len())?;
        self.sent += frame.len() as u64;
        let next = self.next();
        let link = self.link.as_mut().ok_or(CollectiveError::Closed { rank: next })?;
        let started = Instant::now();
        let sent = link.send(frame).map_err(|LinkClosed| CollectiveError::Closed { rank: next });
        self.waited += started.elapsed();
        sent
    }

    /// The next frame from the member before, which must carry exactly `want` and a payload of
    /// `len` bytes. Returns the payload.
    fn recv(&mut self, want: Header, len: usize, deadline: Instant) -> Result<Vec<u8>, CollectiveError> {
        let rank = self.prev();
        let started = Instant::now();
        let until = self.peer_timeout.map_or(deadline, |t| deadline.min(started + t));
        let link = self.link.as_mut().ok_or(CollectiveError::Closed { rank })?;
        let got = link.recv(until);
        self.waited += started.elapsed();
        let frame = match got {
            Recv::Frame(f) => f,
            Recv::Closed => return Err(CollectiveError::Closed { rank }),
            Recv::Cancelled => return Err(CollectiveError::Cancelled),
            Recv::Timeout if Instant::now() >= deadline => return Err(CollectiveError::Deadline { rank }),
            Recv::Timeout => return Err(CollectiveError::Silent { rank, waited: started.elapsed() }),
        };
        self.charge(frame.len())?;
        self.received += frame.len() as u64;
        let bad = |why: String| CollectiveError::BadFrame { rank, why };
        if frame.len() < HEADER {
            return Err(bad(format!("{} bytes, shorter than a frame's header", frame.len())));
        }
        let (kind, compression, size) = (frame.first().copied(), frame.get(1).copied(), le_u64(&frame, 20));
        let (call, step, chunk) = (le_u64(&frame, 4), le_u32(&frame, 12), le_u32(&frame, 16));
        let theirs = match kind {
            Some(1 | 2) => "all-reduce",
            Some(3) => "broadcast",
            Some(4) => "barrier",
            _ => return Err(bad(format!("unknown frame kind {kind:?}"))),
        };
        if call != want.call {
            // Frames come in order: a peer ahead or behind made more or fewer calls.
            return Err(CollectiveError::Mismatch(format!(
                "rank {rank} is at its collective call {call}, this member (rank {}) at call {}",
                self.rank, want.call
            )));
        }
        if theirs != want.kind.name() {
            return Err(CollectiveError::Mismatch(format!(
                "rank {rank} made a {theirs} where this member (rank {}) made a {}",
                self.rank,
                want.kind.name()
            )));
        }
        if size != want.size {
            return Err(CollectiveError::Mismatch(format!(
                "rank {rank}'s {theirs} is of {size}, this member's (rank {}) of {}",
                self.rank, want.size
            )));
        }
        if compression != Some(want.compression) {
            return Err(CollectiveError::Mismatch(format!(
                "rank {rank} compresses its {theirs} otherwise than rank {}",
                self.rank
            )));
        }
        if kind != Some(want.kind as u8) || step != want.step || chunk != want.chunk {
            let phase = |k: Option<u8>| match k {
                Some(1) => "reduce-scatter",
                Some(2) => "all-gather",
                _ => theirs,
            };
            return Err(bad(format!(
                "a {} frame of step {step} chunk {chunk} where a {} frame of step {} chunk {} was due",
                phase(kind),
                phase(Some(want.kind as u8)),
                want.step,
                want.chunk
            )));
        }
        let payload = frame.get(HEADER..).unwrap_or_default();
        if payload.len() != len {
            return Err(bad(format!("a chunk of {} bytes where {len} were due", payload.len())));
        }
        Ok(payload.to_vec())
    }

    /// Returns once every member has called it.
    pub fn barrier(&mut self, deadline: Instant) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.calls += 1;
        let call = self.calls;
        let h = |step| Header { kind: Kind::Barrier, compression: 0, call, step, chunk: 0, size: 0 };
        let (arrive, release) = (h(0), h(1));
        if self.rank == 0 {
            // The token goes round once (everyone has arrived), then the release.
            self.send(arrive, &[])?;
            self.recv(arrive, 0, deadline)?;
            self.send(release, &[])?;
        } else {
            self.recv(arrive, 0, deadline)?;
            self.send(arrive, &[])?;
            self.recv(release, 0, deadline)?;
            if self.next() != 0 {
                self.send(release, &[])?;
            }
        }
        Ok(())
    }

    /// `data` from rank `root` into every member's `data` (each member passes the chunks on).
    pub fn broadcast(&mut self, data: &mut [u8], root: u32, deadline: Instant) -> Result<(), CollectiveError> {
        let whole = data.len() as u64;
        self.broadcast_part(data, root, whole, deadline)
    }

    /// [`Member::broadcast`] of one part of a larger call of `whole` (what every frame names,
    /// so members whose calls differ in size are found whatever the parts).
    pub fn broadcast_part(
        &mut self,
        data: &mut [u8],
        root: u32,
        whole: u64,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Mismatch(format!("root {root} of a {}-member cluster", self.world)));
        }
        if self.world == 1 {
            return Ok(());
        }
        self.calls += 1;
        let (size, call) = (whole, self.calls);
        let header = |chunk: usize| Header {
            kind: Kind::Broadcast,
            compression: 0,
            call,
            step: root,
            chunk: chunk as u32,
            size,
        };
        let forward = self.next() != root;
        // An empty broadcast still sends its one (empty) chunk: every call shows on the wire, so
        // members whose calls differ are found at that call.
        let mut none: [u8; 0] = [];
        let parts: Vec<&mut [u8]> =
            if data.is_empty() { vec![&mut none[..]] } else { data.chunks_mut(CHUNK_BYTES).collect() };
        for (i, part) in parts.into_iter().enumerate() {
            if self.rank == root {
                self.send(header(i), part)?;
            } else {
                let got = self.recv(header(i), part.len(), deadline)?;
                part.copy_from_slice(&got);
                if forward {
                    self.send(header(i), &got)?;
                }
            }
        }
        Ok(())
    }

    /// Every member's `data` combined by `op`, into every member's `data`, identical on all.
    pub fn all_reduce(
        &mut self,
        data: &mut [f32],
        op: ReduceOp,
        compression: Compression,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        let whole = data.len() as u64;
        self.all_reduce_part(data, op, compression, whole, deadline)
    }

    /// [`Member::all_reduce`] of one part of a larger call of `whole` (what every frame names,
    /// so members whose calls differ in size are found whatever the parts).
    pub fn all_reduce_part(
        &mut self,
        data: &mut [f32],
        op: ReduceOp,
        compression: Compression,
        whole: u64,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.calls += 1;
        let (world, n, call) = (self.world as usize, data.len(), self.calls);
        let segment = |s: usize| (s * n / world)..((s + 1) * n / world);
        let header = |kind, step: usize, chunk: usize| Header {
            kind,
            compression: compression.code(),
            call,
            step: step as u32,
            chunk: chunk as u32,
            size: whole,
        };
        if n == 0 {
            // Nothing to add up, but the call shows on the wire (one empty frame to the next
            // member, one from the one before), so members whose calls differ are found here.
            self.send(header(Kind::ReduceScatter, 0, 0), &[])?;
            self.recv(header(Kind::ReduceScatter, 0, 0), 0, deadline)?;
            return Ok(());
        }
        let rank = self.rank as usize;
        let wrap = |s: isize| s.rem_euclid(world as isize) as usize;
        // Reduce-scatter: at step s send segment rank - s, add segment rank - s - 1 into ours.
        for step in 0..world - 1 {
            let out = segment(wrap(rank as isize - step as isize));
            let into = segment(wrap(rank as isize - step as isize - 1));
            let (out_chunks, in_chunks) = (out.len().div_ceil(CHUNK_VALUES), into.len().div_ceil(CHUNK_VALUES));
            for c in 0..out_chunks.max(in_chunks) {
                if c < out_chunks {
                    let lo = out.start + c * CHUNK_VALUES;
                    let part = data.get(lo..out.end.min(lo + CHUNK_VALUES)).unwrap_or_default();
                    let payload = encode(part, compression);
                    self.send(header(Kind::ReduceScatter, step, c), &payload)?;
                }
                if c < in_chunks {
                    let lo = into.start + c * CHUNK_VALUES;
                    let hi = into.end.min(lo + CHUNK_VALUES);
                    let len = compression.encoded_len(hi - lo);
                    let got = self.recv(header(Kind::ReduceScatter, step, c), len, deadline)?;
                    let part = data.get_mut(lo..hi).unwrap_or_default();
                    decode(&got, compression, |i, v| {
                        if let Some(x) = part.get_mut(i) {
                            *x += v;
                        }
                    });
                }
            }
        }
        // This member now owns segment rank + 1, summed over every member: finish it, encoded
        // once, and keep exactly what the others will decode.
        let own = segment(wrap(rank as isize + 1));
        let mut held: Vec<Vec<u8>> = Vec::new();
        for lo in own.clone().step_by(CHUNK_VALUES) {
            let part = data.get_mut(lo..own.end.min(lo + CHUNK_VALUES)).unwrap_or_default();
            if op == ReduceOp::Mean {
                let w = world as f32;
                part.iter_mut().for_each(|x| *x /= w);
            }
            let bytes = encode(part, compression);
            decode(&bytes, compression, |i, v| {
                if let Some(x) = part.get_mut(i) {
                    *x = v;
                }
            });
            held.push(bytes);
        }
        // All-gather: at step s send segment rank + 1 - s (ours, then what came last), take
        // segment rank - s as it comes.
        for step in 0..world - 1 {
            let into = segment(wrap(rank as isize - step as isize));
            let in_chunks = into.len().div_ceil(CHUNK_VALUES);
            let mut next = Vec::with_capacity(in_chunks);
            for c in 0..held.len().max(in_chunks) {
                if let Some(bytes) = held.get(c) {
                    self.send(header(Kind::AllGather, step, c), bytes)?;
                }
                if c < in_chunks {
                    let lo = into.start + c * CHUNK_VALUES;
                    let hi = into.end.min(lo + CHUNK_VALUES);
                    let got =
                        self.recv(header(Kind::AllGather, step, c), compression.encoded_len(hi - lo), deadline)?;
                    let part = data.get_mut(lo..hi).unwrap_or_default();
                    decode(&got, compression, |i, v| {
                        if let Some(x) = part.get_mut(i) {
                            *x = v;
                        }
                    });
                    next.push(got);
                }
            }
            held = next;
        }
        Ok(())
    }
}

/// Values as they go on the wire.
fn encode(values: &[f32], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Compression::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Compression::Int8 => {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            // A chunk holding a value that is not finite decodes as not finite throughout: int8
            // cannot carry it, and silently dropping it would hide a diverged run.
            let finite = values.iter().all(|v| v.is_finite());
            let scale = if finite { max / 127.0 } else { f32::NAN };
            let mut out = Vec::with_capacity(4 + values.len());
            out.extend_from_slice(&scale.to_le_bytes());
            for v in values {
                let q = if scale > 0.0 { (v / scale).round().clamp(-127.0, 127.0) as i8 } else { 0 };
                out.push(q as u8);
            }
            out
        }
    }
}

/// Calls `each(i, value)` for every value of a payload whose length was checked.
fn decode(bytes: &[u8], compression: Compression, mut each: impl FnMut(usize, f32)) {
    match compression {
        Compression::None => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                each(i, f32::from_le_bytes(c.try_into().unwrap_or_default()));
            }
        }
        Compression::F16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                each(i, half::f16::from_le_bytes(c.try_into().unwrap_or_default()).to_f32());
            }
        }
        Compression::Int8 => {
            let scale = f32::from_le_bytes([
                bytes.first().copied().unwrap_or(0),
                bytes.get(1).copied().unwrap_or(0),
                bytes.get(2).copied().unwrap_or(0),
                bytes.get(3).copied().unwrap_or(0),
            ]);
            for (i, q) in bytes.iter().skip(4).enumerate() {
                each(i, f32::from(*q as i8) * scale);
            }
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// In-process links between members, for `wasmgrid run --world N` and tests: member `r`'s
/// sends arrive at member `r + 1`.
pub fn local_ring(world: u32) -> Vec<Box<dyn PeerLink>> {
    let world = world.max(1) as usize;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| std::sync::mpsc::channel::<Vec<u8>>()).unzip();
    let mut receivers: Vec<Option<_>> = receivers.into_iter().map(Some).collect();
    (0..world)
        .map(|r| {
            let to = senders.get((r + 1) % world).cloned();
            let from = receivers.get_mut(r).and_then(Option::take);
            Box::new(LocalLink { to, from }) as Box<dyn PeerLink>
        })
        .collect()
}

struct LocalLink {
    to: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    from: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
}

impl PeerLink for LocalLink {
    fn send(&mut self, frame: Vec<u8>) -> Result<(), LinkClosed> {
        self.to.as_ref().ok_or(LinkClosed)?.send(frame).map_err(|_| LinkClosed)
    }

    fn recv(&mut self, until: Instant) -> Recv {
        let Some(rx) = self.from.as_ref() else { return Recv::Closed };
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(f) => Recv::Frame(f),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Recv::Timeout,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Recv::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    /// Runs `f` on every member of a local ring of `world`, each on its own thread.
    fn each_member<T: Send + 'static>(world: u32, f: impl Fn(&mut Member) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = std::sync::Arc::new(f);
        let threads: Vec<_> = local_ring(world)
            .into_iter()
            .zip(0..)
            .map(|(link, rank)| {
                let f = f.clone();
                std::thread::spawn(move || f(&mut Member::new(rank, world, link, u64::MAX)))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    /// Member `rank`'s values: distinct per member and per place.
    fn values(rank: u32, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + rank as usize * 13) % 101) as f32 / 10.0 - 5.0).collect()
    }

    #[test]
    fn all_reduce_sums_and_averages_exactly_and_identically_on_every_member() {
        // Sizes that do not split evenly, one under the world size, and one of several chunks.
        for world in [1u32, 2, 3, 4] {
            // (Several chunks only where it matters: unoptimised test builds add slowly.)
            let big = if world == 3 { 2 * CHUNK_VALUES + 5 } else { 1001 };
            for n in [0usize, 1, 3, 1000, big] {
                for op in [ReduceOp::Sum, ReduceOp::Mean] {
                    let got = each_member(world, move |m| {
                        let mut v = values(m.rank(), n);
                        m.all_reduce(&mut v, op, Compression::None, soon()).unwrap();
                        v
                    });
                    let inputs: Vec<Vec<f32>> = (0..world).map(|r| values(r, n)).collect();
                    let want: Vec<f32> = (0..n)
                        .map(|i| {
                            let s: f32 = inputs.iter().map(|v| v[i]).sum();
                            if op == ReduceOp::Mean { s / world as f32 } else { s }
                        })
                        .collect();
                    for v in &got {
                        assert_eq!(v.len(), n);
                        assert_eq!(v, &got[0], "world {world} n {n}: members disagree");
                        for (a, b) in v.iter().zip(&want) {
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "world {world} n {n}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn compressed_all_reduce_is_close_identical_everywhere_and_smaller_on_the_wire() {
        let n = 10_000;
        let plain = each_member(4, move |m| {
            let mut v = values(m.rank(), n);
            m.all_reduce(&mut v, ReduceOp::Mean, Compression::None, soon()).unwrap();
            (v, m.bytes_sent())
        });
        for (compression, tolerance, ratio) in [(Compression::F16, 0.01, 0.55), (Compression::Int8, 0.08, 0.3)] {
            let got = each_member(4, move |m| {
                let mut v = values(m.rank(), n);
                m.all_reduce(&mut v, ReduceOp::Mean, compression, soon()).unwrap();
                (v, m.bytes_sent())
            });
            for (v, sent) in &got {
                assert_eq!(v, &got[0].0, "{compression}: members disagree");
                let worst = v.iter().zip(&plain[0].0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= tolerance, "{compression}: off by {worst}");
                assert!((*sent as f64) < plain[0].1 as f64 * ratio, "{compression}: {sent} bytes sent");
            }
        }
        // Bytes on the wire: 2 (n - 1) / n of the data each, plus headers.
        let data = (n * 4) as u64;
        assert!(plain[0].1 >= data * 3 / 2 && plain[0].1 < data * 3 / 2 + 1000, "{}", plain[0].1);
    }

    #[test]
    fn int8_carries_a_non_finite_value_as_not_finite() {
        let got = each_member(2, |m| {
            let mut v = vec![1.0; 8];
            if m.rank() == 1 {
                v[0] = f32::INFINITY;
            }
            m.all_reduce(&mut v, ReduceOp::Sum, Compression::Int8, soon()).unwrap();
            v
        });
        assert!(got[0][0].is_nan() && got[1][0].is_nan());
    }

    #[test]
    fn broadcast_and_barrier_reach_every_member() {
        for world in [1u32, 2, 3, 4] {
            for root in 0..world {
                let got = each_member(world, move |m| {
                    let mut data = if m.rank() == root {
                        (0..CHUNK_BYTES + 77).map(|i| (i % 251) as u8).collect()
                    } else {
                        vec![0u8; CHUNK_BYTES + 77]
                    };
                    m.broadcast(&mut data, root, soon()).unwrap();
                    m.barrier(soon()).unwrap();
                    data
                });
                for d in &got {
                    assert!(d.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "world {world} root {root}");
                }
            }
        }
    }

    #[test]
    fn members_whose_calls_differ_both_fail_saying_so() {
        let got = each_member(2, |m| {
            let mut v = vec![1.0; if m.rank() == 0 { 100 } else { 200 }];
            m.all_reduce(&mut v, ReduceOp::Sum, Compression::None, soon())
        });
        // Each member finds the other's call differs; one may instead find the other already
        // gone (it failed first and dropped its links).
        let said = |r: &Result<(), CollectiveError>| matches!(r, Err(CollectiveError::Mismatch(m)) if m.contains("of 100") && m.contains("of 200"));
        assert!(got.iter().any(said), "{got:?}");
        assert!(got.iter().all(|r| said(r) || matches!(r, Err(CollectiveError::Closed { .. }))), "{got:?}");
        let got = each_member(2, |m| {
            if m.rank() == 0 {
                m.barrier(soon())
            } else {
                let sent = m.broadcast(&mut [0u8; 4], 1, soon());
                // Its links stay up a moment, as a member's do while its job goes on: dropped at
                // once, rank 0's first send could find them gone before it reads the frame.
                std::thread::sleep(Duration::from_millis(300));
                sent
            }
        });
        // The root of a broadcast only sends: the member that hears it finds the difference
        // (and the job ends with it).
        assert!(matches!(&got[0], Err(CollectiveError::Mismatch(m)) if m.contains("broadcast")), "{got:?}");
    }

    #[test]
    fn an_empty_collective_shows_on_the_wire() {
        let got = each_member(2, |m| {
            let n = if m.rank() == 0 { 0 } else { 4 };
            m.all_reduce(&mut vec![1.0; n], ReduceOp::Sum, Compression::None, soon())
        });
        assert!(got.iter().any(|r| matches!(r, Err(CollectiveError::Mismatch(_)))), "{got:?}");
        let got = each_member(3, |m| {
            m.all_reduce(&mut [], ReduceOp::Mean, Compression::Int8, soon())?;
            m.broadcast(&mut [], 2, soon())?;
            let mut v = [m.rank() as f32];
            m.all_reduce(&mut v, ReduceOp::Sum, Compression::None, soon())?;
            Ok::<_, CollectiveError>(v[0])
        });
        assert_eq!(got, vec![Ok(3.0); 3], "empty calls pair up and the next call still works");
    }

    #[test]
    fn parts_of_calls_of_different_sizes_do_not_pair_up() {
        // One member's 128-value call in two parts of 64, the other's two calls of 64 values.
        let got = each_member(2, |m| {
            let mut part = vec![1.0; 64];
            let whole = if m.rank() == 0 { 128 } else { 64 };
            m.all_reduce_part(&mut part, ReduceOp::Sum, Compression::None, whole, soon())
        });
        assert!(got.iter().any(|r| matches!(r, Err(CollectiveError::Mismatch(m)) if m.contains("of 128"))), "{got:?}");
    }

    /// A scripted peer: answers each receive with the next frame (or nothing).
    struct Scripted(Vec<Option<Vec<u8>>>);

    impl PeerLink for Scripted {
        fn send(&mut self, _frame: Vec<u8>) -> Result<(), LinkClosed> {
            Ok(())
        }

        fn recv(&mut self, until: Instant) -> Recv {
            match self.0.pop() {
                Some(Some(f)) => Recv::Frame(f),
                Some(None) => {
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                    Recv::Timeout
                }
                None => Recv::Closed,
            }
        }
    }

    fn rs_header(call: u64, size: u64) -> Header {
        Header { kind: Kind::ReduceScatter, compression: 0, call, step: 0, chunk: 0, size }
    }

    #[test]
    fn a_hostile_or_silent_peer_fails_the_call_saying_who_and_what() {
        let bad = |frames: Vec<Option<Vec<u8>>>| {
            let mut m =
                Member::new(1, 2, Box::new(Scripted(frames)), u64::MAX).with_peer_timeout(Duration::from_millis(200));
            m.all_reduce(&mut [1.0; 8], ReduceOp::Sum, Compression::None, soon()).unwrap_err()
        };
        let good_len = 4 * 4;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "shorter than a frame's header"),
            (rs_header(1, 8).encode(&vec![0; good_len + 4]), "20 bytes where 16"),
            (rs_header(1, 8).encode(&[0; 3]), "3 bytes where 16"),
            (rs_header(9, 8).encode(&vec![0; good_len]), "at its collective call 9"),
            (
                Header { kind: Kind::AllGather, ..rs_header(1, 8) }.encode(&vec![0; good_len]),
                "all-gather frame of step 0",
            ),
            (Header { chunk: 5, ..rs_header(1, 8) }.encode(&vec![0; good_len]), "chunk 5"),
            (Header { compression: 7, ..rs_header(1, 8) }.encode(&vec![0; good_len]), "compresses"),
            (
                {
                    let mut f = rs_header(1, 8).encode(&vec![0; good_len]);
                    f[0] = 99;
                    f
                },
                "unknown frame kind",
            ),
        ];
        for (frame, want) in cases {
            let e = bad(vec![Some(frame)]).to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
            assert!(e.contains("rank 0"), "{e}");
        }
        let started = Instant::now();
        assert!(matches!(bad(vec![None]), CollectiveError::Silent { rank: 0, .. }));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(bad(vec![]), CollectiveError::Closed { rank: 0 });
        // Past the call's own deadline the wall time is what ran out, not the peer's patience.
        let mut m = Member::new(1, 2, Box::new(Scripted(vec![None])), u64::MAX);
        let e = m.barrier(Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(e, CollectiveError::Deadline { rank: 0 });
    }

    #[test]
    fn bytes_to_and_from_peers_are_counted_and_limited() {
        let got = each_member(2, |m| {
            let mut v = vec![1.0; 1000];
            m.all_reduce(&mut v, ReduceOp::Sum, Compression::None, soon()).unwrap();
            (m.bytes_sent(), m.bytes_received())
        });
        // Each member sends half the values twice (reduce-scatter, all-gather), with headers.
        assert_eq!(got[0], (2 * (HEADER as u64 + 2000), 2 * (HEADER as u64 + 2000)));
        let mut m = Member::new(0, 2, local_ring(2).remove(0), 1000);
        let e = m.all_reduce(&mut [1.0; 1000], ReduceOp::Sum, Compression::None, soon()).unwrap_err();
        assert!(matches!(e, CollectiveError::Limit { limit: 1000, .. }), "{e:?}");
        assert_eq!(m.bytes_sent(), 0, "nothing goes out past the limit");
    }
}
