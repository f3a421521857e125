//! Trains a logistic-regression classifier across the members of a cluster job, on a
//! synthetic, seeded data set split evenly between them, in one of two ways:
//!
//! - `mode=sync` (data parallel): every step each member computes the gradient of its share
//!   of the batch on its GPU, the members all-reduce (sum) the gradients, and each applies the
//!   same update. The run matches a single GPU's on the whole batch, up to the order floats
//!   are added in.
//! - `mode=diloco` (DiLoCo-style): each member takes `h` local gradient steps on its own share,
//!   then the members average their parameter change since the last outer step (all-reduce
//!   mean, compressed as `compress=` says) and take one outer Nesterov step with it. The
//!   members talk once every `h` steps instead of every step. With `overlap=1` the outer
//!   all-reduce runs while the next `h` inner steps do (`collective::all_reduce_start`): each
//!   outer step applies the members' change of the round before, and each member goes on from
//!   the new global parameters plus its own latest round's change, so the network is waited on
//!   only when a round's compute is shorter than its all-reduce. (No checkpoints, and the loss
//!   is reported at the end only.)
//!
//! Input (optional text): `mode=sync steps=200 lr=0.5 samples=1024 features=8 seed=7 h=20
//! outer_lr=0.7 momentum=0.9 compress=none|f16|int8 checkpoint=0 overlap=0`, any subset.
//! `checkpoint=K` has rank 0 save a checkpoint every K steps (sync) or every K outer steps
//! (DiLoCo): the parameters, the outer optimiser's state, the step (the data position: every
//! step sees the whole batch) and the report so far. A try that resumes from one goes on from
//! that step, and ends with the output an uninterrupted run would have.
//! Output (text, the same on every member): `step S loss L` every `report` steps (10 by
//! default; the loss over the whole batch), then `final loss L accuracy A`, `members N`,
//! `syncs K values V` (all-reduces of parameters or gradients and the f32s each carried), and
//! `weights w0 w1 ... bias`.
//!
//! Build: `cargo build --release --target wasm32-wasip1 -p cluster-train`; run on two GPUs:
//! `wasmgrid submit target/wasm32-wasip1/release/cluster-train.wasm --gpus 2`.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

use wasmgrid::collective::{self, Compression, Op};
use wasmgrid::{Buffer, Error, Pipeline, Result, Submission};

const WGSL: &str = r#"
struct Config { samples: u32, features: u32, lr: f32, total: f32 }

@group(0) @binding(0) var<uniform> cfg: Config;
@group(0) @binding(1) var<storage, read> x: array<f32>;             // this member's samples x features
@group(0) @binding(2) var<storage, read> y: array<f32>;             // its labels, 0 or 1
@group(0) @binding(3) var<storage, read_write> params: array<f32>;  // features weights, then bias
@group(0) @binding(4) var<storage, read_write> err: array<f32>;     // p - y per sample
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;    // per-sample loss
@group(0) @binding(6) var<storage, read_write> grad: array<f32>;    // summed over this member's samples

@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= cfg.samples) { return; }
    var z = params[cfg.features];
    for (var j = 0u; j < cfg.features; j = j + 1u) {
        z = z + x[i * cfg.features + j] * params[j];
    }
    let p = 1.0 / (1.0 + exp(-z));
    err[i] = p - y[i];
    let q = clamp(p, 1e-7, 1.0 - 1e-7);
    loss[i] = -(y[i] * log(q) + (1.0 - y[i]) * log(1.0 - q));
}

@compute @workgroup_size(64)
fn gradient(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j > cfg.features) { return; }
    var g = 0.0;
    for (var i = 0u; i < cfg.samples; i = i + 1u) {
        var xij = 1.0;
        if (j < cfg.features) { xij = x[i * cfg.features + j]; }
        g = g + err[i] * xij;
    }
    grad[j] = g;
}

@compute @workgroup_size(64)
fn apply(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j > cfg.features) { return; }
    params[j] = params[j] - cfg.lr * grad[j] / cfg.total;
}
"#;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Sync,
    Diloco,
}

