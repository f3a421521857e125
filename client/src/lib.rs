#![doc = include_str!("../README.md")]

use std::net::SocketAddr;
use std::sync::Arc;

use proto::api::{OpenSession, SessionGrant};
use proto::frame::CONTROL_CAP;
use proto::msg::{
    BLOB_CAP, BLOB_CHUNK, BLOB_CHUNK_CAP, FailureKind, INIT_INLINE_MAX, Requirements, SessionMsg, SessionReply,
    WireUsage,
};
use proto::receipt::{self, Receipt};
use proto::{Keypair, PublicKey};
use quic::{Connection, Identity};
use settlement::ledger::Book;

mod pay;
mod scheduler;
pub use pay::Payment;
pub use scheduler::{Scheduler, check_output};

/// What can go wrong talking to the market.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reaching the scheduler at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{what}: the scheduler answered {status}: {message}")]
    Api { what: String, status: u16, message: String },
    #[error("no provider can serve this session: {0}")]
    NoProvider(String),
    #[error("the provider refused the session: {0}")]
    Refused(String),
    #[error("the provider is full: {0}")]
    Busy(String),
    #[error("the request failed ({kind}): {message}")]
    Failed { kind: FailureKind, limit: Option<String>, message: String },
    #[error("the session failed over {0} times and gave up: {1}")]
    GaveUp(usize, String),
    #[error("link: {0}")]
    Link(String),
    #[error("payment: {0}")]
    Payment(String),
}

/// One served request.
#[derive(Clone, Debug)]
pub struct Answer {
    pub response: Vec<u8>,
    pub usage: WireUsage,
    /// The provider that served it.
    pub provider: PublicKey,
    /// The provider's signed receipt of the session after this call, when this call carried
    /// one (checked, possibly after the calls served before it): every call of a paid session,
    /// every few of an unpaid one.
    pub receipt: Option<Receipt>,
}

/// An answered call as the renter follows it: its counts, request, response and receipt.
type Followed = (receipt::Counts, Vec<u8>, Vec<u8>, Option<Receipt>);

/// Calls waiting to be followed in sequence order (concurrent calls answer out of order).
type Pending = std::collections::BTreeMap<u64, Followed>;

/// Follows the next call in order and checks its signed receipt, if it brought one.
fn follow(
    checker: &mut receipt::Checker,
    call: &receipt::Counts,
    request: &[u8],
    response: &[u8],
    signed: Option<&Receipt>,
) -> Result<(), String> {
    checker
        .call(checker.calls() + 1, call, request, response)
        .and_then(|()| signed.map_or(Ok(()), |r| checker.signed(r)))
        .map_err(|e| format!("the provider sent a bad receipt: {e}"))
}

struct Link {
    conn: Connection,
    provider: PublicKey,
    price_per_inference: u64,
    receipts: tokio::sync::Mutex<(receipt::Checker, Pending)>,
    /// On a paid session; held across a whole call, so paid calls go one at a time.
    pay: Option<tokio::sync::Mutex<pay::LinkPay>>,
}

/// An inference session, straight to a provider; fails over to another provider when one goes.
pub struct Session {
    scheduler: Scheduler,
    identity: Identity,
    renter: PublicKey,
    keypair: Arc<Keypair>,
    payment: Option<Payment>,
    /// The books of providers this session left (failed over from).
    left: tokio::sync::Mutex<Vec<Book>>,
    endpoint: quic::Endpoint,
    module: Arc<Vec<u8>>,
    module_hash: String,
    init_input: Vec<u8>,
    /// SHA-256 of `init_input`: the name a provider keeps it by when it goes as a blob.
    init_hash: [u8; 32],
    /// Bytes of the init input sent so far, to every provider (0 when each kept it).
    init_sent: std::sync::atomic::AtomicU64,
    progress: Option<Progress>,
    requirements: Requirements,
    link: tokio::sync::Mutex<(Option<Arc<Link>>, Vec<PublicKey>)>,
    /// Times the session moved to another provider.
    failovers: std::sync::atomic::AtomicUsize,
    /// The receipt the provider signed when the session closed.
    closed_receipt: tokio::sync::Mutex<Option<Receipt>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("module", &self.module_hash).finish_non_exhaustive()
    }
}

