//! GPU tensors and the kernels a transformer needs, recorded into one submission.
//!
//! A [`Tensor`] is a GPU buffer with a shape (row-major, `f32` or `u32` ids). Kernels are
//! methods of a [`Batch`]: each records one dispatch, nothing runs until [`Batch::run`], which
//! crosses into the host once for all of them and waits for the GPU. The [`Kernels`] a batch is
//! made from compile each kernel variant once, on first use, and keep the small parameter
//! buffers of the shapes they have seen, so a model that runs the same shapes again records its
//! whole forward pass without a single host call.
//!
//! ```no_run
//! use wasmgrid::tensor::{Kernels, Matmul, Tensor};
//! # fn main() -> wasmgrid::Result<()> {
//! let mut kernels = Kernels::new();
//! let x = Tensor::from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let w = Tensor::from_f32(&[4, 3], &[0.5; 12])?; // a PyTorch `Linear(3, 4)` weight: [out, in]
//! let bias = Tensor::from_f32(&[4], &[0.0, 1.0, 2.0, 3.0])?;
//! let y = Tensor::zeros(&[2, 4])?;
//! let mut batch = kernels.batch();
//! batch.matmul(&x, &w, Some(&bias), &y, Matmul { trans_b: true, gelu: true, ..Matmul::default() })?;
//! batch.run()?;
//! let y = y.read_f32()?; // GELU(x Wᵀ + b)
//! # Ok(()) }
//! ```
//!
//! Outputs are tensors the caller made ([`Tensor::zeros`]); an output never aliases an input
//! of the same kernel. Every kernel checks the shapes it is given and says what does not fit.
//! A tensor may be a [`view`](Tensor::view) of a larger buffer (its first elements), so that
//! scratch space made once for the largest batch serves smaller ones. Results are within a
//! small tolerance of an `f64` CPU computation, never bit-exact across GPUs: WGSL allows
//! `exp` and division a few ULP of error.

mod wgsl;

use std::collections::HashMap;
use std::rc::Rc;

use crate::{Buffer, BufferKind, Error, Pipeline, Result, Submission};

pub use wgsl::ERFC_GELU;

/// The WGSL of [`Batch::matmul`]'s variant for these options (entry point `matmul`; bindings
/// 0 parameters, 1 A, 2 B, 3 C, 4 bias; workgroups `[ceil(n / 64), ceil(m / 64), batch]`):
/// for a renter's own dispatches, or to run the very same kernel outside the sandbox.
pub fn matmul_wgsl(spec: Matmul, bias: bool) -> String {
    wgsl::matmul(spec.trans_a, spec.trans_b, bias, spec.gelu)
}

/// The 8 words of [`matmul_wgsl`]'s parameter buffer for an `m x k` by `k x n` product (one
/// batch, B not batched); `None` when a matrix has more than 2^32 elements.
pub fn matmul_params(m: u32, k: u32, n: u32, alpha: f32) -> Option<[u32; 8]> {
    Some([m, n, k, alpha.to_bits(), m.checked_mul(k)?, 0, m.checked_mul(n)?, 0])
}

/// What a tensor's elements are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// Token ids and other indices.
    U32,
}

/// A row-major tensor in GPU memory. Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Rc<Buffer>,
    shape: Vec<usize>,
    dtype: DType,
}

fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n > 0 && n <= u32::MAX as usize)
        .ok_or_else(|| Error::kernel(format!("tensor shape {shape:?} is empty or has more than 2^32 elements")))
}

impl Tensor {
    fn with_bytes(shape: &[usize], dtype: DType, bytes: Option<&[u8]>) -> Result<Tensor> {
        let n = numel(shape)?;
        let size = n as u64 * 4;
        let buffer = match bytes {
            Some(b) if b.len() as u64 != size => {
                return Err(Error::kernel(format!("a tensor of shape {shape:?} needs {size} bytes, got {}", b.len())));
            }
            Some(b) => Buffer::from_bytes(BufferKind::Storage, b)?,
            None => Buffer::storage(size)?,
        };
        Ok(Tensor { buffer: Rc::new(buffer), shape: shape.to_vec(), dtype })
    }

