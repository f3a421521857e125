//! Real models in the sandbox against the outputs of their reference implementations.

use std::path::Path;

use host::{Failure, Limits, StartError};
use serde_json::Value;

use crate::host;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/minilm/fixtures/reference.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn start(init: Vec<u8>) -> Result<host::Service, StartError> {
    let module = host().load(&sample_artifacts::read(sample_artifacts::MINILM)).unwrap();
    host().start_service(&module, init, &Limits::default())
}

fn init_failure(init: Vec<u8>) -> String {
    match start(init) {
        Err(StartError::Failed(f)) => f.failure.to_string(),
        Err(e) => panic!("expected an init failure, got {e}"),
        Ok(_) => panic!("expected an init failure, it started"),
    }
}

#[test]
pub(crate) fn minilm() {
    let reference = fixture();
    let sentences = reference["sentences"].as_array().unwrap();
    assert!(sentences.len() >= 50);
    let mut service = start(host::bundle_dir(&sample_artifacts::minilm_dir()).unwrap()).unwrap();
    // Batches of sentences of similar length (fewer padded positions), so masks matter: each
    // batch still mixes lengths.
    let mut order: Vec<usize> = (0..sentences.len()).collect();
    order.sort_by_key(|&i| sentences[i]["ids"].as_array().unwrap().len());
    let mut worst = 1.0f64;
    for batch in order.chunks(8) {
        let texts: Vec<&str> = batch.iter().map(|&i| sentences[i]["text"].as_str().unwrap()).collect();
        let request = serde_json::to_vec(&texts).unwrap();
        let got = service.infer(&request).unwrap();
        let text = String::from_utf8(got.response).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), batch.len(), "one line per sentence");
        for (&i, line) in batch.iter().zip(lines) {
            let got: Vec<f64> = serde_json::from_str(line).unwrap();
            let want: Vec<f64> =
                sentences[i]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(got.len(), 384);
            let c = cosine(&got, &want);
            worst = worst.min(c);
            // The bar, on every sentence: accents, CJK, emoji, over-long text alike.
            assert!(c >= 0.9999, "sentence {i} {:?}: cosine {c}", texts);
        }
    }
    eprintln!("minilm: worst cosine against sentence-transformers over {} sentences: {worst}", sentences.len());

    // The weights alone (vocabulary and configuration built in) serve the same embeddings.
    let mut alone = start(std::fs::read(sample_artifacts::minilm_dir().join("model.safetensors")).unwrap()).unwrap();
    let first_text = sentences[order[0]]["text"].as_str().unwrap();
    assert_eq!(
        alone.infer(format!("{first_text}\n").as_bytes()).unwrap().response,
        service.infer(format!("{first_text}\n").as_bytes()).unwrap().response
    );
    drop(alone);

    // The same sentence as text and as raw floats: the same embedding.
    let first = sentences[0]["text"].as_str().unwrap();
    let json_line = String::from_utf8(service.infer(format!("{first}\n").as_bytes()).unwrap().response).unwrap();
    let as_json: Vec<f32> = serde_json::from_str(&json_line).unwrap();
    let request = serde_json::json!({"sentences": [first], "encoding": "f32le"}).to_string();
    let raw = service.infer(request.as_bytes()).unwrap().response;
    assert_eq!(bytemuck::pod_collect_to_vec::<u8, f32>(&raw), as_json);

    // Bad requests fail with a reason, and the service goes on serving.
    for (bad, why) in [(&b"[\"unterminated"[..], "not valid JSON"), (b"\xff", "UTF-8"), (b"{\"sentences\": 3}", "list")]
    {
        match service.infer(bad) {
            Err(Failure::Guest(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(service.infer(format!("{first}\n").as_bytes()).unwrap().response, json_line.as_bytes());
}

#[test]
fn minilm_init_refuses_a_broken_model_folder_saying_what_is_wrong() {
    let dir = sample_artifacts::minilm_dir();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let folder = |skip: &str, replace: Option<(&str, Vec<u8>)>| {
        let mut files: Vec<(String, Vec<u8>)> = ["config.json", "vocab.txt", "model.safetensors", "modules.json"]
            .into_iter()
            .filter(|n| *n != skip)
            .map(|n| (n.to_string(), read(n)))
            .collect();
        if let Some((name, bytes)) = replace {
            files.retain(|(n, _)| n != name);
            files.push((name.to_string(), bytes));
        }
        abi::files::encode(&files).unwrap()
    };
    // Neither a folder nor weights.
    assert!(init_failure(b"not a model at all".to_vec()).contains("--init MODEL_DIR"));
    assert!(init_failure(folder("vocab.txt", None)).contains("no vocab.txt"));
    let mut weights = read("model.safetensors");
    weights.truncate(weights.len() / 2);
    assert!(init_failure(folder("", Some(("model.safetensors", weights)))).contains("does not match its bytes"));
    let mut header = read("model.safetensors");
    header[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(init_failure(folder("", Some(("model.safetensors", header)))).contains("header of"));
    let config = String::from_utf8(read("config.json")).unwrap().replace("\"gelu\"", "\"relu\"");
    assert!(init_failure(folder("", Some(("config.json", config.into_bytes())))).contains("hidden_act"));
    let config = String::from_utf8(read("config.json")).unwrap().replace("30522", "30000");
    assert!(init_failure(folder("", Some(("config.json", config.into_bytes())))).contains("vocab.txt has 30522"));
    let mut bundle = folder("", None);
    bundle.truncate(bundle.len() - 1);
    assert!(init_failure(bundle).contains("not a file bundle"));
    // And the real folder still starts.
    assert!(start(folder("", None)).is_ok());
}
