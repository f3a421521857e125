//! A BERT encoder (all-MiniLM-L6-v2 and its family) from a model folder as published: weights
//! from `model.safetensors`, sizes from `config.json`, and its forward pass on
//! `wasmgrid::tensor`, recorded into one submission per batch.

use std::collections::HashMap;

use serde_json::Value;
use wasmgrid::tensor::{Attention, Kernels, Matmul, Tensor};
use wasmgrid::{Error, Result};

/// The sizes of a BERT encoder, from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub layer_norm_eps: f32,
}

fn bad(why: impl Into<String>) -> Error {
    Error::bad_input(why.into())
}

impl Config {
    /// Reads `config.json`; only what this encoder runs is accepted (absolute positions, the
    /// exact GELU).
    pub fn parse(json: &[u8]) -> Result<Config> {
        let v: Value = serde_json::from_slice(json).map_err(|e| bad(format!("config.json: {e}")))?;
        let size = |key: &str, most: u64| -> Result<usize> {
            match v.get(key).and_then(Value::as_u64) {
                Some(n) if (1..=most).contains(&n) => Ok(n as usize),
                Some(n) => Err(bad(format!("config.json: {key} = {n} is not in 1..={most}"))),
                None => Err(bad(format!("config.json has no whole number {key}"))),
            }
        };
        let text = |key: &str, default: &str| v.get(key).and_then(Value::as_str).unwrap_or(default).to_string();
        let config = Config {
            hidden: size("hidden_size", 4096)?,
            layers: size("num_hidden_layers", 64)?,
            heads: size("num_attention_heads", 128)?,
            intermediate: size("intermediate_size", 16384)?,
            vocab: size("vocab_size", 1 << 20)?,
            max_positions: size("max_position_embeddings", 8192)?,
            type_vocab: size("type_vocab_size", 16)?,
            layer_norm_eps: v.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-12) as f32,
        };
        if text("hidden_act", "gelu") != "gelu" {
            return Err(bad(format!(
                "config.json: hidden_act {:?}; only the exact \"gelu\" is supported",
                text("hidden_act", "")
            )));
        }
        if text("position_embedding_type", "absolute") != "absolute" {
            return Err(bad("config.json: only absolute position embeddings are supported"));
        }
        let head = config.hidden / config.heads;
        if !config.hidden.is_multiple_of(config.heads) || head > 128 || !head.is_multiple_of(4) {
            return Err(bad(format!(
                "config.json: {} hidden units do not split into {} heads of a multiple of 4 up to 128",
                config.hidden, config.heads
            )));
        }
        if !(config.layer_norm_eps.is_finite() && config.layer_norm_eps > 0.0) {
            return Err(bad(format!(
                "config.json: layer_norm_eps {} is not a small positive number",
                config.layer_norm_eps
            )));
        }
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// One tensor's place in a safetensors file.
#[derive(Debug)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// A parsed `model.safetensors`: its header checked against the data it describes.
#[derive(Debug)]
pub struct SafeTensors<'a> {
    data: &'a [u8],
    entries: HashMap<String, Entry>,
}

/// The largest header read (MiniLM's is 11 KB).
const MAX_HEADER: usize = 16 << 20;

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "F64" | "I64" | "U64" => Some(8),
        "F32" | "I32" | "U32" => Some(4),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
        _ => None,
    }
}

