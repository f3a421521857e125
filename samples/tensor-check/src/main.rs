//! Checks every kernel of `wasmgrid::tensor` against a plain `f64` CPU computation, on seeded
//! data and shapes that cross the kernels' tile edges, each with its own stated tolerance.
//!
//! Output: one line per case, `kernel case max_error tolerance ok|FAIL`; then the shape
//! errors the kernels must give, `refused kernel: message`; the job fails if any case does.
//! Input: empty for the checks; `bench KERNEL TOKENS REPEATS` for one kernel at MiniLM's shapes
//! (see [`bench`]).
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

use std::fmt::Write as _;

use wasmgrid::tensor::{Attention, Kernels, Matmul, Tensor};
use wasmgrid::{Error, Result};

/// xorshift32, uniform in [-1, 1).
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

struct Report {
    text: String,
    failed: usize,
    cases: usize,
}

impl Report {
    /// Passes when every element is within `tol_abs + tol_rel * |want|`; reports the largest
    /// absolute error.
    fn check(&mut self, kernel: &str, case: &str, got: &[f32], want: &[f64], tol_abs: f64, tol_rel: f64) {
        self.cases += 1;
        let mut worst = 0.0f64;
        let mut ok = got.len() == want.len();
        for (g, w) in got.iter().zip(want) {
            let err = (f64::from(*g) - w).abs();
            worst = worst.max(err);
            if err.is_nan() || err > tol_abs + tol_rel * w.abs() {
                ok = false;
            }
        }
        if !ok {
            self.failed += 1;
        }
        let _ = writeln!(
            self.text,
            "{kernel} {case} {worst:.3e} {tol_abs:.1e}+{tol_rel:.1e}rel {}",
            if ok { "ok" } else { "FAIL" }
        );
    }

    fn refused(&mut self, kernel: &str, result: Result<()>, needle: &str) {
        self.cases += 1;
        match result {
            Err(e) if e.to_string().contains(needle) => {
                let _ = writeln!(self.text, "refused {kernel}: {e}");
            }
            other => {
                self.failed += 1;
                let _ = writeln!(self.text, "{kernel} should be refused ({needle}), got {other:?} FAIL");
            }
        }
    }
}

fn erf64(x: f64) -> f64 {
    // Taylor series near 0, a continued fraction for erfc further out: both well below f32's
    // precision.
    if x.abs() < 2.5 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        return sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    let z = x.abs();
    let mut f = 0.0;
    for k in (1..120).rev() {
        f = (k as f64 / 2.0) / (z + f);
    }
    let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
    if x > 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
}

#[allow(clippy::too_many_arguments)]
fn matmul_ref(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    shared_b: bool,
    m: usize,
    k: usize,
    n: usize,
    spec: Matmul,
) -> Vec<f64> {
    let mut out = vec![0.0; batch * m * n];
    for z in 0..batch {
        let a = &a[z * m * k..];
        let b = if shared_b { b } else { &b[z * k * n..] };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if spec.trans_a { a[p * m + i] } else { a[i * k + p] };
                    let bv = if spec.trans_b { b[j * k + p] } else { b[p * n + j] };
                    s += f64::from(av) * f64::from(bv);
                }
                let mut v = s * f64::from(spec.alpha) + bias.map_or(0.0, |b| f64::from(b[j]));
                if spec.gelu {
                    v = gelu64(v);
                }
                out[z * m * n + i * n + j] = v;
            }
        }
    }
    out
}