struct Config {
    mode: Mode,
    steps: u32,
    lr: f32,
    samples: u32,
    features: u32,
    seed: u32,
    h: u32,
    outer_lr: f32,
    momentum: f32,
    compress: Compression,
    report: u32,
    checkpoint: u32,
    overlap: bool,
}

fn parse(input: &[u8]) -> Result<Config> {
    let mut c = Config {
        mode: Mode::Sync,
        steps: 200,
        lr: 0.5,
        samples: 1024,
        features: 8,
        seed: 7,
        h: 20,
        outer_lr: 0.7,
        momentum: 0.9,
        compress: Compression::None,
        report: 10,
        checkpoint: 0,
        overlap: false,
    };
    let text = std::str::from_utf8(input).map_err(|_| Error::bad_input("the input is not UTF-8 text"))?;
    for item in text.split_whitespace() {
        let (key, value) =
            item.split_once('=').ok_or_else(|| Error::bad_input(format!("{item:?} is not key=value")))?;
        let bad = || Error::bad_input(format!("{item:?}: bad value"));
        match key {
            "mode" => {
                c.mode = match value {
                    "sync" => Mode::Sync,
                    "diloco" => Mode::Diloco,
                    _ => return Err(bad()),
                }
            }
            "steps" => c.steps = value.parse().map_err(|_| bad())?,
            "lr" => c.lr = value.parse().map_err(|_| bad())?,
            "samples" => c.samples = value.parse().map_err(|_| bad())?,
            "features" => c.features = value.parse().map_err(|_| bad())?,
            "seed" => c.seed = value.parse().map_err(|_| bad())?,
            "h" => c.h = value.parse().map_err(|_| bad())?,
            "outer_lr" => c.outer_lr = value.parse().map_err(|_| bad())?,
            "momentum" => c.momentum = value.parse().map_err(|_| bad())?,
            "report" => c.report = value.parse().map_err(|_| bad())?,
            "checkpoint" => c.checkpoint = value.parse().map_err(|_| bad())?,
            "overlap" => {
                c.overlap = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad()),
                }
            }
            "compress" => {
                c.compress = match value {
                    "none" => Compression::None,
                    "f16" => Compression::F16,
                    "int8" => Compression::Int8,
                    _ => return Err(bad()),
                }
            }
            other => return Err(Error::bad_input(format!("unknown setting {other:?}"))),
        }
    }
    let world = collective::world_size();
    if !(1..=60_000).contains(&c.samples) || !(1..=256).contains(&c.features) || c.steps > 100_000 {
        return Err(Error::bad_input("samples must be 1..=60000, features 1..=256, steps at most 100000"));
    }
    if c.overlap && (c.mode != Mode::Diloco || c.checkpoint > 0) {
        return Err(Error::bad_input("overlap=1 is for mode=diloco, without checkpoints"));
    }
    if c.samples < world || c.h == 0 || c.report == 0 {
        return Err(Error::bad_input("samples must be at least the members, h and report at least 1"));
    }
    Ok(c)
}

/// xorshift32, uniform in [-1, 1).
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
}

/// The whole data set (every member makes the same): points uniform in [-1, 1)^features,
/// labelled by a seeded true hyperplane.
fn dataset(c: &Config) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng(c.seed.max(1));
    let truth: Vec<f32> = (0..=c.features).map(|_| rng.next() * 2.0).collect();
    let mut x = Vec::with_capacity((c.samples * c.features) as usize);
    let mut y = Vec::with_capacity(c.samples as usize);
    for _ in 0..c.samples {
        let row: Vec<f32> = (0..c.features).map(|_| rng.next()).collect();
        let z: f32 = row.iter().zip(&truth).map(|(a, b)| a * b).sum::<f32>() + truth[c.features as usize];
        y.push(if z > 0.0 { 1.0 } else { 0.0 });
        x.extend(row);
    }
    (x, y)
}

