//! The chain over JSON-RPC, and a JSON-RPC front for the in-process chain.
//!
//! [`RpcChain`] is the real Solana RPC client (`solana-rpc-client`) behind the [`Chain`] trait:
//! it is meant for devnet, testnet and mainnet-beta endpoints (or a local `solana-test-validator`).
//! [`serve`] answers the methods that client uses (`getLatestBlockhash`, `isBlockhashValid`,
//! `sendTransaction`, `getSignatureStatuses`, `getAccountInfo`,
//! `getMinimumBalanceForRentExemption`, `requestAirdrop`, `getVersion`, `getHealth`,
//! `getSlot`, and `wasmgridAdvanceClock` to move its clock forward) over HTTP from a [`LocalChain`], so the RPC path runs end to end (the client's
//! real HTTP path, the real SVM behind it) on any machine, and so separate processes (a
//! scheduler, hosts, renters) can share one local chain (`wasmgrid chain`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use base64::Engine;
use serde_json::{Value, json};
use solana_commitment_config::CommitmentConfig;
use solana_rpc_client::nonblocking::rpc_client::RpcClient;
use solana_sdk::account::Account;
use solana_sdk::hash::Hash;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::Signature;
use solana_sdk::transaction::{Transaction, VersionedTransaction};

use crate::chain::{Chain, ChainError, LocalChain, Status};

/// A cluster over JSON-RPC, at `confirmed` commitment.
pub struct RpcChain {
    client: RpcClient,
    url: String,
}

impl std::fmt::Debug for RpcChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcChain").field("url", &self.url).finish_non_exhaustive()
    }
}

/// The runtime every RPC call runs on. One runtime, always driven by its own worker, so the
/// client's pooled connections stay usable whichever thread calls (a connection opened on one
/// runtime is dead on another).
fn rpc_runtime() -> Result<&'static tokio::runtime::Runtime, ChainError> {
    static RT: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wasmgrid-rpc")
            .enable_all()
            .build()
            .ok()
    })
    .as_ref()
    .ok_or_else(|| ChainError::Unreachable("could not start a runtime for RPC calls".into()))
}

type ClientError = solana_rpc_client::api::client_error::Error;

/// Only what the chain itself refused is `Failed` (nothing landed); anything else (no answer,
/// a timeout while confirming, a garbled reply) is `Unreachable`: the transaction may yet land.
fn client_error(e: ClientError) -> ChainError {
    use solana_rpc_client::api::client_error::ErrorKind;
    use solana_rpc_client::api::request::RpcError;
    match e.kind() {
        ErrorKind::TransactionError(_) => ChainError::Failed(e.to_string()),
        // -32002: the node's preflight simulation refused the transaction; it was not sent.
        ErrorKind::RpcError(RpcError::RpcResponseError { code: -32002, .. }) => ChainError::Failed(e.to_string()),
        _ => ChainError::Unreachable(e.to_string()),
    }
}

impl RpcChain {
    pub fn new(url: &str) -> RpcChain {
        RpcChain {
            client: RpcClient::new_with_commitment(url.to_string(), CommitmentConfig::confirmed()),
            url: url.to_string(),
        }
    }

    /// Runs one RPC call to completion on the RPC runtime (its IO driven by that runtime's
    /// worker). Chain calls are blocking (see [`Chain`]): call them from a plain thread or a
    /// runtime's blocking thread, never from async code.
    fn call<T>(&self, f: impl Future<Output = Result<T, ClientError>>) -> Result<T, ChainError> {
        rpc_runtime()?.block_on(f).map_err(client_error)
    }
}

impl Chain for RpcChain {
    fn latest_blockhash(&self) -> Result<Hash, ChainError> {
        self.call(self.client.get_latest_blockhash())
    }

    fn send(&self, tx: &Transaction) -> Result<Signature, ChainError> {
        self.call(self.client.send_and_confirm_transaction(tx))
    }

    fn status(&self, signature: &Signature) -> Result<Status, ChainError> {
        // With history: a transaction that landed long ago must not read as unknown.
        let status = self.client.get_signature_status_with_commitment_and_history(
            signature,
            CommitmentConfig::confirmed(),
            true,
        );
        Ok(match self.call(status)? {
            None => Status::Unknown,
            Some(Ok(())) => Status::Succeeded,
            Some(Err(e)) => Status::Failed(e.to_string()),
        })
    }

