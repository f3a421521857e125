#![doc = include_str!("../README.md")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use proto::api::{JobView, ModuleUploaded, OpenSession, SessionGrant, SubmitJob, Submitted};
use proto::frame::CONTROL_CAP;
use proto::msg::{BLOB_CAP, JobLimits, Requirements, SessionMsg, SessionReply, WireUsage};
use proto::receipt::{self, Receipt};
use proto::{Keypair, PublicKey};
use quic::{Connection, Identity};
use settlement::ledger::Book;

mod pay;
pub use pay::Payment;

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
    #[error("the request failed ({kind}): {message}")]
    Failed { kind: String, limit: Option<String>, message: String },
    #[error("the session failed over {0} times and gave up: {1}")]
    GaveUp(usize, String),
    #[error("link: {0}")]
    Link(String),
    #[error("payment: {0}")]
    Payment(String),
}

/// The scheduler's HTTP API.
#[derive(Clone, Debug)]
pub struct Scheduler {
    base: String,
    http: reqwest::Client,
}

impl Scheduler {
    /// `base` is the scheduler's HTTP address, such as `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Scheduler {
        Scheduler { base: base.trim_end_matches('/').to_string(), http: reqwest::Client::new() }
    }

    fn unreachable(&self, e: reqwest::Error) -> Error {
        Error::Unreachable { url: self.base.clone(), reason: e.to_string() }
    }

    async fn check(&self, resp: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<proto::api::ApiError>(&body).map(|e| e.error).unwrap_or(body);
        Err(Error::Api { what: what.to_string(), status, message })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, resp: reqwest::Response, what: &str) -> Result<T, Error> {
        self.check(resp, what).await?.json().await.map_err(|e| self.unreachable(e))
    }

    /// Uploads a module (once; the scheduler keeps it by hash).
    pub async fn upload(&self, module: Vec<u8>) -> Result<ModuleUploaded, Error> {
        let resp = self
            .http
            .post(format!("{}/v1/modules", self.base))
            .body(module)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.json(resp, "uploading the module").await
    }

    /// Submits a batch job for an uploaded module.
    pub async fn submit(
        &self,
        module: &str,
        input: &[u8],
        requirements: Requirements,
        limits: JobLimits,
        deadline: Option<Duration>,
    ) -> Result<Submitted, Error> {
        let job = SubmitJob {
            module: module.to_string(),
            input_base64: base64::engine::general_purpose::STANDARD.encode(input),
            requirements,
            limits,
            deadline_secs: deadline.map(|d| d.as_secs().max(1)),
        };
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .json(&job)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.json(resp, "submitting the job").await
    }

    pub async fn job(&self, id: &str) -> Result<JobView, Error> {
        let resp =
            self.http.get(format!("{}/v1/jobs/{id}", self.base)).send().await.map_err(|e| self.unreachable(e))?;
        self.json(resp, "reading the job").await
    }

    /// Follows a job until it ends, calling `progress` whenever its view changes. Uses the
    /// scheduler's long poll, so a change is seen as soon as it happens.
    pub async fn wait(&self, id: &str, mut progress: impl FnMut(&JobView)) -> Result<JobView, Error> {
        let mut last: Option<(proto::api::JobState, Option<u32>, usize)> = None;
        let mut state: Option<proto::api::JobState> = None;
        loop {
            let url = match state {
                Some(s) => format!("{}/v1/jobs/{id}?wait_ms=10000&state={}", self.base, state_name(s)),
                None => format!("{}/v1/jobs/{id}", self.base),
            };
            let resp = self.http.get(url).send().await.map_err(|e| self.unreachable(e))?;
            let view: JobView = self.json(resp, "reading the job").await?;
            let now = (view.state, view.queue_position, view.attempts.len());
            if last != Some(now) {
                progress(&view);
                last = Some(now);
            }
            if view.state.is_final() {
                return Ok(view);
            }
            state = Some(view.state);
        }
    }

    /// A finished job's output or log (`what` is `output` or `log`).
    pub async fn bytes(&self, id: &str, what: &str) -> Result<Vec<u8>, Error> {
        let resp = self
            .http
            .get(format!("{}/v1/jobs/{id}/{what}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let resp = self.check(resp, &format!("reading the job's {what}")).await?;
        Ok(resp.bytes().await.map_err(|e| self.unreachable(e))?.to_vec())
    }

    /// Pays for a finished job from `payer`'s token account, the amount on the provider's
    /// signed receipt (checked here first); returns the payment transaction's signature. Paying
    /// a job already paid returns the first payment's signature and pays nothing.
    pub async fn pay_job(&self, id: &str, chain: Arc<dyn settlement::Chain>, payer: &Keypair) -> Result<String, Error> {
        let view = self.job(id).await?;
        let terms = view.payment.clone().ok_or_else(|| Error::Payment(format!("job {id} has nothing to pay")))?;
        if let Some(sig) = terms.transaction {
            return Ok(sig);
        }
        // The output is withheld until paid: check everything else the receipt says now, and
        // the output against its digest once it comes.
        match (&view.receipt, view.provider) {
            (Some(r), Some(p)) => {
                r.check_terms(id, &p).map_err(|e| Error::Payment(format!("not paying job {id}: {e}")))?;
                if r.amount_due != terms.amount || settlement::pay::hex(&r.digest()) != terms.receipt_digest {
                    return Err(Error::Payment(format!("job {id}'s payment does not match its receipt")));
                }
            }
            _ => return Err(Error::Payment(format!("job {id} has no receipt to pay against"))),
        }
        let payer = Keypair::from_seed(payer.seed());
        let tx = tokio::task::spawn_blocking(move || settlement::pay::job_payment(chain.as_ref(), &payer, &terms))
            .await
            .map_err(|e| Error::Payment(e.to_string()))?
            .map_err(|e| Error::Payment(e.to_string()))?;
        let resp = self
            .http
            .post(format!("{}/v1/jobs/{id}/payment", self.base))
            .json(&proto::api::PayJob { transaction: tx })
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let v: serde_json::Value = self.json(resp, "paying for the job").await?;
        v.get("transaction")
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::Payment("the scheduler did not say which transaction paid".into()))
    }

    /// Asks for a provider to serve an inference session.
    pub async fn open_session(&self, req: &OpenSession) -> Result<SessionGrant, Error> {
        let resp = self
            .http
            .post(format!("{}/v1/sessions", self.base))
            .json(req)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().as_u16() == 503 {
            let body: serde_json::Value = resp.json().await.map_err(|e| self.unreachable(e))?;
            return Err(Error::NoProvider(body.get("error").and_then(|e| e.as_str()).unwrap_or("").to_string()));
        }
        self.json(resp, "opening a session").await
    }
}

