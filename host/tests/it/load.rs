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