    fn account(&self, key: &Pubkey) -> Result<Option<Account>, ChainError> {
        Ok(self.call(self.client.get_account_with_commitment(key, CommitmentConfig::confirmed()))?.value)
    }

    fn rent(&self, len: usize) -> Result<u64, ChainError> {
        self.call(self.client.get_minimum_balance_for_rent_exemption(len))
    }

    fn is_blockhash_valid(&self, blockhash: &Hash) -> Result<bool, ChainError> {
        self.call(self.client.is_blockhash_valid(blockhash, CommitmentConfig::processed()))
    }

    fn airdrop(&self, to: &Pubkey, lamports: u64) -> Result<(), ChainError> {
        let signature = self.call(self.client.request_airdrop(to, lamports))?;
        for _ in 0..60 {
            match self.status(&signature)? {
                Status::Succeeded => return Ok(()),
                Status::Failed(e) => return Err(ChainError::Failed(format!("the airdrop failed: {e}"))),
                Status::Unknown => std::thread::sleep(std::time::Duration::from_millis(500)),
            }
        }
        Err(ChainError::Unreachable(format!("the airdrop {signature} was not confirmed within 30 s")))
    }
}

// ---- the JSON-RPC front ----

/// Serves `chain` over JSON-RPC on `addr`; returns the bound address. Runs until the runtime
/// stops.
pub async fn serve(chain: Arc<LocalChain>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route("/", post(rpc)).with_state(chain);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("the JSON-RPC front stopped: {e}");
        }
    });
    Ok(local)
}

/// Largest request body: a transaction is at most 1232 bytes; leave room for JSON and base64.
const BODY_CAP: usize = 64 * 1024;

async fn rpc(State(chain): State<Arc<LocalChain>>, body: axum::body::Bytes) -> Json<Value> {
    // The chain's calls block (and take its lock): keep them off the async threads.
    let answer = tokio::task::spawn_blocking(move || handle(&chain, &body)).await;
    Json(answer.unwrap_or_else(|e| error(Value::Null, -32603, format!("internal error: {e}"))))
}

/// Answers one JSON-RPC request body (blocking): a result, or an error object for anything
/// malformed, unknown or refused by the chain.
pub fn handle(chain: &LocalChain, body: &[u8]) -> Value {
    if body.len() > BODY_CAP {
        return error(Value::Null, -32600, "request too large".into());
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(Value::Null, -32700, "parse error".into());
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req.get("method").and_then(Value::as_str).unwrap_or("");
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    match dispatch(chain, method, &params) {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err((code, message)) => error(id, code, message),
    }
}

fn error(id: Value, code: i64, message: String) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

type RpcResult = Result<Value, (i64, String)>;

fn param(params: &Value, i: usize) -> Result<&Value, (i64, String)> {
    params.get(i).ok_or_else(|| (-32602, format!("missing parameter {i}")))
}

fn pubkey_param(params: &Value, i: usize) -> Result<Pubkey, (i64, String)> {
    param(params, i)?
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| (-32602, format!("parameter {i} is not a base58 public key")))
}

fn chain_err(e: ChainError) -> (i64, String) {
    (-32603, e.to_string())
}

