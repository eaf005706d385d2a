//! A run killed with SIGKILL at chosen moments — inside checkpoint writes, between the two renames of a
//! folder swap, while `final/` is written — resumes with `--resume` to final weights that are
//! byte-identical to an uninterrupted run, with the same per-step metrics and no temporary folders left.
//!
//! The moments are `prospect::fsio::pause_point`s: with `PROSPECT_PAUSE_AT=NAME:STAGE@N` the process
//! prints `paused at ...` and waits; the test then sends SIGKILL (`Child::kill`), so the process dies
//! exactly there with no chance to clean up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(out: &Path, resume: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prospect"));
    cmd.current_dir(root()).args(["train", "--config", "configs/kto-tiny.toml"]);
    for set in [format!("output_dir={}", out.display()), "max_steps=6".into(), "save_every=1".into()] {
        cmd.args(["--set", &set]);
    }
    if resume {
        cmd.arg("--resume");
    }
    cmd.env_remove("PROSPECT_PAUSE_AT");
    cmd
}

/// Run until the pause point `at`, then SIGKILL. Fails if the run ends without reaching it.
fn kill_at(out: &Path, resume: bool, at: &str) {
    let mut child = train(out, resume).env("PROSPECT_PAUSE_AT", at).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.starts_with("paused at ") {
            assert_eq!(line, format!("paused at {at}"));
            child.kill().unwrap(); // SIGKILL
            let status = child.wait().unwrap();
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{at}");
            return;
        }
        seen.push(line);
    }
    panic!("the run ended without reaching {at}: {:?}\n{}", child.wait(), seen.join("\n"));
}

fn run_to_end(out: &Path, resume: bool) {
    let o = train(out, resume).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `(step, loss, grad_norm)` of every step line of `metrics.jsonl`.
fn steps(out: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap()))
        .collect()
}

fn hidden_entries(out: &Path) -> Vec<String> {
    let names = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|n| n.starts_with('.')).collect()
}

#[test]
fn a_run_killed_at_any_of_these_points_resumes_to_the_same_weights() {
    let base = root().join("target/tmp/kill-test");
    let _ = std::fs::remove_dir_all(&base);
    let (whole, killed) = (base.join("whole"), base.join("killed"));
    run_to_end(&whole, false);

    // Step 2's checkpoint is complete in its temporary folder but not renamed: resume from step 1.
    kill_at(&killed, false, "checkpoint:filled@2");
    assert!(hidden_entries(&killed).iter().any(|n| n.starts_with(".checkpoint.tmp-")));
    // Resumed at 1, it writes checkpoint 2 (first visit), then dies between the renames of checkpoint 3:
    // `checkpoint/` is gone, `.checkpoint.old-*` holds step 2 and `.checkpoint.ready-*` step 3.
    kill_at(&killed, true, "checkpoint:swapping@2");
    assert!(!killed.join("checkpoint").exists());
    // The next start completes that swap (step 3), trains on, and dies between the renames of `final/`.
    kill_at(&killed, true, "final:swapping@1");
    // Nothing to resume but the last checkpoint (step 6) and the finished `.final.ready-*`.
    run_to_end(&killed, true);

    let read = |dir: &Path| std::fs::read(dir.join("final/model.safetensors")).unwrap();
    assert!(read(&whole) == read(&killed), "final weights differ after kills and resumes");
    let (a, b) = (steps(&whole), steps(&killed));
    assert_eq!(a.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(a, b, "per-step loss and grad_norm must be identical");
    assert_eq!(hidden_entries(&killed), Vec::<String>::new(), "temporary folders left behind");
}

#[test]
fn resume_with_nothing_to_resume_from_is_an_error() {
    let out = root().join("target/tmp/kill-test-nothing");
    let _ = std::fs::remove_dir_all(&out);
    let o = train(&out, true).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("checkpoint"), "{err}");
    assert!(!out.join("metrics.jsonl").exists(), "a refused resume must not start a run");
}