/// What a checkpoint holds: where the run is and everything it needs to go on from there.
struct Saved {
    step: u32,
    syncs: u32,
    values: u64,
    /// The parameters (sync), or the outer parameters (DiLoCo).
    params: Vec<f32>,
    velocity: Vec<f32>,
    report: String,
}

impl Saved {
    const MAGIC: &'static [u8; 4] = b"ctk1";

    fn encode(&self) -> Vec<u8> {
        let mut out = Self::MAGIC.to_vec();
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.syncs.to_le_bytes());
        out.extend_from_slice(&self.values.to_le_bytes());
        out.extend_from_slice(&(self.params.len() as u32).to_le_bytes());
        out.extend_from_slice(&wasmgrid::to_bytes(&self.params));
        out.extend_from_slice(&wasmgrid::to_bytes(&self.velocity));
        out.extend_from_slice(self.report.as_bytes());
        out
    }

    /// A checkpoint of a run with `n` parameters; anything else is refused.
    fn decode(bytes: &[u8], n: usize) -> Result<Saved> {
        let bad = || Error::bad_input("the checkpoint is not one this job saved with these settings");
        if bytes.len() < 24 + 8 * n || &bytes[..4] != Self::MAGIC {
            return Err(bad());
        }
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        if u32_at(20) as usize != n {
            return Err(bad());
        }
        let floats = |at: usize| wasmgrid::from_bytes::<f32>(&bytes[at..at + 4 * n]);
        let mut values = [0u8; 8];
        values.copy_from_slice(&bytes[12..20]);
        Ok(Saved {
            step: u32_at(4),
            syncs: u32_at(8),
            values: u64::from_le_bytes(values),
            params: floats(24),
            velocity: floats(24 + 4 * n),
            report: String::from_utf8(bytes[24 + 8 * n..].to_vec()).map_err(|_| bad())?,
        })
    }

    /// Saves it, from rank 0 only: every member holds the same state here.
    fn save(&self) -> Result<()> {
        if collective::rank() != 0 {
            return Ok(());
        }
        wasmgrid::checkpoint::save(u64::from(self.step), &self.encode())
    }
}

struct Trainer {
    cfg: Buffer,
    params: Buffer,
    err: Buffer,
    loss: Buffer,
    grad: Buffer,
    xb: Buffer,
    yb: Buffer,
    forward: Pipeline,
    gradient: Pipeline,
    apply: Pipeline,
    local: u32,
    features: u32,
    total: u32,
    /// All-reduces made and the f32s they carried.
    syncs: u32,
    values: u64,
}

impl Trainer {
    fn bind(&self) -> [(u32, &Buffer); 7] {
        [
            (0, &self.cfg),
            (1, &self.xb),
            (2, &self.yb),
            (3, &self.params),
            (4, &self.err),
            (5, &self.loss),
            (6, &self.grad),
        ]
    }

    /// The learning rate and the count the summed gradient is divided by.
    fn configure(&self, lr: f32, divide_by: u32) -> Result<()> {
        self.cfg.write(0, &[self.local, self.features, lr.to_bits(), (divide_by as f32).to_bits()])
    }

    /// One step on this member's share: forward, gradient; with `sync`, the gradient summed
    /// over every member first.
    fn step(&mut self, sync: bool) -> Result<()> {
        let params = self.features + 1;
        let mut s = Submission::new();
        s.dispatch(&self.forward, &self.bind(), [self.local.div_ceil(64), 1, 1]);
        s.dispatch(&self.gradient, &self.bind(), [params.div_ceil(64), 1, 1]);
        if !sync {
            s.dispatch(&self.apply, &self.bind(), [params.div_ceil(64), 1, 1]);
            return s.run();
        }
        s.run()?;
        collective::all_reduce(&self.grad, Op::Sum, Compression::None)?;
        self.syncs += 1;
        self.values += u64::from(params);
        self.apply.dispatch(&self.bind(), [params.div_ceil(64), 1, 1])
    }

