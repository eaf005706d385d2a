//! BCO against TRL's own `BCOTrainer`, step for step and microbatch for microbatch.
//!
//! `tests/fixtures/trl_bco.json` was written by `scripts/make_bco_fixture.py` with TRL 1.13.0, the last
//! release that ships `BCOTrainer` (torch 2.15.0, transformers 5.24.0, as the other fixtures): tiny-llama,
//! unpaired.jsonl in file order, microbatch 2 × accumulation 4, lr 1e-2 constant, clipping at 1, β 0.1,
//! max_length 64 (no row is truncated), 3 steps. Its steps hold TRL's log (`trl_log`) and the same metrics
//! in Prospect's aggregation (the mean over microbatches of each microbatch's class means; TRL 1.13's BCO
//! divides the step's sums by its counts instead), and every `bco_loss` call's inputs and outputs.
//!
//! Also here: the running moments survive a checkpoint bit for bit, and a data-parallel launch is refused.

mod common;

use candle_core::{Device, Tensor};
use common::{
    check_final_params, close, compare_steps, config_from_fixture, fixture_json, fixtures, max_abs_diff, metric,
    run_ranks, scratch, trl_config, weights,
};
use prospect::data::{prepare, read_jsonl, Examples};
use prospect::loss::{bco_loss, BcoConfig, BcoInputs, Loss, LossConfig, LossOutput, LossState, RunningMoments};
use prospect::train::{train, RunOptions, StepMetrics};
use serde_json::Value;

