//! Feeds arbitrary bytes to a worker as its stdin, as a daemon (or whatever took its place)
//! would write them: the worker's frame reader and loop must end with an error or serve, never
//! panic or hang. The daemon's side of the same pipe (a worker's frames, which run tenant code)
//! is fuzzed by the `frames` target.
//! Run: `scripts/fuzz.sh 60` (or `cargo +nightly fuzz run worker --sanitizer none` in `fuzz/`).
#![no_main]

use std::sync::OnceLock;

use host::{Host, HostConfig};
use libfuzzer_sys::fuzz_target;

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| Host::new(HostConfig { max_instances: 4, ..HostConfig::default() }).expect("a GPU adapter"))
}

fuzz_target!(|stdin: &[u8]| {
    let _ = host::worker::serve(host(), std::io::Cursor::new(stdin.to_vec()), std::io::sink());
});
