//! The folders Prospect saves load in `transformers` and compute the same logits as Prospect.
//!
//! Runs `scripts/hf_logits.py` / `scripts/hf_scores.py` with the reference Python environment that
//! `scripts/test.sh` sets up (`PROSPECT_PYTHON`, pins in `scripts/requirements-test.txt`), so the file
//! builds only with `--features live-reference` (which `scripts/test.sh` turns on). With the feature on
//! and no interpreter the tests fail and say how to get it: they never skip.
#![cfg(feature = "live-reference")]

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixtures, hf_scores, run_reference_script, scratch, trl_config};
use prospect::loss::{DpoConfig, LossConfig};
use prospect::model::Policy;
use prospect::train::{train, RunOptions};

fn hf_logits(model_dir: &Path, ids: &[Vec<u32>]) -> (String, Vec<Vec<Vec<f64>>>) {
    let json = run_reference_script("hf_logits.py", model_dir, ids);
    let logits = serde_json::from_value(json["logits"].clone()).unwrap();
    (json["class"].as_str().unwrap().to_string(), logits)
}

#[test]
fn trained_folder_loads_in_transformers_with_equal_logits() {
    let out = scratch("roundtrip-dpo");
    let config = trl_config("paired.jsonl", LossConfig::Dpo(DpoConfig::default()), &out);
    train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let final_dir = out.join("final");

    let ids = vec![vec![330u32, 28, 355, 319, 298, 263, 264, 325, 33, 201, 362, 28, 287]];
    let (class, want) = hf_logits(&final_dir, &ids);
    assert_eq!(class, "LlamaForCausalLM");

    let dev = Device::Cpu;
    let (policy, _) = Policy::load(&final_dir, &dev).unwrap();
    let got: Vec<Vec<Vec<f32>>> =
        policy.model(&dev).unwrap().forward(&Tensor::new(ids, &dev).unwrap()).unwrap().to_vec3().unwrap();
    let mut worst = 0f64;
    for (g, w) in got[0].iter().flatten().zip(want[0].iter().flatten()) {
        worst = worst.max((*g as f64 - w).abs());
    }
    assert!(worst < 1e-4, "largest logit difference Prospect vs transformers: {worst:e}");

    // And the trained model is not the starting one (the check would be vacuous otherwise).
    let (_, start) = hf_logits(
        &fixtures().join("tiny-llama"),
        &[vec![330, 28, 355, 319, 298, 263, 264, 325, 33, 201, 362, 28, 287]],
    );
    let moved =
        start[0].iter().flatten().zip(want[0].iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(moved > 1e-3, "training did not change the logits ({moved:e})");
}

#[test]
fn reward_model_folder_loads_in_transformers_with_equal_scores() {
    // A reward model trained from a causal-LM folder (the score head is initialised) saves as a
    // sequence classifier that `AutoModelForSequenceClassification` loads and scores as Prospect does.
    use prospect::loss::RewardConfig;
    use prospect::model::load_frozen_reward;

    let out = scratch("roundtrip-reward");
    let mut config = trl_config("paired.jsonl", LossConfig::Reward(RewardConfig::default()), &out);
    config.batch_size = 4;
    train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let final_dir = out.join("final");

    // Right-padded with pad = eos = 0: the score sits on the token before the final eos.
    let ids = vec![vec![330u32, 28, 355, 319, 298, 263, 0], vec![54, 307, 201, 0, 0, 0, 0]];
    let (class, num_labels, want) = hf_scores(&final_dir, &ids);
    assert_eq!((class.as_str(), num_labels), ("LlamaForSequenceClassification", 1));

    let dev = Device::Cpu;
    let got: Vec<f32> = load_frozen_reward(&final_dir, &dev)
        .unwrap()
        .scores(&Tensor::new(ids, &dev).unwrap(), 0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-4, "largest score difference Prospect vs transformers: {worst:e} ({got:?} vs {want:?})");
}

#[test]
fn trained_gpt2_and_gpt_neox_folders_load_in_transformers_with_equal_logits() {
    use prospect::loss::KtoConfig;
    let ids = vec![vec![330u32, 28, 355, 319, 298, 263, 264, 325, 33, 201, 362, 28, 287]];
    for (family, class) in [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-gpt-neox", "GPTNeoXForCausalLM")] {
        let out = scratch(&format!("roundtrip-kto-{family}"));
        let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
        config.model = fixtures().join(family);
        train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
        let final_dir = out.join("final");
        let (got_class, want) = hf_logits(&final_dir, &ids);
        assert_eq!(got_class, class);
        let dev = Device::Cpu;
        let (policy, unused) = Policy::load(&final_dir, &dev).unwrap();
        assert!(unused.is_empty(), "{family}: unused tensors {unused:?}");
        let got: Vec<Vec<Vec<f32>>> =
            policy.model(&dev).unwrap().forward(&Tensor::new(ids.clone(), &dev).unwrap()).unwrap().to_vec3().unwrap();
        let worst = got[0]
            .iter()
            .flatten()
            .zip(want[0].iter().flatten())
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-4, "{family}: largest logit difference Prospect vs transformers: {worst:e}");
        let (_, start) = hf_logits(&fixtures().join(family), &ids);
        let moved =
            start[0].iter().flatten().zip(want[0].iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(moved > 1e-3, "{family}: training did not change the logits ({moved:e})");
    }
}

#[test]
fn gpt2_and_gpt_neox_reward_models_load_in_transformers_with_equal_scores() {
    use prospect::loss::RewardConfig;
    use prospect::model::load_frozen_reward;
    let ids = vec![vec![330u32, 28, 355, 319, 298, 263, 0], vec![54, 307, 201, 0, 0, 0, 0]];
    for (family, class) in
        [("tiny-gpt2", "GPT2ForSequenceClassification"), ("tiny-gpt-neox", "GPTNeoXForSequenceClassification")]
    {
        let out = scratch(&format!("roundtrip-reward-{family}"));
        let mut config = trl_config("paired.jsonl", LossConfig::Reward(RewardConfig::default()), &out);
        config.model = fixtures().join(family);
        config.batch_size = 4;
        train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
        let final_dir = out.join("final");
        let (got_class, num_labels, want) = hf_scores(&final_dir, &ids);
        assert_eq!((got_class.as_str(), num_labels), (class, 1));
        let dev = Device::Cpu;
        let got: Vec<f32> = load_frozen_reward(&final_dir, &dev)
            .unwrap()
            .scores(&Tensor::new(ids.clone(), &dev).unwrap(), 0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
        assert!(worst < 1e-4, "{family}: largest score difference {worst:e} ({got:?} vs {want:?})");
    }
}
