//! Data parallelism: N ranks give the numbers of one process. The ranks here are threads
//! (`dist::threads`), so the suite needs no MPI; `crates/prospect-cli/tests/mpi.rs` runs the same
//! semantics through `mpirun` with the `mpi` feature.
//!
//! - KTO, DPO and SFT, batch 8 = microbatch 2 × accumulation 2 × 2 ranks, against one process with
//!   accumulation 4: per-step loss, grad_norm, metrics and final weights bit for bit, and TRL's
//!   trajectory as the single process matches it;
//! - a checkpoint written by 2 ranks resumes in 1 process and the other way round;
//! - a rank whose microbatches hold one KTO class trains (no hang).
//!
//! A failing rank: `distributed_failure.rs` (it sets an environment variable, so it has a binary of its own).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::{compare_steps, fixture_json, max_abs_diff, run_ranks, run_ranks_each, scratch, trl_config, weights};
use prospect::loss::{DpoConfig, KtoConfig, LossConfig, SftConfig};
use prospect::train::{train, RunOptions, StepMetrics};
use prospect::TrainConfig;

/// One process and N ranks take the same steps bit for bit: a step's gradient is summed exactly (in f64,
/// then rounded once), so the order in which microbatches and ranks add up does not show.
fn assert_same_steps(name: &str, one: &[StepMetrics], many: &[StepMetrics]) {
    assert_eq!(one.len(), many.len(), "{name}: steps");
    for (a, b) in one.iter().zip(many) {
        assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm), "{name} step {}: (loss, grad_norm)", a.step);
        assert_eq!((&a.objective, a.num_tokens), (&b.objective, b.num_tokens), "{name} step {}", a.step);
    }
}

fn assert_same_weights(name: &str, a: &Path, b: &Path) {
    let diff = max_abs_diff(&weights(a), &weights(b));
    assert_eq!(diff, 0.0, "{name}: final weights differ by {diff:e}");
}

#[test]
fn two_ranks_give_the_numbers_of_one_process() {
    for (name, data, loss, fixture) in [
        ("kto", "unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), "trl_kto.json"),
        ("dpo", "paired.jsonl", LossConfig::Dpo(DpoConfig::default()), "trl_dpo.json"),
        ("sft", "sft.jsonl", LossConfig::Sft(SftConfig::default()), "trl_sft.json"),
    ] {
        let one_dir = scratch(&format!("dist-one-{name}"));
        let one =
            train(&trl_config(data, loss.clone(), &one_dir), &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
        let two_dir = scratch(&format!("dist-two-{name}"));
        let results = run_ranks(&trl_config(data, loss, &two_dir), 2, RunOptions::default());
        let (r0, r1) = (results[0].as_ref().unwrap(), results[1].as_ref().unwrap());
        assert_same_steps(name, &one, r0);
        let untimed =
            |m: &StepMetrics| StepMetrics { step_time_s: 0.0, tokens_per_s: 0.0, comm_time_s: None, ..m.clone() };
        assert_eq!(r0.iter().map(untimed).collect::<Vec<_>>(), r1.iter().map(untimed).collect::<Vec<_>>(), "{name}");
        assert_same_weights(name, &one_dir.join("final"), &two_dir.join("final"));
        // Rank 0 alone wrote the log: one line per step.
        assert_eq!(std::fs::read_to_string(two_dir.join("metrics.jsonl")).unwrap().lines().count(), one.len());
        // And the 2-rank run is TRL's run, as the single process is (tests/trl_trajectory.rs).
        let keys: &[&str] = if name == "kto" { &["loss", "grad_norm", "kl"] } else { &["loss", "grad_norm"] };
        compare_steps(name, &fixture_json(fixture), r0, keys, &[1e-3; 3]);
    }
}

#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_a_config_error() {
    let out = scratch("dist-bad-batch");
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.batch_size = 6; // 3 microbatches of 2 do not split over 2 ranks
    let results = run_ranks(&config, 2, RunOptions::default());
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("batch_size") && err.contains("2 ranks"), "{err}");
}

