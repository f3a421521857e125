//! Feeds arbitrary bytes to every decoder that reads the network or a worker's pipe: the frame
//! splitter, each message type (the worker protocol's both ways included), the HTTP bodies, a
//! job payment's transaction and its check, and the local chain's JSON-RPC front. None may panic; each either decodes or refuses with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::{FrameDecoder, decode_body};
use proto::msg::{HostMsg, JobMsg, JobReply, SchedulerMsg, SessionMsg, SessionReply};

/// One local chain for every input (starting one loads the SPL programs).
fn chain() -> &'static settlement::LocalChain {
    static CHAIN: std::sync::OnceLock<settlement::LocalChain> = std::sync::OnceLock::new();
    CHAIN.get_or_init(settlement::LocalChain::new)
}

fn terms() -> proto::api::JobPayment {
    proto::api::JobPayment {
        amount: 7,
        mint: proto::PublicKey([3; 32]),
        decimals: 6,
        pay_to: "11111111111111111111111111111111".into(),
        receipt_digest: "ab".repeat(32),
        transaction: None,
        payer: None,
        pending: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut frames = FrameDecoder::new(1 << 16);
    for chunk in data.chunks(7) {
        match frames.push(chunk) {
            Ok(Some(body)) => {
                let _ = decode_body::<HostMsg>(&body);
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    let _ = decode_body::<HostMsg>(data);
    let _ = decode_body::<SchedulerMsg>(data);
    let _ = decode_body::<JobMsg>(data);
    let _ = decode_body::<JobReply>(data);
    let _ = decode_body::<SessionMsg>(data);
    let _ = decode_body::<SessionReply>(data);
    let _ = decode_body::<proto::worker::ToWorker>(data);
    let _ = decode_body::<proto::worker::FromWorker>(data);
    let _ = serde_json::from_slice::<proto::api::SubmitJob>(data);
    let _ = serde_json::from_slice::<proto::api::PayJob>(data);
    let _ = serde_json::from_slice::<proto::api::JobView>(data);
    if let Ok(tx) = settlement::pay::decode_transaction_bytes(data) {
        let _ = settlement::pay::check_job_payment(&tx, &terms());
    }
    let _ = settlement::rpc::handle(chain(), data);
    let _ = proto::Keypair::from_json(&String::from_utf8_lossy(data), "fuzz");
});
