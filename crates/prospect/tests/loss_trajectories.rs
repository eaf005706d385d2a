//! What the losses of issue 3 need beyond the conformance suite (`loss_conformance.rs`, which runs every
//! loss against its reference trajectory): their data, saved folders, chaining and side inputs.
//!
//! * `trl_ipo.json`, `trl_reward.json`: TRL 1.16's `DPOTrainer(loss_type=["ipo"])` and `RewardTrainer`.
//! * `torch_<loss>.json`: a small PyTorch reimplementation of Prospect's loop with the formula of each loss
//!   (TRL's own `cpo_loss` / `odds_ratio_loss` for SimPO and ORPO), for the losses TRL trains differently.
//! * `reward_roundtrip.json`: the scores `transformers` gives Prospect's saved reward model.
//!
//! All written by `scripts/make_loss_fixtures.py` (torch 2.15.0, transformers 5.24.0, trl 1.16.0).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{compare_steps, fixture_json, fixtures, scratch, trl_config};
use prospect::data::{collate_sequences, prepare, read_jsonl, Examples, Sequence, Shape};
use prospect::eval::{generate, GenerateConfig};
use prospect::loss::*;
use prospect::model::{load_frozen, load_frozen_reward, load_tensors, HfTokenizer};
use prospect::train::{train, RunOptions, StepMetrics};
use prospect::TrainConfig;
use serde_json::Value;

/// The setting: microbatch 2 × accumulation 2.
fn config(model: &Path, data: &str, loss: LossConfig, out: &Path, max_length: usize) -> TrainConfig {
    let mut c = trl_config(data, loss, out);
    c.model = model.to_path_buf();
    c.batch_size = 4;
    c.microbatch_size = 2;
    c.max_length = max_length;
    c
}

