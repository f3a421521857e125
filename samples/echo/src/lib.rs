//! The smallest inference service: each response is the request reversed, with no GPU work, so
//! round trips measure the path (network, sandbox call, metering) and nothing else.
//!
//! Build: `cargo build --release --target wasm32-wasip1 -p echo`;
//! run: `echo hello | wasmgrid infer target/wasm32-wasip1/release/echo.wasm`.

use wasmgrid::{InferenceService, Result};

struct Echo;

impl InferenceService for Echo {
    fn init(_input: &[u8]) -> Result<Self> {
        Ok(Echo)
    }

    fn infer(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        Ok(request.iter().rev().copied().collect())
    }
}

wasmgrid::inference_service!(Echo);
