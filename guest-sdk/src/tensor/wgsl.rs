//! The WGSL behind [`super`]'s kernels. Variants (operand layout, fused epilogues, head size) are
//! chosen by text substitution before compiling, so each compiled pipeline has no runtime
//! branches for them.

/// `erfc(x)` with a fractional error below 1.2e-7 everywhere (Numerical Recipes' Chebyshev
/// fit), and the exact GELU `x * Φ(x) = 0.5 * x * erfc(-x / √2)`, whose relative error is
/// therefore as small: written through `erfc`, not `1 + erf`, so small inputs keep their
/// precision. Public so that a renter's own WGSL can include it.
pub const ERFC_GELU: &str = r#"
fn wg_erfc(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(poly);
    return select(2.0 - r, r, x >= 0.0);
}

fn wg_gelu(x: f32) -> f32 {
    return 0.5 * x * wg_erfc(-x * 0.70710678118654752);
}
"#;

/// `c = alpha * op(a) * op(b) (+ bias) (then GELU)`, batched over `wg.z`: the WGSL for one
/// variant. A 64 x 64 output tile per workgroup of 8 x 8 threads, each holding an 8 x 8
/// register tile in sixteen `vec4` accumulators (written out, not an array, so that no
/// compiler spills them); K in steps of 32 through workgroup memory (16 KiB, the least every
/// adapter offers), loaded so that
/// neighbouring threads read neighbouring addresses for either operand layout.
pub(super) fn matmul(trans_a: bool, trans_b: bool, bias: bool, gelu: bool) -> String {
    use std::fmt::Write as _;
    // Tile element `e` (0..2048) of A: (row r, depth kk) and where it lies in `a`.
    let load_a = if trans_a {
        "let r = e % 64u; let kk = e / 64u;
            var v = 0.0;
            if (row0 + r < p.m && k0 + kk < p.k) { v = a[a0 + (k0 + kk) * p.m + row0 + r]; }"
    } else {
        "let kk = e % 32u; let r = e / 32u;
            var v = 0.0;
            if (row0 + r < p.m && k0 + kk < p.k) { v = a[a0 + (row0 + r) * p.k + k0 + kk]; }"
    };
    let load_b = if trans_b {
        "let kk = e % 32u; let cc = e / 32u;
            var w = 0.0;
            if (col0 + cc < p.n && k0 + kk < p.k) { w = b[b0 + (col0 + cc) * p.k + k0 + kk]; }"
    } else {
        "let cc = e % 64u; let kk = e / 64u;
            var w = 0.0;
            if (col0 + cc < p.n && k0 + kk < p.k) { w = b[b0 + (k0 + kk) * p.n + col0 + cc]; }"
    };
    let mut declare = String::new();
    let mut fmas = String::new();
    let mut stores = String::new();
    for r in 0..8 {
        let lane = ["x", "y", "z", "w"][r % 4];
        let half = r / 4;
        for h in 0..2 {
            let _ = writeln!(declare, "    var c{r}{h} = vec4<f32>();");
            let _ = writeln!(fmas, "            c{r}{h} = fma(vec4<f32>(a{half}.{lane}), b{h}, c{r}{h});");
            let _ =
                writeln!(stores, "    store4(row0 + lid.y * 8u + {r}u, col0 + {h}u * 32u + lid.x * 4u, c0_, c{r}{h});");
        }
    }
    let stores = stores.replace("c0_, ", "c0, ");
    let mut epilogue = String::new();
    if bias {
        epilogue.push_str("x = x + bias[col];");
    }
    if gelu {
        epilogue.push_str(" x = wg_gelu(x);");
    }
    format!(
        r#"
struct Params {{
    m: u32, n: u32, k: u32, alpha: f32,
    a_batch: u32, b_batch: u32, c_batch: u32, _pad: u32,
}}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
{bias_decl}

var<workgroup> ta: array<f32, 2048>;
var<workgroup> tb: array<f32, 2048>;

{functions}

fn store4(r: u32, col4: u32, c0: u32, v: vec4<f32>) {{
    if (r >= p.m) {{ return; }}
    for (var j = 0u; j < 4u; j = j + 1u) {{
        let col = col4 + j;
        if (col < p.n) {{
            var x = v[j] * p.alpha;
            {epilogue}
            c[c0 + r * p.n + col] = x;
        }}
    }}
}}

@compute @workgroup_size(8, 8, 1)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {{
    let tid = lid.y * 8u + lid.x;
    let row0 = wg.y * 64u;
    let col0 = wg.x * 64u;
    let a0 = wg.z * p.a_batch;
    let b0 = wg.z * p.b_batch;
    let c0 = wg.z * p.c_batch;
{declare}
    for (var k0 = 0u; k0 < p.k; k0 = k0 + 32u) {{
        for (var i = 0u; i < 32u; i = i + 1u) {{
            let e = tid + i * 64u;
            {{
            {load_a}
            ta[kk * 64u + r] = v;
            }}
            {{
            {load_b}
            tb[kk * 64u + cc] = w;
            }}
        }}
        workgroupBarrier();
        for (var kk = 0u; kk < 32u; kk = kk + 1u) {{
            let t = kk * 64u;
            let ar = t + lid.y * 8u;
            let bc = t + lid.x * 4u;
            let a0 = vec4<f32>(ta[ar], ta[ar + 1u], ta[ar + 2u], ta[ar + 3u]);
            let a1 = vec4<f32>(ta[ar + 4u], ta[ar + 5u], ta[ar + 6u], ta[ar + 7u]);
            let b0 = vec4<f32>(tb[bc], tb[bc + 1u], tb[bc + 2u], tb[bc + 3u]);
            let b1 = vec4<f32>(tb[bc + 32u], tb[bc + 33u], tb[bc + 34u], tb[bc + 35u]);
{fmas}        }}
        workgroupBarrier();
    }}
{stores}}}
"#,
        bias_decl = if bias { BIAS_DECL } else { "" },
        functions = if gelu { ERFC_GELU } else { "" },
    )
}