fn run(c: &TrainConfig) -> Vec<StepMetrics> {
    train(c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap()
}

fn tiny_llama() -> PathBuf {
    fixtures().join("tiny-llama")
}

fn reward_run(name: &str) -> (Vec<StepMetrics>, PathBuf) {
    let out = scratch(name);
    let c = config(
        &fixtures().join("tiny-llama-rm"),
        "paired.jsonl",
        LossConfig::Reward(RewardConfig::default()),
        &out,
        64,
    );
    (run(&c), out)
}

#[test]
fn reward_rows_tokenize_as_trl_does() {
    // The trajectory itself is checked by `loss_conformance.rs`.
    let fixture = fixture_json("trl_reward.json");
    // Same token ids as TRL's RewardTrainer (prompt + response + eos, tokenized as one string).
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama-rm")).unwrap();
    let path = fixtures().join("data/paired.jsonl");
    let Examples::Paired(ex) = prepare(read_jsonl(&path).unwrap(), Shape::Paired, &tok, 64, &path).unwrap().0 else {
        panic!()
    };
    let joined =
        |s: &Sequence| -> Vec<u64> { s.prompt_ids.iter().chain(&s.completion_ids).map(|&i| i as u64).collect() };
    for (e, row) in ex.iter().zip(fixture["rows"].as_array().unwrap()) {
        let ids = |k: &str| -> Vec<u64> { row[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect() };
        assert_eq!(joined(&e.chosen), ids("chosen_ids"));
        assert_eq!(joined(&e.rejected), ids("rejected_ids"));
    }
}

/// Prospect's reward run, its saved `final/` and the right-padded token ids of every pair of paired.jsonl
/// (chosen rows, then rejected rows) with the scores Prospect's own reward model gives them.
fn reward_run_scores(name: &str) -> (PathBuf, Vec<Vec<u32>>, Vec<f32>) {
    let (_, out) = reward_run(name);
    let final_dir = out.join("final");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["pad_token_id"], 0);
    assert_eq!(config["id2label"].as_object().unwrap().len(), 1, "num_labels = 1");

    let rm = load_frozen_reward(&final_dir, &Device::Cpu).unwrap();
    let tok = HfTokenizer::load(&final_dir).unwrap();
    let path = fixtures().join("data/paired.jsonl");
    let Examples::Paired(ex) = prepare(read_jsonl(&path).unwrap(), Shape::Paired, &tok, 64, &path).unwrap().0 else {
        panic!()
    };
    let seqs: Vec<&Sequence> = ex.iter().map(|e| &e.chosen).chain(ex.iter().map(|e| &e.rejected)).collect();
    let batch = collate_sequences(&seqs, 64, tok.pad_token_id, &Device::Cpu).unwrap();
    let scores: Vec<f32> = rm.scores(&batch.input_ids, tok.pad_token_id).unwrap().to_vec1().unwrap();
    (final_dir, batch.input_ids.to_vec2().unwrap(), scores)
}

#[test]
fn reward_model_scores_equal_the_recorded_transformers_scores() {
    // Hermetic: `reward_roundtrip.json` holds the scores transformers gave the final/ of this same run when
    // the fixture was written (`make_loss_fixtures.py --roundtrip`). This catches a drift of the run or of
    // the scoring; loading *today's* final/ in transformers is `reward_model_round_trips_through_transformers`
    // (live-reference).
    let (_, _, scores) = reward_run_scores("reward-recorded");
    let fixture = fixture_json("reward_roundtrip.json");
    assert_eq!(fixture["loaded_class"], "LlamaForSequenceClassification");
    let want: Vec<f64> = ["chosen_scores", "rejected_scores"]
        .iter()
        .flat_map(|k| fixture[*k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>())
        .collect();
    assert_eq!(scores.len(), want.len());
    let worst = scores.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "largest score difference {worst}: prospect {scores:?} vs transformers {want:?}");
}

#[test]
#[cfg(feature = "live-reference")]
fn reward_model_round_trips_through_transformers() {
    // Live: transformers loads the final/ this run just saved and scores the same ids as Prospect does.
    let (final_dir, ids, scores) = reward_run_scores("reward-roundtrip");
    let (class, num_labels, want) = common::hf_scores(&final_dir, &ids);
    assert_eq!((class.as_str(), num_labels), ("LlamaForSequenceClassification", 1));
    assert_eq!(scores.len(), want.len());
    let worst = scores.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "largest score difference {worst}: prospect {scores:?} vs transformers {want:?}");
}

/// Check a PyTorch-reimplementation trajectory.
fn torch_trajectory(loss: LossConfig, data: &str, model: &Path, keys: &[&str]) {
    torch_trajectory_within(loss, data, model, keys, &STRICT)
}

fn torch_trajectory_within(loss: LossConfig, data: &str, model: &Path, keys: &[&str], rel: &[f64]) {
    let name = loss.name();
    let fixture = fixture_json(&format!("torch_{name}.json"));
    let out = scratch(&format!("torch-{name}"));
    let history = run(&config(model, data, loss, &out, 32));
    let mut all = vec!["loss", "grad_norm"];
    all.extend_from_slice(keys);
    compare_steps(name, &fixture, &history, &all, rel);
}

/// The tolerance: 1e-3 relative at every step.
const STRICT: [f64; 3] = [1e-3; 3];

#[test]
fn csft_matches_pytorch_and_saves_the_control_tokens() {
    torch_trajectory(LossConfig::Csft(CsftConfig::default()), "unpaired.jsonl", &tiny_llama(), &[]);
    // The saved folder knows the new tokens and has the grown embedding matrix.
    let final_dir = scratch_path("torch-csft").join("final");
    let tok = HfTokenizer::load(&final_dir).unwrap();
    assert_eq!(tok.token_id("<|good|>").unwrap(), 400);
    assert_eq!(tok.token_id("<|bad|>").unwrap(), 401);
    let tensors = load_tensors(&final_dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tensors["model.embed_tokens.weight"].dims(), &[402, 32]);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 402);

    // Generation conditions on <|good|>: the suffix option equals writing the token after the prompt.
    let model = load_frozen(&final_dir, &Device::Cpu).unwrap();
    let suffix = CsftConfig::default().generation_suffix();
    assert_eq!(suffix, vec!["<|good|>".to_string()]);
    let prompts = vec![tok.encode("What do birds do?").unwrap()];
    let with_option = GenerateConfig { max_new_tokens: 6, append_tokens: suffix, ..Default::default() };
    let a = generate(&model, &tok, &prompts, &with_option, &Device::Cpu, &mut |_| {}).unwrap();
    let by_hand: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().copied().chain([400]).collect()).collect();
    let plain = GenerateConfig { max_new_tokens: 6, ..Default::default() };
    let b = generate(&model, &tok, &by_hand, &plain, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(a, b);
}