    /// A zero-filled `f32` tensor.
    pub fn zeros(shape: &[usize]) -> Result<Tensor> {
        Tensor::with_bytes(shape, DType::F32, None)
    }

    /// A zero-filled `u32` tensor.
    pub fn zeros_u32(shape: &[usize]) -> Result<Tensor> {
        Tensor::with_bytes(shape, DType::U32, None)
    }

    /// An `f32` tensor holding `values` (as many as the shape has elements).
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Result<Tensor> {
        Tensor::with_bytes(shape, DType::F32, Some(&crate::to_bytes(values)))
    }

    /// An `f32` tensor from little-endian bytes, as a safetensors file stores `F32` tensors:
    /// uploaded as they are, with no copy in guest memory.
    pub fn from_f32_bytes(shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        Tensor::with_bytes(shape, DType::F32, Some(bytes))
    }

    /// A `u32` tensor holding `values`.
    pub fn from_u32(shape: &[usize], values: &[u32]) -> Result<Tensor> {
        Tensor::with_bytes(shape, DType::U32, Some(&crate::to_bytes(values)))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Always false: a tensor has at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Elements the buffer behind this tensor can hold.
    pub fn capacity(&self) -> usize {
        (self.buffer.size() / 4) as usize
    }

    /// The buffer, for code that dispatches its own pipelines on tensors.
    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }

    /// The same buffer seen with another shape of at most [`capacity`](Tensor::capacity)
    /// elements (its first ones).
    pub fn view(&self, shape: &[usize]) -> Result<Tensor> {
        let n = numel(shape)?;
        if n > self.capacity() {
            return Err(Error::kernel(format!(
                "a view of shape {shape:?} needs {n} elements; the buffer holds {}",
                self.capacity()
            )));
        }
        Ok(Tensor { buffer: self.buffer.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }

    /// Writes `values` at the start (at most the tensor's length).
    pub fn write_f32(&self, values: &[f32]) -> Result<()> {
        self.check_write(values.len(), DType::F32)?;
        self.buffer.write(0, values)
    }

    /// Writes `u32` values at the start (at most the tensor's length).
    pub fn write_u32(&self, values: &[u32]) -> Result<()> {
        self.check_write(values.len(), DType::U32)?;
        self.buffer.write(0, values)
    }

    fn check_write(&self, n: usize, dtype: DType) -> Result<()> {
        if dtype != self.dtype || n > self.len() {
            return Err(Error::kernel(format!(
                "cannot write {n} {dtype:?} values to a {:?} tensor of shape {:?}",
                self.dtype, self.shape
            )));
        }
        Ok(())
    }

    /// The elements, read back from the GPU.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        Ok(crate::from_bytes(&self.buffer.read_bytes(0, self.len() * 4)?))
    }

    fn rows(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.len() / cols.max(1), cols)
    }

    fn same(&self, other: &Tensor) -> bool {
        Rc::ptr_eq(&self.buffer, &other.buffer)
    }
}

/// How [`Batch::matmul`] reads its operands and what it fuses after the product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Matmul {
    /// A is stored `[.., k, m]`: the product uses its transpose.
    pub trans_a: bool,
    /// B is stored `[.., n, k]` (a PyTorch `Linear` weight): the product uses its transpose.
    pub trans_b: bool,
    /// Scales the product (before the bias).
    pub alpha: f32,
    /// Applies the exact GELU after the bias.
    pub gelu: bool,
}

impl Default for Matmul {
    fn default() -> Self {
        Matmul { trans_a: false, trans_b: false, alpha: 1.0, gelu: false }
    }
}

/// Kernel variants compiled once and the parameter buffers of shapes already seen.
#[derive(Debug, Default)]
pub struct Kernels {
    pipelines: HashMap<String, Pipeline>,
    params: HashMap<Vec<u32>, Rc<Buffer>>,
}

/// Parameter buffers kept at most; past it the cache starts again (a model with this many
/// distinct shapes gains little from it).
const MAX_PARAMS: usize = 256;

