//! Feeds arbitrary bytes to every decoder that reads the network or a worker's pipe: the frame
//! splitter, each message type (the worker protocol's both ways included), the HTTP bodies (a
//! paid job's channel terms and vouchers among them, cluster plans), the checks of a session
//! report's voucher and of a cluster roster, and the local chain's JSON-RPC front. None may panic; each either decodes or refuses with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::{FrameDecoder, decode_body};
use proto::msg::{HostMsg, JobMsg, JobReply, SchedulerMsg, SessionMsg, SessionReply};

/// One local chain for every input (starting one loads the SPL programs).
fn chain() -> &'static settlement::LocalChain {
    static CHAIN: std::sync::OnceLock<settlement::LocalChain> = std::sync::OnceLock::new();
    CHAIN.get_or_init(settlement::LocalChain::new)
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
    // A provider's report is checked by the scheduler (receipt, voucher, derived channel), and
    // a cluster roster by every member, before anything is believed.
    if let Ok(HostMsg::SessionReport(r)) = decode_body::<HostMsg>(data)
        && let Some(v) = &r.vouched
    {
        let _ = v.check(&r.session_id, &v.receipt.renter, &v.receipt.provider);
    }
    if let Ok(roster) = decode_body::<proto::cluster::Roster>(data) {
        if let Some(m) = roster.members.first() {
            let _ = roster.check(&roster.scheduler, &m.provider, 0);
            let _ = roster.admit(&m.provider, m.rank);
        }
    }
    let _ = serde_json::from_slice::<proto::api::PlanRequest>(data);
    let _ = decode_body::<SchedulerMsg>(data);
    let _ = decode_body::<JobMsg>(data);
    let _ = decode_body::<JobReply>(data);
    let _ = decode_body::<SessionMsg>(data);
    let _ = decode_body::<SessionReply>(data);
    let _ = decode_body::<proto::worker::ToWorker>(data);
    let _ = decode_body::<proto::worker::FromWorker>(data);
    let _ = serde_json::from_slice::<proto::api::SubmitJob>(data);
    let _ = serde_json::from_slice::<proto::voucher::ChannelTerms>(data);
    let _ = serde_json::from_slice::<proto::voucher::Voucher>(data);
    if let Ok(v) = serde_json::from_slice::<proto::api::JobView>(data) {
        let _ = v.paid();
    }
    let _ = settlement::rpc::handle(chain(), data);
    let _ = proto::Keypair::from_json(&String::from_utf8_lossy(data), "fuzz");
});
