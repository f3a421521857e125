//! The `wasmgrid` binary end to end: output, JSON shape and exit statuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod cluster;
mod hostile;
mod market;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap() }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wasmgrid"));
        c.args(args)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    }
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\nstderr: {}", text(&out.stdout), text(&out.stderr)))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn gpus_lists_adapters_as_json() {
    let out = Env::new().run(&["gpus", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = json(&out);
    let first = &list.as_array().unwrap()[0];
    for key in ["name", "vendor", "backend", "device_type", "limits"] {
        assert!(first.get(key).is_some(), "missing {key}: {first}");
    }
    assert!(first["limits"]["max_compute_workgroups_per_dimension"].as_u64().unwrap() > 0);
}

#[test]
fn run_prints_output_and_usage_as_json() {
    let env = Env::new();
    let out = env.run(&["run", sample_artifacts::MATMUL, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["status"], "ok");
    assert!(v["output"].as_str().unwrap().contains("matches the CPU reference"), "{v}");
    let usage = &v["usage"];
    for key in
        ["fuel", "dispatches", "invocations", "bytes_uploaded", "bytes_downloaded", "gpu_time_ns", "gpu_time_source"]
    {
        assert!(usage.get(key).is_some(), "usage lacks {key}: {usage}");
    }
    assert_eq!(usage["dispatches"], 1);
    assert_eq!(usage["invocations"], 256 * 256);
}

#[test]
fn run_reads_input_and_writes_output_files() {
    let env = Env::new();
    let (m, k, n) = (8u32, 4u32, 2u32);
    let mut input: Vec<u8> = [m, k, n].iter().flat_map(|w| w.to_le_bytes()).collect();
    input.extend((0..m * k + k * n).flat_map(|i| (i as f32).to_le_bytes()));
    let input_path = env.file("in.bin", &input);
    let output_path = env.dir.path().join("out.bin");
    let out = env.run(&[
        "run",
        sample_artifacts::MATMUL,
        "--input",
        &input_path,
        "--output",
        output_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["output_bytes"], 4 * 8 * 2);
    let c = std::fs::read(&output_path).unwrap();
    assert_eq!(c.len(), 64);
    // c[0][0] = sum_p a[0][p] * b[p][0] = 0*32 + 1*34 + 2*36 + 3*38
    assert_eq!(f32::from_le_bytes(c[0..4].try_into().unwrap()), 34.0 + 72.0 + 114.0);
}

#[test]
fn a_limit_kill_exits_3_and_names_the_limit() {
    let env = Env::new();
    let input = env.file("case", b"loop");
    let out = env.run(&["run", sample_artifacts::HOSTILE, "--input", &input, "--cpu-time", "300ms", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["kind"], "limit");
    assert_eq!(v["error"]["limit"], "cpu-time");

    let out = env.run(&["run", sample_artifacts::HOSTILE, "--input", &input, "--fuel", "1000000"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("limit fuel exceeded"), "{}", text(&out.stderr));
}

#[test]
fn a_job_error_exits_1_with_its_log() {
    let env = Env::new();
    let input = env.file("case", b"panic");
    let out = env.run(&["run", sample_artifacts::HOSTILE, "--input", &input]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("panicked on purpose") && err.contains("the job crashed"), "{err}");
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let env = Env::new();
    let out = env.run(&["run", "/no/such/job.wasm"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("reading the job /no/such/job.wasm"), "{}", text(&out.stderr));

    let garbage = env.file("garbage.wasm", b"this is not wasm");
    let out = env.run(&["run", &garbage]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a valid WebAssembly module"), "{}", text(&out.stderr));

    let out = env.run(&["run", sample_artifacts::MATMUL, "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not a size"), "{}", text(&out.stderr));

    let out = env.run(&["run", sample_artifacts::MLP]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("wasmgrid infer"), "{}", text(&out.stderr));

    let out = env.run(&["run", sample_artifacts::MATMUL, "--input", "/no/such/input"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_with_world_runs_a_cluster_job_here_and_its_members_agree() {
    let env = Env::new();
    let input = env.dir.path().join("train.txt");
    std::fs::write(&input, "mode=sync steps=20 samples=256 features=4").unwrap();
    let run = |world: &str| {
        let out = env
            .cmd(&[
                "run",
                sample_artifacts::CLUSTER_TRAIN,
                "--input",
                input.to_str().unwrap(),
                "--world",
                world,
                "--json",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        json(&out)
    };
    let one = run("1");
    let three = run("3");
    assert!(three["output"].as_str().unwrap().contains("members 3"), "{three}");
    let members = three["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["status"] == "ok" && m["usage"]["net_bytes_sent"].as_u64() > Some(0)));
    assert!(one.get("members").is_none() && one["usage"]["net_bytes_sent"] == 0);
    let weights = |v: &Value| -> Vec<f64> {
        let out = v["output"].as_str().unwrap();
        let line = out.lines().find_map(|l| l.strip_prefix("weights ")).unwrap();
        line.split_whitespace().map(|w| w.parse().unwrap()).collect()
    };
    for (a, b) in weights(&one).iter().zip(weights(&three)) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{one} vs {three}");
    }
    // Out of range is bad input, said at once.
    let out = env.cmd(&["run", sample_artifacts::CLUSTER_TRAIN, "--world", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn run_with_a_checkpoint_file_saves_to_it_and_resumes_from_it() {
    let env = Env::new();
    let input = env.dir.path().join("train.txt");
    std::fs::write(&input, "mode=sync steps=60 samples=256 features=4 checkpoint=20").unwrap();
    let file = env.dir.path().join("train.ck");
    let run = |world: &str, file: &std::path::Path| {
        let args = ["run", sample_artifacts::CLUSTER_TRAIN, "--input", input.to_str().unwrap(), "--world", world];
        let mut args = args.to_vec();
        args.extend(["--checkpoint", file.to_str().unwrap(), "--json"]);
        env.cmd(&args).output().unwrap()
    };
    // No file yet: it runs afresh and leaves its newest checkpoint (step 40: none at the end).
    let out = run("2", &file);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let whole = json(&out);
    assert_eq!(whole["checkpoint"]["resumed_from_step"], Value::Null, "{whole}");
    assert_eq!(
        (whole["checkpoint"]["saved"].as_u64(), whole["checkpoint"]["newest_step"].as_u64()),
        (Some(2), Some(40))
    );
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(b"wgck1") && bytes[5..13] == 40u64.to_le_bytes(), "{:?}", &bytes[..13]);
    // Again with the file: it resumes at step 40 and ends with the same output.
    let out = run("2", &file);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let resumed = json(&out);
    assert_eq!(resumed["checkpoint"]["resumed_from_step"], 40, "{resumed}");
    assert!(resumed["log"].as_str().unwrap().contains("resuming from the checkpoint at step 40"), "{resumed}");
    assert_eq!(resumed["output"], whole["output"]);
    // A file that is not a checkpoint is bad input, said before anything runs; the file stays.
    let junk = env.dir.path().join("junk.ck");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let out = run("1", &junk);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not a wasmgrid checkpoint"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&junk).unwrap(), b"not a checkpoint at all");
}

#[test]
fn infer_serves_one_request_per_stdin_line() {
    let env = Env::new();
    let mut child = env
        .cmd(&["infer", sample_artifacts::MLP, "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line: Vec<String> = (0..16).map(|i| (i as f32 / 10.0).to_string()).collect();
    let line = line.join(",");
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{line}\nnot,numbers\n\n{line}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    // The bad request fails alone; the exit status says one request failed.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "3 requests and a summary: {lines:?}");
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[0]["response"].as_str().unwrap().split(',').count(), 4);
    assert_eq!(lines[1]["status"], "failed");
    assert_eq!(lines[1]["error"]["kind"], "guest");
    assert_eq!(lines[2]["response"], lines[0]["response"], "same request, same response");
    assert_eq!(lines[3]["usage"]["inferences"], 2);
}

#[test]
fn infer_takes_a_model_folder_as_its_init_and_a_bad_folder_is_refused_before_anything_runs() {
    let env = Env::new();
    let model = sample_artifacts::minilm_dir();
    let mut child = env
        .cmd(&["infer", sample_artifacts::MINILM, "--init", model.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "A man is eating food.\n[\"A man is eating food.\", \"A woman is playing violin.\"]").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // One line per request; the JSON list's response is its two embeddings on two lines.
    let lines: Vec<Vec<f32>> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{}", text(&out.stdout));
    assert!(lines.iter().all(|e| e.len() == 384));
    assert_eq!(lines[0], lines[1], "the same sentence alone and in a batch");
    let norm: f32 = lines[2].iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5, "unit length: {norm}");

    // A folder that is not there, one with nothing in it: refused as bad input, with the path.
    let empty = env.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (init, why) in [(env.dir.path().join("missing"), "missing"), (empty, "holds no files")] {
        let out = env.cmd(&["infer", sample_artifacts::MINILM, "--init", init.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
    }
}

#[test]
fn infer_takes_request_files() {
    let env = Env::new();
    let a = env.file("a.txt", "1 ".repeat(16).as_bytes());
    let b = env.file("b.txt", "0 ".repeat(16).as_bytes());
    let out = env.run(&["infer", sample_artifacts::MLP, &a, &b]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2);
    assert!(text(&out.stderr).contains("2 requests"), "{}", text(&out.stderr));
}