const BIAS_DECL: &str = "@group(0) @binding(4) var<storage, read> bias: array<f32>;";

/// A 128-thread workgroup's sum and maximum of one value per thread, every thread getting the
/// result: the row reductions of layer norm, softmax and L2 normalisation. Pasted where a kernel
/// says `$ROW_REDUCE`.
const ROW_REDUCE: &str = r#"
var<workgroup> part: array<f32, 128>;

fn row_reduce(lid: u32, v: f32, take_max: bool) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    for (var s = 64u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let other = part[lid + s];
            part[lid] = select(part[lid] + other, max(part[lid], other), take_max);
        }
        workgroupBarrier();
    }
    let total = part[0];
    workgroupBarrier();
    return total;
}

fn row_sum(lid: u32, v: f32) -> f32 { return row_reduce(lid, v, false); }
fn row_max(lid: u32, v: f32) -> f32 { return row_reduce(lid, v, true); }
"#;

/// `kernel` with the shared row reduction pasted in.
pub(super) fn with_row_reduce(kernel: &str) -> String {
    kernel.replace("$ROW_REDUCE", ROW_REDUCE)
}

/// Layer norm of each row (optionally of `x + residual`), statistics in f32 in two passes (mean,
/// then the mean square of the deviations), one workgroup of 128 threads per row.
pub(super) const LAYER_NORM: &str = r#"
struct Params { rows: u32, cols: u32, eps: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
$RESIDUAL_DECL

$ROW_REDUCE

fn value(i: u32) -> f32 {
    return $VALUE;
}

@compute @workgroup_size(128, 1, 1)
fn layer_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) { return; }
    let lid = lid3.x;
    let base = row * p.cols;
    var s = 0.0;
    for (var j = lid; j < p.cols; j = j + 128u) { s = s + value(base + j); }
    let mean = row_sum(lid, s) / f32(p.cols);
    var q = 0.0;
    for (var j = lid; j < p.cols; j = j + 128u) { let d = value(base + j) - mean; q = q + d * d; }
    let inv = inverseSqrt(row_sum(lid, q) / f32(p.cols) + p.eps);
    for (var j = lid; j < p.cols; j = j + 128u) {
        y[base + j] = (value(base + j) - mean) * inv * gamma[j] + beta[j];
    }
}
"#;