impl<'a> SafeTensors<'a> {
    /// Parses the header (an 8-byte little-endian length, then JSON) and checks that every
    /// tensor lies inside the data with the size its dtype and shape give.
    pub fn parse(bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
        let len = bytes.get(..8).ok_or_else(|| bad("model.safetensors is shorter than its 8-byte header length"))?;
        let len = u64::from_le_bytes(len.try_into().map_err(|_| bad("model.safetensors: bad header length"))?);
        let len = usize::try_from(len).ok().filter(|&n| n <= MAX_HEADER && n <= bytes.len() - 8).ok_or_else(|| {
            bad(format!("model.safetensors: a header of {len} bytes does not fit in the {}-byte file", bytes.len()))
        })?;
        let header: Value = serde_json::from_slice(&bytes[8..8 + len])
            .map_err(|e| bad(format!("model.safetensors: the header is not JSON: {e}")))?;
        let data = &bytes[8 + len..];
        let object = header.as_object().ok_or_else(|| bad("model.safetensors: the header is not a JSON object"))?;
        let mut entries = HashMap::new();
        for (name, v) in object {
            if name == "__metadata__" {
                continue;
            }
            let broken = |why: &str| bad(format!("model.safetensors: tensor {name:?} {why}"));
            let dtype = v.get("dtype").and_then(Value::as_str).ok_or_else(|| broken("has no dtype"))?;
            let size = dtype_size(dtype).ok_or_else(|| broken("has an unknown dtype"))?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| broken("has no shape"))?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| broken("has a shape that is not whole numbers"))?;
            let offsets =
                v.get("data_offsets").and_then(Value::as_array).ok_or_else(|| broken("has no data_offsets"))?;
            let offset = |i: usize| offsets.get(i).and_then(Value::as_u64).and_then(|o| usize::try_from(o).ok());
            let (Some(begin), Some(end), 2) = (offset(0), offset(1), offsets.len()) else {
                return Err(broken("has data_offsets that are not two whole numbers"));
            };
            let bytes_needed = shape.iter().try_fold(size, |n, &d| n.checked_mul(d));
            if begin > end || end > data.len() || bytes_needed != Some(end - begin) {
                return Err(broken(&format!(
                    "of shape {shape:?} ({dtype}) does not match its bytes {begin}..{end} of {}",
                    data.len()
                )));
            }
            entries.insert(name.clone(), Entry { dtype: dtype.to_string(), shape, begin, end });
        }
        Ok(SafeTensors { data, entries })
    }

    /// The little-endian bytes of `F32` tensor `name` (or `bert.name`, as some exports call
    /// it), which must have `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<&'a [u8]> {
        let entry = self
            .entries
            .get(name)
            .or_else(|| self.entries.get(&format!("bert.{name}")))
            .ok_or_else(|| bad(format!("model.safetensors has no tensor {name}")))?;
        if entry.dtype != "F32" || entry.shape != shape {
            return Err(bad(format!(
                "model.safetensors: {name} is {} {:?}, expected F32 {shape:?}",
                entry.dtype, entry.shape
            )));
        }
        Ok(&self.data[entry.begin..entry.end])
    }

    /// Tensor `name` as `f32` values.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(wasmgrid::from_bytes(self.f32(name, shape)?))
    }
}

/// Tokens in one submission at most (sentences x their padded length): the widest activation
/// (the intermediate layer, 1,536 floats a token for MiniLM) then stays within the 128 MiB a
/// storage binding may hold on every adapter. [`Encoder::tokens_per_submission`] says how many
/// for a given model.
pub const MAX_TOKENS: usize = 16_384;

/// The least storage-binding size every adapter offers (WebGPU's default limit).
const BINDING_BYTES: usize = 128 << 20;

/// One encoder layer's weights on the GPU.
#[derive(Debug)]
struct Layer {
    /// Query, key and value projections as one `[3 * hidden, hidden]` weight: one matmul.
    qkv_w: Tensor,
    qkv_b: Tensor,
    attn_out_w: Tensor,
    attn_out_b: Tensor,
    attn_norm_g: Tensor,
    attn_norm_b: Tensor,
    inter_w: Tensor,
    inter_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    out_norm_g: Tensor,
    out_norm_b: Tensor,
}

/// Activations for up to `tokens` tokens and `sentences` sentences, made once for the largest
/// batch seen and viewed smaller for smaller ones.
#[derive(Debug)]
struct Scratch {
    tokens: usize,
    sentences: usize,
    ids: Tensor,
    mask: Tensor,
    emb: Tensor,
    xa: Tensor,
    xb: Tensor,
    tmp: Tensor,
    ctx: Tensor,
    qkv: Tensor,
    inter: Tensor,
    pooled: Tensor,
    out: Tensor,
}

