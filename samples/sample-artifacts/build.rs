//! Builds every sample kernel for `wasm32-wasip1` and writes `samples.rs`: one constant per
//! sample with the path of its `.wasm`, and `foreach_sample!`, which tests use to make sure
//! each sample has a test.

use std::path::PathBuf;
use std::process::Command;

/// Every sample crate under `samples/`: (package, kind). A new sample goes here, and the build
/// of the host tests then fails until it has a test.
const SAMPLES: &[(&str, &str)] = &[
    ("matmul", "bin"),
    ("mlp", "cdylib"),
    ("train", "bin"),
    ("cluster-train", "bin"),
    ("allreduce", "bin"),
    ("hostile", "bin"),
    ("fuzz-driver", "bin"),
    ("echo", "cdylib"),
    ("tensor-check", "bin"),
    ("minilm", "cdylib"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../..").canonicalize()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let target_dir = out_dir.join("wasm-target");

    for (name, _) in SAMPLES {
        println!("cargo:rerun-if-changed={}", root.join("samples").join(name).display());
    }
    for dep in ["guest-sdk", "abi"] {
        println!("cargo:rerun-if-changed={}", root.join(dep).display());
    }

    // `cargo` from PATH, not `$CARGO`: under `cargo +nightly` (cargo-fuzz) the outer toolchain
    // may lack the wasm32 target, and rustup's proxy picks the one rust-toolchain.toml pins.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args(["build", "--release", "--target", "wasm32-wasip1", "--target-dir"]).arg(&target_dir);
    if std::env::var_os("CARGO_NET_OFFLINE").is_some() {
        cmd.arg("--offline");
    }
    for (name, _) in SAMPLES {
        cmd.args(["-p", name]);
    }
    // The outer build's flags (sanitizers under cargo-fuzz, clippy as the rustc wrapper,
    // coverage) are for the host; the guests build plainly.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_ENCODED_RUSTFLAGS")
            || key == "RUSTFLAGS"
            || key.starts_with("RUSTC_WRAPPER")
            || key.starts_with("RUSTC_WORKSPACE_WRAPPER")
            || key.starts_with("CARGO_BUILD_RUSTFLAGS")
            || key.starts_with("CARGO_TARGET_DIR")
            || key.starts_with("CARGO_PROFILE_")
            || key == "CARGO_MAKEFLAGS"
            || key == "CARGO_BUILD_TARGET"
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTC"
            || key == "RUSTDOC"
            || key == "RUSTC_LINKER"
        {
            cmd.env_remove(&key);
        }
    }
    // Guests ship without debug info: smaller modules compile faster on every host.
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false").env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    let status = cmd.status()?;
    if !status.success() {
        return Err(format!(
            "building the samples for wasm32-wasip1 failed ({status}); is the target installed? `rustup target add wasm32-wasip1`"
        )
        .into());
    }

    let mut code = String::new();
    let mut names = Vec::new();
    for (name, kind) in SAMPLES {
        // Binaries and cdylibs alike land as `<name>.wasm`.
        let path = target_dir.join("wasm32-wasip1/release").join(format!("{name}.wasm"));
        if !path.exists() {
            return Err(format!("sample {name} built, but {} is missing", path.display()).into());
        }
        let konst = name.to_uppercase().replace('-', "_");
        code.push_str(&format!(
            "/// The built `{name}` sample ({kind}).\npub const {konst}: &str = {:?};\n",
            path.display().to_string()
        ));
        names.push(name.replace('-', "_"));
    }
    code.push_str(&format!(
        "/// Every sample, by package name.\npub const ALL: &[(&str, &str)] = &[{}];\n",
        SAMPLES
            .iter()
            .map(|(n, _)| format!("({n:?}, {})", n.to_uppercase().replace('-', "_")))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    code.push_str("/// Calls `$m!(sample_name)` once per sample.\n#[macro_export]\nmacro_rules! foreach_sample {\n    ($m:ident) => {\n");
    for n in &names {
        code.push_str(&format!("        $m!({n});\n"));
    }
    code.push_str("    };\n}\n");
    std::fs::write(out_dir.join("samples.rs"), code)?;
    Ok(())
}
