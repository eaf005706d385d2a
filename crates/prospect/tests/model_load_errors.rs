//! Bad model folders: each must be an error that names the file, the field or tensor and what was
//! expected, never a panic. `tests/fixtures/bad/config/` holds inputs the fuzz harness
//! (`scripts/fuzz.sh`) found; each must fail the same way (`bad/tokenizer/`: `tokenizer_panic.rs`). The other cases are `tests/fixtures/tiny-llama`
//! with one field of `config.json` changed.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use prospect::model::{load_frozen, HfTokenizer, ModelConfig, Policy};

/// A copy of `tiny-llama` in a scratch folder, with `edit` applied to its `config.json`.
fn tiny_llama_with(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let dir = common::scratch(name);
    let src = common::fixtures().join("tiny-llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config = common::fixture_json("tiny-llama/config.json");
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir
}

fn bad_inputs(kind: &str) -> Vec<PathBuf> {
    let dir = common::fixtures().join("bad").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no regression inputs in {}", dir.display());
    files
}

fn error_of<T>(result: prospect::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Fuzz findings in `bad/config/`: each names the field at fault. The expected text per file.
#[test]
fn bad_config_fixtures_name_the_field() {
    let expected = [("kv-heads-zero-b5d3616579d86c23.json", "`num_key_value_heads` is 0: expected a divisor of")];
    let inputs = bad_inputs("config");
    assert_eq!(inputs.len(), expected.len(), "a regression input without an expected message: {inputs:?}");
    for (file, text) in expected {
        let dir = common::scratch(&format!("bad-config-{file}"));
        std::fs::copy(common::fixtures().join("bad/config").join(file), dir.join("config.json")).unwrap();
        let message = error_of(ModelConfig::load(&dir));
        assert!(message.contains(&dir.join("config.json").display().to_string()), "{file}: {message}");
        assert!(message.contains(text), "{file}: {message}");
    }
}

/// Zero, inconsistent and absurd sizes, one field at a time: the error names the field and what was
/// expected, before anything divides or allocates (2^62 and 2^40 would overflow or abort otherwise).
#[test]
fn absurd_sizes_name_the_field() {
    let huge = 1u64 << 62;
    let cases: [(&str, serde_json::Value, &str); 11] = [
        ("vocab_size", 0.into(), "`vocab_size` is 0: expected a positive size"),
        ("hidden_size", 0.into(), "`hidden_size` is 0: expected a positive size"),
        ("intermediate_size", 0.into(), "`intermediate_size` is 0: expected a positive size"),
        ("num_hidden_layers", 0.into(), "`num_hidden_layers` is 0: expected a positive size"),
        ("num_attention_heads", 0.into(), "`num_attention_heads` is 0: expected a positive size"),
        ("num_key_value_heads", 3.into(), "`num_key_value_heads` (3) must divide num_attention_heads (4)"),
        ("head_dim", 0.into(), "`head_dim` is 0: expected a positive size"),
        ("head_dim", 7.into(), "RoPE rotates 7 head dimensions: expected an even number"),
        ("hidden_size", huge.into(), "parameters; expected at most 1099511627776"),
        ("vocab_size", huge.into(), "describe more than 2^64 parameters"),
        ("rms_norm_eps", (-1.0).into(), "`rms_norm_eps` is -1: expected a finite number >= 0"),
    ];
    for (k, (field, value, text)) in cases.into_iter().enumerate() {
        let dir = tiny_llama_with(&format!("absurd-{k}-{field}"), |c| {
            c.insert(field.into(), value.clone());
        });
        let message = error_of(ModelConfig::load(&dir));
        assert!(message.contains(text), "{field} = {value}: {message}");
    }
    // Without head_dim, hidden_size / num_attention_heads must be whole: 30 / 4 is not.
    let dir = tiny_llama_with("absurd-head-dim-not-dividing", |c| {
        c.remove("head_dim");
        c.insert("hidden_size".into(), 30.into());
    });
    let message = error_of(ModelConfig::load(&dir));
    assert!(message.contains("`hidden_size` (30) must be a multiple of num_attention_heads (4)"), "{message}");
}

#[test]
fn a_missing_model_folder_is_named() {
    let dir = common::scratch("missing-model-parent").join("no-such-model");
    let shown = dir.display().to_string();
    for message in [
        error_of(HfTokenizer::load(&dir)),
        error_of(ModelConfig::load(&dir)),
        error_of(Policy::load(&dir, &Device::Cpu)),
        error_of(load_frozen(&dir, &Device::Cpu)),
    ] {
        assert_eq!(message, format!("model {shown}: folder does not exist (expected a Hugging Face model folder: config.json, tokenizer.json, model.safetensors)"));
    }
}

/// tiny-llama's tokenizer has ids 0..=399; a config.json with vocab_size 300 is refused when the
/// tokenizer is loaded (not later as `index-select invalid index`), and by the model loader, which
/// finds `embed_tokens` [400, 32] where config.json says [300, 32].
#[test]
fn a_tokenizer_larger_than_the_model_vocabulary_is_refused_at_load() {
    let dir = tiny_llama_with("vocab-mismatch", |c| {
        c.insert("vocab_size".into(), 300.into());
    });
    let message = error_of(HfTokenizer::load(&dir));
    assert!(message.contains("tokenizer.json has token ids up to 399"), "{message}");
    assert!(message.contains("400 tokens, but config.json has vocab_size 300"), "{message}");
    let message = error_of(Policy::load(&dir, &Device::Cpu));
    assert!(
        message.contains("`model.embed_tokens.weight` in the weights has shape [400, 32], config.json says [vocab_size, hidden_size] = [300, 32]"),
        "{message}"
    );
    // The same check for a reference model in another folder, against a tokenizer that loaded.
    let tok = HfTokenizer::load(&common::fixtures().join("tiny-llama")).unwrap();
    let message = error_of(tok.check_fits(&dir));
    assert!(message.contains("up to 399") && message.contains("vocab_size 300"), "{message}");
    // A model vocabulary larger than the tokenizer's (padded, as many checkpoints are) is fine.
    let dir = tiny_llama_with("vocab-padded", |c| {
        c.insert("vocab_size".into(), 512.into());
    });
    HfTokenizer::load(&dir).unwrap();
    tok.check_fits(&dir).unwrap();
}

/// A size in config.json that the weights do not have: the error names the tensor and both shapes.
#[test]
fn config_and_weights_that_disagree_name_the_tensor_and_both_shapes() {
    let dir = tiny_llama_with("shape-mismatch", |c| {
        c.insert("intermediate_size".into(), 48.into());
    });
    let message = error_of(load_frozen(&dir, &Device::Cpu));
    assert!(message.contains("model.layers.0.mlp.gate_proj.weight"), "{message}");
    assert!(message.contains("expected: [48, 32], got: [64, 32]"), "{message}");
    let message = error_of(Policy::load(&dir, &Device::Cpu));
    assert!(message.contains("expected: [48, 32], got: [64, 32]"), "{message}");
}