fn dispatch(chain: &LocalChain, method: &str, params: &Value) -> RpcResult {
    let context = json!({ "slot": chain.slot(), "apiVersion": "4.2.2" });
    match method {
        "getHealth" => Ok(json!("ok")),
        "getVersion" => Ok(json!({ "solana-core": "4.2.2", "feature-set": 0 })),
        "getSlot" | "getBlockHeight" => Ok(json!(chain.slot())),
        "getLatestBlockhash" => {
            let hash = chain.latest_blockhash().map_err(chain_err)?;
            Ok(json!({ "context": context, "value": {
                "blockhash": hash.to_string(),
                "lastValidBlockHeight": chain.slot() + 150,
            }}))
        }
        "isBlockhashValid" => {
            let hash: Hash = param(params, 0)?
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| (-32602, "parameter 0 is not a blockhash".to_string()))?;
            Ok(json!({ "context": context, "value": chain.is_recent(&hash) }))
        }
        "getMinimumBalanceForRentExemption" => {
            let len = param(params, 0)?.as_u64().ok_or_else(|| (-32602, "parameter 0 is not a length".to_string()))?;
            let len = usize::try_from(len).map_err(|_| (-32602, "length too large".to_string()))?;
            Ok(json!(chain.rent(len).map_err(chain_err)?))
        }
        "getAccountInfo" => {
            let key = pubkey_param(params, 0)?;
            let value = chain.account(&key).map_err(chain_err)?.map(|a| {
                json!({
                    "data": [base64::engine::general_purpose::STANDARD.encode(&a.data), "base64"],
                    "executable": a.executable,
                    "lamports": a.lamports,
                    "owner": a.owner.to_string(),
                    "rentEpoch": a.rent_epoch,
                    "space": a.data.len(),
                })
            });
            Ok(json!({ "context": context, "value": value }))
        }
        "getBalance" => {
            let key = pubkey_param(params, 0)?;
            let lamports = chain.account(&key).map_err(chain_err)?.map_or(0, |a| a.lamports);
            Ok(json!({ "context": context, "value": lamports }))
        }
        "requestAirdrop" => {
            let key = pubkey_param(params, 0)?;
            let lamports =
                param(params, 1)?.as_u64().ok_or_else(|| (-32602, "parameter 1 is not lamports".to_string()))?;
            let signature = chain.airdrop_signed(&key, lamports).map_err(chain_err)?;
            Ok(json!(signature.to_string()))
        }
        // Not a Solana method: the local chain's clock moves forward (a dispute window can end
        // in a test without waiting for it), as `solana-test-validator --warp-slot` moves slots.
        "wasmgridAdvanceClock" => {
            let secs = param(params, 0)?
                .as_i64()
                .filter(|s| (0..=365 * 24 * 3600).contains(s))
                .ok_or_else(|| (-32602, "parameter 0 is not seconds (0 to a year)".to_string()))?;
            chain.advance_clock(secs);
            Ok(json!(chain.unix_time()))
        }
        "sendTransaction" => {
            let encoded =
                param(params, 0)?.as_str().ok_or_else(|| (-32602, "parameter 0 is not a string".to_string()))?;
            let encoding = params.get(1).and_then(|c| c.get("encoding")).and_then(Value::as_str).unwrap_or("base58");
            let bytes = match encoding {
                "base64" => base64::engine::general_purpose::STANDARD.decode(encoded).ok(),
                "base58" => bs58_decode(encoded),
                _ => None,
            }
            .ok_or_else(|| (-32602, format!("parameter 0 is not {encoding}")))?;
            if bytes.len() > 1232 {
                return Err((-32602, format!("transaction of {} bytes is over the 1232-byte limit", bytes.len())));
            }
            let tx: VersionedTransaction =
                bincode::deserialize(&bytes).map_err(|e| (-32602, format!("not a transaction: {e}")))?;
            match chain.execute(tx) {
                Ok((signature, _, _)) => Ok(json!(signature.to_string())),
                Err(e) => Err((-32002, format!("Transaction simulation failed: {e}"))),
            }
        }
        "getSignatureStatuses" => {
            let list = param(params, 0)?.as_array().ok_or_else(|| (-32602, "parameter 0 is not a list".to_string()))?;
            if list.len() > 256 {
                return Err((-32602, "at most 256 signatures".into()));
            }
            let mut value = Vec::with_capacity(list.len());
            for s in list {
                let sig: Signature =
                    s.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| (-32602, "not a signature".to_string()))?;
                value.push(match chain.outcome(&sig) {
                    None => Value::Null,
                    Some(Ok(())) => json!({
                        "slot": chain.slot(), "confirmations": null, "err": null,
                        "status": { "Ok": null }, "confirmationStatus": "finalized",
                    }),
                    Some(Err(e)) => {
                        let e = serde_json::to_value(&e).unwrap_or(Value::Null);
                        json!({
                            "slot": chain.slot(), "confirmations": null, "err": e,
                            "status": { "Err": e }, "confirmationStatus": "finalized",
                        })
                    }
                });
            }
            Ok(json!({ "context": context, "value": value }))
        }
        _ => Err((-32601, format!("method {method:?} is not served by this local chain"))),
    }
}

fn bs58_decode(s: &str) -> Option<Vec<u8>> {
    bs58::decode(s).into_vec().ok()
}
