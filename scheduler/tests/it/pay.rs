//! Job payments through the scheduler's HTTP API, on the in-process chain: a payment whose
//! answer was lost is found on the chain, and no second payment is taken while the first could
//! still land.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use proto::Keypair;
use proto::msg::{JobLimits, JobResult, Outcome, Price, Requirements, hash_hex};
use scheduler::{Config, JobPricing, MemoryStore, State};
use settlement::solana::Signer;
use settlement::{Chain, ChainError, LocalChain, Status};
use solana_sdk::transaction::Transaction;

const NORMAL: u8 = 0;
/// The transaction lands, but the answer never comes back.
const ANSWER_LOST: u8 = 1;
/// The chain cannot be reached: nothing lands.
const DOWN: u8 = 2;

#[derive(Debug)]
struct Flaky {
    chain: LocalChain,
    mode: AtomicU8,
}

impl Chain for Flaky {
    fn latest_blockhash(&self) -> Result<solana_sdk::hash::Hash, ChainError> {
        self.chain.latest_blockhash()
    }
    fn send(&self, tx: &Transaction) -> Result<solana_sdk::signature::Signature, ChainError> {
        match self.mode.load(Ordering::SeqCst) {
            ANSWER_LOST => {
                let _ = self.chain.send(tx);
                Err(ChainError::Unreachable("connection reset".into()))
            }
            DOWN => Err(ChainError::Unreachable("connection refused".into())),
            _ => self.chain.send(tx),
        }
    }
    fn status(&self, s: &solana_sdk::signature::Signature) -> Result<Status, ChainError> {
        self.chain.status(s)
    }
    fn account(&self, k: &solana_sdk::pubkey::Pubkey) -> Result<Option<solana_sdk::account::Account>, ChainError> {
        self.chain.account(k)
    }
    fn is_blockhash_valid(&self, h: &solana_sdk::hash::Hash) -> Result<bool, ChainError> {
        self.chain.is_blockhash_valid(h)
    }
    fn rent(&self, len: usize) -> Result<u64, ChainError> {
        self.chain.rent(len)
    }
    fn airdrop(&self, to: &solana_sdk::pubkey::Pubkey, lamports: u64) -> Result<(), ChainError> {
        self.chain.airdrop(to, lamports)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_answer_is_found_on_the_chain_and_no_second_payment_is_taken_meanwhile() {
    let flaky = Arc::new(Flaky { chain: LocalChain::new(), mode: AtomicU8::new(NORMAL) });
    let (renter, provider) = (Keypair::generate(), Keypair::generate());
    let issuer = settlement::solana::Keypair::new();
    let c = flaky.clone();
    let (r, p) = (Keypair::from_seed(renter.seed()), Keypair::from_seed(provider.seed()));
    let mint = tokio::task::spawn_blocking(move || {
        let chain = &c.chain;
        for k in [issuer.pubkey(), settlement::address(&r.public()), settlement::address(&p.public())] {
            chain.airdrop(&k, 10_000_000_000).unwrap();
        }
        let mint = settlement::token::create_mint(chain, &issuer, &issuer.pubkey(), 6).unwrap();
        let me = settlement::signer(&r);
        let account = settlement::token::ensure_token_account(chain, &me, &me.pubkey(), &mint).unwrap();
        settlement::token::mint_to(chain, &issuer, &mint, &account, 1_000_000).unwrap();
        let them = settlement::signer(&p);
        settlement::token::ensure_token_account(chain, &them, &them.pubkey(), &mint).unwrap();
        mint
    })
    .await
    .unwrap();

    // A job that ran and came back with its receipt.
    let pricing = JobPricing { mint: settlement::wire_key(&mint), decimals: 6 };
    let mut state =
        State::load(Config { payments: Some(pricing), ..Config::default() }, Box::new(MemoryStore::default()), 0)
            .unwrap();
    let price = Price { per_gpu_second: 1_000_000, per_inference: 1 };
    state.register(provider.public(), "p".into(), "eu".into(), vec![crate::gpu()], price, 1, None, 0, 0).unwrap();
    let module = hash_hex(&state.put_module(b"\0asm\x01\0\0\0").unwrap());
    let id = state
        .submit(renter.public(), &module, Vec::new(), Requirements::default(), JobLimits::default(), None, 1)
        .unwrap()
        .id;
    let a = state.assign(2).unwrap().remove(0);
    let receipt =
        proto::receipt::JobReceipt::sign(&provider, &id, a.module, b"out", Default::default(), 1234, 1_000_000);
    let result = JobResult {
        outcome: Outcome::Succeeded,
        output: b"out".to_vec(),
        log: Vec::new(),
        usage: Default::default(),
        wall_time_ms: 1,
        wall_time_us: 1234,
        first_dispatch_us: None,
        receipt: Some(receipt),
    };
    state.finished(&id, &provider.public(), result, 3).unwrap();
    let terms = state.job(&id).unwrap().payment.clone().unwrap();
    assert_eq!(terms.amount, 1234);

    let chain: Arc<dyn Chain> = flaky.clone();
    let options = scheduler::server::TestOptions { chain: Some(chain), ..Default::default() };
    let app = scheduler::server::test_router(state, options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let pay = |tx: String| {
        let (http, id) = (http.clone(), id.clone());
        let renter = Keypair::from_seed(renter.seed());
        async move {
            let path = format!("/v1/jobs/{id}/payment");
            let body = serde_json::to_vec(&proto::api::PayJob { transaction: tx }).unwrap();
            let rb = http.post(format!("http://{addr}{path}")).header("content-type", "application/json");
            let resp = crate::sign_reqwest(rb, &renter, "POST", &path, &body).body(body).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let sign = |terms: proto::api::JobPayment| {
        let (c, r) = (flaky.clone(), Keypair::from_seed(renter.seed()));
        async move {
            tokio::task::spawn_blocking(move || settlement::pay::job_payment(&c.chain, &r, &terms).unwrap())
                .await
                .unwrap()
        }
    };
    let provider_balance = || {
        let account = settlement::token::token_account(&settlement::address(&provider.public()), &mint);
        settlement::token::token_balance(&flaky.chain, &account).unwrap()
    };

    // The chain is down: the outcome is unknown, so the payment stays pending.
    flaky.mode.store(DOWN, Ordering::SeqCst);
    let (status, body) = pay(sign(terms.clone()).await).await;
    assert_eq!(status, 503, "{body}");
    // A second payment while the first could still land is refused.
    flaky.mode.store(NORMAL, Ordering::SeqCst);
    let (status, body) = pay(sign(terms.clone()).await).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("may still land"));
    // Once its blockhash has expired it can never land, and a new payment is taken; this one
    // lands but its answer is lost: the scheduler finds it on the chain.
    let c = flaky.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..160 {
            c.chain.airdrop(&settlement::solana::Keypair::new().pubkey(), 10_000_000).unwrap();
        }
    })
    .await
    .unwrap();
    flaky.mode.store(ANSWER_LOST, Ordering::SeqCst);
    let (status, body) = pay(sign(terms.clone()).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["already_paid"], false);
    let paid = body["transaction"].as_str().unwrap().to_string();
    // Any later payment is answered with the first and pays nothing.
    flaky.mode.store(NORMAL, Ordering::SeqCst);
    let (status, body) = pay(sign(terms.clone()).await).await;
    assert_eq!((status, body["transaction"].as_str().unwrap()), (200, paid.as_str()));
    assert_eq!(provider_balance(), 1234, "paid exactly once");
    let sig: settlement::solana::Signature = paid.parse().unwrap();
    assert_eq!(flaky.chain.status(&sig).unwrap(), Status::Succeeded);
}
