//! Drives every host function of the ABI (checkpoints and started all-reduces too) with arbitrary calls and arguments, from inside a real
//! sandbox on the real GPU: the fuzz input is the program of the `fuzz-driver` guest.
//! Run: `scripts/fuzz.sh 60` (or `cargo +nightly fuzz run abi --sanitizer none` in `fuzz/`).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use host::{Failure, Host, HostConfig, JobModule, Limits};
use libfuzzer_sys::fuzz_target;

fn sandbox() -> &'static (Host, JobModule) {
    static SANDBOX: OnceLock<(Host, JobModule)> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let host = Host::new(HostConfig { max_instances: 4, ..HostConfig::default() }).expect("a GPU adapter");
        let module = host.load(&sample_artifacts::read(sample_artifacts::FUZZ_DRIVER)).expect("the driver loads");
        (host, module)
    })
}

fuzz_target!(|program: &[u8]| {
    let (host, module) = sandbox();
    let limits = Limits {
        memory_bytes: 64 << 20,
        fuel: 200_000_000,
        cpu_time: Duration::from_secs(2),
        wall_time: Duration::from_secs(10),
        gpu_bytes: 16 << 20,
        buffers: 32,
        pipelines: 8,
        workgroups_per_dispatch: 1 << 16,
        dispatches: 64,
        output_bytes: 1 << 20,
        log_bytes: 64 << 10,
        wgsl_bytes: 64 << 10,
        net_bytes: 1 << 20,
    };
    // Half the programs run as a try that resumes from a checkpoint (the program's own first
    // bytes), so that reads of one reach the host's checks too.
    let resume = (program.len() % 2 == 1).then(|| host::checkpoint::Checkpoint {
        step: program.len() as u64,
        bytes: program.get(..program.len().min(64)).unwrap_or_default().to_vec(),
    });
    let context = host::JobContext {
        checkpoints: host::checkpoint::Checkpoints::new(resume, Some(Box::new(|_| {}))),
        ..host::JobContext::default()
    };
    let report = host.run_job(module, program.to_vec(), &limits, |_| {}, context).expect("the driver is a batch job");
    // Whatever the calls, the host answers with an error code or a named limit; a host-side
    // failure (a lost device, a poisoned state) is a bug.
    if let Err(Failure::Host(message)) = &report.outcome {
        panic!("host failure: {message}");
    }
});
