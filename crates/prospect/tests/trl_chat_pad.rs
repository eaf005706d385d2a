//! The pad token inside the chat template: TRL-exact KTO and DPO on conversational rows for a model whose
//! pad token is `<|im_end|>`, as SmolLM2's is.
//!
//! `transformers` builds `embed_tokens` as `nn.Embedding(v, d, padding_idx=config.pad_token_id)`: the pad
//! row gets no gradient through the lookup, while the tied LM head still trains it. On plain text the pad
//! (= eos) token is only looked up at the very end, where no loss depends on it; in ChatML every turn ends
//! with `<|im_end|>`, so here the rule changes `grad_norm` from step 1 on.
//!
//! Fixtures from `scripts/make_data_fixtures.py --only chatpad` (torch 2.15.0, transformers 5.24.0,
//! trl 1.16.0, tokenizers 0.23.3, seed 0, one thread):
//! - `tiny-llama-chatpad/`: tiny-llama's tensors, tokenizer and ChatML template with pad = `<|im_end|>` (2);
//! - `trl_kto_conv_chatpad.json`, `trl_dpo_conv_chatpad.json`: 3 steps of `KTOTrainer` / `DPOTrainer` on
//!   `data/conv_unpaired.jsonl` / `data/conv_paired.jsonl`, microbatch 2 × accumulation 4, max_length 64,
//!   lr 1e-2 constant.
//!
//! Without the pad-row rule, step 1 gives grad_norm 1.3083734 for KTO (TRL: 1.2987289, 7.4e-3 apart) and
//! 3.2568989 for DPO (TRL: 3.2375994, 6.0e-3 apart); with it, 1e-7 and 3e-7.

mod common;

use candle_core::Device;
use common::{check_final_params, compare_steps, config_from_fixture, fixture_json, fixtures, scratch};
use prospect::data::{prepare, read_jsonl, Examples};
use prospect::loss::{DpoConfig, KtoConfig, LossConfig};
use prospect::model::{HfTokenizer, ModelConfig};
use prospect::train::{train, RunOptions};

/// `loss` and `grad_norm`: TRL to 1e-5 relative at every step (plus `compare_steps`' 1e-6 absolute slack).
const EXACT: [f64; 3] = [1e-5; 3];
/// `kl` and the rewards are differences of two summed log-probs of ~−80 (policy − reference), so f32
/// summation order alone moves them by ~5e-5 absolute (measured: kl 1.5e-5 and 2.0e-5 relative at steps 2
/// and 3, while loss and grad_norm agree to ≤ 6e-6): 3e-5 relative, plus 1e-5 absolute near 0.
const LOGP_DIFFERENCES: [f64; 3] = [3e-5; 3];

/// Print each step's relative difference from the fixture for `keys` (shown with `--nocapture`, and on failure).
fn report(name: &str, fixture: &serde_json::Value, ours: &[prospect::train::StepMetrics], keys: &[&str]) {
    for (m, s) in ours.iter().zip(fixture["steps"].as_array().unwrap()) {
        let diffs: Vec<String> = keys
            .iter()
            .map(|k| {
                let want = s["log"][*k].as_f64().unwrap();
                let got = common::metric(m, k).unwrap();
                format!("{k} {got:.8} vs {want:.8} ({:.1e})", (got - want).abs() / want.abs().max(1e-12))
            })
            .collect();
        eprintln!("{name} step {}: {}", m.step, diffs.join(", "));
    }
}

fn chatpad() -> std::path::PathBuf {
    fixtures().join("tiny-llama-chatpad")
}

#[test]
fn the_fixture_model_pads_with_im_end_and_im_end_sits_inside_the_rows() {
    let config = ModelConfig::load(&chatpad()).unwrap();
    let tok = HfTokenizer::load(&chatpad()).unwrap();
    assert_eq!(config.padding_idx().unwrap(), Some(2));
    assert_eq!(tok.pad_token_id, 2);
    assert_eq!(tok.decode(&[2], false).unwrap(), "<|im_end|>");
    assert!(config.tie_word_embeddings, "the tied head must still train the pad row");
    // The pad token is looked up before the last position of every row (the prompt's turns end with it,
    // and the completion is `…<|im_end|>\n`), so the lookup's gradient into it is not zero by accident.
    let path = fixtures().join("data/conv_unpaired.jsonl");
    let shape = LossConfig::Kto(KtoConfig::default()).shape();
    let Examples::Unpaired(ex) = prepare(read_jsonl(&path).unwrap(), shape, &tok, 64, &path).unwrap().0 else {
        panic!("KTO trains on unpaired examples")
    };
    for (i, e) in ex.iter().enumerate() {
        let ids: Vec<u32> = e.seq.prompt_ids.iter().chain(&e.seq.completion_ids).copied().collect();
        assert!(ids[..ids.len() - 1].contains(&2), "row {i}: no <|im_end|> before the last token");
    }
}

#[test]
fn kto_with_the_pad_token_in_the_template_matches_trl() {
    let fixture = fixture_json("trl_kto_conv_chatpad.json");
    let out = scratch("trl-kto-conv-chatpad");
    let config = config_from_fixture(&fixture, LossConfig::Kto(KtoConfig::default()), &out);
    assert_eq!((config.model.as_path(), config.max_length), (chatpad().as_path(), 64));
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let keys = ["loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected"];
    report("kto conv chatpad", &fixture, &history, &keys);
    compare_steps("kto conv chatpad", &fixture, &history, &keys[..2], &EXACT);
    compare_steps("kto conv chatpad", &fixture, &history, &keys[2..], &LOGP_DIFFERENCES);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn dpo_with_the_pad_token_in_the_template_matches_trl() {
    let fixture = fixture_json("trl_dpo_conv_chatpad.json");
    let out = scratch("trl-dpo-conv-chatpad");
    let config = config_from_fixture(&fixture, LossConfig::Dpo(DpoConfig::default()), &out);
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins"];
    report("dpo conv chatpad", &fixture, &history, &keys);
    compare_steps("dpo conv chatpad", &fixture, &history, &keys[..2], &EXACT);
    compare_steps("dpo conv chatpad", &fixture, &history, &keys[2..], &LOGP_DIFFERENCES);
    check_final_params(&fixture, &out.join("final"));
}