/// The most workgroups along one dispatch dimension every adapter allows.
const MAX_GROUPS_PER_DIM: u32 = 65_535;

impl Kernels {
    pub fn new() -> Kernels {
        Kernels::default()
    }

    /// A batch to record kernels into.
    pub fn batch(&mut self) -> Batch<'_> {
        Batch { kernels: self, submission: Submission::new(), keep: Vec::new() }
    }

    /// Pipelines compiled so far.
    pub fn compiled(&self) -> usize {
        self.pipelines.len()
    }

    fn pipeline(&mut self, key: &str, source: impl FnOnce() -> String, entry: &str) -> Result<u32> {
        if let Some(p) = self.pipelines.get(key) {
            return Ok(p.handle());
        }
        let p = Pipeline::new(&source(), entry)?;
        let handle = p.handle();
        self.pipelines.insert(key.to_string(), p);
        Ok(handle)
    }

    fn params(&mut self, words: &[u32]) -> Result<Rc<Buffer>> {
        if let Some(b) = self.params.get(words) {
            return Ok(b.clone());
        }
        if self.params.len() >= MAX_PARAMS {
            self.params.clear();
        }
        let b = Rc::new(Buffer::uniform_from(words)?);
        self.params.insert(words.to_vec(), b.clone());
        Ok(b)
    }
}

/// Kernels recorded for one submission; see the [module docs](self).
#[derive(Debug)]
pub struct Batch<'k> {
    kernels: &'k mut Kernels,
    submission: Submission,
    /// Every buffer a recorded dispatch binds, alive until the batch has run.
    keep: Vec<Rc<Buffer>>,
}

fn dim(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::kernel(format!("{what} of {n} is too large")))
}

/// Workgroups for `groups` along x, spilling into y past what one dimension holds.
fn spread(groups: usize) -> Result<[u32; 3]> {
    let g = dim(groups.max(1), "a dispatch")?;
    Ok([g.min(MAX_GROUPS_PER_DIM), g.div_ceil(MAX_GROUPS_PER_DIM), 1])
}

fn f32_arg(v: f32) -> u32 {
    v.to_bits()
}

fn need(ok: bool, why: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::kernel(why())) }
}

fn no_alias(out: &Tensor, inputs: &[&Tensor], op: &str) -> Result<()> {
    need(inputs.iter().all(|t| !t.same(out)), || format!("{op}: the output shares a buffer with an input"))
}

fn f32s(tensors: &[&Tensor], op: &str) -> Result<()> {
    need(tensors.iter().all(|t| t.dtype == DType::F32), || format!("{op}: f32 tensors expected"))
}