impl Scratch {
    fn new(c: &Config, tokens: usize, sentences: usize) -> Result<Scratch> {
        let h = c.hidden;
        Ok(Scratch {
            tokens,
            sentences,
            ids: Tensor::zeros_u32(&[tokens])?,
            mask: Tensor::zeros(&[tokens])?,
            emb: Tensor::zeros(&[tokens, h])?,
            xa: Tensor::zeros(&[tokens, h])?,
            xb: Tensor::zeros(&[tokens, h])?,
            tmp: Tensor::zeros(&[tokens, h])?,
            ctx: Tensor::zeros(&[tokens, h])?,
            qkv: Tensor::zeros(&[tokens, 3 * h])?,
            inter: Tensor::zeros(&[tokens, c.intermediate])?,
            pooled: Tensor::zeros(&[sentences, h])?,
            out: Tensor::zeros(&[sentences, h])?,
        })
    }
}

/// A BERT encoder with mean pooling, ready on the GPU.
#[derive(Debug)]
pub struct Encoder {
    pub config: Config,
    word: Tensor,
    /// Position embeddings with the token-type-0 embedding added (every sentence is type 0).
    pos_type: Tensor,
    norm_g: Tensor,
    norm_b: Tensor,
    layers: Vec<Layer>,
    kernels: Kernels,
    scratch: Option<Scratch>,
    /// Whether embeddings are scaled to unit length (a `Normalize` module follows pooling).
    pub normalize: bool,
}

