//! Host integration tests: every sample against a CPU reference, hostile guests, module
//! checks. All GPU work runs on whatever adapter the machine has (lavapipe in CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod checkpoint;
mod collective;
mod hostile;
mod imports;
mod limits;
mod load;
mod models;
mod samples;
mod worker;

use std::sync::OnceLock;

use host::{Host, HostConfig, JobReport, Limits};

/// One host for the whole test binary: opening a device on a software driver takes seconds.
fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| Host::new(HostConfig::default()).expect("a GPU adapter (install mesa-vulkan-drivers)"))
}

fn run(path: &str, input: &[u8], limits: &Limits) -> JobReport {
    let module = host().load(&sample_artifacts::read(path)).expect("sample loads");
    host().run_batch(&module, input.to_vec(), limits).expect("sample is a batch job")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Each sample must have a test named after it; adding a sample without one fails to compile.
mod per_sample {
    pub(crate) use crate::hostile::{fuzz_driver, hostile};
    pub(crate) use crate::models::minilm;
    pub(crate) use crate::samples::{allreduce, cluster_train, echo, matmul, mlp, tensor_check, train};
}

macro_rules! require_test {
    ($name:ident) => {
        const _: fn() = per_sample::$name;
    };
}
sample_artifacts::foreach_sample!(require_test);