impl Batch<'_> {
    /// Kernels recorded so far.
    pub fn len(&self) -> usize {
        self.submission.len()
    }

    pub fn is_empty(&self) -> bool {
        self.submission.is_empty()
    }

    /// Runs every recorded kernel in one submission, in order, and waits for the GPU.
    pub fn run(self) -> Result<()> {
        if self.submission.is_empty() {
            return Ok(());
        }
        self.submission.run()
    }

    fn record(&mut self, pipeline: u32, params: Rc<Buffer>, bound: &[&Tensor], groups: [u32; 3]) {
        let mut bindings: Vec<(u32, &Buffer)> = vec![(0, &params)];
        for (i, t) in bound.iter().enumerate() {
            bindings.push((i as u32 + 1, &t.buffer));
        }
        self.submission.dispatch_handle(pipeline, &bindings, groups);
        self.keep.push(params.clone());
        self.keep.extend(bound.iter().map(|t| t.buffer.clone()));
    }

    /// `out = alpha * op(a) op(b) (+ bias) (then GELU)`. `a` is `[.., m, k]` (`[.., k, m]`
    /// with `trans_a`), `b` is `[.., k, n]` (`[.., n, k]` with `trans_b`), `out` is
    /// `[.., m, n]`; leading dimensions are batches (equal in `a` and `out`; `b` either has
    /// the same or none, shared by every batch). `bias` has `n` elements.
    pub fn matmul(&mut self, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, out: &Tensor, spec: Matmul) -> Result<()> {
        f32s(&[a, b, out], "matmul")?;
        let (sa, sb, so) = (&a.shape, &b.shape, &out.shape);
        need(sa.len() >= 2 && sb.len() >= 2 && so.len() == sa.len(), || {
            format!("matmul: shapes {sa:?} x {sb:?} -> {so:?} are not [.., m, k] x [.., k, n] -> [.., m, n]")
        })?;
        let last2 = |s: &[usize]| (s[s.len() - 2], s[s.len() - 1]);
        let (m, k) = if spec.trans_a { (last2(sa).1, last2(sa).0) } else { last2(sa) };
        let (kb, n) = if spec.trans_b { (last2(sb).1, last2(sb).0) } else { last2(sb) };
        let batch: usize = sa[..sa.len() - 2].iter().product();
        let b_batch: usize = sb[..sb.len() - 2].iter().product();
        need(
            k == kb
                && last2(so) == (m, n)
                && sa[..sa.len() - 2] == so[..so.len() - 2]
                && (b_batch == 1 || b_batch == batch),
            || format!("matmul: shapes {sa:?} x {sb:?} -> {so:?} do not agree (m {m}, k {k} vs {kb}, n {n})"),
        )?;
        if let Some(bias) = bias {
            f32s(&[bias], "matmul")?;
            need(bias.len() == n, || format!("matmul: a bias of {} elements for {n} columns", bias.len()))?;
        }
        let mut inputs = vec![a, b];
        inputs.extend(bias);
        no_alias(out, &inputs, "matmul")?;
        let key =
            format!("matmul:{}{}{}{}", spec.trans_a as u8, spec.trans_b as u8, bias.is_some() as u8, spec.gelu as u8);
        let source = || wgsl::matmul(spec.trans_a, spec.trans_b, bias.is_some(), spec.gelu);
        let pipeline = self.kernels.pipeline(&key, source, "matmul")?;
        let b_stride = if b_batch == 1 { 0 } else { k * n };
        let words = [
            dim(m, "m")?,
            dim(n, "n")?,
            dim(k, "k")?,
            f32_arg(spec.alpha),
            dim(m * k, "a batch")?,
            dim(b_stride, "b batch")?,
            dim(m * n, "c batch")?,
            0,
        ];
        let params = self.kernels.params(&words)?;
        let groups = [dim(n.div_ceil(64), "n")?, dim(m.div_ceil(64), "m")?, dim(batch, "batch")?];
        need(groups.iter().all(|&g| g <= MAX_GROUPS_PER_DIM), || {
            format!("matmul: {groups:?} workgroups is over {MAX_GROUPS_PER_DIM} in one dimension")
        })?;
        let mut bound = vec![a, b, out];
        bound.extend(bias);
        self.record(pipeline, params, &bound, groups);
        Ok(())
    }

    /// `out = LayerNorm(x (+ residual)) * gamma + beta` over the last dimension.
    pub fn layer_norm(
        &mut self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        out: &Tensor,
    ) -> Result<()> {
        f32s(&[x, gamma, beta, out], "layer_norm")?;
        let (rows, cols) = x.rows();
        need(gamma.len() == cols && beta.len() == cols && out.shape == x.shape, || {
            format!(
                "layer_norm: x {:?}, gamma {:?}, beta {:?}, out {:?} do not agree",
                x.shape, gamma.shape, beta.shape, out.shape
            )
        })?;
        if let Some(r) = residual {
            f32s(&[r], "layer_norm")?;
            need(r.shape == x.shape, || format!("layer_norm: residual {:?} for x {:?}", r.shape, x.shape))?;
        }
        let mut inputs = vec![x, gamma, beta];
        inputs.extend(residual);
        no_alias(out, &inputs, "layer_norm")?;
        let key = format!("layer_norm:{}", residual.is_some() as u8);
        let source = || {
            let (decl, value) = match residual {
                Some(_) => ("@group(0) @binding(5) var<storage, read> residual: array<f32>;", "x[i] + residual[i]"),
                None => ("", "x[i]"),
            };
            wgsl::with_row_reduce(wgsl::LAYER_NORM).replace("$RESIDUAL_DECL", decl).replace("$VALUE", value)
        };
        let pipeline = self.kernels.pipeline(&key, source, "layer_norm")?;
        let params = self.kernels.params(&[dim(rows, "rows")?, dim(cols, "cols")?, f32_arg(eps), 0])?;
        let mut bound = vec![x, gamma, beta, out];
        bound.extend(residual);
        self.record(pipeline, params, &bound, spread(rows)?);
        Ok(())
    }

    /// Softmax over the last dimension. With a mask (`f32`, one row of `cols` values per
    /// `group` consecutive rows of `x`), columns whose mask is 0 get 0.
    pub fn softmax(&mut self, x: &Tensor, mask: Option<(&Tensor, usize)>, out: &Tensor) -> Result<()> {
        f32s(&[x, out], "softmax")?;
        let (rows, cols) = x.rows();
        need(out.shape == x.shape, || format!("softmax: out {:?} for x {:?}", out.shape, x.shape))?;
        let group = match mask {
            Some((m, group)) => {
                f32s(&[m], "softmax")?;
                need(group > 0 && rows.is_multiple_of(group) && m.len() == rows / group * cols, || {
                    format!(
                        "softmax: a mask of {} values does not cover {rows} rows of {cols} in groups of {group}",
                        m.len()
                    )
                })?;
                group
            }
            None => 1,
        };
        let mut inputs = vec![x];
        inputs.extend(mask.map(|m| m.0));
        no_alias(out, &inputs, "softmax")?;
        let key = format!("softmax:{}", mask.is_some() as u8);
        let source = || {
            let (decl, kept) = match mask {
                Some(_) => (
                    "@group(0) @binding(3) var<storage, read> mask: array<f32>;",
                    "mask[(row / p.group) * p.cols + j] != 0.0",
                ),
                None => ("", "true"),
            };
            wgsl::with_row_reduce(wgsl::SOFTMAX).replace("$MASK_DECL", decl).replace("$KEPT", kept)
        };
        let pipeline = self.kernels.pipeline(&key, source, "softmax")?;
        let params = self.kernels.params(&[dim(rows, "rows")?, dim(cols, "cols")?, dim(group, "group")?, 0])?;
        let mut bound = vec![x, out];
        bound.extend(mask.map(|m| m.0));
        self.record(pipeline, params, &bound, spread(rows)?);
        Ok(())
    }

    /// Scaled dot-product attention, fused (the scores never leave the GPU's registers and
    /// workgroup memory): for each of `batch` sequences of `seq` positions and each head,
    /// `softmax(q kᵀ * scale + mask) v`. `q`, `k` and `v` are `[batch * seq, stride]` floats
    /// (they may be one tensor, a fused QKV projection) with the heads' columns starting at
    /// `spec.q_col`, `k_col`, `v_col`; `mask` is `[batch, seq]`, 0 for keys left out; `out`
    /// is `[batch, seq, heads * head_dim]`.
    pub fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        out: &Tensor,
        spec: Attention,
    ) -> Result<()> {
        f32s(&[q, k, v, mask, out], "attention")?;
        let Attention { batch, seq, heads, head_dim, scale, q_col, k_col, v_col } = spec;
        need((1..=128).contains(&head_dim) && head_dim.is_multiple_of(4), || {
            format!("attention: head size {head_dim} is not a multiple of 4 in 4..=128")
        })?;
        let too_big = || Error::kernel(format!("attention: {batch} x {seq} x {heads} x {head_dim} is too large"));
        let width = heads.checked_mul(head_dim).ok_or_else(too_big)?;
        let stride = q.shape.last().copied().unwrap_or(0);
        let rows = batch.checked_mul(seq).ok_or_else(too_big)?;
        rows.checked_mul(stride.max(width)).filter(|&n| n <= u32::MAX as usize).ok_or_else(too_big)?;
        let fits = |t: &Tensor, col: usize| {
            t.shape.last() == Some(&stride) && t.len() == rows * stride && col + width <= stride
        };
        need(fits(q, q_col) && fits(k, k_col) && fits(v, v_col), || {
            format!(
                "attention: q {:?}, k {:?}, v {:?} are not [{rows}, stride] with {heads} heads of {head_dim} from columns {q_col}, {k_col}, {v_col}",
                q.shape, k.shape, v.shape
            )
        })?;
        need(mask.len() == rows && out.len() == rows * width && out.shape.last() == Some(&width), || {
            format!("attention: mask {:?} or out {:?} do not fit {batch} x {seq} x {width}", mask.shape, out.shape)
        })?;
        no_alias(out, &[q, k, v, mask], "attention")?;
        // Keys per tile: the two tiles fill at most 8 KiB of workgroup memory.
        let tile = (1024 / head_dim).clamp(1, 64);
        let key = format!("attention:{head_dim}");
        let source = || {
            wgsl::ATTENTION
                .replace("$HEAD_DIM4", &(head_dim / 4).to_string())
                .replace("$HEAD_DIM", &head_dim.to_string())
                .replace("$TILE_VECS", &(tile * head_dim / 4).to_string())
                .replace("$TILE", &tile.to_string())
        };
        let pipeline = self.kernels.pipeline(&key, source, "attention")?;
        let words = [
            dim(seq, "seq")?,
            dim(heads, "heads")?,
            dim(stride, "stride")?,
            f32_arg(scale),
            dim(q_col, "q_col")?,
            dim(k_col, "k_col")?,
            dim(v_col, "v_col")?,
            0,
        ];
        let params = self.kernels.params(&words)?;
        let groups = [dim(seq.div_ceil(64), "seq")?, dim(heads, "heads")?, dim(batch, "batch")?];
        need(groups.iter().all(|&g| g <= MAX_GROUPS_PER_DIM), || {
            format!("attention: {groups:?} workgroups is over {MAX_GROUPS_PER_DIM} in one dimension")
        })?;
        self.record(pipeline, params, &[q, k, v, mask, out], groups);
        Ok(())
    }

    fn elementwise(&mut self, name: &str, expr: &str, a: &Tensor, b: Option<&Tensor>, out: &Tensor) -> Result<()> {
        f32s(&[a, out], name)?;
        need(out.len() == a.len(), || format!("{name}: out {:?} for input {:?}", out.shape, a.shape))?;
        let b_len = match b {
            Some(b) => {
                f32s(&[b], name)?;
                need(a.len().is_multiple_of(b.len()), || {
                    format!("{name}: {:?} does not repeat evenly over {:?}", b.shape, a.shape)
                })?;
                b.len()
            }
            None => 1,
        };
        let mut inputs = vec![a];
        inputs.extend(b);
        no_alias(out, &inputs, name)?;
        let source = || {
            wgsl::ELEMENTWISE
                .replace(
                    "$B_DECL",
                    if b.is_some() { "@group(0) @binding(3) var<storage, read> b: array<f32>;" } else { "" },
                )
                .replace("$FUNCTIONS", wgsl::ERFC_GELU)
                .replace("$EXPR", expr)
        };
        let pipeline = self.kernels.pipeline(name, source, "elementwise")?;
        let params = self.kernels.params(&[dim(a.len(), "length")?, dim(b_len, "length")?, 0, 0])?;
        let mut bound = vec![a, out];
        bound.extend(b);
        self.record(pipeline, params, &bound, spread(a.len().div_ceil(256))?);
        Ok(())
    }

    /// `out = a + b`, where `b` repeats over `a` (its length divides `a`'s: a bias row, a
    /// block of position embeddings).
    pub fn add(&mut self, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
        self.elementwise("add", "a[i] + b[i % p.b_len]", a, Some(b), out)
    }

    /// `out = GELU(x)`, the exact (erf) form.
    pub fn gelu(&mut self, x: &Tensor, out: &Tensor) -> Result<()> {
        self.elementwise("gelu", "wg_gelu(a[i])", x, None, out)
    }

    /// `out[i, :] = table[ids[i], :]`: `table` is `[vocab, cols]`, `ids` are `u32`, `out` is
    /// `[ids.., cols]`. An id past the table gives a row of zeros.
    pub fn embedding(&mut self, table: &Tensor, ids: &Tensor, out: &Tensor) -> Result<()> {
        f32s(&[table, out], "embedding")?;
        need(ids.dtype == DType::U32, || "embedding: ids must be a u32 tensor".to_string())?;
        let (vocab, cols) = table.rows();
        need(table.shape.len() == 2 && out.len() == ids.len() * cols && out.shape.last() == Some(&cols), || {
            format!("embedding: table {:?}, ids {:?}, out {:?} do not agree", table.shape, ids.shape, out.shape)
        })?;
        no_alias(out, &[table, ids], "embedding")?;
        let pipeline = self.kernels.pipeline("embedding", || wgsl::EMBEDDING.to_string(), "embedding")?;
        let params = self.kernels.params(&[dim(out.len(), "length")?, dim(cols, "cols")?, dim(vocab, "vocab")?, 0])?;
        self.record(pipeline, params, &[table, ids, out], spread(out.len().div_ceil(256))?);
        Ok(())
    }

    /// `out[b, :]` = the mean of `x[b, l, :]` over the positions `l` whose `mask[b, l]` is
    /// non-zero, weighted by the mask: `x` is `[batch, seq, cols]`, `mask` `[batch, seq]`.
    pub fn mean_pool(&mut self, x: &Tensor, mask: &Tensor, out: &Tensor) -> Result<()> {
        f32s(&[x, mask, out], "mean_pool")?;
        need(x.shape.len() == 3 && mask.shape == x.shape[..2] && out.shape == [x.shape[0], x.shape[2]], || {
            format!(
                "mean_pool: x {:?}, mask {:?}, out {:?} are not [b, l, c], [b, l], [b, c]",
                x.shape, mask.shape, out.shape
            )
        })?;
        no_alias(out, &[x, mask], "mean_pool")?;
        let (batch, seq, cols) = (x.shape[0], x.shape[1], x.shape[2]);
        let pipeline = self.kernels.pipeline("mean_pool", || wgsl::MEAN_POOL.to_string(), "mean_pool")?;
        let params = self.kernels.params(&[dim(batch, "batch")?, dim(seq, "seq")?, dim(cols, "cols")?, 0])?;
        let groups = dim((batch * cols).div_ceil(64), "mean_pool")?;
        need(groups <= MAX_GROUPS_PER_DIM, || format!("mean_pool: {groups} workgroups is too many"))?;
        self.record(pipeline, params, &[x, mask, out], [groups, 1, 1]);
        Ok(())
    }

    /// Each row of the last dimension divided by its L2 norm (at least `eps`).
    pub fn l2_normalize(&mut self, x: &Tensor, eps: f32, out: &Tensor) -> Result<()> {
        f32s(&[x, out], "l2_normalize")?;
        need(out.shape == x.shape, || format!("l2_normalize: out {:?} for x {:?}", out.shape, x.shape))?;
        no_alias(out, &[x], "l2_normalize")?;
        let (rows, cols) = x.rows();
        let pipeline =
            self.kernels.pipeline("l2_normalize", || wgsl::with_row_reduce(wgsl::L2_NORMALIZE), "l2_normalize")?;
        let params = self.kernels.params(&[dim(rows, "rows")?, dim(cols, "cols")?, f32_arg(eps), 0])?;
        self.record(pipeline, params, &[x, out], spread(rows)?);
        Ok(())
    }
}

/// The shape of one [`Batch::attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence (padded; the mask says which are real).
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Multiplies the scores; `1 / sqrt(head_dim)` for scaled dot-product attention.
    pub scale: f32,
    /// First column of the heads in `q`, `k` and `v`.
    pub q_col: usize,
    pub k_col: usize,
    pub v_col: usize,
}
