//! Reads its input as a program of host calls and makes them, arguments and all, so a fuzzer
//! can drive every host function of the ABI with arbitrary values from inside a real sandbox.
//!
//! Each step is an opcode byte followed by its arguments, little-endian. A pointer argument is a
//! mode byte and an `i32`: with an even mode, the value is an offset into a scratch arena in
//! this guest's memory (so most calls reach the host's deeper checks); with an odd mode, the raw
//! value is passed (so out-of-range pointers are tried too). The program ends at the end of the
//! input. The output is one line per call with its result.
#![allow(clippy::indexing_slicing)]
// a kernel's own panics end only its own job
// It calls the raw ABI with arbitrary values on purpose. The host may write into the scratch
// arena (which nothing reads as typed data) or must refuse the address: a stray write can only
// corrupt this throwaway guest, and finding one is the point.
#![allow(unsafe_code)]

use std::fmt::Write as _;

use wasmgrid::raw;

/// Valid shaders the program can pick by index, so that dispatches get past compilation.
const SHADERS: [&str; 3] = [
    "@group(0) @binding(0) var<storage, read_write> d: array<u32>;
     @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
         if (g.x < arrayLength(&d)) { d[g.x] = d[g.x] * 3u + 1u; } }",
    "struct P { n: u32, m: u32 }
     @group(0) @binding(0) var<uniform> p: P;
     @group(0) @binding(1) var<storage, read> a: array<f32>;
     @group(0) @binding(2) var<storage, read_write> b: array<f32>;
     @compute @workgroup_size(8, 8) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
         let i = g.y * p.m + g.x;
         if (i < p.n && i < arrayLength(&a) && i < arrayLength(&b)) { b[i] = a[i] + 1.0; } }",
    "@compute @workgroup_size(1) fn main() {}",
];

const ARENA: usize = 1 << 16;

struct Program<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Program<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn i32(&mut self) -> Option<i32> {
        let b = self.bytes.get(self.at..self.at + 4)?;
        self.at += 4;
        Some(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self) -> Option<i64> {
        let b = self.bytes.get(self.at..self.at + 8)?;
        self.at += 8;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Some(i64::from_le_bytes(w))
    }

    /// A pointer: into the arena (even mode) or raw (odd mode).
    fn ptr(&mut self, arena: &[u8]) -> Option<i32> {
        let mode = self.u8()?;
        let v = self.i32()?;
        Some(if mode % 2 == 0 { arena.as_ptr() as i32 + (v.unsigned_abs() as usize % ARENA) as i32 } else { v })
    }

    /// A length: small and mostly sensible (even mode), or raw (odd mode).
    fn len(&mut self) -> Option<i32> {
        let mode = self.u8()?;
        let v = self.i32()?;
        Some(if mode % 2 == 0 { (v.unsigned_abs() % 4096) as i32 } else { v })
    }

    /// A handle: one of the first few this job could hold (even mode), or raw (odd mode).
    fn handle(&mut self) -> Option<i32> {
        let mode = self.u8()?;
        let v = self.i32()?;
        Some(if mode % 2 == 0 { (v.unsigned_abs() % 16) as i32 } else { v })
    }
}

