//! Paths of the sample kernels, built for `wasm32-wasip1` by this crate's build script, for
//! tests and benchmarks. `foreach_sample!` lists them, so a test suite can require a test per
//! sample.

include!(concat!(env!("OUT_DIR"), "/samples.rs"));

/// Reads a built sample.
pub fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("sample {path} is not built: {e}"))
}

/// all-MiniLM-L6-v2's folder as `scripts/fetch-minilm.sh` places it (`WASMGRID_MINILM_DIR`, or
/// its default place); the test command runs that script first. Panics, saying so, when the
/// model is not there.
pub fn minilm_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("WASMGRID_MINILM_DIR")
        .map_or_else(|| std::path::PathBuf::from("/var/tmp/wasmgrid-models/all-minilm-l6-v2"), Into::into);
    assert!(
        dir.join("model.safetensors").is_file(),
        "no model at {}: run scripts/fetch-minilm.sh (or set WASMGRID_MINILM_DIR)",
        dir.display()
    );
    dir
}
