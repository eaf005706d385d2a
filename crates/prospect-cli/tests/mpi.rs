//! `mpirun -np 2 prospect train`: the MPI backend end to end (feature `mpi`; `scripts/test.sh` builds it
//! after `scripts/setup_mpi.sh`). Two ranks on this machine, oversubscribed, one thread each.
//! - KTO, DPO and SFT: per-step metrics and final weights equal to one process's, bit for bit;
//! - a rank that fails at step 2 ends both ranks with a non-zero exit in under 10 s, naming the rank;
//! - a checkpoint written by 2 ranks resumes in 1 process, and one written by 1 process on 2 ranks;
//! - KTO rows arranged so that each rank's microbatches hold one class train without a hang.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mpirun");
    // Root in CI containers; two ranks on two cores; no network interfaces needed between them.
    cmd.args(["--oversubscribe", "--allow-run-as-root", "-np", &np.to_string()]).args([
        "--mca",
        "btl",
        "self,vader",
        "-x",
        "RAYON_NUM_THREADS=1",
    ]);
    for (k, v) in env {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_prospect")).args(args).env("OMPI_ALLOW_RUN_AS_ROOT", "1");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").output().expect("mpirun (scripts/setup_mpi.sh installs it)")
}

fn config(dir: &Path, loss: &str, data: &str) -> PathBuf {
    let text = format!(
        "model = {:?}\ntrain_data = {:?}\noutput_dir = {:?}\nbatch_size = 8\nmicrobatch_size = 2\n\
         max_steps = 3\nlearning_rate = 1e-2\nlr_scheduler = \"constant\"\nmax_length = 32\nshuffle = false\n\
         [loss]\ntype = {loss:?}\n",
        fixtures().join("tiny-llama"),
        fixtures().join("data").join(data),
        dir.join("out"),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let loaded =
        prospect::model::load_tensors(&dir.join("out/final"), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    loaded.into_iter().map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

#[test]
fn two_mpi_ranks_train_as_one_process() {
    for (loss, data) in [("kto", "unpaired.jsonl"), ("dpo", "paired.jsonl"), ("sft", "sft.jsonl")] {
        let (one, two) = (scratch(&format!("mpi-one-{loss}")), scratch(&format!("mpi-two-{loss}")));
        let o = prospect(&["train", "--config", config(&one, loss, data).to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = mpirun(2, &["train", "--config", config(&two, loss, data).to_str().unwrap()], &[]);
        assert!(o.status.success(), "{loss}: {}\n{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(stderr(&o).contains("data parallel: 2 ranks"), "{}", stderr(&o));
        // Bit for bit: the step's gradient is an exact sum (f64, rounded once) on any number of ranks.
        let untimed = |m: &serde_json::Value| {
            let mut m = m.as_object().unwrap().clone();
            for key in ["step_time_s", "tokens_per_s", "comm_time_s"] {
                m.remove(key);
            }
            m
        };
        let (a, b) = (metrics(&one), metrics(&two));
        assert_eq!(a.iter().map(untimed).collect::<Vec<_>>(), b.iter().map(untimed).collect::<Vec<_>>(), "{loss}");
        assert!(b.iter().all(|m| m["comm_time_s"].is_number()), "{loss}: no comm_time_s logged");
        assert_eq!(tensors(&one), tensors(&two), "{loss}: final weights");
    }
}

#[test]
fn a_rank_that_fails_ends_the_job_within_seconds() {
    let dir = scratch("mpi-fail");
    let started = Instant::now();
    let o = mpirun(
        2,
        &["train", "--config", config(&dir, "kto", "unpaired.jsonl").to_str().unwrap()],
        &[("PROSPECT_FAIL_AT", "1:2")],
    );
    let took = started.elapsed();
    assert!(!o.status.success());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = stderr(&o);
    assert!(err.contains("rank 1 of 2: error") && err.contains("injected failure at step 2"), "{err}");
    assert!(!dir.join("out/final").exists());
}

#[test]
fn checkpoints_move_between_one_process_and_two_ranks() {
    let full = scratch("mpi-ckpt-full");
    let o = prospect(&["train", "--config", config(&full, "kto", "unpaired.jsonl").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (first, second) in [(2usize, 1usize), (1, 2)] {
        let dir = scratch(&format!("mpi-ckpt-{first}-{second}"));
        let cfg = config(&dir, "kto", "unpaired.jsonl");
        let cfg = cfg.to_str().unwrap();
        let run = |np: usize, extra: &[&str]| {
            let mut args = vec!["train", "--config", cfg];
            args.extend_from_slice(extra);
            let o = if np == 1 { prospect(&args) } else { mpirun(np, &args, &[]) };
            assert!(o.status.success(), "{first}->{second}: {}", stderr(&o));
        };
        run(first, &["--set", "max_steps=2", "--set", "save_every=2"]);
        run(second, &["--resume", "--resume-force"]);
        let (a, b) = (metrics(&full), metrics(&dir));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (&x["loss"], &x["grad_norm"], &x["kl"]),
                (&y["loss"], &y["grad_norm"], &y["kl"]),
                "step {}",
                x["step"]
            );
        }
        assert_eq!(tensors(&full), tensors(&dir), "{first}->{second}: final weights");
    }
}

#[test]
fn a_rank_whose_rows_are_one_kto_class_trains() {
    let dir = scratch("mpi-one-class");
    // Rows 0-3 (rank 0's microbatches of each step) desirable, rows 4-7 (rank 1's) undesirable.
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \" {}.\", \"label\": {}}}\n",
                2 * i,
                i < 4
            )
        })
        .collect();
    let data = dir.join("skewed.jsonl");
    std::fs::write(&data, rows).unwrap();
    let cfg = config(&dir, "kto", "unpaired.jsonl");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("{:?}", fixtures().join("data").join("unpaired.jsonl")), &format!("{data:?}"));
    std::fs::write(&cfg, text).unwrap();
    let started = Instant::now();
    let o = mpirun(2, &["train", "--config", cfg.to_str().unwrap(), "--set", "max_steps=1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(60));
    let m = metrics(&dir);
    assert!(m[0]["rewards/chosen"].is_number() && m[0]["rewards/rejected"].is_number(), "{:?}", m[0]);
}