fn step(p: &mut Program<'_>, arena: &mut [u8]) -> Option<(u8, i64)> {
    let op = p.u8()? % 21;
    let r = match op {
        0 => raw::input_len(),
        // SAFETY: see the crate comment.
        1 => i64::from(unsafe { raw::input_read(p.ptr(arena)?, p.len()?, p.i64()?) }),
        2 => i64::from(raw::output_write(p.ptr(arena)?, p.len()?)),
        3 => i64::from(raw::log(p.i32()?, p.ptr(arena)?, p.len()?)),
        // SAFETY: see the crate comment.
        4 => i64::from(unsafe { raw::last_error(p.ptr(arena)?, p.len()?) }),
        5 => i64::from(raw::set_failure(p.ptr(arena)?, p.len()?)),
        6 => {
            let mode = p.u8()?;
            let size = p.i64()?;
            let size = if mode % 2 == 0 { (size.unsigned_abs() % (1 << 20)) as i64 & !3 } else { size };
            i64::from(raw::buffer_create(size, p.i32()? % 4))
        }
        7 => i64::from(raw::buffer_write(p.handle()?, p.i64()? % 8192, p.ptr(arena)?, p.len()?)),
        // SAFETY: see the crate comment.
        8 => i64::from(unsafe { raw::buffer_read(p.handle()?, p.i64()? % 8192, p.ptr(arena)?, p.len()?) }),
        9 => i64::from(raw::buffer_destroy(p.handle()?)),
        10 => {
            // A known shader copied into the arena, with a fuzzed entry name half the time.
            let which = p.u8()? as usize % SHADERS.len();
            let src = SHADERS[which].as_bytes();
            arena[..src.len()].copy_from_slice(src);
            let entry_at = src.len();
            let entry: &[u8] = if p.u8()? % 2 == 0 { b"main" } else { b"mian" };
            arena[entry_at..entry_at + entry.len()].copy_from_slice(entry);
            let base = arena.as_ptr() as i32;
            i64::from(raw::pipeline_create(base, src.len() as i32, base + entry_at as i32, entry.len() as i32))
        }
        11 => i64::from(raw::pipeline_create(p.ptr(arena)?, p.len()?, p.ptr(arena)?, p.len()?)),
        12 => i64::from(raw::pipeline_destroy(p.handle()?)),
        13 => {
            // One dispatch built in the arena from fuzzed handles and sizes.
            let base = arena.as_ptr() as u32;
            let pipeline = p.handle()? as u32;
            let count = u32::from(p.u8()? % 5);
            let bindings_at = 64usize;
            for i in 0..count as usize {
                let binding = u32::from(p.u8()? % 4);
                let buffer = p.handle()? as u32;
                let at = bindings_at + i * 8;
                arena[at..at + 4].copy_from_slice(&binding.to_le_bytes());
                arena[at + 4..at + 8].copy_from_slice(&buffer.to_le_bytes());
            }
            let groups = [p.i32()? as u32 % 70_000, 1 + p.u8()? as u32 % 4, 1];
            let desc = [pipeline, base + bindings_at as u32, count, groups[0], groups[1], groups[2]];
            for (i, w) in desc.iter().enumerate() {
                arena[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            i64::from(raw::submit(base as i32, 1))
        }
        14 => i64::from(raw::submit(p.ptr(arena)?, p.i32()? % 8)),
        15 => {
            i64::from(raw::all_reduce_start(p.handle()?, p.i64()? % 8192, p.i64()? % 8192, p.i32()? % 3, p.i32()? % 4))
        }
        16 => i64::from(raw::checkpoint_save(p.ptr(arena)?, p.len()?, p.i64()?)),
        17 => raw::checkpoint_step(),
        18 => raw::checkpoint_len(),
        // SAFETY: see the crate comment.
        19 => i64::from(unsafe { raw::checkpoint_read(p.ptr(arena)?, p.len()?, p.i64()?) }),
        20 => i64::from(raw::collective_wait()),
        _ => {
            // Scribble fuzzed bytes into the arena, to be read back as strings or descriptors.
            let at = p.u8()? as usize * 64;
            let n = p.u8()? as usize % 64;
            for i in 0..n {
                arena[(at + i) % ARENA] = p.u8()?;
            }
            0
        }
    };
    Some((op, r))
}

fn main() -> Result<(), wasmgrid::Error> {
    let input = wasmgrid::input()?;
    let mut arena = vec![0u8; ARENA];
    let mut program = Program { bytes: &input, at: 0 };
    let mut log = String::new();
    while let Some((op, result)) = step(&mut program, &mut arena) {
        writeln!(log, "{op} {result}").ok();
    }
    wasmgrid::output(log.as_bytes())
}