fn matmuls(kernels: &mut Kernels, rng: &mut Rng, r: &mut Report) -> Result<()> {
    let shapes = [(1, 1, 1), (37, 53, 29), (64, 384, 96), (130, 70, 65), (5, 16, 200)];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        for variant in 0..4u32 {
            let spec = Matmul {
                trans_a: variant & 1 != 0,
                trans_b: variant & 2 != 0,
                alpha: if i % 2 == 0 { 1.0 } else { 0.5 },
                gelu: (i + variant as usize).is_multiple_of(3),
            };
            let with_bias = (i + variant as usize).is_multiple_of(2);
            let (a, b, bias) = (rng.vec(m * k), rng.vec(k * n), rng.vec(n));
            let ashape = if spec.trans_a { [k, m] } else { [m, k] };
            let bshape = if spec.trans_b { [n, k] } else { [k, n] };
            let (ta, tb, tbias) =
                (Tensor::from_f32(&ashape, &a)?, Tensor::from_f32(&bshape, &b)?, Tensor::from_f32(&[n], &bias)?);
            let out = Tensor::zeros(&[m, n])?;
            let mut batch = kernels.batch();
            batch.matmul(&ta, &tb, with_bias.then_some(&tbias), &out, spec)?;
            batch.run()?;
            let want = matmul_ref(&a, &b, with_bias.then_some(&bias), 1, true, m, k, n, spec);
            let case = format!(
                "{m}x{k}x{n} ta{} tb{} alpha{} bias{} gelu{}",
                spec.trans_a as u8, spec.trans_b as u8, spec.alpha, with_bias as u8, spec.gelu as u8
            );
            // Sums of k products of values in [-1, 1), in f32: 1e-6 per term.
            r.check("matmul", &case, &out.read_f32()?, &want, 1e-6 * k as f64 + 1e-6, 1e-6);
        }
    }
    // Batched: B per batch, and one B shared by every batch.
    for shared in [false, true] {
        let (batch_n, m, k, n) = (3, 17, 40, 23);
        let a = rng.vec(batch_n * m * k);
        let b = rng.vec(if shared { k * n } else { batch_n * k * n });
        let ta = Tensor::from_f32(&[batch_n, m, k], &a)?;
        let tb = if shared { Tensor::from_f32(&[k, n], &b)? } else { Tensor::from_f32(&[batch_n, k, n], &b)? };
        let out = Tensor::zeros(&[batch_n, m, n])?;
        let mut batch = kernels.batch();
        batch.matmul(&ta, &tb, None, &out, Matmul::default())?;
        batch.run()?;
        let want = matmul_ref(&a, &b, None, batch_n, shared, m, k, n, Matmul::default());
        r.check(
            "matmul",
            &format!("batched {batch_n}x{m}x{k}x{n} shared_b{}", shared as u8),
            &out.read_f32()?,
            &want,
            1e-6 * k as f64,
            1e-6,
        );
    }
    Ok(())
}

fn layer_norms(kernels: &mut Kernels, rng: &mut Rng, r: &mut Report) -> Result<()> {
    for (rows, cols, residual) in [(5, 384, false), (3, 384, true), (70, 7, true), (1, 1000, false)] {
        let x = rng.vec(rows * cols);
        let res = rng.vec(rows * cols);
        let gamma = rng.vec(cols);
        let beta = rng.vec(cols);
        let (tx, tres, tg, tb) = (
            Tensor::from_f32(&[rows, cols], &x)?,
            Tensor::from_f32(&[rows, cols], &res)?,
            Tensor::from_f32(&[cols], &gamma)?,
            Tensor::from_f32(&[cols], &beta)?,
        );
        let out = Tensor::zeros(&[rows, cols])?;
        let mut batch = kernels.batch();
        batch.layer_norm(&tx, residual.then_some(&tres), &tg, &tb, 1e-12, &out)?;
        batch.run()?;
        let mut want = vec![0.0; rows * cols];
        for i in 0..rows {
            let row: Vec<f64> = (0..cols)
                .map(|j| f64::from(x[i * cols + j]) + if residual { f64::from(res[i * cols + j]) } else { 0.0 })
                .collect();
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
            for j in 0..cols {
                want[i * cols + j] = (row[j] - mean) / (var + 1e-12).sqrt() * f64::from(gamma[j]) + f64::from(beta[j]);
            }
        }
        r.check(
            "layer_norm",
            &format!("{rows}x{cols} residual{}", residual as u8),
            &out.read_f32()?,
            &want,
            2e-5,
            1e-5,
        );
    }
    Ok(())
}

