//! The real-model path end to end: `configs/smollm2-kto.toml` trains SmolLM2-135M-Instruct (imported
//! from its GGUF by the binary under test) with KTO on LLaMA-Factory's conversational KTO rows.
//! Needs `scripts/fetch_smollm2.sh` and `scripts/fetch_llamafactory_data.sh` (run by scripts/test.sh), so
//! it builds only with `--features live-reference`; with the feature on and either missing it fails.
//!
//! Reference numbers: at step 1 the policy equals the reference, so every log-ratio and z0 are exactly
//! 0 and the loss is 1 − σ(0) = 0.5; the rewards are 0. After one AdamW step at lr 5e-6 the model has
//! moved: step 2's z0 is no longer 0 and its loss differs from 0.5.
#![cfg(feature = "live-reference")]

mod common;

use std::path::Path;

use common::*;

#[test]
fn kto_steps_on_smollm2_and_llamafactory_rows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = root.join("target/smollm2");
    let data = root.join("target/llamafactory/data/kto_en_demo.json");
    assert!(cache.join("READY").exists(), "{}: run scripts/fetch_smollm2.sh first", cache.display());
    assert!(data.exists(), "{}: run scripts/fetch_llamafactory_data.sh first", data.display());

    let dir = scratch("smollm2-kto");
    let model = dir.join("smollm2");
    let gguf = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let o = prospect(&["import", "gguf", gguf.to_str().unwrap(), model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let config = root.join("configs/smollm2-kto.toml");
    let set = |k: &str, v: &Path| format!("{k}=\"{}\"", v.display());
    let o = prospect(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--set",
        &set("model", &model),
        "--set",
        &set("train_data", &data),
        "--set",
        &set("output_dir", &dir.join("run")),
        "--set",
        "max_steps=2",
        "--set",
        "batch_size=4",
        "--set",
        "microbatch_size=2",
        "--set",
        "max_length=64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let f = |i: usize, k: &str| lines[i][k].as_f64().unwrap_or_else(|| panic!("step {}: no {k}", i + 1));
    assert!(
        (f(0, "loss") - 0.5).abs() < 1e-6 && f(0, "kl") == 0.0 && f(0, "rewards/chosen").abs() < 1e-6,
        "{}",
        lines[0]
    );
    assert!(f(0, "grad_norm") > 0.0 && f(1, "grad_norm").is_finite());
    assert!(
        (f(1, "loss") - 0.5).abs() > 1e-7 && f(1, "kl_raw") != 0.0,
        "the first step must move the model: {}",
        lines[1]
    );
    assert!(dir.join("run/final/model.safetensors").exists());
}
