//! The adapters Prospect saves, loaded by PEFT 0.21.2 (`PeftModel.from_pretrained(base, final)`), compute
//! Prospect's logits; PEFT's merge and Prospect's `merge_adapter`, loaded by `transformers`, agree too; and a
//! reward model's adapter (`SEQ_CLS`, `score` in `modules_to_save`) gives Prospect's scores.
//!
//! Needs the reference Python (`PROSPECT_PYTHON`, with peft): built only with `--features live-reference`,
//! which `scripts/test.sh` turns on; it then fails, never skips, when Python is missing.
#![cfg(feature = "live-reference")]

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixtures, run_reference_script, scratch, trl_config};
use prospect::config::LoraTable;
use prospect::loss::{DpoConfig, LossConfig, RewardConfig};
use prospect::model::lora::TargetModules;
use prospect::train::{train, RunOptions};
use serde_json::Value;

fn peft(base: &Path, adapter: &Path, ids: &[Vec<u32>], extra: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/peft_logits.py");
    let out = std::process::Command::new(common::python())
        .arg(&script)
        .arg(base)
        .arg(adapter)
        .arg(serde_json::to_string(ids).unwrap())
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "peft failed to load {}:\n{}",
        adapter.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn train_lora(loss: LossConfig, data: &str, name: &str) -> std::path::PathBuf {
    train_lora_on("tiny-llama", loss, data, name)
}

fn train_lora_on(model: &str, loss: LossConfig, data: &str, name: &str) -> std::path::PathBuf {
    let out = scratch(name);
    let mut config = trl_config(data, loss, &out);
    config.model = fixtures().join(model);
    config.lora = Some(LoraTable {
        r: Some(4),
        alpha: Some(8.0),
        target_modules: Some(TargetModules::One("all-linear".into())),
        ..Default::default()
    });
    train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    out.join("final")
}

#[test]
fn peft_loads_the_saved_adapter_and_computes_prospects_logits() {
    peft_round_trip("tiny-llama", "LlamaForCausalLM");
}

#[test]
fn peft_loads_gpt2_conv1d_and_gpt_neox_adapters_and_computes_prospects_logits() {
    peft_round_trip("tiny-gpt2", "GPT2LMHeadModel");
    peft_round_trip("tiny-gpt-neox", "GPTNeoXForCausalLM");
}

/// A DPO adapter on every linear layer of `model`: PEFT's logits, Prospect's merge and PEFT's merge agree.
fn peft_round_trip(model: &str, class: &str) {
    let loss = LossConfig::Dpo(DpoConfig::default());
    let final_dir = train_lora_on(model, loss, "paired.jsonl", &format!("lora-peft-dpo-{model}"));
    let base = fixtures().join(model);
    let ids = vec![vec![1u32, 330, 28, 355, 319, 298, 263, 264], vec![5, 6, 7, 8, 9, 10, 11, 12]];
    let dev = Device::Cpu;
    let ours = prospect::model::load_frozen(&final_dir, &dev)
        .unwrap()
        .forward(&Tensor::new(ids.clone(), &dev).unwrap())
        .unwrap();
    let ours: Vec<f64> = ours.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
    let merged_by_peft = scratch(&format!("lora-peft-merged-{model}")).join("m");
    let json = peft(&base, &final_dir, &ids, &["--merged-out", merged_by_peft.to_str().unwrap()]);
    assert_eq!(json["class"], "PeftModelForCausalLM");
    let theirs = flat(&json["logits"]);
    let base_logits = flat(&run_reference_script("hf_logits.py", &base, &ids)["logits"]);
    assert!(max_diff(&theirs, &base_logits) > 1e-2, "{model}: the adapter changed nothing");
    assert!(max_diff(&ours, &theirs) < 1e-4, "{model}: PEFT vs Prospect: {:e}", max_diff(&ours, &theirs));
    // Prospect's merge, loaded by transformers as a plain model, and PEFT's own merge.
    let merged_by_us = scratch(&format!("lora-prospect-merged-{model}")).join("m");
    prospect::model::merge_adapter(&base, &final_dir, &merged_by_us, &dev).unwrap();
    let json = run_reference_script("hf_logits.py", &merged_by_us, &ids);
    assert_eq!(json["class"], class);
    let merged = flat(&json["logits"]);
    assert!(max_diff(&merged, &theirs) < 1e-4, "merged (transformers) vs PEFT: {:e}", max_diff(&merged, &theirs));
    let peft_merged = flat(&run_reference_script("hf_logits.py", &merged_by_peft, &ids)["logits"]);
    assert!(max_diff(&merged, &peft_merged) < 1e-4, "our merge vs PEFT's: {:e}", max_diff(&merged, &peft_merged));
}

#[test]
fn a_reward_models_adapter_loads_in_peft_with_its_score_head() {
    let final_dir = train_lora(LossConfig::Reward(RewardConfig::default()), "paired.jsonl", "lora-peft-reward");
    let config: Value = serde_json::from_slice(&std::fs::read(final_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["task_type"].as_str(), config["modules_to_save"].clone()),
        (Some("SEQ_CLS"), serde_json::json!(["score"]))
    );
    // Right-padded with pad = 0 (tiny-llama's pad_token_id): the score is read at the last non-pad token.
    let ids = vec![vec![1u32, 330, 28, 355, 319, 298, 263, 264], vec![5, 6, 7, 8, 9, 0, 0, 0]];
    let dev = Device::Cpu;
    let rm = prospect::model::load_frozen_reward(&final_dir, &dev).unwrap();
    let ours: Vec<f64> = rm
        .scores(&Tensor::new(ids.clone(), &dev).unwrap(), 0)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let json = peft(&fixtures().join("tiny-llama"), &final_dir, &ids, &["--seq-cls"]);
    let theirs = flat(&json["scores"]);
    assert!(max_diff(&ours, &theirs) < 1e-4, "scores: prospect {ours:?} vs PEFT {theirs:?}");
}
