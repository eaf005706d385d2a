//! LoRA against TRL 1.16 + PEFT 0.21.2, step for step.
//!
//! Fixtures by `scripts/make_lora_fixtures.py`:
//! - `tiny-llama-lora/`: a PEFT adapter on tiny-llama (r 4, alpha 8, every linear layer) with A and B
//!   both random, so the policy differs from the base from step 1;
//! - `trl_kto_lora.json`, `trl_dpo_lora.json`: TRL's `KTOTrainer` / `DPOTrainer` for 3 steps from
//!   `PeftModel.from_pretrained(base, adapter, is_trainable=True)`. TRL then adds a frozen copy of the
//!   adapter as a second adapter, `ref`, and scores the reference through it: the reference is the
//!   policy as training starts, which is what `init_adapter` gives here;
//! - `trl_lora_fresh.json`: one step from an adapter TRL creates itself (B = 0; reference = adapter off).
//!
//! The trainers' settings are those of `trl_kto.json` / `trl_dpo.json` (`common::trl_config`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{close, fixture_json, fixtures, scratch, trl_config};
use prospect::config::LoraTable;
use prospect::loss::{DpoConfig, KtoConfig, LossConfig};
use prospect::model::lora::ADAPTER_WEIGHTS;
use prospect::train::{train, RunOptions, StepMetrics};
use serde_json::Value;

fn run(data: &str, loss: LossConfig, adapter: &Path, out: &Path, steps: usize) -> Vec<StepMetrics> {
    let mut config = trl_config(data, loss, out);
    config.max_steps = Some(steps);
    config.lora = Some(LoraTable { init_adapter: Some(adapter.to_path_buf()), ..Default::default() });
    train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap()
}

/// Each step's `keys` against TRL's log, to 1e-3 relative (1e-6 absolute: rewards are 0 at step 1).
fn check_steps(fixture: &Value, ours: &[StepMetrics], keys: &[&str]) {
    let steps = fixture["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps.len());
    for (m, s) in ours.iter().zip(steps) {
        for key in keys {
            let want = s["log"][*key].as_f64().unwrap_or_else(|| panic!("TRL logs no `{key}`"));
            let got = common::metric(m, key).unwrap_or_else(|| panic!("step {}: we logged no `{key}`", m.step));
            assert!(close(got, want, 1e-3, 1e-6), "step {} `{key}`: prospect {got} vs TRL {want}", m.step);
        }
    }
}

/// A fixture's `{name: {shape, values}}` tensors.
fn tensors(v: &Value) -> BTreeMap<String, Tensor> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let shape: Vec<usize> =
                t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let values: Vec<f32> = t["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (name.clone(), Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

/// The saved adapter against TRL's final adapter, element by element: within 1e-3 of the largest
/// change any element made over the run.
fn check_final_adapter(fixture: &Value, final_dir: &Path) {
    let want = tensors(&fixture["adapter_final"]);
    let start = tensors(&fixture["adapter_initial"]);
    let got: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(final_dir.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap().into_iter().collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let moved = want.iter().map(|(k, w)| max((w - &start[k]).unwrap())).fold(0f32, f32::max);
    assert!(moved > 1e-2, "TRL's adapter hardly moved ({moved})");
    for (name, w) in &want {
        let diff = max((&got[name] - w).unwrap());
        assert!(diff <= 1e-3 * moved, "{name}: differs from TRL's by {diff:e} (largest move {moved:e})");
    }
}

/// 3 steps from `tiny-llama-lora` against the TRL + PEFT fixture: per-step `keys`, then every adapter tensor.
fn from_the_trained_adapter(fixture: &str, data: &str, loss: LossConfig, keys: &[&str]) {
    let fixture = fixture_json(fixture);
    let out = scratch(&format!("lora-trl-{}", loss.name()));
    let history = run(data, loss, &fixtures().join("tiny-llama-lora"), &out, 3);
    check_steps(&fixture, &history, keys);
    check_final_adapter(&fixture, &out.join("final"));
}

#[test]
fn kto_from_a_trained_adapter_matches_trl_with_peft() {
    let keys = ["loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"];
    from_the_trained_adapter("trl_kto_lora.json", "unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &keys);
}

#[test]
fn dpo_from_a_trained_adapter_matches_trl_with_peft() {
    let keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"];
    from_the_trained_adapter("trl_dpo_lora.json", "paired.jsonl", LossConfig::Dpo(DpoConfig::default()), &keys);
}

/// TRL's fresh adapter (its A from torch's generator, B = 0) written as an adapter folder, so that
/// Prospect starts from the same A. B = 0 makes the frozen copy of it the adapter switched off, which
/// is TRL's reference for a fresh adapter.
fn fresh_adapter_dir(fixture: &Value, name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    let initial = tensors(&fixture["adapter_initial"]);
    assert!(initial
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .all(|(_, t)| { t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0 }));
    let cfg = &fixture["config"]["peft_config"];
    use prospect::model::config::Arch;
    let settings = prospect::model::LoraSettings {
        r: cfg["r"].as_u64().unwrap() as usize,
        alpha: cfg["lora_alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: prospect::model::lora::resolve_targets(
            &cfg["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
            Some(Arch::Llama),
        )
        .unwrap(),
        rslora: false,
    };
    let config = prospect::model::lora::AdapterConfig::new(&settings, "tiny-llama", Arch::Llama, false, vec![]);
    let inner = initial.into_iter().map(|(k, t)| (k.trim_start_matches("base_model.model.").to_string(), t)).collect();
    prospect::model::lora::write_adapter(&dir, &config, &inner).unwrap();
    dir
}

#[test]
fn a_fresh_adapter_takes_trls_first_step() {
    let fixture = fixture_json("trl_lora_fresh.json");
    for (kind, data, loss) in [
        ("kto", "unpaired.jsonl", LossConfig::Kto(KtoConfig::default())),
        ("dpo", "paired.jsonl", LossConfig::Dpo(DpoConfig::default())),
    ] {
        let f = &fixture[kind];
        let adapter = fresh_adapter_dir(f, &format!("lora-fresh-adapter-{kind}"));
        let out = scratch(&format!("lora-trl-fresh-{kind}"));
        let history = run(data, loss, &adapter, &out, 1);
        check_steps(f, &history, &["loss", "grad_norm"]);
    }
}
