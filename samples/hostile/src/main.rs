//! A guest that misbehaves on purpose, one way per case, so the host tests can check that each
//! is contained and named. The input is the case name (and an optional number); the output
//! says what the guest saw.
//!
//! Cases that need values the safe SDK never produces (bad pointers, forged handles) call the
//! raw imports directly.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job
#![allow(unsafe_code)] // it calls the raw ABI with bad values on purpose

use std::fmt::Write as _;
use std::hint::black_box;

use wasmgrid::{Buffer, BufferKind, Pipeline, raw};

mod wasi {
    // SAFETY: the signature is WASI preview 1's `sock_accept`; the host checks every argument,
    // which is what this guest tests.
    #[allow(unsafe_code)]
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        pub(crate) safe fn sock_accept(fd: i32, flags: i32, result_fd: i32) -> i32;
        // SAFETY: WASI preview 1's `poll_oneoff`; the host checks every pointer.
        pub(crate) safe fn poll_oneoff(subs: i32, events: i32, n: i32, nevents: i32) -> i32;
    }

    /// A WASI `subscription`: a clock (`kind` 0: `clock_id`, `timeout` ns, `flags`) or an fd
    /// (`kind` 1 read, 2 write: `clock_id` is the fd).
    pub(crate) fn subscription(userdata: u64, kind: u8, clock_id: u32, timeout: u64, flags: u16) -> [u8; 48] {
        let mut s = [0u8; 48];
        s[0..8].copy_from_slice(&userdata.to_le_bytes());
        s[8] = kind;
        s[16..20].copy_from_slice(&clock_id.to_le_bytes());
        s[24..32].copy_from_slice(&timeout.to_le_bytes());
        s[40..42].copy_from_slice(&flags.to_le_bytes());
        s
    }
}

/// A shader of one of a few shapes, `n` deep or long, that stresses how deep the compiler
/// recurses: the host refuses those over its bounds before compiling and compiles the rest.
fn deep_wgsl(shape: &str, n: usize) -> Option<String> {
    let head = "@group(0) @binding(0) var<storage, read_write> d: array<u32>;\n";
    let body = |expr: String| {
        format!("{head}@compute @workgroup_size(1) fn main() {{ let x = d[0]; let y = i32(x); d[1] = {expr}; }}\n")
    };
    Some(match shape {
        // A flat sum: naga lowers it recursively, one level per term. This one, 300,000 terms
        // long, overflowed the stack of the daemon's async worker thread.
        "sum" => format!(
            "{head}fn f() -> u32 {{ return 1u{}; }}\n@compute @workgroup_size(1) fn main() {{ d[1] = f(); }}\n",
            "+1u".repeat(n.saturating_sub(1))
        ),
        // The same over a value only known when it runs, so that the driver compiles it too.
        "xsum" => body(format!("x{}", "+x".repeat(n.saturating_sub(1)))),
        "neg" => body(format!("u32({}y)", "- ".repeat(n))),
        "parens" => body(format!("{}x{}", "(".repeat(n), ")".repeat(n))),
        "else-if" => {
            let mut chain = String::from("if x == 0u { d[1] = 0u; }");
            for i in 1..n {
                chain.push_str(&format!(" else if x == {i}u {{ d[1] = {i}u; }}"));
            }
            format!("{head}@compute @workgroup_size(1) fn main() {{ let x = d[0]; {chain} }}\n")
        }
        // Each constant uses the next: naga orders them with a recursive search.
        "decls" => {
            let mut s = String::from(head);
            for i in 0..n {
                s.push_str(&format!("const c{i} = c{};\n", i + 1));
            }
            s.push_str(&format!("const c{n} = 1u;\n@compute @workgroup_size(1) fn main() {{ d[1] = c0; }}\n"));
            s
        }
        "types" => {
            let ty = format!("{}u32{}", "array<".repeat(n), ", 1>".repeat(n));
            format!("{head}var<private> t: {ty};\n@compute @workgroup_size(1) fn main() {{ _ = t; d[1] = 1u; }}\n")
        }
        _ => return None,
    })
}

const FILL_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> data: array<u32>;
@compute @workgroup_size(64)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * 65535u * 64u + gid.x;
    if (i < arrayLength(&data)) { data[i] = 0xC0FFEE00u | (i & 0xffu); }
}
"#;

/// Every invocation loops `data[0]` times (kept under 65,535, where some drivers cut loops
/// short); the dispatch size multiplies that into hours of GPU work.
const SPIN_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> data: array<u32>;
@compute @workgroup_size(64)
fn spin(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = data[0];
    var acc = data[1] + gid.x;
    for (var i = 0u; i < n; i = i + 1u) {
        acc = acc * 1664525u + (1013904223u ^ i);
    }
    if (acc == 7u) { data[1] = acc; }
}
"#;

