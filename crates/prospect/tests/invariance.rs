//! Invariances a correct trainer must have (TRL's habit worth copying):
//! - KTO, split-dependent in general, gives the same update for any split while z0 is fixed: at the
//!   first step policy = reference, so z0 = 0 however rows pair up (every other loss's split invariance
//!   is checked by `loss_conformance.rs`);
//! - a run checkpointed and resumed equals an uninterrupted run;
//! - the saved `final/` reloads to the same logits.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::{close, fixtures, max_abs_diff, scratch, trl_config, weights};
use prospect::loss::{KtoConfig, LossConfig};
use prospect::model::Policy;
use prospect::train::{train, RunOptions, StepMetrics};

fn one_step(data: &str, loss: LossConfig, microbatch: usize, name: &str) -> (StepMetrics, BTreeMap<String, Tensor>) {
    let out = scratch(name);
    let mut config = trl_config(data, loss, &out);
    config.max_steps = Some(1);
    config.microbatch_size = microbatch;
    config.learning_rate = 1e-3;
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    (history[0].clone(), weights(&out.join("final")))
}

fn check_split_invariance(data: &str, loss: LossConfig, name: &str) {
    let (m8, w8) = one_step(data, loss.clone(), 8, &format!("{name}-mb8"));
    let (m2, w2) = one_step(data, loss, 2, &format!("{name}-mb2"));
    assert!(close(m2.loss, m8.loss, 1e-6, 1e-7), "{name}: loss {} (8×1) vs {} (2×4)", m8.loss, m2.loss);
    assert!(close(m2.grad_norm, m8.grad_norm, 1e-5, 1e-7), "{name}: grad_norm {} vs {}", m8.grad_norm, m2.grad_norm);
    // One AdamW step moves each weight by about lr·g/|g| = ±1e-3 whatever the gradient's size, so
    // float-summation noise in tiny gradients shows up at ~5e-6. A real difference between the splits
    // (e.g. a mean of microbatch means) moves weights by a sizeable fraction of lr.
    let diff = max_abs_diff(&w8, &w2);
    assert!(diff < 1e-5, "{name}: weights differ by {diff:e} after one step (lr 1e-3)");
    let start = weights(&fixtures().join("tiny-llama"));
    assert!(max_abs_diff(&start, &w8) > 1e-4, "{name}: the step did not move the weights");
}