fn state_name(s: proto::api::JobState) -> &'static str {
    match s {
        proto::api::JobState::Queued => "queued",
        proto::api::JobState::Running => "running",
        proto::api::JobState::Succeeded => "succeeded",
        proto::api::JobState::Failed => "failed",
        proto::api::JobState::Expired => "expired",
    }
}

/// One served request.
#[derive(Clone, Debug)]
pub struct Answer {
    pub response: Vec<u8>,
    pub usage: WireUsage,
    /// The provider that served it.
    pub provider: PublicKey,
    /// The provider's signed receipt after this call (checked, possibly after the receipts of
    /// calls served before it).
    pub receipt: Receipt,
}

/// Receipts waiting to be checked in sequence order (concurrent calls answer out of order).
type Pending = std::collections::BTreeMap<u64, (Receipt, Vec<u8>, Vec<u8>)>;

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
    requirements: Requirements,
    link: tokio::sync::Mutex<(Option<Arc<Link>>, Vec<PublicKey>)>,
    /// Times the session moved to another provider.
    failovers: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("module", &self.module_hash).finish_non_exhaustive()
    }
}

/// How often a session moves to another provider before it gives up.
const MAX_FAILOVERS: usize = 3;

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

    /// As [`Session::open`], paying with `payment`: each provider gets an escrow of
    /// `payment.budget`, a voucher for every receipt, and its refund submitted at the end.
    pub async fn open_paid(
        scheduler: &Scheduler,
        renter: Keypair,
        module: Vec<u8>,
        init_input: Vec<u8>,
        requirements: Requirements,
        payment: Option<Payment>,
    ) -> Result<Session, Error> {
        let uploaded = scheduler.upload(module.clone()).await?;
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
            requirements,
            link: tokio::sync::Mutex::new((None, Vec::new())),
            failovers: std::sync::atomic::AtomicUsize::new(0),
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

    /// The last receipt checked from the current provider: what this renter owes it so far.
    pub async fn last_receipt(&self) -> Option<Receipt> {
        let link = self.link.lock().await.0.clone()?;
        let guard = link.receipts.lock().await;
        guard.0.last().cloned()
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
                    // The provider is gone: take back what is left in its escrow.
                    if let Some(p) = &l.pay {
                        let mut p = p.lock().await;
                        if let Err(e) = p.recover().await {
                            log::warn!("recovering the escrow with provider {}: {e}", l.provider);
                        }
                        self.left.lock().await.push(p.book().clone());
                    }
                    *current = None;
                    self.failovers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                _ => return Ok(l.clone()),
            }
        }
        let grant = self
            .scheduler
            .open_session(&OpenSession {
                module: self.module_hash.clone(),
                renter: self.renter,
                requirements: self.requirements.clone(),
                exclude: excluded.clone(),
            })
            .await?;
        let link = Arc::new(self.connect(&grant).await?);
        *current = Some(link.clone());
        Ok(link)
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
        let open = SessionMsg::Open {
            ticket: Box::new(grant.ticket.clone()),
            init_input: self.init_input.clone(),
            escrow: pay.as_ref().map(|p| p.terms()),
        };
        quic::write_msg(&mut send, &open, BLOB_CAP).await.map_err(link_err)?;
        loop {
            match quic::read_msg::<SessionReply>(&mut recv, CONTROL_CAP).await.map_err(link_err)? {
                Some(SessionReply::NeedModule) => {
                    let bytes = self.module.as_ref().clone();
                    quic::write_msg(&mut send, &SessionMsg::Module { bytes }, BLOB_CAP).await.map_err(link_err)?;
                }
                Some(SessionReply::Opened { refund, .. }) => {
                    if let Some(p) = pay.as_mut() {
                        p.opened(refund).await.map_err(Error::Payment)?;
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
            Some(SessionReply::Response { bytes, usage, receipt, settled }) => {
                let receipt = *receipt;
                // Check receipts in the order the provider served the calls.
                let mut guard = link.receipts.lock().await;
                let (checker, pending) = &mut *guard;
                pending.insert(receipt.sequence, (receipt.clone(), request.to_vec(), bytes.clone()));
                loop {
                    let next = checker.last().map_or(1, |r| r.sequence + 1);
                    let Some((r, req, resp)) = pending.remove(&next) else { break };
                    if let Err(e) = checker.check(&r, &req, &resp) {
                        return Err(format!("the provider sent a bad receipt: {e}"));
                    }
                }
                if pending.len() > 1024 {
                    return Err("the provider's receipts skip sequence numbers".into());
                }
                // Only a receipt that was checked is paid for: paid calls go one at a time, so
                // this call's receipt must be the last one checked.
                let checked = checker.last() == Some(&receipt);
                drop(guard);
                if let Some(p) = pay.as_mut() {
                    if !checked {
                        return Err(format!(
                            "the provider's receipt {} is out of order on a paid session; not paying for it",
                            receipt.sequence
                        ));
                    }
                    p.answered(&receipt, settled).await.map_err(|e| format!("paying the provider: {e}"))?;
                }
                Ok(Ok(Answer { response: bytes, usage, provider: link.provider, receipt }))
            }
            // The guest's own error fails this request only.
            Some(SessionReply::Failed { kind, limit, message }) if kind == "guest" => {
                Ok(Err(Error::Failed { kind, limit, message }))
            }
            // The provider stopped for want of payment (the budget is spent, say): another
            // provider would not change that.
            Some(SessionReply::Failed { kind, limit, message }) if kind == "payment" => {
                Ok(Err(Error::Failed { kind, limit, message }))
            }
            // A limit, a crash or a host failure ended the instance there: move on.
            Some(SessionReply::Failed { kind, message, .. }) => Err(format!("{kind}: {message}")),
            Some(other) => Err(format!("unexpected {other:?}")),
            None => Err("the provider closed the stream without an answer".into()),
        }
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

    /// Ends the session: on a paid one, the provider settles the last voucher and hands over
    /// its refund, which is submitted here. Returns this renter's book of every provider the
    /// session used (settlement and refund transactions included).
    pub async fn close(&self) -> Result<Vec<Book>, Error> {
        let link = self.link.lock().await.0.take();
        let mut books = std::mem::take(&mut *self.left.lock().await);
        let Some(link) = link else { return Ok(books) };
        if let Some(p) = &link.pay {
            let mut p = p.lock().await;
            let closed = async {
                let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| e.to_string())?;
                quic::write_msg(&mut send, &SessionMsg::Close { voucher: p.voucher() }, CONTROL_CAP)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = send.finish();
                match quic::read_msg::<SessionReply>(&mut recv, CONTROL_CAP).await.map_err(|e| e.to_string())? {
                    Some(SessionReply::Closed { settled, refund }) => Ok((settled, refund)),
                    other => Err(format!("unexpected answer to close: {other:?}")),
                }
            }
            .await;
            match closed {
                Ok((settled, refund)) => p.closed(settled, refund).await.map_err(Error::Payment)?,
                Err(e) => {
                    log::warn!("closing with provider {}: {e}; recovering the escrow", link.provider);
                    p.recover().await.map_err(Error::Payment)?;
                }
            }
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