const MB: u64 = 1 << 20;

// SAFETY: WASI preview 1's `clock_time_get(id, precision, *mut timestamp) -> errno`.
#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    #[link_name = "clock_time_get"]
    fn wasip1_clock_time_get(id: i32, precision: i64, time: i32) -> i32;
}

fn main() -> Result<(), wasmgrid::Error> {
    let input =
        String::from_utf8(wasmgrid::input()?).map_err(|_| wasmgrid::Error::bad_input("case name must be text"))?;
    let mut words = input.split_whitespace();
    let case = words.next().unwrap_or("");
    let arg: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let mut out = String::new();
    match case {
        "loop" => loop {
            black_box(&mut out);
        },
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 16 << 20]);
                black_box(&hoard);
            }
        }
        "recurse" => {
            // The guard is never true, but the compiler cannot know that.
            fn deeper(n: u64) -> u64 {
                if black_box(n) == u64::MAX { 0 } else { black_box(deeper(black_box(n + 1))) + 1 }
            }
            writeln!(out, "{}", deeper(0)).ok();
        }
        "panic" => panic!("the kernel panicked on purpose"),
        "exit" => std::process::exit(3),
        "log-flood" => loop {
            println!("flooding the log with a line that is long enough to fill it quickly ............");
        },
        "bad-pointer" => {
            let far = 0x7fff_fff0u32 as i32;
            let b = Buffer::storage(64)?;
            writeln!(out, "buffer_write {}", raw::buffer_write(b.handle() as i32, 0, far, 64)).ok();
            // SAFETY: `far` is outside linear memory, which the host must refuse before writing.
            writeln!(out, "buffer_read {}", unsafe { raw::buffer_read(b.handle() as i32, 0, far, 64) }).ok();
            // SAFETY: as above.
            writeln!(out, "input_read {}", unsafe { raw::input_read(far, 16, 0) }).ok();
            writeln!(out, "output_write {}", raw::output_write(16, -5)).ok();
            writeln!(out, "log {}", raw::log(3, -1, 10)).ok();
            writeln!(out, "pipeline_create {}", raw::pipeline_create(far, 100, 0, 4)).ok();
            writeln!(out, "submit {}", raw::submit(far, 1)).ok();
            writeln!(out, "wrap {}", raw::buffer_write(b.handle() as i32, 0, i32::MAX, i32::MAX)).ok();
        }
        "bad-handle" => {
            let data = [0u8; 16];
            let ptr = data.as_ptr() as i32;
            writeln!(out, "unknown {}", raw::buffer_write(12345, 0, ptr, 16)).ok();
            // SAFETY: the handle is refused before anything is written; were it not, `data` is
            // ours and 16 bytes long.
            writeln!(out, "negative {}", unsafe { raw::buffer_read(-7, 0, ptr, 16) }).ok();
            let h = raw::buffer_create(64, 1);
            writeln!(out, "destroy {}", raw::buffer_destroy(h)).ok();
            writeln!(out, "freed-write {}", raw::buffer_write(h, 0, ptr, 16)).ok();
            writeln!(out, "freed-destroy {}", raw::buffer_destroy(h)).ok();
            let p = Pipeline::new(FILL_WGSL, "fill")?;
            // A pipeline handle is not a buffer handle.
            writeln!(out, "pipeline-as-buffer {}", raw::buffer_destroy(p.handle() as i32)).ok();
            let bindings = wasmgrid::to_bytes(&[0u32, h as u32]);
            let desc = wasmgrid::to_bytes(&[p.handle(), bindings.as_ptr() as u32, 1, 1, 1, 1]);
            writeln!(out, "freed-bind {}", raw::submit(desc.as_ptr() as i32, 1)).ok();
            let desc = wasmgrid::to_bytes(&[999u32, bindings.as_ptr() as u32, 0, 1, 1, 1]);
            writeln!(out, "unknown-pipeline {}", raw::submit(desc.as_ptr() as i32, 1)).ok();
        }
        "invalid-wgsl" => {
            for (name, src) in [
                ("syntax", "@compute @workgroup_size(1) fn main( {"),
                ("types", "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }"),
                ("entry", FILL_WGSL),
            ] {
                let entry = if name == "entry" { "nope" } else { "main" };
                match Pipeline::new(src, entry) {
                    Ok(_) => writeln!(out, "{name} accepted"),
                    // One line per case: compiler messages span several.
                    Err(e) => writeln!(out, "{name} {:?}: {}", e.code(), e.to_string().replace('\n', " | ")),
                }
                .ok();
            }
        }
        "binding-mismatch" => {
            let src = r#"
                struct P { n: u32 }
                @group(0) @binding(0) var<uniform> p: P;
                @group(0) @binding(1) var<storage, read_write> data: array<u32>;
                @compute @workgroup_size(1) fn main() { data[0] = p.n; }
            "#;
            let pipe = Pipeline::new(src, "main")?;
            let uniform = Buffer::new(BufferKind::Uniform, 16)?;
            let storage = Buffer::storage(16)?;
            let cases: [(&str, Vec<(u32, &Buffer)>); 5] = [
                ("swapped", vec![(0, &storage), (1, &uniform)]),
                ("missing", vec![(0, &uniform)]),
                ("extra", vec![(0, &uniform), (1, &storage), (7, &storage)]),
                ("twice", vec![(0, &uniform), (1, &storage), (1, &storage)]),
                ("ok", vec![(0, &uniform), (1, &storage)]),
            ];
            for (name, bindings) in cases {
                match pipe.dispatch(&bindings, [1, 1, 1]) {
                    Ok(()) => writeln!(out, "{name} ok"),
                    Err(e) => writeln!(out, "{name} {:?}: {e}", e.code()),
                }
                .ok();
            }
        }
        "workgroups" => {
            let pipe = Pipeline::new(FILL_WGSL, "fill")?;
            let data = Buffer::storage(256)?;
            for (name, groups) in
                [("over-device", [1_000_000, 1, 1]), ("over-job", [65_535, 65_535, 64]), ("ok", [1, 1, 1])]
            {
                match pipe.dispatch(&[(0, &data)], groups) {
                    Ok(()) => writeln!(out, "{name} ok"),
                    Err(e) => writeln!(out, "{name} {:?}: {e}", e.code()),
                }
                .ok();
            }
        }
        "gpu-quota" => {
            let mut held = Vec::new();
            let err = loop {
                match Buffer::storage(16 * MB) {
                    Ok(b) => held.push(b),
                    Err(e) => break e,
                }
                if held.len() > 10_000 {
                    break wasmgrid::Error::kernel("no quota");
                }
            };
            writeln!(out, "held {} MiB, then {:?}: {err}", held.len() as u64 * 16, err.code()).ok();
            // Freeing gives the quota back.
            held.clear();
            writeln!(out, "after free {}", Buffer::storage(16 * MB).map(|_| "ok").unwrap_or("refused")).ok();
        }
        "secret" => {
            // Fill `arg` MiB of GPU memory with a recognisable pattern, both by upload and by a
            // shader, then free it.
            let mib = arg.max(1);
            let pipe = Pipeline::new(FILL_WGSL, "fill")?;
            let pattern = vec![0xC0u8; MB as usize];
            let mut bufs = Vec::new();
            for _ in 0..mib {
                let b = Buffer::storage(MB)?;
                b.write_bytes(0, &pattern)?;
                let words = (MB / 4) as u32;
                pipe.dispatch(&[(0, &b)], [words.div_ceil(64).min(65_535), words.div_ceil(64 * 65_535), 1])?;
                bufs.push(b);
            }
            let check = bufs[0].read_bytes(0, 16)?;
            writeln!(out, "filled {mib} MiB, first bytes {check:02x?}").ok();
        }
        "zeros" => {
            let mib = arg.max(1);
            let mut nonzero = 0u64;
            for _ in 0..mib {
                let b = Buffer::storage(MB)?;
                let bytes = b.read_bytes(0, MB as usize)?;
                nonzero += bytes.iter().filter(|&&v| v != 0).count() as u64;
            }
            writeln!(out, "read {mib} MiB of fresh buffers, {nonzero} non-zero bytes").ok();
        }
        "wasi-file" => {
            for path in ["/etc/passwd", "passwd", "../x", "/"] {
                match std::fs::read(path) {
                    Ok(b) => writeln!(out, "read {path}: {} bytes", b.len()),
                    Err(e) => writeln!(out, "read {path}: error {e}"),
                }
                .ok();
            }
            match std::fs::write("/tmp/wasmgrid-escape", b"x") {
                Ok(()) => writeln!(out, "write: ok"),
                Err(e) => writeln!(out, "write: error {e}"),
            }
            .ok();
            match std::fs::read_dir("/") {
                Ok(_) => writeln!(out, "read_dir: ok"),
                Err(e) => writeln!(out, "read_dir: error {e}"),
            }
            .ok();
            writeln!(out, "env vars {}", std::env::vars().count()).ok();
        }
        "wasi-socket" => {
            match std::net::TcpStream::connect("127.0.0.1:22") {
                Ok(_) => writeln!(out, "connect: ok"),
                Err(e) => writeln!(out, "connect: error {e}"),
            }
            .ok();
            match std::net::TcpListener::bind("0.0.0.0:8080") {
                Ok(_) => writeln!(out, "bind: ok"),
                Err(e) => writeln!(out, "bind: error {e}"),
            }
            .ok();
            let mut fd = 0i32;
            for candidate in 0..8 {
                let errno = wasi::sock_accept(candidate, 0, &mut fd as *mut i32 as i32);
                writeln!(out, "sock_accept({candidate}) errno {errno}").ok();
            }
        }
        "long-shader" => {
            let pipe = Pipeline::new(SPIN_WGSL, "spin")?;
            // `arg` iterations (at most 60,000) in each of 64 x 65,535 x `rows` invocations:
            // 60,000 and 100 rows is hours of work on a software driver.
            let rows: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
            let data = Buffer::storage_from(&[arg.clamp(1, 60_000) as u32, 1u32])?;
            pipe.dispatch(&[(0, &data)], [65_535, rows.clamp(1, 65_535), 1])?;
            writeln!(out, "spun {:?}", data.read::<u32>()?).ok();
        }
        "sleep" => {
            // `std::thread::sleep` is WASI `poll_oneoff` with one relative clock.
            std::thread::sleep(std::time::Duration::from_millis(arg));
            writeln!(out, "slept {arg} ms").ok();
        }
        "sleep-until" => {
            // An absolute monotonic deadline `arg` ms from now, through the raw call.
            let mut now = 0u64;
            // SAFETY: WASI preview 1's `clock_time_get` writes one u64 at the pointer.
            let errno = unsafe { wasip1_clock_time_get(1, 1, &mut now as *mut u64 as i32) };
            let sub = wasi::subscription(7, 0, 1, now + arg * 1_000_000, 1);
            let mut event = [0u8; 32];
            let mut n = 0u32;
            let r = wasi::poll_oneoff(sub.as_ptr() as i32, event.as_mut_ptr() as i32, 1, &mut n as *mut u32 as i32);
            writeln!(out, "clock {errno} poll {r} events {n} userdata {}", event[0]).ok();
        }
        "poll-stdin" => {
            // stdin is ready (empty) at once, so a ten-second clock beside it never sleeps.
            let subs = [wasi::subscription(1, 0, 1, 10_000_000_000, 0), wasi::subscription(2, 1, 0, 0, 0)];
            let mut events = [0u8; 64];
            let mut n = 0u32;
            let r = wasi::poll_oneoff(subs.as_ptr() as i32, events.as_mut_ptr() as i32, 2, &mut n as *mut u32 as i32);
            writeln!(out, "poll {r} events {n} first {} type {}", events[0], events[10]).ok();
        }
        "stdin" => {
            use std::io::Read;
            let mut buf = Vec::new();
            let r = std::io::stdin().read_to_end(&mut buf);
            writeln!(out, "stdin {:?} bytes", r.map_err(|e| e.to_string())).ok();
        }
        "write-flood" => {
            // Writes one buffer `times` times and never submits: each write is staged in host
            // memory until the next submission.
            let times: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
            let size = arg.max(1) * MB;
            let b = Buffer::storage(size)?;
            let data = vec![0x5Au8; size as usize];
            for _ in 0..times {
                b.write_bytes(0, &data)?;
            }
            writeln!(out, "wrote {} MiB", times * arg.max(1)).ok();
        }
        "wgsl" => {
            // `wgsl <n> <shape>`: one line, what the host answered.
            let shape = words.next().unwrap_or("");
            let n = arg as usize;
            let src =
                deep_wgsl(shape, n).ok_or_else(|| wasmgrid::Error::bad_input(format!("unknown shape {shape}")))?;
            match Pipeline::new(&src, "main") {
                Ok(_) => writeln!(out, "{shape} {n} ok"),
                Err(e) => writeln!(out, "{shape} {n} {:?}: {}", e.code(), e.to_string().replace('\n', " | ")),
            }
            .ok();
        }
        "compile-loop" => {
            // `arg` different shaders, one after another: compiling is work the host does for
            // the guest, so it uses up the job's CPU time.
            for i in 0..arg {
                let src = format!(
                    "@group(0) @binding(0) var<storage, read_write> d: array<u32>;
                     @compute @workgroup_size(1) fn main() {{ d[0] = d[1] * {i}u + {i}u; }}"
                );
                Pipeline::new(&src, "main")?;
            }
            writeln!(out, "compiled {arg}").ok();
        }
        "gpu-after-sleep" => {
            // Holds a buffer, sleeps `arg` ms (the device may be lost meanwhile), then uses it.
            let b = Buffer::storage(64)?;
            std::thread::sleep(std::time::Duration::from_millis(arg));
            b.write_bytes(0, &[1u8; 64])?;
            writeln!(out, "read {:?}", b.read_bytes(0, 4)?).ok();
        }
        other => return Err(wasmgrid::Error::bad_input(format!("unknown case {other:?}"))),
    }
    wasmgrid::output(out.as_bytes())
}
