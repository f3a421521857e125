//! The JSON-RPC path end to end: the real Solana RPC client over HTTP to the JSON-RPC front,
//! the real SVM and SPL programs behind it, driving a whole paid session.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use settlement::channel::LOCAL_PROGRAM_ID;
use settlement::rpc::{RpcChain, serve};
use settlement::token::{self, ensure_token_account, mint_to, token_balance};
use settlement::{Chain, Ids, LocalChain, Payee, Payer, signer, wire_key};
use solana_sdk::signature::{Keypair, Signer};

/// A renter holding 1,000 tokens of a new mint and a provider, both with SOL, and the ids of
/// their channel 0 in `program`.
struct Parties {
    renter: proto::Keypair,
    provider: proto::Keypair,
    /// Their token accounts.
    r: solana_sdk::pubkey::Pubkey,
    p: solana_sdk::pubkey::Pubkey,
    ids: Ids,
}

fn parties(chain: &RpcChain, program: solana_sdk::pubkey::Pubkey) -> Parties {
    let (issuer, renter, provider) = (Keypair::new(), proto::Keypair::generate(), proto::Keypair::generate());
    for k in [issuer.pubkey(), signer(&renter).pubkey(), signer(&provider).pubkey()] {
        chain.airdrop(&k, 5_000_000_000).unwrap();
    }
    let mint = token::create_mint(chain, &issuer, &issuer.pubkey(), 6).unwrap();
    let r = ensure_token_account(chain, &signer(&renter), &signer(&renter).pubkey(), &mint).unwrap();
    let p = ensure_token_account(chain, &signer(&provider), &signer(&provider).pubkey(), &mint).unwrap();
    mint_to(chain, &issuer, &mint, &r, 1_000).unwrap();
    let ids = Ids {
        program: settlement::wire_address(&program),
        renter: renter.public(),
        provider: provider.public(),
        mint: wire_key(&mint),
        id: 0,
    };
    Parties { renter, provider, r, p, ids }
}

#[test]
fn a_channel_opens_pays_claims_and_closes_over_json_rpc() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let local = Arc::new(LocalChain::new());
    let addr = rt.block_on(serve(local.clone(), "127.0.0.1:0".parse().unwrap())).unwrap();
    // This thread has no runtime: the client runs its calls on its own.
    let chain = RpcChain::new(&format!("http://{addr}"));

    let Parties { renter, provider, r, p, ids } = parties(&chain, LOCAL_PROGRAM_ID);
    let mut payer = Payer::ensure(&chain, &renter, ids, None, 500, 0).unwrap();
    let mut payee = Payee::open(&chain, ids, None).unwrap();
    for i in 1..=4u64 {
        let v = payer.sign(&renter, 30 * i, [i as u8; 32]).unwrap();
        payee.accept(&v, 30 * i, &[i as u8; 32]).unwrap();
        if i % 2 == 0 {
            let claimed = payee.claim(&chain, &provider).unwrap().unwrap();
            // The claim is on the chain, under the signature the provider reported.
            let sig = solana_sdk::signature::Signature::from(claimed.transaction.0);
            assert_eq!(chain.status(&sig).unwrap(), settlement::Status::Succeeded);
        }
    }
    // A claim of the same voucher again pays nothing.
    assert_eq!(payee.claim(&chain, &provider).unwrap(), None);
    assert_eq!(token_balance(&chain, &p).unwrap(), 120);
    payer.start_close(&chain, &renter).unwrap();
    local.advance_clock(settlement::channel::DEFAULT_WINDOW_SECS + 1);
    payer.finalize(&chain, &renter).unwrap();
    assert_eq!(token_balance(&chain, &r).unwrap(), 880);
    // The in-process chain behind the front agrees with what the client read.
    assert_eq!(token_balance(local.as_ref(), &p).unwrap(), 120);
}

#[test]
fn the_front_answers_bad_requests_with_errors() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let local = Arc::new(LocalChain::new());
    let addr = rt.block_on(serve(local, "127.0.0.1:0".parse().unwrap())).unwrap();
    let post = |body: &str| -> serde_json::Value {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    assert_eq!(post("{not json")["error"]["code"], -32700);
    assert_eq!(post(r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#)["error"]["code"], -32601);
    assert_eq!(post(r#"{"jsonrpc":"2.0","id":1,"method":"getAccountInfo","params":["zz"]}"#)["error"]["code"], -32602);
    let junk = r#"{"jsonrpc":"2.0","id":1,"method":"sendTransaction","params":["AAAA",{"encoding":"base64"}]}"#;
    assert_eq!(post(junk)["error"]["code"], -32602);
    let unknown = r#"{"jsonrpc":"2.0","id":2,"method":"getSignatureStatuses","params":[["1111111111111111111111111111111111111111111111111111111111111111"]]}"#;
    assert_eq!(post(unknown)["result"]["value"][0], serde_json::Value::Null);
    // The local chain's own clock method: no parameter, a negative, a string or over a year are
    // refused, and the clock does not move; a good request is served right after.
    let clock = |params: &str| {
        post(&format!(r#"{{"jsonrpc":"2.0","id":3,"method":"wasmgridAdvanceClock","params":{params}}}"#))
    };
    for bad in ["[]", "[-5]", r#"["60"]"#, "[31536001]", "[1e300]"] {
        assert_eq!(clock(bad)["error"]["code"], -32602, "{bad}");
    }
    let now = clock("[0]")["result"].as_i64().unwrap();
    let later = clock("[120]")["result"].as_i64().unwrap();
    assert!(later >= now + 120, "{now} -> {later}");
}

#[test]
fn the_program_deploys_through_the_upgradeable_loader_over_json_rpc_and_then_pays() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let local = Arc::new(LocalChain::new());
    let addr = rt.block_on(serve(local.clone(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let chain = RpcChain::new(&format!("http://{addr}"));
    let (deployer, program) = (Keypair::new(), Keypair::new());
    chain.airdrop(&deployer.pubkey(), 10_000_000_000).unwrap();
    let done = settlement::channel::deploy(&chain, &deployer, &program, settlement::channel::PROGRAM_ELF).unwrap();
    assert_eq!(done.program, program.pubkey());
    assert!(done.transactions > 50, "written in chunks: {done:?}");
    let account = chain.account(&program.pubkey()).unwrap().unwrap();
    assert!(account.executable);
    // Deploying over it again is refused before anything is sent.
    let again = settlement::channel::deploy(&chain, &deployer, &program, settlement::channel::PROGRAM_ELF);
    assert!(again.unwrap_err().to_string().contains("already exists"));

    // A channel in the deployed program opens, pays and claims like one in the preloaded copy.
    let Parties { renter, provider, p, ids, .. } = parties(&chain, program.pubkey());
    let mut payer = Payer::ensure(&chain, &renter, ids, None, 500, 0).unwrap();
    let mut payee = Payee::open(&chain, ids, None).unwrap();
    let v = payer.sign(&renter, 70, [1; 32]).unwrap();
    payee.accept(&v, 70, &[1; 32]).unwrap();
    payee.claim(&chain, &provider).unwrap().unwrap();
    assert_eq!(token_balance(&chain, &p).unwrap(), 70);
}