#[test]
fn kto_update_does_not_depend_on_the_microbatch_split_when_z0_is_fixed() {
    check_split_invariance("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), "inv-kto");
}

#[test]
fn precomputed_reference_logps_give_the_same_run_and_a_second_run_reuses_them() {
    // Two shuffled epochs: the pre-pass must cover every microbatch of every epoch (KL pairs change
    // with the shuffle). Values are looked up by the exact batch the reference reads, so every epoch is
    // bit-identical to a live reference.
    let run = |precompute: bool, out: &std::path::Path, notices: &mut Vec<String>| {
        let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), out);
        config.max_steps = None;
        config.epochs = 2;
        config.shuffle = true;
        config.precompute_ref_logps = Some(precompute);
        train(&config, &Device::Cpu, RunOptions::default(), &mut |e| {
            if let prospect::train::Event::Notice(n) = e {
                notices.push(n)
            }
        })
        .unwrap()
    };
    let reference_notice = |notices: &[String]| -> String {
        notices.iter().find(|n| n.starts_with("reference log-probs:")).cloned().unwrap_or_default()
    };
    let mut notices = Vec::new();
    let live = run(false, &scratch("ref-live"), &mut notices);
    assert_eq!(reference_notice(&notices), "", "a live reference has no pre-pass");
    let cached_dir = scratch("ref-cached");
    let mut first = Vec::new();
    let cached = run(true, &cached_dir, &mut first);
    assert_eq!(live.len(), cached.len());
    for (a, b) in live.iter().zip(&cached) {
        assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm), "step {}", a.step);
        assert_eq!(a.objective, b.objective, "step {}", a.step);
    }
    // steps × 4 microbatches (8 = 2 × 4) × 2 batches (targets, KL pairs), none seen twice: the shuffle
    // makes every microbatch of the second epoch new.
    let batches = cached.len() * 4 * 2;
    assert!(reference_notice(&first).contains(&format!("{batches} batches computed")), "{first:?}");
    assert!(cached_dir.join("reference_logps.bin").is_file());
    // The same run again in the same folder (any optimizer setting may change): nothing to compute.
    let mut second = Vec::new();
    let again = run(true, &cached_dir, &mut second);
    let notice = reference_notice(&second);
    assert!(notice.contains("0 batches computed") && notice.contains(&format!("{batches} reused")), "{notice}");
    assert!(notice.ends_with("reference model not needed"), "the model is not even loaded: {notice}");
    for (a, b) in live.iter().zip(&again) {
        assert_eq!((a.loss, a.grad_norm, &a.objective), (b.loss, b.grad_norm, &b.objective), "step {}", a.step);
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let loss = LossConfig::Kto(KtoConfig::default());
    // Uninterrupted: 4 steps (two epochs of 16 rows, shuffled, so the order matters).
    let full_dir = scratch("resume-full");
    let mut full = trl_config("unpaired.jsonl", loss.clone(), &full_dir);
    full.max_steps = Some(4);
    full.shuffle = true;
    let full_history = train(&full, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();

    // Interrupted after step 2 (its checkpoint is the last thing written), then resumed to 4.
    let dir = scratch("resume-split");
    let mut first = full.clone();
    first.output_dir = dir.clone();
    first.max_steps = Some(2);
    first.save_every = 2;
    train(&first, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let mut second = first.clone();
    second.max_steps = Some(4);
    // The checkpoint's fingerprint has max_steps = 2 (this stands in for a kill after step 2): a plain
    // --resume refuses it, naming the difference; forcing it continues.
    let refused = train(&second, &Device::Cpu, RunOptions { resume: true, resume_force: false }, &mut |_| {});
    let err = refused.unwrap_err().to_string();
    assert!(err.contains("different run") && err.contains("max_steps: 2 → 4"), "{err}");
    let forced = RunOptions { resume: true, resume_force: true };
    let resumed = train(&second, &Device::Cpu, forced, &mut |_| {}).unwrap();
    assert_eq!(resumed.first().map(|m| m.step), Some(3), "the resumed run must start at step 3");

    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<StepMetrics> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|m| m.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for (a, b) in lines.iter().zip(&full_history) {
        assert_eq!(
            (a.loss, a.grad_norm, a.objective.get("kl")),
            (b.loss, b.grad_norm, b.objective.get("kl")),
            "step {}",
            a.step
        );
    }
    assert_eq!(max_abs_diff(&weights(&dir.join("final")), &weights(&full_dir.join("final"))), 0.0);
}

#[test]
fn saved_model_reloads_to_the_same_logits() {
    let out = scratch("reload");
    let config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let dev = Device::Cpu;
    let (trained, _) = Policy::load(&out.join("final"), &dev).unwrap();
    let (start, _) = Policy::load(&fixtures().join("tiny-llama"), &dev).unwrap();
    let ids = Tensor::new(&[[330u32, 28, 355, 319, 298, 263, 264]], &dev).unwrap();
    let a = trained.model(&dev).unwrap().forward(&ids).unwrap();
    let b = start.model(&dev).unwrap().forward(&ids).unwrap();
    let moved = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-3, "training did not change the saved model");
    // Same files as the input: tokenizer and config travel with the weights; tied head not duplicated.
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "prospect.toml"] {
        assert!(out.join("final").join(f).exists(), "final/ lacks {f}");
    }
    assert!(!weights(&out.join("final")).contains_key("lm_head.weight"));
}

#[test]
fn resume_refuses_what_it_cannot_trust() {
    let dir = scratch("resume-refusals");
    let mut c = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &dir);
    (c.max_steps, c.save_every) = (Some(1), 1);
    let resume = RunOptions { resume: true, resume_force: false };
    // Nothing to resume from: an error, not a silent fresh start.
    let err = train(&c, &Device::Cpu, resume, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("cannot resume") && err.contains("there is no checkpoint"), "{err}");
    train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    // Another learning rate and seed in the same output_dir: every difference is listed.
    let mut other = c.clone();
    (other.learning_rate, other.seed) = (2e-2, 7);
    let err = train(&other, &Device::Cpu, resume, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("learning_rate: 0.01 → 0.02") && err.contains("seed: 0 → 7"), "{err}");
    // Other data: the digest differs.
    let mut data = c.clone();
    data.train_data = fixtures().join("data/paired.jsonl");
    let err = train(&data, &Device::Cpu, resume, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("train_data.sha256"), "{err}");
    // A checkpoint without its trainer state is incomplete, not a fresh start.
    std::fs::remove_file(dir.join("checkpoint/trainer_state.json")).unwrap();
    let err = train(&c, &Device::Cpu, resume, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("incomplete"), "{err}");
}