/// Softmax of each row with the maximum subtracted; where a mask is bound, columns whose mask
/// is 0 get probability 0 (a row with every column masked is all zeros). The mask has one row
/// per `group` consecutive rows.
pub(super) const SOFTMAX: &str = r#"
struct Params { rows: u32, cols: u32, group: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
$MASK_DECL

$ROW_REDUCE

fn kept(row: u32, j: u32) -> bool {
    return $KEPT;
}

@compute @workgroup_size(128, 1, 1)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) { return; }
    let lid = lid3.x;
    let base = row * p.cols;
    var m = -3.4028234e38;
    for (var j = lid; j < p.cols; j = j + 128u) { if (kept(row, j)) { m = max(m, x[base + j]); } }
    m = row_max(lid, m);
    var total = 0.0;
    for (var j = lid; j < p.cols; j = j + 128u) { if (kept(row, j)) { total = total + exp(x[base + j] - m); } }
    total = row_sum(lid, total);
    for (var j = lid; j < p.cols; j = j + 128u) {
        var v = 0.0;
        if (kept(row, j) && total > 0.0) { v = exp(x[base + j] - m) / total; }
        y[base + j] = v;
    }
}
"#;

/// Scaled dot-product attention, fused: per (sequence, head, block of 64 queries) one workgroup,
/// one query per thread, keys and values in tiles through workgroup memory, an online softmax
/// (running maximum and sum), so the `L x L` scores never reach memory. Q, K and V are rows of
/// `stride` floats at column offsets (one fused QKV projection or three tensors alike); a key
/// whose mask is 0 is left out; the output is `[batch, seq, heads * D]`.
pub(super) const ATTENTION: &str = r#"
struct Params {
    seq: u32, heads: u32, stride: u32, scale: f32,
    q_off: u32, k_off: u32, v_off: u32, _pad: u32,
}

const D: u32 = $HEAD_DIMu;
const D4: u32 = $HEAD_DIM4u;
const TILE: u32 = $TILEu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> mask: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;

var<workgroup> tk: array<vec4<f32>, $TILE_VECS>;
var<workgroup> tv: array<vec4<f32>, $TILE_VECS>;
var<workgroup> tm: array<f32, TILE>;

fn load4(which: u32, at: u32) -> vec4<f32> {
    if (which == 0u) { return vec4<f32>(k[at], k[at + 1u], k[at + 2u], k[at + 3u]); }
    return vec4<f32>(v[at], v[at + 1u], v[at + 2u], v[at + 3u]);
}