fn elementwise(kernels: &mut Kernels, rng: &mut Rng, r: &mut Report) -> Result<()> {
    // GELU over [-10, 10] and at the points where approximations go wrong.
    let mut x: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 100.0).collect();
    x.extend([0.0, 1e-3, -1e-3, 1e-6, -1e-6, 0.5, -0.5, 3.0, -3.0, 5.5, -5.5, 30.0, -30.0]);
    let tx = Tensor::from_f32(&[x.len()], &x)?;
    let out = Tensor::zeros(&[x.len()])?;
    let mut batch = kernels.batch();
    batch.gelu(&tx, &out)?;
    batch.run()?;
    let want: Vec<f64> = x.iter().map(|&v| gelu64(f64::from(v))).collect();
    r.check("gelu", &format!("{} points in [-30, 30]", x.len()), &out.read_f32()?, &want, 1e-7, 1e-6);

    for (rows, cols, b_len) in [(4, 6, 6), (4, 6, 24), (300, 257, 257)] {
        let a = rng.vec(rows * cols);
        let b = rng.vec(b_len);
        let (ta, tb) = (Tensor::from_f32(&[rows, cols], &a)?, Tensor::from_f32(&[b_len], &b)?);
        let out = Tensor::zeros(&[rows, cols])?;
        let mut batch = kernels.batch();
        batch.add(&ta, &tb, &out)?;
        batch.run()?;
        let want: Vec<f64> = (0..rows * cols).map(|i| f64::from(a[i]) + f64::from(b[i % b_len])).collect();
        r.check("add", &format!("{rows}x{cols} + {b_len}"), &out.read_f32()?, &want, 1e-7, 1e-7);
    }

    // Many dispatches in one submission, each seeing the one before: x + 1, forty times.
    let one = Tensor::from_f32(&[1], &[1.0])?;
    let ping = Tensor::from_f32(&[1000], &vec![0.5; 1000])?;
    let pong = Tensor::zeros(&[1000])?;
    let mut batch = kernels.batch();
    for i in 0..40 {
        let (from, to) = if i % 2 == 0 { (&ping, &pong) } else { (&pong, &ping) };
        batch.add(from, &one, to)?;
    }
    let recorded = batch.len();
    batch.run()?;
    r.check("add", &format!("chain of {recorded} in one submission"), &ping.read_f32()?, &vec![40.5; 1000], 0.0, 0.0);
    Ok(())
}

fn softmaxes(kernels: &mut Kernels, rng: &mut Rng, r: &mut Report) -> Result<()> {
    for (rows, cols, group) in [(6, 10, 0), (6, 10, 3), (4, 300, 2), (2, 1, 0)] {
        let x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 20.0).collect();
        let mask_rows = rows.checked_div(group).unwrap_or(0);
        // Some zeros, and one mask row all zero (its rows come out all zero).
        let mask: Vec<f32> = (0..mask_rows * cols)
            .map(|i| {
                let last_row = i / cols == mask_rows - 1 && mask_rows > 1;
                if last_row || i % 3 == 1 { 0.0 } else { 1.0 }
            })
            .collect();
        let tx = Tensor::from_f32(&[rows, cols], &x)?;
        let tmask = if group > 0 { Some(Tensor::from_f32(&[mask_rows, cols], &mask)?) } else { None };
        let out = Tensor::zeros(&[rows, cols])?;
        let mut batch = kernels.batch();
        batch.softmax(&tx, tmask.as_ref().map(|m| (m, group)), &out)?;
        batch.run()?;
        let mut want = vec![0.0; rows * cols];
        for i in 0..rows {
            let kept = |j: usize| group == 0 || mask[(i / group) * cols + j] != 0.0;
            let m = (0..cols).filter(|&j| kept(j)).map(|j| f64::from(x[i * cols + j])).fold(f64::MIN, f64::max);
            let total: f64 = (0..cols).filter(|&j| kept(j)).map(|j| (f64::from(x[i * cols + j]) - m).exp()).sum();
            for j in 0..cols {
                if kept(j) {
                    want[i * cols + j] = (f64::from(x[i * cols + j]) - m).exp() / total;
                }
            }
        }
        r.check("softmax", &format!("{rows}x{cols} mask_group{group}"), &out.read_f32()?, &want, 1e-6, 1e-5);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attention_ref(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], spec: Attention, stride: usize) -> Vec<f64> {
    let Attention { batch, seq, heads, head_dim: d, scale, q_col, k_col, v_col } = spec;
    let mut out = vec![0.0; batch * seq * heads * d];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let row = |t: &[f32], col: usize, pos: usize, e: usize| {
                    f64::from(t[(b * seq + pos) * stride + col + h * d + e])
                };
                let scores: Vec<Option<f64>> = (0..seq)
                    .map(|j| {
                        (mask[b * seq + j] != 0.0).then(|| {
                            (0..d).map(|e| row(q, q_col, i, e) * row(k, k_col, j, e)).sum::<f64>() * f64::from(scale)
                        })
                    })
                    .collect();
                let m = scores.iter().flatten().fold(f64::MIN, |a, &b| a.max(b));
                let total: f64 = scores.iter().flatten().map(|s| (s - m).exp()).sum();
                for e in 0..d {
                    let mut acc = 0.0;
                    for (j, s) in scores.iter().enumerate() {
                        if let Some(s) = s {
                            acc += (s - m).exp() / total * row(v, v_col, j, e);
                        }
                    }
                    out[(b * seq + i) * heads * d + h * d + e] = if total > 0.0 { acc } else { 0.0 };
                }
            }
        }
    }
    out
}