    /// The mean loss over the whole batch (every member's share) at the current parameters,
    /// and this member's correct predictions.
    fn score(&mut self) -> Result<(f32, f32)> {
        self.forward.dispatch(&self.bind(), [self.local.div_ceil(64), 1, 1])?;
        let loss: f32 = self.loss.read_f32()?.iter().sum();
        let correct = self.err.read_f32()?.iter().filter(|e| e.abs() < 0.5).count() as f32;
        let sums = Buffer::storage_from(&[loss, correct])?;
        collective::all_reduce(&sums, Op::Sum, Compression::None)?;
        let s = sums.read_f32()?;
        Ok((s[0] / self.total as f32, s[1] / self.total as f32))
    }
}

fn main() -> Result<()> {
    let c = parse(&wasmgrid::input()?)?;
    let (rank, world) = (collective::rank(), collective::world_size());
    let (x, y) = dataset(&c);
    // This member's share: rows [rank n / world, (rank + 1) n / world).
    let lo = (u64::from(rank) * u64::from(c.samples) / u64::from(world)) as usize;
    let hi = (u64::from(rank + 1) * u64::from(c.samples) / u64::from(world)) as usize;
    let f = c.features as usize;
    let local = (hi - lo) as u32;
    let params = c.features + 1;
    let mut t = Trainer {
        cfg: Buffer::uniform(16)?,
        params: Buffer::storage(u64::from(params) * 4)?,
        err: Buffer::storage(u64::from(local) * 4)?,
        loss: Buffer::storage(u64::from(local) * 4)?,
        grad: Buffer::storage(u64::from(params) * 4)?,
        xb: Buffer::storage_from(&x[lo * f..hi * f])?,
        yb: Buffer::storage_from(&y[lo..hi])?,
        forward: Pipeline::new(WGSL, "forward")?,
        gradient: Pipeline::new(WGSL, "gradient")?,
        apply: Pipeline::new(WGSL, "apply")?,
        local,
        features: c.features,
        total: c.samples,
        syncs: 0,
        values: 0,
    };
    // A try that resumes picks up where the last checkpoint left off.
    let resumed = match wasmgrid::checkpoint::load()? {
        Some((_, bytes)) => Some(Saved::decode(&bytes, params as usize)?),
        None => None,
    };
    let mut report = String::new();
    let mut first = 0;
    let mut global = vec![0f32; params as usize];
    let mut velocity = vec![0f32; params as usize];
    if let Some(r) = resumed {
        wasmgrid::log(wasmgrid::Level::Info, &format!("resuming from the checkpoint at step {}", r.step));
        first = r.step.min(c.steps);
        t.syncs = r.syncs;
        t.values = r.values;
        t.params.write(0, &r.params)?;
        global = r.params;
        velocity = r.velocity;
        report = r.report;
    }
    // The score at the last step, when a report line took it: the final one is the same, and
    // needs no collective of its own.
    let mut last_score: Option<(f32, f32)> = None;
    let mut line = |step: u32, t: &mut Trainer, report: &mut String| -> Result<()> {
        let (loss, correct) = t.score()?;
        if step == c.steps {
            last_score = Some((loss, correct));
        }
        let l = format!("step {step} loss {loss:.6}");
        wasmgrid::log(wasmgrid::Level::Info, &l);
        report.push_str(&l);
        report.push('\n');
        Ok(())
    };
    match c.mode {
        Mode::Sync => {
            // Every member's gradient summed, divided by the whole batch: a single GPU's step.
            t.configure(c.lr, c.samples)?;
            for step in first..c.steps {
                t.step(true)?;
                if (step + 1) % c.report == 0 {
                    line(step + 1, &mut t, &mut report)?;
                }
                if c.checkpoint > 0 && (step + 1) % c.checkpoint == 0 && step + 1 < c.steps {
                    let (syncs, values) = (t.syncs, t.values);
                    let params = t.params.read_f32()?;
                    let saved = Saved { step: step + 1, syncs, values, params, velocity: velocity.clone(), report };
                    saved.save()?;
                    report = saved.report;
                }
            }
        }
        Mode::Diloco if c.overlap => {
            t.configure(c.lr, local)?;
            let delta = Buffer::storage(u64::from(params) * 4)?;
            let mut step = 0;
            // Where this member's round started, and the all-reduce of the round before.
            let mut start = global.clone();
            let mut pending: Option<collective::Pending<'_>> = None;
            let outer_step = |global: &mut Vec<f32>, velocity: &mut Vec<f32>, mean: &[f32]| {
                for ((g, v), d) in global.iter_mut().zip(velocity.iter_mut()).zip(mean) {
                    *v = c.momentum * *v + d;
                    *g -= c.outer_lr * (d + c.momentum * *v);
                }
            };
            while step < c.steps {
                let inner = c.h.min(c.steps - step);
                for _ in 0..inner {
                    t.step(false)?;
                }
                step += inner;
                let now = t.params.read_f32()?;
                let change: Vec<f32> = start.iter().zip(&now).map(|(s, p)| s - p).collect();
                // The round before's mean change, combined while this round ran.
                if let Some(p) = pending.take() {
                    p.wait()?;
                    outer_step(&mut global, &mut velocity, &delta.read_f32()?);
                }
                // On from the new global parameters plus this round's own change.
                start = global.iter().zip(&change).map(|(g, d)| g - d).collect();
                t.params.write(0, &start)?;
                delta.write(0, &change)?;
                pending = Some(collective::all_reduce_start(&delta, Op::Mean, c.compress)?);
                t.syncs += 1;
                t.values += u64::from(params);
            }
            if let Some(p) = pending.take() {
                p.wait()?;
                outer_step(&mut global, &mut velocity, &delta.read_f32()?);
            }
            t.params.write(0, &global)?;
            line(step, &mut t, &mut report)?;
        }
        Mode::Diloco => {
            // Inner steps on this member's share alone (its mean gradient); outer steps on the
            // members' averaged change, with Nesterov momentum, every `h`.
            t.configure(c.lr, local)?;
            let delta = Buffer::storage(u64::from(params) * 4)?;
            let mut step = first;
            let mut outer = first / c.h;
            while step < c.steps {
                let inner = c.h.min(c.steps - step);
                for _ in 0..inner {
                    t.step(false)?;
                }
                step += inner;
                outer += 1;
                let now = t.params.read_f32()?;
                let change: Vec<f32> = global.iter().zip(&now).map(|(g, p)| g - p).collect();
                delta.write(0, &change)?;
                collective::all_reduce(&delta, Op::Mean, c.compress)?;
                t.syncs += 1;
                t.values += u64::from(params);
                let mean = delta.read_f32()?;
                for ((g, v), d) in global.iter_mut().zip(velocity.iter_mut()).zip(&mean) {
                    *v = c.momentum * *v + d;
                    *g -= c.outer_lr * (d + c.momentum * *v);
                }
                t.params.write(0, &global)?;
                if step % c.report < inner || step == c.steps {
                    line(step, &mut t, &mut report)?;
                }
                if c.checkpoint > 0 && outer % c.checkpoint == 0 && step < c.steps {
                    let (syncs, values) = (t.syncs, t.values);
                    let saved =
                        Saved { step, syncs, values, params: global.clone(), velocity: velocity.clone(), report };
                    saved.save()?;
                    report = saved.report;
                }
            }
        }
    }
    let (final_loss, accuracy) = match last_score {
        Some(s) => s,
        None => t.score()?,
    };
    let w = t.params.read_f32()?;
    report.push_str(&format!("final loss {final_loss:.6} accuracy {accuracy:.4}\n"));
    report.push_str(&format!("members {world}\n"));
    report.push_str(&format!("syncs {} values {}\n", t.syncs, t.values));
    let words: Vec<String> = w.iter().map(|v| v.to_string()).collect();
    report.push_str(&format!("weights {}\n", words.join(" ")));
    wasmgrid::output(report.as_bytes())
}