#[test]
fn ppo_offline_matches_pytorch() {
    // Start from tiny-llama plus the value head the PyTorch run started from.
    let model = scratch("ppo-model");
    for entry in std::fs::read_dir(tiny_llama()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    std::fs::copy(fixtures().join("ppo_value_head.safetensors"), model.join("value_head.safetensors")).unwrap();
    torch_trajectory(
        LossConfig::PpoOffline(PpoOfflineConfig::default()),
        "unpaired.jsonl",
        &model,
        &["loss/policy", "loss/critic", "clipfrac"],
    );
    let final_dir = scratch_path("torch-ppo_offline").join("final");
    assert!(final_dir.join("value_head.safetensors").exists());
    let lm = load_tensors(&final_dir, DType::F32, &Device::Cpu).unwrap();
    assert!(lm.keys().all(|k| !k.starts_with("v_head.")), "the LM checkpoint stays a plain causal LM");
}

fn scratch_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

#[test]
fn sft_then_kto_chains_through_final() {
    // Step 1: SFT. Step 2: KTO with the SFT model as both policy and reference (`reference = ...`).
    let sft_out = scratch("chain-sft");
    let mut sft = trl_config("sft.jsonl", LossConfig::Sft(SftConfig::default()), &sft_out);
    sft.max_steps = Some(2);
    run(&sft);
    let sft_final = sft_out.join("final");

    let kto_out = scratch("chain-kto");
    let mut kto = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &kto_out);
    kto.model = sft_final.clone();
    kto.reference = Some(sft_final.clone());
    kto.max_steps = Some(1);
    let history = run(&kto);
    // Policy = reference at the first step: every log-ratio is 0, so z0 = 0 and the loss is 1 − σ(0).
    assert!((history[0].loss - 0.5).abs() < 1e-6, "{:?}", history[0]);
    assert_eq!(history[0].objective.get("kl"), Some(0.0));
    assert!(history[0].objective.get("rewards/chosen").unwrap().abs() < 1e-6);

    // The reference really comes from `reference`: starting from tiny-llama against the SFT model, the
    // first step already has non-zero rewards.
    let mixed_out = scratch("chain-mixed");
    let mut mixed = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &mixed_out);
    mixed.reference = Some(sft_final);
    mixed.max_steps = Some(1);
    let history = run(&mixed);
    assert!(history[0].objective.get("rewards/chosen").unwrap().abs() > 1e-3, "{:?}", history[0]);
    // And the chained config round-trips with its reference path.
    let saved = std::fs::read_to_string(mixed_out.join("final/prospect.toml")).unwrap();
    assert!(saved.contains("reference = "), "{saved}");
}

