//! Feeds arbitrary bytes to every decoder that reads the network: the frame splitter and each
//! message type. None may panic; each either decodes or refuses with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::{FrameDecoder, decode_body};
use proto::msg::{HostMsg, JobMsg, JobReply, SchedulerMsg, SessionMsg, SessionReply};

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
    let _ = serde_json::from_slice::<proto::api::SubmitJob>(data);
    let _ = proto::Keypair::from_json(&String::from_utf8_lossy(data), "fuzz");
});