@compute @workgroup_size(64, 1, 1)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let seq_i = wg.z;
    let head = wg.y;
    let i = wg.x * 64u + lid;
    let live = i < p.seq;
    let row0 = seq_i * p.seq;
    var qr: array<vec4<f32>, $HEAD_DIM4>;
    var acc: array<vec4<f32>, $HEAD_DIM4>;
    if (live) {
        let qb = (row0 + i) * p.stride + p.q_off + head * D;
        for (var d = 0u; d < D4; d = d + 1u) {
            let at = qb + d * 4u;
            qr[d] = vec4<f32>(q[at], q[at + 1u], q[at + 2u], q[at + 3u]) * p.scale;
        }
    }
    var m = -3.4028234e38;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.seq; j0 = j0 + TILE) {
        for (var e = lid; e < TILE * D4; e = e + 64u) {
            let jj = e / D4;
            let d = e % D4;
            var kv = vec4<f32>();
            var vv = vec4<f32>();
            if (j0 + jj < p.seq) {
                let r = (row0 + j0 + jj) * p.stride + head * D + d * 4u;
                kv = load4(0u, r + p.k_off);
                vv = load4(1u, r + p.v_off);
            }
            tk[e] = kv;
            tv[e] = vv;
        }
        for (var jj = lid; jj < TILE; jj = jj + 64u) {
            var keep = 0.0;
            if (j0 + jj < p.seq) { keep = mask[row0 + j0 + jj]; }
            tm[jj] = keep;
        }
        workgroupBarrier();
        if (live) {
            for (var jj = 0u; jj < TILE; jj = jj + 1u) {
                if (tm[jj] != 0.0) {
                    var s4 = vec4<f32>();
                    for (var d = 0u; d < D4; d = d + 1u) { s4 = fma(qr[d], tk[jj * D4 + d], s4); }
                    let s = s4.x + s4.y + s4.z + s4.w;
                    let m2 = max(m, s);
                    let corr = exp(m - m2);
                    let w = exp(s - m2);
                    l = l * corr + w;
                    for (var d = 0u; d < D4; d = d + 1u) { acc[d] = fma(acc[d], vec4<f32>(corr), w * tv[jj * D4 + d]); }
                    m = m2;
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let ob = (row0 + i) * (p.heads * D) + head * D;
        var inv = 0.0;
        if (l > 0.0) { inv = 1.0 / l; }
        for (var d = 0u; d < D4; d = d + 1u) {
            let r = acc[d] * inv;
            o[ob + d * 4u] = r.x;
            o[ob + d * 4u + 1u] = r.y;
            o[ob + d * 4u + 2u] = r.z;
            o[ob + d * 4u + 3u] = r.w;
        }
    }
}
"#;

/// Elementwise kernels over a flat index, 256 invocations per workgroup, the index spread over
/// `x` and `y` so that more than 65,535 workgroups fit in one dispatch.
pub(super) const ELEMENTWISE: &str = r#"
struct Params { n: u32, b_len: u32, _p0: u32, _p1: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
$B_DECL

$FUNCTIONS

@compute @workgroup_size(256, 1, 1)
fn elementwise(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    y[i] = $EXPR;
}
"#;

/// Rows of a table picked by `u32` ids; an id past the table gives a zero row.
pub(super) const EMBEDDING: &str = r#"
struct Params { n: u32, cols: u32, vocab: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn embedding(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    let id = ids[i / p.cols];
    var v = 0.0;
    if (id < p.vocab) { v = table[id * p.cols + i % p.cols]; }
    y[i] = v;
}
"#;

/// The mean over each sequence's positions whose mask is non-zero, weighted by the mask (the
/// count clamped to 1e-9 as sentence-transformers does), one invocation per output.
pub(super) const MEAN_POOL: &str = r#"
struct Params { batch: u32, seq: u32, cols: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn mean_pool(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.batch * p.cols) { return; }
    let b = i / p.cols;
    let c = i % p.cols;
    var s = 0.0;
    var w = 0.0;
    for (var l = 0u; l < p.seq; l = l + 1u) {
        let mk = mask[b * p.seq + l];
        s = fma(x[(b * p.seq + l) * p.cols + c], mk, s);
        w = w + mk;
    }
    y[i] = s / max(w, 1e-9);
}
"#;

/// Each row divided by its L2 norm (clamped to `eps`, as `torch.nn.functional.normalize`).
pub(super) const L2_NORMALIZE: &str = r#"
struct Params { rows: u32, cols: u32, eps: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

$ROW_REDUCE

@compute @workgroup_size(128, 1, 1)
fn l2_normalize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) { return; }
    let lid = lid3.x;
    let base = row * p.cols;
    var s = 0.0;
    for (var j = lid; j < p.cols; j = j + 128u) { let v = x[base + j]; s = fma(v, v, s); }
    let inv = 1.0 / max(sqrt(row_sum(lid, s)), p.eps);
    for (var j = lid; j < p.cols; j = j + 128u) { y[base + j] = x[base + j] * inv; }
}
"#;
