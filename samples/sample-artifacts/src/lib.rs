//! Paths of the sample kernels, built for `wasm32-wasip1` by this crate's build script, for
//! tests and benchmarks. `foreach_sample!` lists them, so a test suite can require a test per
//! sample.

include!(concat!(env!("OUT_DIR"), "/samples.rs"));

/// Reads a built sample.
pub fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("sample {path} is not built: {e}"))
}