fn attentions(kernels: &mut Kernels, rng: &mut Rng, r: &mut Report) -> Result<()> {
    // (batch, seq, heads, head_dim, lengths of the sequences, fused qkv)
    type Case = (usize, usize, usize, usize, &'static [usize], bool);
    let cases: [Case; 4] = [
        (2, 37, 3, 32, &[37, 20], true),
        (1, 70, 2, 8, &[70], false),
        (3, 5, 12, 32, &[5, 1, 3], true),
        (1, 129, 1, 64, &[100], false),
    ];
    for (batch, seq, heads, d, lengths, fused) in cases {
        let width = heads * d;
        let stride = if fused { 3 * width } else { width };
        let rows = batch * seq;
        let mask: Vec<f32> = (0..rows).map(|i| if i % seq < lengths[i / seq] { 1.0 } else { 0.0 }).collect();
        let tmask = Tensor::from_f32(&[batch, seq], &mask)?;
        let out = Tensor::zeros(&[batch, seq, width])?;
        let spec = Attention {
            batch,
            seq,
            heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            q_col: 0,
            k_col: if fused { width } else { 0 },
            v_col: if fused { 2 * width } else { 0 },
        };
        let (want, got) = if fused {
            let qkv = rng.vec(rows * stride);
            let t = Tensor::from_f32(&[rows, stride], &qkv)?;
            let mut b = kernels.batch();
            b.attention(&t, &t, &t, &tmask, &out, spec)?;
            b.run()?;
            (attention_ref(&qkv, &qkv, &qkv, &mask, spec, stride), out.read_f32()?)
        } else {
            let (q, k, v) = (rng.vec(rows * width), rng.vec(rows * width), rng.vec(rows * width));
            let (tq, tk, tv) = (
                Tensor::from_f32(&[rows, width], &q)?,
                Tensor::from_f32(&[rows, width], &k)?,
                Tensor::from_f32(&[rows, width], &v)?,
            );
            let mut b = kernels.batch();
            b.attention(&tq, &tk, &tv, &tmask, &out, spec)?;
            b.run()?;
            (attention_ref(&q, &k, &v, &mask, spec, stride), out.read_f32()?)
        };
        let case = format!("b{batch} l{seq} h{heads} d{d} lengths{lengths:?} fused{}", fused as u8);
        r.check("attention", &case, &got, &want, 1e-5, 1e-5);
    }
    Ok(())
}

fn pooling(kernels: &mut Kernels, rng: &mut Rng, r: &mut Report) -> Result<()> {
    // Embedding lookup, an id past the table included.
    let (vocab, cols) = (50, 12);
    let table = rng.vec(vocab * cols);
    let ids = [0u32, 49, 7, 7, 50, 4_000_000_000, 3];
    let (tt, ti) = (Tensor::from_f32(&[vocab, cols], &table)?, Tensor::from_u32(&[ids.len()], &ids)?);
    let out = Tensor::zeros(&[ids.len(), cols])?;
    let mut b = kernels.batch();
    b.embedding(&tt, &ti, &out)?;
    b.run()?;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| (0..cols).map(move |c| if (id as usize) < vocab { (id as usize, c) } else { (usize::MAX, c) }))
        .map(|(id, c)| if id == usize::MAX { 0.0 } else { f64::from(table[id * cols + c]) })
        .collect();
    r.check("embedding", &format!("{} ids of a {vocab}x{cols} table", ids.len()), &out.read_f32()?, &want, 0.0, 0.0);

    let (batch, seq, cols) = (3, 5, 7);
    let x = rng.vec(batch * seq * cols);
    let mask: Vec<f32> = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0].to_vec();
    let (tx, tm) = (Tensor::from_f32(&[batch, seq, cols], &x)?, Tensor::from_f32(&[batch, seq], &mask)?);
    let out = Tensor::zeros(&[batch, cols])?;
    let mut b = kernels.batch();
    b.mean_pool(&tx, &tm, &out)?;
    b.run()?;
    let mut want = vec![0.0; batch * cols];
    for bi in 0..batch {
        let w: f64 = (0..seq).map(|l| f64::from(mask[bi * seq + l])).sum();
        for c in 0..cols {
            let s: f64 =
                (0..seq).map(|l| f64::from(x[(bi * seq + l) * cols + c]) * f64::from(mask[bi * seq + l])).sum();
            want[bi * cols + c] = s / w.max(1e-9);
        }
    }
    r.check(
        "mean_pool",
        &format!("{batch}x{seq}x{cols}, one sequence all padding"),
        &out.read_f32()?,
        &want,
        1e-6,
        1e-6,
    );

    let (rows, cols) = (4, 384);
    let mut x = rng.vec(rows * cols);
    x[cols..2 * cols].fill(0.0);
    let tx = Tensor::from_f32(&[rows, cols], &x)?;
    let out = Tensor::zeros(&[rows, cols])?;
    let mut b = kernels.batch();
    b.l2_normalize(&tx, 1e-12, &out)?;
    b.run()?;
    let mut want = vec![0.0; rows * cols];
    for i in 0..rows {
        let norm = (0..cols).map(|j| f64::from(x[i * cols + j]).powi(2)).sum::<f64>().sqrt().max(1e-12);
        for j in 0..cols {
            want[i * cols + j] = f64::from(x[i * cols + j]) / norm;
        }
    }
    r.check("l2_normalize", &format!("{rows}x{cols}, one row zero"), &out.read_f32()?, &want, 1e-7, 1e-6);
    Ok(())
}

