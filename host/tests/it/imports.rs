//! Every built sample imports only what `abi` lists and WASI preview 1, with the signatures the
//! ABI gives. Read with wasmparser, independently of the host's own check.

use wasmparser::{Parser, Payload, TypeRef};

#[test]
fn samples_import_only_the_abi_and_wasi_preview1() {
    for (name, path) in sample_artifacts::ALL {
        let wasm = sample_artifacts::read(path);
        let mut imports = Vec::new();
        for payload in Parser::new(0).parse_all(&wasm) {
            if let Payload::ImportSection(reader) = payload.unwrap() {
                for import in reader.into_imports() {
                    let import = import.unwrap();
                    assert!(matches!(import.ty, TypeRef::Func(_)), "{name} imports a non-function {}", import.name);
                    imports.push((import.module.to_string(), import.name.to_string()));
                }
            }
        }
        assert!(!imports.is_empty(), "{name} imports nothing?");
        for (module, field) in &imports {
            assert!(abi::import_allowed(module, field), "{name} imports {module}::{field}, which abi does not allow");
        }
        assert!(imports.iter().any(|(m, _)| m == abi::IMPORT_MODULE), "{name} does not use the wasmgrid ABI");
    }
}