/// Told `(sent, total)` as an init blob streams to a provider.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// How often a session moves to another provider before it gives up.
const MAX_FAILOVERS: usize = 3;
/// Full providers a session is turned away by before it gives up.
const MAX_BUSY: usize = 8;

impl Session {
    /// Uploads the module, asks the scheduler for a provider, connects and runs `init`; an
    /// unpaid session (providers that take payment refuse it).
    pub async fn open(
        scheduler: &Scheduler,
        renter: Keypair,
        module: Vec<u8>,
        init_input: Vec<u8>,
        requirements: Requirements,
    ) -> Result<Session, Error> {
        Session::open_paid(scheduler, renter, module, init_input, requirements, None).await
    }

    /// As [`Session::open`], paying with `payment`: through the payment channel with each
    /// provider (opened on first use, topped up to `payment.deposit`), a voucher for every
    /// receipt.
    pub async fn open_paid(
        scheduler: &Scheduler,
        renter: Keypair,
        module: Vec<u8>,
        init_input: Vec<u8>,
        requirements: Requirements,
        payment: Option<Payment>,
    ) -> Result<Session, Error> {
        Session::open_with(scheduler, renter, module, init_input, requirements, payment, None).await
    }

    /// As [`Session::open_paid`], telling `progress` how an init blob's upload goes. An init
    /// input over [`proto::msg::INIT_INLINE_MAX`] goes as a blob: announced by its hash, sent
    /// in chunks only to a provider that does not keep it already.
    pub async fn open_with(
        scheduler: &Scheduler,
        renter: Keypair,
        module: Vec<u8>,
        init_input: Vec<u8>,
        requirements: Requirements,
        payment: Option<Payment>,
        progress: Option<Progress>,
    ) -> Result<Session, Error> {
        let uploaded = scheduler.upload(module.clone()).await?;
        let init_hash = proto::msg::sha256(&init_input);
        let identity = Identity::new(&renter).map_err(|e| Error::Link(e.to_string()))?;
        let endpoint = quic::client(SocketAddr::from(([0, 0, 0, 0], 0))).map_err(|e| Error::Link(e.to_string()))?;
        let session = Session {
            scheduler: scheduler.clone(),
            identity,
            renter: renter.public(),
            keypair: Arc::new(renter),
            payment,
            left: tokio::sync::Mutex::new(Vec::new()),
            endpoint,
            module: Arc::new(module),
            module_hash: uploaded.module,
            init_input,
            init_hash,
            init_sent: std::sync::atomic::AtomicU64::new(0),
            progress,
            requirements,
            link: tokio::sync::Mutex::new((None, Vec::new())),
            failovers: std::sync::atomic::AtomicUsize::new(0),
            closed_receipt: tokio::sync::Mutex::new(None),
        };
        session.link(None).await?;
        Ok(session)
    }

    /// The provider serving the session now.
    pub async fn provider(&self) -> Option<PublicKey> {
        self.link.lock().await.0.as_ref().map(|l| l.provider)
    }

    /// The price per inference agreed with the current provider.
    pub async fn price_per_inference(&self) -> Option<u64> {
        self.link.lock().await.0.as_ref().map(|l| l.price_per_inference)
    }

    /// The last signed receipt checked from the current provider (after [`Session::close`],
    /// the one it signed at the close): what this renter owes it so far.
    pub async fn last_receipt(&self) -> Option<Receipt> {
        let Some(link) = self.link.lock().await.0.clone() else {
            return self.closed_receipt.lock().await.clone();
        };
        let guard = link.receipts.lock().await;
        guard.0.last().cloned()
    }