impl Encoder {
    /// Uploads the weights of `config` from `weights`.
    pub fn load(config: Config, weights: &SafeTensors<'_>, normalize: bool) -> Result<Encoder> {
        let (h, i) = (config.hidden, config.intermediate);
        let up = |name: &str, shape: &[usize]| Tensor::from_f32_bytes(shape, weights.f32(name, shape)?);
        let word = up("embeddings.word_embeddings.weight", &[config.vocab, h])?;
        let pos = weights.values("embeddings.position_embeddings.weight", &[config.max_positions, h])?;
        let types = weights.values("embeddings.token_type_embeddings.weight", &[config.type_vocab, h])?;
        let pos_type: Vec<f32> = pos.iter().enumerate().map(|(k, p)| p + types[k % h]).collect();
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let name = |part: &str| format!("encoder.layer.{l}.{part}");
            let mut qkv_w = Vec::with_capacity(3 * h * h * 4);
            let mut qkv_b = Vec::with_capacity(3 * h * 4);
            for part in ["query", "key", "value"] {
                qkv_w.extend_from_slice(weights.f32(&name(&format!("attention.self.{part}.weight")), &[h, h])?);
                qkv_b.extend_from_slice(weights.f32(&name(&format!("attention.self.{part}.bias")), &[h])?);
            }
            layers.push(Layer {
                qkv_w: Tensor::from_f32_bytes(&[3 * h, h], &qkv_w)?,
                qkv_b: Tensor::from_f32_bytes(&[3 * h], &qkv_b)?,
                attn_out_w: up(&name("attention.output.dense.weight"), &[h, h])?,
                attn_out_b: up(&name("attention.output.dense.bias"), &[h])?,
                attn_norm_g: up(&name("attention.output.LayerNorm.weight"), &[h])?,
                attn_norm_b: up(&name("attention.output.LayerNorm.bias"), &[h])?,
                inter_w: up(&name("intermediate.dense.weight"), &[i, h])?,
                inter_b: up(&name("intermediate.dense.bias"), &[i])?,
                out_w: up(&name("output.dense.weight"), &[h, i])?,
                out_b: up(&name("output.dense.bias"), &[h])?,
                out_norm_g: up(&name("output.LayerNorm.weight"), &[h])?,
                out_norm_b: up(&name("output.LayerNorm.bias"), &[h])?,
            });
        }
        Ok(Encoder {
            word,
            pos_type: Tensor::from_f32(&[config.max_positions, h], &pos_type)?,
            norm_g: up("embeddings.LayerNorm.weight", &[h])?,
            norm_b: up("embeddings.LayerNorm.bias", &[h])?,
            layers,
            kernels: Kernels::new(),
            scratch: None,
            normalize,
            config,
        })
    }

    /// Tokens one submission may hold (sentences x padded length): the widest activation
    /// within one storage binding.
    pub fn tokens_per_submission(&self) -> usize {
        let widest = self.config.intermediate.max(3 * self.config.hidden) * 4;
        (BINDING_BYTES / widest).clamp(1, MAX_TOKENS)
    }

    /// The pooled embeddings of `batch` (token ids, each `[CLS] .. [SEP]`, at most
    /// `max_positions` long), `hidden` floats per sentence, in one GPU submission.
    pub fn embed(&mut self, batch: &[Vec<u32>], pad: u32) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let (b, h) = (batch.len(), c.hidden);
        let l = batch.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || l == 0 || l > c.max_positions {
            return Err(Error::kernel(format!("a batch of {b} sentences of up to {l} tokens cannot be embedded")));
        }
        let t = b * l;
        let mut ids = vec![pad; t];
        let mut mask = vec![0.0f32; t];
        for (s, sentence) in batch.iter().enumerate() {
            ids[s * l..s * l + sentence.len()].copy_from_slice(sentence);
            mask[s * l..s * l + sentence.len()].fill(1.0);
        }
        let fits = self.scratch.as_ref().is_some_and(|s| s.tokens >= t && s.sentences >= b);
        if !fits {
            // Drop the old scratch first: both at once may not fit the job's GPU memory. Room
            // for a few more tokens than asked, so that batches a little longer reuse it.
            self.scratch = None;
            let tokens = t.div_ceil(256).saturating_mul(256).min(self.tokens_per_submission().max(t));
            self.scratch = Some(Scratch::new(&c, tokens, b)?);
        }
        let Some(s) = self.scratch.as_ref() else { return Err(Error::kernel("no scratch space")) };
        let ids_t = s.ids.view(&[t])?;
        let mask_t = s.mask.view(&[b, l])?;
        ids_t.write_u32(&ids)?;
        mask_t.write_f32(&mask)?;
        let rows = |x: &Tensor, cols: usize| x.view(&[t, cols]);
        let (emb, xa, xb, tmp, ctx) =
            (rows(&s.emb, h)?, rows(&s.xa, h)?, rows(&s.xb, h)?, rows(&s.tmp, h)?, rows(&s.ctx, h)?);
        let (qkv, inter) = (rows(&s.qkv, 3 * h)?, rows(&s.inter, c.intermediate)?);
        let pooled = s.pooled.view(&[b, h])?;
        let out = s.out.view(&[b, h])?;
        let linear = Matmul { trans_b: true, ..Matmul::default() };
        let attention = Attention {
            batch: b,
            seq: l,
            heads: c.heads,
            head_dim: c.head_dim(),
            scale: 1.0 / (c.head_dim() as f32).sqrt(),
            q_col: 0,
            k_col: h,
            v_col: 2 * h,
        };
        let mut run = self.kernels.batch();
        run.embedding(&self.word, &ids_t, &emb)?;
        run.add(&emb, &self.pos_type.view(&[l, h])?, &xb)?;
        run.layer_norm(&xb, None, &self.norm_g, &self.norm_b, c.layer_norm_eps, &xa)?;
        for layer in &self.layers {
            run.matmul(&xa, &layer.qkv_w, Some(&layer.qkv_b), &qkv, linear)?;
            run.attention(&qkv, &qkv, &qkv, &mask_t, &ctx, attention)?;
            run.matmul(&ctx, &layer.attn_out_w, Some(&layer.attn_out_b), &tmp, linear)?;
            run.layer_norm(&tmp, Some(&xa), &layer.attn_norm_g, &layer.attn_norm_b, c.layer_norm_eps, &xb)?;
            run.matmul(&xb, &layer.inter_w, Some(&layer.inter_b), &inter, Matmul { gelu: true, ..linear })?;
            run.matmul(&inter, &layer.out_w, Some(&layer.out_b), &tmp, linear)?;
            run.layer_norm(&tmp, Some(&xb), &layer.out_norm_g, &layer.out_norm_b, c.layer_norm_eps, &xa)?;
        }
        run.mean_pool(&xa.view(&[b, l, h])?, &mask_t, &pooled)?;
        let result = if self.normalize {
            run.l2_normalize(&pooled, 1e-12, &out)?;
            &out
        } else {
            &pooled
        };
        run.run()?;
        result.read_f32()
    }
}
