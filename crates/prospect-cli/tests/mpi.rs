//! `mpirun -np 2 prospect train`: the MPI backend end to end (feature `mpi`; `scripts/test.sh` builds it
//! after `scripts/setup_mpi.sh`). Two ranks on this machine, oversubscribed, one thread each.
//! - KTO, DPO and SFT: per-step metrics and final weights equal to one process's, to 1e-6 relative;
//! - a rank that fails at step 2 ends both ranks with a non-zero exit in under 10 s, naming the rank.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mpirun");
    // Root in CI containers; two ranks on two cores; no network interfaces needed between them.
    cmd.args(["--oversubscribe", "--allow-run-as-root", "-np", &np.to_string()])
        .args(["--mca", "btl", "self,vader", "-x", "RAYON_NUM_THREADS=1"]);
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
    let loaded = prospect::model::load_tensors(&dir.join("out/final"), candle_core::DType::F32, &candle_core::Device::Cpu)
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
        let (a, b) = (metrics(&one), metrics(&two));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            for key in ["loss", "grad_norm", "kl", "rewards/chosen"] {
                let (Some(p), Some(q)) = (x[key].as_f64(), y[key].as_f64()) else {
                    assert_eq!(x.get(key).is_some(), y.get(key).is_some(), "{loss}: {key}");
                    continue;
                };
                assert!((p - q).abs() <= 1e-6 * p.abs().max(1e-3), "{loss} step {}: {key} {p} vs {q}", x["step"]);
            }
        }
        for ((n, p), (_, q)) in tensors(&one).iter().zip(&tensors(&two)) {
            let diff = p.iter().zip(q).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = p.iter().fold(0f32, |m, a| m.max(a.abs()));
            assert!(diff <= 1e-6 * scale, "{loss}: {n} differs by {diff:e}");
        }
    }
}

#[test]
fn a_rank_that_fails_ends_the_job_within_seconds() {
    let dir = scratch("mpi-fail");
    let started = Instant::now();
    let o = mpirun(2, &["train", "--config", config(&dir, "kto", "unpaired.jsonl").to_str().unwrap()], &[("PROSPECT_FAIL_AT", "1:2")]);
    let took = started.elapsed();
    assert!(!o.status.success());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = stderr(&o);
    assert!(err.contains("rank 1 of 2: error") && err.contains("injected failure at step 2"), "{err}");
    assert!(!dir.join("out/final").exists());
}
