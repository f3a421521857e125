//! Feeds arbitrary bytes to the payment-channel program's decoders, natively (the same code the
//! program runs on chain): instruction data and channel account data. Neither may panic, and
//! whatever decodes must encode back to the very bytes it came from (one encoding per value).
#![no_main]

use libfuzzer_sys::fuzz_target;

use paychan_state::{Channel, Instruction};

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = Instruction::decode(data) {
        let mut out = [0u8; Instruction::MAX_LEN];
        let n = ix.encode(&mut out);
        assert_eq!(&out[..n], data, "{ix:?} has another encoding");
    }
    if let Ok(c) = Channel::decode(data) {
        let mut out = [0u8; Channel::LEN];
        c.encode(&mut out).unwrap();
        // Only the padding may differ: the layout keeps six zero bytes at the end.
        assert_eq!(&out[..Channel::LEN - 6], &data[..Channel::LEN - 6]);
        assert_eq!(Channel::decode(&out), Ok(c));
    }
});
