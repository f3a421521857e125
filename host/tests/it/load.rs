//! Module checks at load time: nothing of a refused module runs.

use host::LoadError;

use crate::host;

fn load_wat(src: &str) -> Result<host::JobModule, LoadError> {
    host().load(&wat::parse_str(src).unwrap())
}

#[test]
fn another_abi_version_is_refused_with_both_versions_named() {
    let err = load_wat(r#"(module (import "wasmgrid_v2" "submit" (func (param i32 i32) (result i32))) (memory (export "memory") 1) (func (export "_start")))"#)
        .unwrap_err();
    assert_eq!(err, LoadError::AbiVersion { found: 2, expected: 1 });
    let msg = err.to_string();
    assert!(msg.contains("ABI v2") && msg.contains("speaks v1"), "{msg}");
}

#[test]
fn imports_outside_the_abi_are_refused() {
    let err = load_wat(r#"(module (import "env" "system" (func)) (func (export "_start")))"#).unwrap_err();
    assert_eq!(err, LoadError::ForbiddenImport { module: "env".into(), name: "system".into() });
    let err = load_wat(r#"(module (import "wasmgrid_v1" "open_socket" (func)) (func (export "_start")))"#).unwrap_err();
    assert!(matches!(err, LoadError::ForbiddenImport { .. }), "{err}");
}

#[test]
fn a_wrong_import_signature_is_refused() {
    let err = load_wat(
        r#"(module (import "wasmgrid_v1" "submit" (func (param i64) (result i32))) (func (export "_start")))"#,
    )
    .unwrap_err();
    assert_eq!(err, LoadError::Signature { name: "submit".into(), version: 1 });
}

#[test]
fn garbage_and_entry_point_less_modules_are_refused() {
    assert!(matches!(host().load(b"\0asm\x01\0\0\0garbage"), Err(LoadError::Invalid(_))));
    assert!(matches!(host().load(b"hello"), Err(LoadError::Invalid(_))));
    assert_eq!(load_wat("(module (func (export \"main\")))").unwrap_err(), LoadError::NoEntryPoint);
}

#[test]
fn modules_are_cached_by_content_hash() {
    let wasm = wat::parse_str(r#"(module (func (export "_start")))"#).unwrap();
    let a = host().load(&wasm).unwrap();
    assert!(host().is_cached(&a.hash()));
    let b = host().load(&wasm).unwrap();
    assert_eq!(a.hash(), b.hash());
    let report = host().run_batch(&a, Vec::new(), &host::Limits::default()).unwrap();
    assert_eq!(report.outcome, Ok(()));
}

#[test]
fn a_service_is_not_run_as_a_batch_job_and_back() {
    let mlp = host().load(&sample_artifacts::read(sample_artifacts::MLP)).unwrap();
    assert_eq!(host().run_batch(&mlp, Vec::new(), &host::Limits::default()).unwrap_err(), LoadError::NotBatch);
    let matmul = host().load(&sample_artifacts::read(sample_artifacts::MATMUL)).unwrap();
    let err = host().start_service(&matmul, Vec::new(), &host::Limits::default()).unwrap_err();
    assert!(matches!(err, host::StartError::Load(LoadError::NotService)), "{err}");
}

#[test]
fn the_disk_cache_serves_a_precompiled_module() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        || host::HostConfig { cache_dir: Some(dir.path().to_path_buf()), max_instances: 2, ..Default::default() };
    let wasm = sample_artifacts::read(sample_artifacts::MATMUL);
    let first = host::Host::new(config()).unwrap();
    first.load(&wasm).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "one precompiled module on disk");
    // A corrupt cache file is ignored and rewritten, never trusted.
    let path = files[0].as_ref().unwrap().path();
    std::fs::write(&path, b"not a module").unwrap();
    let second = host::Host::new(config()).unwrap();
    let module = second.load(&wasm).unwrap();
    let report = second.run_batch(&module, Vec::new(), &host::Limits::default()).unwrap();
    assert_eq!(report.outcome, Ok(()));
    assert!(std::fs::read(&path).unwrap().len() > 1000, "rewritten");
}

/// A module with `imports` whose one big function fails validation (it leaves an i64 where it
/// declares an i32): any compile refuses it as invalid, so a refusal that names the import
/// shows the import check ran before compiling.
fn with_invalid_body(imports: &str, exports: &str) -> Vec<u8> {
    let body = "i32.const 1 drop ".repeat(100_000);
    wat::parse_str(format!(
        r#"(module {imports} (memory (export "memory") 1) {exports} (func (result i32) {body} i64.const 0))"#
    ))
    .unwrap()
}

#[test]
fn imports_are_checked_before_the_module_is_compiled() {
    let start = r#"(func (export "_start"))"#;
    // The body alone is refused by the compiler.
    let control = with_invalid_body("", start);
    assert!(matches!(host().load(&control), Err(LoadError::Invalid(_))), "the body really is invalid");
    let cases = [
        (
            r#"(import "env" "system" (func))"#,
            start,
            LoadError::ForbiddenImport { module: "env".into(), name: "system".into() },
        ),
        (
            r#"(import "wasi_snapshot_preview1" "fd_write" (global i32))"#,
            start,
            LoadError::ForbiddenImport { module: "wasi_snapshot_preview1".into(), name: "fd_write".into() },
        ),
        (r#"(import "wasmgrid_v2" "submit" (func))"#, start, LoadError::AbiVersion { found: 2, expected: 1 }),
        (
            r#"(import "wasmgrid_v1" "submit" (func (param i64) (result i32)))"#,
            start,
            LoadError::Signature { name: "submit".into(), version: 1 },
        ),
        ("", r#"(func (export "main"))"#, LoadError::NoEntryPoint),
    ];
    for (imports, exports, want) in cases {
        assert_eq!(host().load(&with_invalid_body(imports, exports)).unwrap_err(), want, "{imports}");
    }
}

/// The matmul sample made distinct (and so compiled and cached apart) by a custom section.
fn variant(tag: &str) -> Vec<u8> {
    let mut wasm = sample_artifacts::read(sample_artifacts::MATMUL);
    wasm.extend_from_slice(&crate::limits::custom_section(tag));
    wasm
}

fn cache_files(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let all: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    all.into_iter().partition(|p| p.extension().is_some_and(|e| e == "cwasm"))
}

#[test]
fn concurrent_loads_of_one_module_through_a_shared_cache_never_read_a_torn_file() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = 4;
    let rounds = 3;
    let barrier = std::sync::Barrier::new(hosts);
    std::thread::scope(|scope| {
        for _ in 0..hosts {
            scope.spawn(|| {
                // A host of its own, as a worker process has: its memory cache is empty, so
                // every load goes through the directory, where the others write at once.
                let own = host::Host::new(host::HostConfig {
                    cache_dir: Some(dir.path().to_path_buf()),
                    max_instances: 2,
                    ..Default::default()
                })
                .unwrap();
                for round in 0..rounds {
                    let wasm = variant(&format!("shared-cache-{round}"));
                    barrier.wait();
                    let module = own.load(&wasm).unwrap();
                    let report = own.run_batch(&module, Vec::new(), &host::Limits::default()).unwrap();
                    assert_eq!(report.outcome, Ok(()));
                }
            });
        }
    });
    let (modules, others) = cache_files(dir.path());
    assert_eq!(modules.len(), rounds, "one file per module: {modules:?}");
    assert!(others.is_empty(), "no temporary file is left: {others:?}");
}

#[test]
fn the_disk_cache_keeps_to_its_size_bound() {
    let dir = tempfile::tempdir().unwrap();
    // A stale temporary file, left by a writer that died, and a fresh one still being written.
    let stale = dir.path().join(".dead.cwasm.1.0.0.tmp");
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    let writing = dir.path().join(".busy.cwasm.2.0.0.tmp");
    std::fs::write(&writing, b"partial").unwrap();

    let probe = host::Host::new(host::HostConfig {
        cache_dir: Some(dir.path().join("probe")),
        max_instances: 1,
        ..Default::default()
    })
    .unwrap();
    probe.load(&variant("size-probe")).unwrap();
    let (files, _) = cache_files(&dir.path().join("probe"));
    let one = std::fs::metadata(&files[0]).unwrap().len();

    // Room for two and a half modules.
    let bound = one * 5 / 2;
    let own = host::Host::new(host::HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        cache_max_bytes: bound,
        max_instances: 1,
        ..Default::default()
    })
    .unwrap();
    let mut last = [0u8; 32];
    for i in 0..4 {
        last = own.load(&variant(&format!("bounded-{i}"))).unwrap().hash();
        // Distinct modification times, so "oldest" is well defined.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (modules, others) = cache_files(dir.path());
    let total: u64 = modules.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(total <= bound, "{total} bytes on disk, over the bound of {bound}");
    assert_eq!(modules.len(), 2, "{modules:?}");
    let newest = modules.iter().any(|p| p.file_stem().unwrap().to_string_lossy() == hex(&last));
    assert!(newest, "the module just written stays: {modules:?}");
    assert!(!stale.exists(), "a stale temporary file is removed");
    assert!(others.iter().any(|p| p == &writing), "a fresh one is left to its writer: {others:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
