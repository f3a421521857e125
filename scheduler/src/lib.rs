//! The wasmgrid scheduler: providers register over QUIC, renters submit over HTTP, and jobs are
//! matched to providers. Work in progress: see issue 3.