#[test]
fn checkpoints_move_between_world_sizes() {
    let loss = LossConfig::Kto(KtoConfig::default());
    let full_dir = scratch("dist-ckpt-full");
    let mut full = trl_config("unpaired.jsonl", loss, &full_dir);
    full.max_steps = Some(4);
    full.shuffle = true;
    let uninterrupted = train(&full, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let resume = RunOptions { resume: true, resume_force: true };
    for (first_world, second_world) in [(2, 1), (1, 2)] {
        let dir = scratch(&format!("dist-ckpt-{first_world}-{second_world}"));
        let mut first = TrainConfig { output_dir: dir.clone(), max_steps: Some(2), save_every: 2, ..full.clone() };
        for r in run_ranks(&first, first_world, RunOptions::default()) {
            r.unwrap();
        }
        first.max_steps = Some(4);
        for r in run_ranks(&first, second_world, resume) {
            r.unwrap();
        }
        let logged: Vec<StepMetrics> = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_same_steps(&format!("{first_world}→{second_world}"), &uninterrupted, &logged);
        assert_same_weights(&format!("{first_world}→{second_world}"), &full_dir.join("final"), &dir.join("final"));
    }
}

#[test]
fn a_rank_with_one_kto_class_trains_without_a_hang() {
    // Rows 0-3 (rank 0's microbatches) all desirable, rows 4-7 (rank 1's) all undesirable.
    let dir = scratch("dist-one-class");
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Question {i}: what is {i} plus {i}?\", \"completion\": \" It is {}.\", \"label\": {}}}\n",
                2 * i,
                i < 4
            )
        })
        .collect();
    std::fs::write(dir.join("skewed.jsonl"), rows).unwrap();
    let out = dir.join("out");
    let mut config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    config.train_data = dir.join("skewed.jsonl");
    config.max_steps = Some(2);
    let one_dir = dir.join("one");
    let one =
        train(&TrainConfig { output_dir: one_dir, ..config.clone() }, &Device::Cpu, RunOptions::default(), &mut |_| {})
            .unwrap();
    let started = Instant::now();
    let results = run_ranks(&config, 2, RunOptions::default());
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_same_steps("one class per rank", &one, results[0].as_ref().unwrap());
    assert!(one[0].objective.get("rewards/chosen").is_some() && one[0].objective.get("rewards/rejected").is_some());
}

#[test]
fn the_reference_cache_is_computed_in_shares_and_gives_the_same_run() {
    for loss in [LossConfig::Kto(KtoConfig::default()), LossConfig::Dpo(DpoConfig::default())] {
        let data = if matches!(loss, LossConfig::Kto(_)) { "unpaired.jsonl" } else { "paired.jsonl" };
        let one_dir = scratch(&format!("dist-precompute-one-{}", loss.name()));
        let mut config = trl_config(data, loss.clone(), &one_dir);
        config.precompute_ref_logps = Some(true);
        let one = train(&config, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
        let two_dir = scratch(&format!("dist-precompute-two-{}", loss.name()));
        let results = run_ranks(&TrainConfig { output_dir: two_dir.clone(), ..config }, 2, RunOptions::default());
        assert_same_steps(loss.name(), &one, results[0].as_ref().unwrap());
        assert_same_weights(loss.name(), &one_dir.join("final"), &two_dir.join("final"));
    }
}

#[test]
fn ranks_that_disagree_on_the_run_stop_with_an_error_naming_the_difference() {
    let out = scratch("dist-disagree");
    let config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    let mut other = config.clone();
    other.learning_rate = 2e-2;
    let results = run_ranks_each(vec![config, other], RunOptions::default());
    for r in &results {
        let err = r.as_ref().unwrap_err().to_string();
        assert!(err.contains("rank 1") && err.contains("learning_rate"), "{err}");
    }
}

#[test]
fn f32_accumulation_differs_from_the_exact_sum_by_rounding_only() {
    // `exact_accumulation = false` sums microbatch gradients in f32, in order, as PyTorch does: the steps
    // then differ from the exact sum's in the last bits only.
    let exact_dir = scratch("dist-acc-exact");
    let exact = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &exact_dir);
    let a = train(&exact, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    let f32_dir = scratch("dist-acc-f32");
    let plain = TrainConfig { output_dir: f32_dir, exact_accumulation: false, ..exact };
    let b = train(&plain, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x.grad_norm / y.grad_norm - 1.0).abs() < 1e-6, "step {}: {} vs {}", x.step, x.grad_norm, y.grad_norm);
        assert!((x.loss - y.loss).abs() < 1e-6 * x.loss.abs(), "step {}", x.step);
    }
    assert_ne!(a.iter().map(|m| m.grad_norm).collect::<Vec<_>>(), b.iter().map(|m| m.grad_norm).collect::<Vec<_>>());
}