    /// Bytes of the init input sent to providers so far: 0 when every provider kept it.
    pub fn init_bytes_sent(&self) -> u64 {
        self.init_sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many times the session moved to another provider.
    pub fn failovers(&self) -> usize {
        self.failovers.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current link, or a new one when `broken` is the current one (or there is none).
    async fn link(&self, broken: Option<&Arc<Link>>) -> Result<Arc<Link>, Error> {
        let mut guard = self.link.lock().await;
        let (current, excluded) = &mut *guard;
        if let Some(l) = current.as_ref() {
            match broken {
                Some(b) if Arc::ptr_eq(l, b) => {
                    excluded.push(l.provider);
                    // The provider is gone: the channel keeps the deposit for another session
                    // (or `wasmgrid spend --close`); its vouchers stay payable to it.
                    if let Some(p) = &l.pay {
                        let mut p = p.lock().await;
                        p.ended(None);
                        self.left.lock().await.push(p.book().clone());
                    }
                    *current = None;
                    self.failovers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                _ => return Ok(l.clone()),
            }
        }
        // A provider that is full says so before anything runs: ask for another, a bounded
        // number of times.
        let mut busy = Vec::new();
        loop {
            let grant = self
                .scheduler
                .open_session(&OpenSession {
                    module: self.module_hash.clone(),
                    renter: self.renter,
                    requirements: self.requirements.clone(),
                    exclude: excluded.iter().chain(&busy).copied().collect(),
                })
                .await
                .map_err(|e| match (&e, busy.is_empty()) {
                    (Error::NoProvider(why), false) => {
                        Error::NoProvider(format!("{why}; {} more were full", busy.len()))
                    }
                    _ => e,
                })?;
            match self.connect(&grant).await {
                Ok(link) => {
                    let link = Arc::new(link);
                    *current = Some(link.clone());
                    return Ok(link);
                }
                Err(Error::Busy(reason)) if busy.len() < MAX_BUSY => {
                    log::info!("provider {} is full ({reason}); asking for another", grant.provider);
                    busy.push(grant.provider);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect(&self, grant: &SessionGrant) -> Result<Link, Error> {
        let addr: SocketAddr =
            grant.addr.parse().map_err(|_| Error::Link(format!("bad provider address {:?}", grant.addr)))?;
        let conn = quic::connect(&self.endpoint, &self.identity, addr, grant.provider)
            .await
            .map_err(|e| Error::Link(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Error::Link(e.to_string()))?;
        let link_err = |e: quic::QuicError| Error::Link(e.to_string());
        let mut pay = match &self.payment {
            Some(p) => Some(pay::LinkPay::create(p, self.keypair.clone(), grant).await.map_err(Error::Payment)?),
            None => None,
        };
        // The ticket goes first, alone and small: the provider reads nothing more from a peer
        // before it has checked it. The init input follows at once.
        let open = SessionMsg::Open {
            ticket: Box::new(grant.ticket.clone()),
            channel: pay.as_ref().map(|p| Box::new(p.terms())),
        };
        quic::write_msg(&mut send, &open, proto::msg::OPEN_CAP).await.map_err(link_err)?;
        let init = if self.init_input.len() > INIT_INLINE_MAX {
            SessionMsg::InitBlob { hash: self.init_hash, len: self.init_input.len() as u64 }
        } else {
            SessionMsg::Init { init_input: self.init_input.clone() }
        };
        quic::write_msg(&mut send, &init, BLOB_CAP).await.map_err(link_err)?;
        loop {
            match quic::read_msg::<SessionReply>(&mut recv, CONTROL_CAP).await.map_err(link_err)? {
                Some(SessionReply::NeedBlob) => {
                    let total = self.init_input.len() as u64;
                    let mut sent = 0u64;
                    for chunk in self.init_input.chunks(BLOB_CHUNK) {
                        let msg = SessionMsg::BlobChunk { bytes: chunk.to_vec() };
                        quic::write_msg(&mut send, &msg, BLOB_CHUNK_CAP).await.map_err(link_err)?;
                        sent += chunk.len() as u64;
                        self.init_sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst);
                        if let Some(p) = &self.progress {
                            p(sent, total);
                        }
                    }
                }
                Some(SessionReply::NeedModule) => {
                    let bytes = self.module.as_ref().clone();
                    quic::write_msg(&mut send, &SessionMsg::Module { bytes }, BLOB_CAP).await.map_err(link_err)?;
                }
                Some(SessionReply::Opened { newest, vouch_every, .. }) => {
                    if let Some(p) = pay.as_mut() {
                        p.opened(newest, vouch_every).map_err(Error::Payment)?;
                    }
                    let checker = receipt::Checker::new(
                        grant.ticket.session_id,
                        grant.provider,
                        self.renter,
                        grant.price_per_inference,
                    );
                    return Ok(Link {
                        conn,
                        provider: grant.provider,
                        price_per_inference: grant.price_per_inference,
                        receipts: tokio::sync::Mutex::new((checker, Pending::new())),
                        pay: pay.map(tokio::sync::Mutex::new),
                    });
                }
                Some(SessionReply::Refused { reason }) => return Err(Error::Refused(reason)),
                Some(SessionReply::Busy { reason }) => return Err(Error::Busy(reason)),
                Some(SessionReply::Failed { kind, limit, message }) => {
                    return Err(Error::Failed { kind, limit, message });
                }
                Some(other) => return Err(Error::Link(format!("unexpected {other:?} while opening"))),
                None => return Err(Error::Link("the provider closed the session while opening".into())),
            }
        }
    }

    async fn try_infer(link: &Link, request: &[u8]) -> Result<Result<Answer, Error>, String> {
        let mut pay = match &link.pay {
            Some(p) => Some(p.lock().await),
            None => None,
        };
        let voucher = pay.as_ref().and_then(|p| p.voucher());
        let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| e.to_string())?;
        quic::write_msg(&mut send, &SessionMsg::Request { bytes: request.to_vec(), voucher }, BLOB_CAP)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match quic::read_msg::<SessionReply>(&mut recv, BLOB_CAP).await.map_err(|e| e.to_string())? {
            Some(SessionReply::Response { bytes, usage, sequence, receipt, claimed }) => {
                let receipt = receipt.map(|r| *r);
                let call = receipt::Counts::of_call(&usage);
                Self::settle(link, pay.as_deref_mut(), sequence, call, request, &bytes, receipt.as_ref(), claimed)
                    .await?;
                Ok(Ok(Answer { response: bytes, usage, provider: link.provider, receipt }))
            }
            // The guest's code ran and failed: billed like any call (its message is what the
            // receipt covers), then the guest's own error fails this request only, and any
            // other ends the instance there: move on.
            Some(SessionReply::CallFailed { kind, limit, message, sequence, receipt, claimed }) => {
                let call = receipt::Counts { inferences: 1, ..receipt::Counts::default() };
                let receipt = receipt.map(|r| *r);
                Self::settle(
                    link,
                    pay.as_deref_mut(),
                    sequence,
                    call,
                    request,
                    message.as_bytes(),
                    receipt.as_ref(),
                    claimed,
                )
                .await?;
                if kind == FailureKind::Guest {
                    Ok(Err(Error::Failed { kind, limit, message }))
                } else {
                    Err(format!("{kind}: {message}"))
                }
            }
            // The guest's own error fails this request only.
            Some(SessionReply::Failed { kind, limit, message }) if kind == FailureKind::Guest => {
                Ok(Err(Error::Failed { kind, limit, message }))
            }
            // The provider stopped for want of payment (the deposit is spent, say): another
            // provider would not change that.
            Some(SessionReply::Failed { kind, limit, message }) if kind == FailureKind::Payment => {
                Ok(Err(Error::Failed { kind, limit, message }))
            }
            // A limit, a crash or a host failure ended the instance there: move on.
            Some(SessionReply::Failed { kind, message, .. }) => Err(format!("{kind}: {message}")),
            Some(other) => Err(format!("unexpected {other:?}")),
            None => Err("the provider closed the stream without an answer".into()),
        }
    }

    /// Follows an answered call in the receipt chain and, on a paid session, answers its
    /// receipt with a voucher.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        link: &Link,
        pay: Option<&mut pay::LinkPay>,
        sequence: u64,
        call: receipt::Counts,
        request: &[u8],
        response: &[u8],
        receipt: Option<&Receipt>,
        claimed: Option<Box<proto::voucher::Claimed>>,
    ) -> Result<(), String> {
        // Follow the calls in the order the provider served them.
        let mut guard = link.receipts.lock().await;
        let (checker, pending) = &mut *guard;
        // The call next in order is followed at once; only calls answered ahead of an earlier
        // one are kept (with copies of their bytes) until it comes.
        if sequence == checker.calls() + 1 {
            follow(checker, &call, request, response, receipt)?;
        } else {
            pending.insert(sequence, (call, request.to_vec(), response.to_vec(), receipt.cloned()));
        }
        while let Some((call, req, resp, signed)) = pending.remove(&(checker.calls() + 1)) {
            follow(checker, &call, &req, &resp, signed.as_ref())?;
        }
        if pending.len() > 1024 {
            return Err("the provider's answers skip sequence numbers".into());
        }
        // Only a receipt that was checked is paid for: paid calls go one at a time, so this
        // call's receipt must be the last one checked.
        let checked = receipt.is_some() && checker.last() == receipt;
        drop(guard);
        if let Some(p) = pay {
            let Some(r) = receipt.filter(|_| checked) else {
                if !p.receipt_due(sequence) && receipt.is_none() {
                    // Between receipts: vouched for with the next one (or the close).
                    return Ok(());
                }
                return Err(format!(
                    "the provider's answer {sequence} on a paid session has no receipt in order; not paying for it"
                ));
            };
            p.answered(r, claimed).map_err(|e| format!("paying the provider: {e}"))?;
        }
        Ok(())
    }

    /// Serves one request. If the provider fails (goes away, or its instance dies), the session
    /// moves to another provider and sends the request again, up to a bounded number of times.
    pub async fn infer(&self, request: &[u8]) -> Result<Answer, Error> {
        let mut link = self.link(None).await?;
        let mut last = String::new();
        for _ in 0..=MAX_FAILOVERS {
            match Self::try_infer(&link, request).await {
                Ok(result) => return result,
                Err(reason) => {
                    log::warn!("provider {} failed the session: {reason}; failing over", link.provider);
                    last = reason;
                    link = match self.link(Some(&link)).await {
                        Ok(l) => l,
                        Err(e) => return Err(Error::GaveUp(self.failovers(), format!("{last}; then {e}"))),
                    };
                }
            }
        }
        Err(Error::GaveUp(self.failovers(), last))
    }

    /// Ends the session: on a paid one, with the voucher for the last receipt (the provider
    /// claims if its policy claims at the end; the channel stays open for the next session).
    /// Returns this renter's book of every provider the session used.
    pub async fn close(&self) -> Result<Vec<Book>, Error> {
        let link = self.link.lock().await.0.take();
        let mut books = std::mem::take(&mut *self.left.lock().await);
        let Some(link) = link else { return Ok(books) };
        let mut pay = match &link.pay {
            Some(p) => Some(p.lock().await),
            None => None,
        };
        // The last voucher covers every call followed, those since the newest receipt too.
        let (expected, calls) = {
            let receipts = link.receipts.lock().await;
            (receipts.0.expected(), receipts.0.calls())
        };
        let voucher = pay.as_mut().and_then(|p| p.closing_voucher(expected, calls));
        let closed = async {
            let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| e.to_string())?;
            quic::write_msg(&mut send, &SessionMsg::Close { voucher }, CONTROL_CAP).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            match quic::read_msg::<SessionReply>(&mut recv, CONTROL_CAP).await.map_err(|e| e.to_string())? {
                Some(SessionReply::Closed { claimed, receipt }) => Ok((claimed, receipt)),
                other => Err(format!("unexpected answer to close: {other:?}")),
            }
        }
        .await;
        let claimed = match closed {
            Ok((claimed, receipt)) => {
                // The provider's word on the whole session, checked against every call followed.
                if let Some(r) = receipt {
                    let mut guard = link.receipts.lock().await;
                    match guard.0.signed(&r) {
                        Ok(()) => *self.closed_receipt.lock().await = Some(*r),
                        Err(e) => log::warn!("provider {}: its closing receipt is refused: {e}", link.provider),
                    }
                }
                claimed
            }
            Err(e) => {
                log::info!("closing with provider {}: {e}", link.provider);
                None
            }
        };
        if let Some(p) = pay.as_mut() {
            p.ended(claimed);
            books.push(p.book().clone());
        }
        link.conn.close(0u32.into(), b"done");
        Ok(books)
    }

    /// SHA-256 of the module, hex.
    pub fn module_hash(&self) -> &str {
        &self.module_hash
    }
}