#[test]
fn reward_model_starts_from_a_causal_lm_folder() {
    // tiny-llama has no score.weight: it is initialised (and said so), trained, and saved without lm_head.
    let out = scratch("reward-from-lm");
    let mut c = config(&tiny_llama(), "paired.jsonl", LossConfig::Reward(RewardConfig::default()), &out, 64);
    c.max_steps = Some(1);
    let mut notices = vec![];
    let history = train(&c, &Device::Cpu, RunOptions::default(), &mut |e| {
        if let prospect::train::Event::Notice(n) = e {
            notices.push(n)
        }
    })
    .unwrap();
    assert!(history[0].loss.is_finite() && history[0].objective.get("accuracy").is_some());
    assert!(notices.iter().any(|n| n.contains("score.weight")), "{notices:?}");
    let tensors = load_tensors(&out.join("final"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tensors["score.weight"].dims(), &[1, 32]);
    assert!(!tensors.contains_key("lm_head.weight"));
}

#[test]
fn ppo_offline_takes_rewards_from_a_reward_model() {
    // Same first step as with ±1 labels except for the rewards: the critic loss must change, the
    // first-step KL (policy = reference) stays 0.
    let with_labels = run(&config(
        &tiny_llama(),
        "unpaired.jsonl",
        LossConfig::PpoOffline(PpoOfflineConfig::default()),
        &scratch("ppo-labels"),
        32,
    ));
    let scored = PpoOfflineConfig { reward_model: Some(fixtures().join("tiny-llama-rm")), ..Default::default() };
    let with_rm = run(&config(&tiny_llama(), "unpaired.jsonl", LossConfig::PpoOffline(scored), &scratch("ppo-rm"), 32));
    assert_eq!(with_rm[0].objective.get("kl"), Some(0.0));
    let (a, b) =
        (with_labels[0].objective.get("loss/critic").unwrap(), with_rm[0].objective.get("loss/critic").unwrap());
    assert!((a - b).abs() > 1e-3, "critic loss {a} vs {b}");
    // A folder without a score head is refused with a message that says what to do.
    let bad = PpoOfflineConfig { reward_model: Some(tiny_llama()), ..Default::default() };
    let c = config(&tiny_llama(), "unpaired.jsonl", LossConfig::PpoOffline(bad), &scratch("ppo-bad-rm"), 32);
    let err = train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).err().unwrap().to_string();
    assert!(err.contains("not a reward model"), "{err}");
}

#[test]
fn a_diverging_run_names_its_step_and_loss() {
    // lr 1e30: the first AdamW update moves every weight by ~1e30, so step 2's forward pass overflows.
    let out = scratch("diverge");
    let mut c = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    c.learning_rate = 1e30;
    let err = train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.starts_with("step 2 (kto): numerics: non-finite"), "{err}");
}

#[test]
fn a_run_whose_weights_were_destroyed_says_so() {
    // lr 1e6 stays finite but moves every weight by ~1e6 at step 1 (Adam's first update is ±lr): the logits
    // saturate, every softmax is one-hot in f32, and from step 2 the gradient is exactly zero.
    let out = scratch("destroyed");
    let mut c = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    c.learning_rate = 1e6;
    let mut notices = vec![];
    let history = train(&c, &Device::Cpu, RunOptions::default(), &mut |e| {
        if let prospect::train::Event::Notice(m) = e {
            notices.push(m)
        }
    })
    .unwrap();
    let zero: Vec<usize> = history.iter().filter(|m| m.grad_norm == 0.0).map(|m| m.step).collect();
    assert!(!zero.is_empty(), "{:?}", history.iter().map(|m| m.grad_norm).collect::<Vec<_>>());
    for step in zero {
        let want = format!("step {step}: the gradient is exactly zero, so the weights did not learn");
        assert!(notices.iter().any(|n| n.starts_with(&want)), "{notices:?}");
    }
}

#[test]
fn an_update_that_overflows_the_weights_stops_the_run_before_anything_is_saved() {
    // Decay factor 1 − lr·λ = 1 − 1e40 is −inf in f32: every decayed weight overflows at step 1.
    let out = scratch("overflow");
    let mut c = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    (c.learning_rate, c.weight_decay, c.save_every) = (1e10, 1e30, 1);
    let err = train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.starts_with("step 1 (kto): numerics: the AdamW update (lr 1e10) made"), "{err}");
    assert!(err.contains("non-finite"), "{err}");
    assert!(!out.join("final").exists() && !out.join("checkpoint").exists(), "a non-finite model was saved");
}
