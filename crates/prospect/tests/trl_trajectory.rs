//! Prospect against TRL 1.16, step for step.
//!
//! `tests/fixtures/trl_*.json` were written by `scripts/make_fixtures.py` (torch 2.15.0, transformers
//! 5.24.0, trl 1.16.0): TRL's tokenized rows, its logged `loss`, `grad_norm`, `kl` and rewards for 3
//! optimizer steps, and the sum and L2 norm of every parameter afterwards. Same model, data, order and
//! hyperparameters here; everything must agree to 1e-3 relative.

mod common;

use std::collections::BTreeMap;

use candle_core::Device;
use common::{check_final_params, close, fixture_json, fixtures, scratch, trl_config};
use prospect::data::{prepare, read_jsonl, rotate_for_kl, Examples};
use prospect::loss::{DpoConfig, KtoConfig, LossConfig, SftConfig};
use prospect::model::HfTokenizer;
use prospect::train::{train, RunOptions, StepMetrics};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn run(data: &str, loss: LossConfig, name: &str) -> (Vec<StepMetrics>, std::path::PathBuf) {
    run_with(data, loss, name, false)
}

fn run_with(
    data: &str,
    loss: LossConfig,
    name: &str,
    precompute_ref_logps: bool,
) -> (Vec<StepMetrics>, std::path::PathBuf) {
    let out = scratch(name);
    let mut config = trl_config(data, loss, &out);
    config.precompute_ref_logps = Some(precompute_ref_logps);
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    (history, out)
}

fn examples(data: &str, loss: &LossConfig) -> Examples {
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let path = fixtures().join("data").join(data);
    prepare(read_jsonl(&path).unwrap(), loss.shape(), &tok, 32, &path).unwrap().0
}