const STEP_KEYS: &[&str] = &[
    "loss",
    "grad_norm",
    "delta",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

fn bco() -> LossConfig {
    LossConfig::Bco(BcoConfig::default())
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    f64s(v).into_iter().map(|x| x as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn relative_error(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-12)
}

#[test]
fn bco_rows_tokenize_as_trl_does() {
    let fixture = fixture_json("trl_bco.json");
    let tok = prospect::model::HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let path = fixtures().join("data/unpaired.jsonl");
    let max_length = fixture["config"]["max_length"].as_u64().unwrap() as usize;
    let Examples::Unpaired(ex) = prepare(read_jsonl(&path).unwrap(), bco().shape(), &tok, max_length, &path).unwrap().0
    else {
        panic!("BCO trains on unpaired examples")
    };
    let rows = fixture["rows"].as_array().unwrap();
    assert_eq!(ex.len(), rows.len());
    for (i, (e, row)) in ex.iter().zip(rows).enumerate() {
        let full: Vec<u32> = e.seq.prompt_ids.iter().chain(&e.seq.completion_ids).copied().collect();
        assert_eq!(e.seq.prompt_ids, ids(&row["prompt_ids"]), "row {i}: prompt");
        assert_eq!(full, ids(&row["completion_input_ids"]), "row {i}: prompt + completion + eos");
        assert!(full.len() < max_length, "row {i} would be truncated");
        assert_eq!(e.label, row["label"].as_bool().unwrap(), "row {i}");
    }
}

#[test]
fn bco_matches_trl() {
    let fixture = fixture_json("trl_bco.json");
    let out = scratch("trl-bco");
    let mut config = config_from_fixture(&fixture, bco(), &out);
    config.save_every = 3; // the checkpoint after step 3 holds δ's running moments
    let history = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    // The measured agreement, for the record (`cargo test -- --nocapture`).
    for key in STEP_KEYS {
        let worst = history
            .iter()
            .zip(fixture["steps"].as_array().unwrap())
            .map(|(m, s)| relative_error(metric(m, key).unwrap(), s[*key].as_f64().unwrap()))
            .fold(0.0, f64::max);
        eprintln!("bco vs TRL 1.13: `{key}` max relative error {worst:.2e}");
    }
    compare_steps("bco (trl_bco.json)", &fixture, &history, STEP_KEYS, &[1e-3; 3]);
    check_final_params(&fixture, &out.join("final"));
    // TRL's `running.json` after 3 steps: count 24 and the mean and variance of every reward.
    let state: Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoint/trainer_state.json")).unwrap()).unwrap();
    let (ours, trl) = (f64s(&state["loss_state"]["values"]), f64s(&fixture["running"]));
    assert_eq!(ours[0], trl[0], "count");
    assert!(close(ours[1], trl[1], 1e-3, 1e-6) && close(ours[2], trl[2], 1e-3, 1e-6), "{ours:?} vs TRL {trl:?}");
}

/// One recorded `bco_loss` call: TRL's rows come chosen first, then rejected.
fn recorded_inputs(mb: &Value) -> (Vec<f32>, Vec<f32>, Vec<bool>) {
    let (pc, pr) = (f32s(&mb["policy_chosen"]), f32s(&mb["policy_rejected"]));
    let (rc, rr) = (f32s(&mb["reference_chosen"]), f32s(&mb["reference_rejected"]));
    let labels = std::iter::repeat_n(true, pc.len()).chain(std::iter::repeat_n(false, pr.len())).collect();
    ([pc, pr].concat(), [rc, rr].concat(), labels)
}

#[test]
fn every_microbatch_matches_trl_bco_loss() {
    // From TRL's own log-probs and running moments, each call's δ, loss and new moments; and the state
    // chained through all 12 training microbatches by `observe` alone ends where TRL's did.
    let fixture = fixture_json("trl_bco.json");
    let cfg = BcoConfig::default();
    let mut chained = LossState::default();
    for (i, mb) in
        fixture["steps"].as_array().unwrap().iter().flat_map(|s| s["microbatches"].as_array().unwrap()).enumerate()
    {
        let (policy, reference, labels) = recorded_inputs(mb);
        let before = f64s(&mb["running_before"]);
        let running = RunningMoments { count: before[0], mean: before[1], var: before[2] };
        let (p, r) = (
            Tensor::new(policy.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(reference.as_slice(), &Device::Cpu).unwrap(),
        );
        let inputs = BcoInputs { policy_logps: &p, reference_logps: &r, labels: &labels, running, update: true };
        let out = bco_loss(&cfg, &inputs).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let want = mb["loss"].as_f64().unwrap();
        assert!(close(loss, want, 1e-6, 1e-7), "microbatch {i}: loss {loss} vs TRL {want}");
        let after = f64s(&mb["running_after"]);
        assert!(close(out.delta, after[1], 1e-6, 1e-8), "microbatch {i}: δ {} vs TRL {}", out.delta, after[1]);
        // TRL's per-class sums over counts, microbatch by microbatch.
        let m = &mb["metrics"];
        for (ours, split) in [(out.rewards_chosen, "chosen"), (out.rewards_rejected, "rejected")] {
            let count = m.get(format!("count/{split}")).and_then(Value::as_f64);
            assert_eq!(ours.is_some(), count.is_some(), "microbatch {i}: {split} rows");
            if let (Some(ours), Some(count)) = (ours, count) {
                let want = m[format!("rewards/{split}_sum")].as_f64().unwrap() / count;
                assert!(close(ours, want, 1e-5, 1e-7), "microbatch {i}: rewards/{split} {ours} vs TRL {want}");
            }
        }
        let metrics = LossOutput::from(out).metrics;
        let mut state = RunningMoments { count: before[0], mean: before[1], var: before[2] }.to_state();
        cfg.observe(&mut state, &metrics);
        cfg.observe(&mut chained, &metrics);
        assert_eq!(state.values[0], after[0], "microbatch {i}: count");
        assert!(close(state.values[2], after[2], 1e-5, 1e-12), "microbatch {i}: var {:?} vs {after:?}", state.values);
    }
    let (ours, trl) = (&chained.values, f64s(&fixture["running"]));
    assert!(
        ours[0] == trl[0] && close(ours[1], trl[1], 1e-6, 1e-9) && close(ours[2], trl[2], 1e-5, 0.0),
        "{ours:?} vs {trl:?}"
    );
}

fn untimed(m: &StepMetrics) -> (f64, f64, Vec<(String, f64)>) {
    (m.loss, m.grad_norm, m.objective.iter().map(|(k, v)| (k.to_string(), v)).collect())
}

#[test]
fn bco_resumes_with_its_running_moments_bit_for_bit() {
    let full_dir = scratch("bco-resume-full");
    let mut full = trl_config("unpaired.jsonl", bco(), &full_dir);
    full.max_steps = Some(4);
    let full_history = train(&full, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();

    // Stopped after step 2 with a checkpoint, then resumed to step 4.
    let dir = scratch("bco-resume-split");
    let mut first = full.clone();
    (first.output_dir, first.max_steps, first.save_every) = (dir.clone(), Some(2), 2);
    train(&first, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let state_path = dir.join("checkpoint/trainer_state.json");
    let saved: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(f64s(&saved["loss_state"]["values"])[0], 16.0, "2 steps of 8 rows merged: {saved}");
    let mut second = first.clone();
    second.max_steps = Some(4);
    let forced = RunOptions { resume: true, resume_force: true }; // max_steps differs from the checkpoint's
    let resumed = train(&second, &Device::Cpu, forced, &mut |_| {}).unwrap();
    assert_eq!(resumed.first().map(|m| m.step), Some(3));
    for (a, b) in resumed.iter().zip(&full_history[2..]) {
        assert_eq!(untimed(a), untimed(b), "step {}: loss, grad_norm and every metric, δ included", a.step);
    }
    assert_eq!(max_abs_diff(&weights(&dir.join("final")), &weights(&full_dir.join("final"))), 0.0);

    // Without the saved moments, step 3's δ would be another number: the state is what carries it.
    let mut blank = saved.clone();
    blank["loss_state"]["values"] = serde_json::json!([]);
    std::fs::write(&state_path, serde_json::to_vec(&blank).unwrap()).unwrap();
    let mut third = second.clone();
    third.max_steps = Some(3);
    let restarted = train(&third, &Device::Cpu, forced, &mut |_| {}).unwrap();
    let (with, without) =
        (full_history[2].objective.get("delta").unwrap(), restarted[0].objective.get("delta").unwrap());
    assert!((with - without).abs() > 1e-4, "δ {with} with the state, {without} without it");
}

#[test]
fn bco_refuses_data_parallel_ranks() {
    let out = scratch("dist-bco");
    let results = run_ranks(&trl_config("unpaired.jsonl", bco(), &out), 2, RunOptions::default());
    for (rank, result) in results.iter().enumerate() {
        let err = result.as_ref().expect_err("BCO must not train on 2 ranks").to_string();
        assert!(err.contains("`bco` cannot train data-parallel") && err.contains("one process"), "rank {rank}: {err}");
    }
    assert!(!out.join("metrics.jsonl").exists(), "no step may run");
}