fn refusals(kernels: &mut Kernels, r: &mut Report) -> Result<()> {
    let a = Tensor::zeros(&[4, 5])?;
    let b = Tensor::zeros(&[6, 3])?;
    let out = Tensor::zeros(&[4, 3])?;
    let mut batch = kernels.batch();
    r.refused("matmul", batch.matmul(&a, &b, None, &out, Matmul::default()), "do not agree");
    r.refused("add", batch.add(&a, &a, &a), "shares a buffer");
    r.refused("view", a.view(&[21]).map(drop), "holds 20");
    r.refused("layer_norm", batch.layer_norm(&a, None, &b, &b, 1e-5, &out), "do not agree");
    let ids = Tensor::zeros(&[2])?;
    r.refused("embedding", batch.embedding(&a, &ids, &out), "u32");
    r.refused("zeros", Tensor::zeros(&[3, 0]).map(drop), "empty");
    // Nothing refused was recorded: the batch runs empty.
    let recorded = batch.len();
    batch.run()?;
    r.check("refusals", "nothing recorded", &[recorded as f32], &[0.0], 0.0, 0.0);
    Ok(())
}

/// `bench KERNEL TOKENS REPEATS`: one kernel at all-MiniLM-L6-v2's shapes for `TOKENS`
/// tokens (sequences of 128), on the same tensors `REPEATS` times in one submission, for the
/// host's benchmark to time (two repeat counts, the difference is the kernels' own time).
/// Prints the floating-point operations done.
fn bench(args: &[&str]) -> Result<()> {
    let parse = |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let kernel = args.first().copied().unwrap_or("ffn_up");
    let (tokens, repeats) = (parse(1, 4096), parse(2, 4));
    let (h, inter, seq) = (384, 1536, 128.min(tokens));
    let mut rng = Rng(7);
    let mut kernels = Kernels::new();
    let rand = |rng: &mut Rng, shape: &[usize]| Tensor::from_f32(shape, &rng.vec(shape.iter().product()));
    let x = rand(&mut rng, &[tokens, inter])?;
    let out = Tensor::zeros(&[tokens, 3 * h.max(inter)])?;
    // (k, n, gelu): the four matmuls of a MiniLM layer.
    let matmul = match kernel {
        "qkv" => Some((h, 3 * h, false)),
        "attn_out" => Some((h, h, false)),
        "ffn_up" => Some((h, inter, true)),
        "ffn_down" => Some((inter, h, false)),
        _ => None,
    };
    let mut batch = kernels.batch();
    let flops_each = if let Some((k, n, gelu)) = matmul {
        let (a, w, bias) = (x.view(&[tokens, k])?, rand(&mut rng, &[n, k])?, rand(&mut rng, &[n])?);
        let c = out.view(&[tokens, n])?;
        let spec = Matmul { trans_b: true, gelu, ..Matmul::default() };
        for _ in 0..repeats {
            batch.matmul(&a, &w, Some(&bias), &c, spec)?;
        }
        2 * (tokens * k * n) as u64
    } else if kernel == "attention" {
        let qkv = x.view(&[tokens, 3 * h])?;
        let mask = Tensor::from_f32(&[tokens / seq, seq], &vec![1.0; tokens / seq * seq])?;
        let spec = Attention {
            batch: tokens / seq,
            seq,
            heads: 12,
            head_dim: 32,
            scale: 1.0 / 32f32.sqrt(),
            q_col: 0,
            k_col: h,
            v_col: 2 * h,
        };
        let o = out.view(&[tokens / seq, seq, h])?;
        for _ in 0..repeats {
            batch.attention(&qkv, &qkv, &qkv, &mask, &o, spec)?;
        }
        4 * (tokens * seq * h) as u64
    } else {
        return Err(Error::bad_input(format!(
            "no benchmark kernel {kernel:?}: qkv, attn_out, ffn_up, ffn_down, attention"
        )));
    };
    batch.run()?;
    let flops = flops_each * repeats as u64;
    wasmgrid::output(format!("{kernel} tokens {tokens} repeats {repeats} flops {flops}\n").as_bytes())
}

fn main() -> Result<()> {
    let input = String::from_utf8(wasmgrid::input()?).unwrap_or_default();
    if let Some(rest) = input.trim().strip_prefix("bench") {
        return bench(&rest.split_whitespace().collect::<Vec<_>>());
    }
    let mut kernels = Kernels::new();
    let mut rng = Rng(0x5eed_1234);
    let mut r = Report { text: String::new(), failed: 0, cases: 0 };
    matmuls(&mut kernels, &mut rng, &mut r)?;
    layer_norms(&mut kernels, &mut rng, &mut r)?;
    elementwise(&mut kernels, &mut rng, &mut r)?;
    softmaxes(&mut kernels, &mut rng, &mut r)?;
    attentions(&mut kernels, &mut rng, &mut r)?;
    pooling(&mut kernels, &mut rng, &mut r)?;
    refusals(&mut kernels, &mut r)?;
    let _ = writeln!(r.text, "{} cases, {} failed, {} pipelines", r.cases, r.failed, kernels.compiled());
    wasmgrid::output(r.text.as_bytes())?;
    if r.failed > 0 {
        return Err(Error::kernel(format!("{} of {} kernel checks failed", r.failed, r.cases)));
    }
    Ok(())
}