/// A metric as TRL logs it (its key) and how to read ours.
type MetricKey = (&'static str, fn(&StepMetrics) -> Option<f64>);

/// Compare each step's metrics with TRL's log. `keys` are (TRL key, our value getter).
fn check_steps(fixture: &Value, ours: &[StepMetrics], keys: &[MetricKey]) {
    let steps = fixture["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps.len());
    for (m, s) in ours.iter().zip(steps) {
        let log = &s["log"];
        for (key, get) in keys {
            let Some(want) = log.get(*key).and_then(|v| v.as_f64()) else {
                assert!(get(m).is_none(), "step {}: TRL logs no `{key}`, we logged {:?}", m.step, get(m));
                continue;
            };
            let got = get(m).unwrap_or_else(|| panic!("step {}: missing `{key}`", m.step));
            assert!(close(got, want, 1e-3, 1e-6), "step {} `{key}`: prospect {got} vs TRL {want}", m.step);
        }
    }
}

const LOSS: MetricKey = ("loss", |m| Some(m.loss));
const GRAD_NORM: MetricKey = ("grad_norm", |m| Some(m.grad_norm));
const LR: MetricKey = ("learning_rate", |m| Some(m.lr));
const EPOCH: MetricKey = ("epoch", |m| Some(m.epoch));
const KL: MetricKey = ("kl", |m| m.objective.get("kl"));
const CHOSEN: MetricKey = ("rewards/chosen", |m| m.objective.get("rewards/chosen"));
const REJECTED: MetricKey = ("rewards/rejected", |m| m.objective.get("rewards/rejected"));
const MARGINS: MetricKey = ("rewards/margins", |m| m.objective.get("rewards/margins"));
const ACCURACIES: MetricKey = ("rewards/accuracies", |m| m.objective.get("rewards/accuracies"));

fn check_kto_rows(fixture: &Value, examples: &Examples) {
    let Examples::Unpaired(ex) = examples else { panic!("KTO trains on unpaired examples") };
    let rows = fixture["rows"].as_array().unwrap();
    assert_eq!(ex.len(), rows.len());
    // TRL fixes the KL completions by rotating within blocks of the microbatch size (2).
    for (block_start, block) in ex.chunks(2).enumerate().map(|(i, b)| (i * 2, b)) {
        let rot = rotate_for_kl(block.len());
        for (j, e) in block.iter().enumerate() {
            let row = &rows[block_start + j];
            assert_eq!(e.seq.prompt_ids, ids(&row["prompt_ids"]), "row {}", block_start + j);
            assert_eq!(e.seq.completion_ids, ids(&row["completion_ids"]), "row {}", block_start + j);
            assert_eq!(block[rot[j]].seq.completion_ids, ids(&row["KL_completion_ids"]), "KL row {}", block_start + j);
            assert_eq!(e.label, row["label"].as_bool().unwrap());
        }
    }
}

#[test]
fn kto_matches_trl() {
    let fixture = fixture_json("trl_kto.json");
    let loss = LossConfig::Kto(KtoConfig::default());
    check_kto_rows(&fixture, &examples("unpaired.jsonl", &loss));
    let (history, out) = run("unpaired.jsonl", loss, "trl-kto");
    check_steps(&fixture, &history, &[LOSS, GRAD_NORM, LR, EPOCH, KL, CHOSEN, REJECTED, MARGINS]);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn kto_with_precomputed_reference_logps_matches_trl() {
    // TRL's own run computed reference log-probs live; caching them must not change a number.
    let fixture = fixture_json("trl_kto.json");
    let (history, out) = run_with("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), "trl-kto-precomputed", true);
    check_steps(&fixture, &history, &[LOSS, GRAD_NORM, LR, EPOCH, KL, CHOSEN, REJECTED, MARGINS]);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn dpo_with_precomputed_reference_logps_matches_trl() {
    let fixture = fixture_json("trl_dpo.json");
    let (history, out) = run_with("paired.jsonl", LossConfig::Dpo(DpoConfig::default()), "trl-dpo-precomputed", true);
    check_steps(&fixture, &history, &[LOSS, GRAD_NORM, EPOCH, CHOSEN, REJECTED, MARGINS, ACCURACIES]);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn kto_on_paired_rows_matches_trl() {
    // TRL unpairs 8 pairs into 8 chosen rows, then 8 rejected rows: every microbatch is one class,
    // so the log has no margins, and steps 1 and 3 have no rejected rewards at all.
    let fixture = fixture_json("trl_kto_paired.json");
    let loss = LossConfig::Kto(KtoConfig::default());
    check_kto_rows(&fixture, &examples("paired.jsonl", &loss));
    let (history, out) = run("paired.jsonl", loss, "trl-kto-paired");
    check_steps(&fixture, &history, &[LOSS, GRAD_NORM, KL, CHOSEN, REJECTED, MARGINS]);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn dpo_matches_trl() {
    let fixture = fixture_json("trl_dpo.json");
    let loss = LossConfig::Dpo(DpoConfig::default());
    let Examples::Paired(ex) = examples("paired.jsonl", &loss) else { panic!() };
    for (e, row) in ex.iter().zip(fixture["rows"].as_array().unwrap()) {
        assert_eq!(e.chosen.prompt_ids, ids(&row["prompt_ids"]));
        assert_eq!(e.rejected.prompt_ids, ids(&row["prompt_ids"]));
        assert_eq!(e.chosen.completion_ids, ids(&row["chosen_ids"]));
        assert_eq!(e.rejected.completion_ids, ids(&row["rejected_ids"]));
    }
    let (history, out) = run("paired.jsonl", loss, "trl-dpo");
    check_steps(&fixture, &history, &[LOSS, GRAD_NORM, EPOCH, CHOSEN, REJECTED, MARGINS, ACCURACIES]);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn sft_matches_trl() {
    // 10 rows in microbatches of 2 and steps of 8: step 2 is the epoch's last, one microbatch of 2
    // rows, normalised by its own tokens; step 3 starts the second epoch.
    let fixture = fixture_json("trl_sft.json");
    let loss = LossConfig::Sft(SftConfig::default());
    let Examples::Sft(ex) = examples("sft.jsonl", &loss) else { panic!() };
    for (s, row) in ex.iter().zip(fixture["rows"].as_array().unwrap()) {
        let mut joined: Vec<u32> = s.prompt_ids.iter().chain(&s.completion_ids).copied().collect();
        let mut mask: Vec<u32> = s.prompt_ids.iter().map(|_| 0).chain(s.completion_ids.iter().map(|_| 1)).collect();
        joined.truncate(32);
        mask.truncate(32);
        assert_eq!(joined, ids(&row["input_ids"]));
        assert_eq!(mask, ids(&row["completion_mask"]));
    }
    let (history, out) = run("sft.jsonl", loss, "trl-sft");
    check_steps(&fixture, &history, &[LOSS, GRAD_NORM, LR, EPOCH]);
    check_final_params(&fixture, &out.join("final"));
}

#[test]
fn metrics_file_has_one_line_per_step() {
    let (history, out) = run("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), "trl-kto-metrics-file");
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<StepMetrics> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, history);
    let first: BTreeMap<String, Value> = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "grad_norm",
        "lr",
        "kl",
        "kl_raw",
        "rewards/chosen",
        "rewards/rejected",
        "step_time_s",
        "tokens_per_s",
    ] {
        assert!(first.contains_key(key), "metrics.jsonl lacks `{key}`: {first:?}");
    }
    // The resolved config travels with the model.
    let saved = std::fs::read_to_string(out.join("final/prospect.toml")).unwrap();
    assert!(saved.contains("type = \"kto\"") && saved.contains("max_length = 32"), "{saved}");
}
