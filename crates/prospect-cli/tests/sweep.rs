//! `prospect sweep`: the built-in grid fills every cell and a rerun redoes none; a sweep file's cell
//! killed inside a checkpoint resumes to the uninterrupted result; a changed judge setting re-judges
//! without retraining and a changed loss key retrains only its cell; bad sweep files are errors that
//! name the file, line and key.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fixtures, prospect, scratch, stderr};
use serde_json::Value;

fn results(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap()
}

/// The Wilson 95% interval, as `eval::winrate::wilson` computes it (z = Φ⁻¹(0.975)).
fn wilson(p: f64, n: f64) -> [f64; 2] {
    let z: f64 = 1.959963984540054;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    [centre - half, centre + half]
}

#[test]
fn builtin_quick_sweep_fills_the_grid_and_a_rerun_redoes_nothing() {
    let out = scratch("sweep-builtin-quick");
    let o = prospect(&["sweep", "--builtin", "--quick", "--jobs", "2", "--output", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = results(&out);
    let methods =
        ["sft", "sft+dpo", "sft+kto", "kto", "sft+kto-10%-desirable", "csft", "sft+slic", "sft+ppo", "sft+bco"];
    assert_eq!(r["methods"], serde_json::json!(methods));
    assert_eq!(r["models"], serde_json::json!(["w16", "w24", "w32", "w48"]));
    assert_eq!(r["missing"], 0);
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4 * 9);
    for c in cells {
        let result = &c["result"];
        if c["method"] == "sft" {
            assert!(result.is_null(), "the SFT baseline is not judged against itself: {c}");
            continue;
        }
        // 60 held-out prompts (a quarter of the 6 × 5 × 8 request grid) × 4 samples.
        let n = result["n"].as_f64().unwrap();
        assert_eq!(n, 240.0, "{c}");
        let (w, t, l) =
            (result["wins"].as_f64().unwrap(), result["ties"].as_f64().unwrap(), result["losses"].as_f64().unwrap());
        assert_eq!(w + t + l, n, "{c}");
        let rate = result["win_rate"].as_f64().unwrap();
        assert!((rate - (w + t / 2.0) / n).abs() < 1e-12, "ties count half: {c}");
        let ci = wilson(rate, n);
        for k in 0..2 {
            assert!((result["ci95"][k].as_f64().unwrap() - ci[k]).abs() < 1e-12, "{c}");
        }
        assert!(c["steps"].as_u64().unwrap() > 0 && c["final_loss"].as_f64().unwrap().is_finite(), "{c}");
    }
    // Width 32: 32 × 32 tied embedding (30 words + eos + unk) + 2 layers × (q 32·32 + k, v 32·16 each +
    // o 32·32 + MLP 3 · 32·64 + 2 norms · 32) + final norm 32:
    // python3 -c "print(32*32 + 2*(32*32 + 2*32*16 + 32*32 + 3*32*64 + 2*32) + 32)"  → 19616
    let w32 = cells.iter().find(|c| c["model"] == "w32").unwrap();
    assert_eq!(w32["parameters"], 19616);
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for m in methods {
        assert!(md.contains(&format!("| {m} |")), "results.md lacks a row for {m}:\n{md}");
    }
    assert!(md.contains("| method | w16 (0.01M) | w24 (0.01M) | w32 (0.02M) | w48 (0.04M) |"), "{md}");
    assert_eq!(&std::fs::read(out.join("win_rates.png")).unwrap()[1..4], b"PNG");

    // Again, one cell at a time: every cell is recognised as finished, nothing is retrained.
    let before = std::fs::read(out.join("results.json")).unwrap();
    let o = prospect(&["sweep", "--builtin", "--quick", "--output", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("sweep: 36 cells, 36 finished by an earlier run"), "{log}");
    assert!(!log.contains(": training") && !log.contains("pre-training"), "a finished cell was redone:\n{log}");
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
}

/// A one-model, one-method sweep on the tiny fixtures, judged by the tiny reward model.
fn write_sweep(dir: &Path, samples: usize, beta: f64) -> PathBuf {
    let f = fixtures();
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Question: What is the capital of Spain?\\nAnswer:\"}\n{\"prompt\": \"Name a colour.\"}\n{\"prompt\": \"The opposite of hot is\"}\n").unwrap();
    let text = format!(
        r#"
[train]
batch_size = 4
microbatch_size = 2
max_steps = 4
learning_rate = 1e-3
max_length = 48
save_every = 2
seed = 3

[sft]
max_steps = 2
save_every = 0

[eval]
judge = "reward:{rm}"
samples_per_prompt = {samples}
max_new_tokens = 6
batch_size = 8

[[models]]
name = "tiny"
path = "{model}"

[[datasets]]
name = "unpaired"
train_data = "{data}"
eval_prompts = "{prompts}"

[[methods]]
name = "sft+kto"
after_sft = true
loss = {{ type = "kto", beta = {beta} }}
"#,
        rm = f.join("tiny-llama-rm").display(),
        model = f.join("tiny-llama").display(),
        data = f.join("data/unpaired.jsonl").display(),
        prompts = prompts.display(),
    );
    let path = dir.join("sweep.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn sweep(config: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prospect"));
    cmd.args(["sweep", "--config"]).arg(config).arg("--output").arg(out).env_remove("PROSPECT_PAUSE_AT");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
}

fn kto_cell(out: &Path) -> PathBuf {
    out.join("cells/unpaired/tiny/sft+kto")
}

#[test]
fn a_killed_cell_resumes_and_changes_redo_only_what_they_touch() {
    let dir = scratch("sweep-config");
    let config = write_sweep(&dir, 2, 0.1);
    let whole = dir.join("whole");
    run_ok(&mut sweep(&config, &whole));

    // Killed inside the KTO cell's first checkpoint (step 2 of 4): the rerun resumes after step 2 and
    // ends where the uninterrupted sweep did.
    let out = dir.join("killed");
    let mut child =
        sweep(&config, &out).env("PROSPECT_PAUSE_AT", "checkpoint:swapping@1").stderr(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut paused = false;
    for line in lines {
        if line.unwrap() == "paused at checkpoint:swapping@1" {
            child.kill().unwrap();
            paused = true;
            break;
        }
    }
    child.wait().unwrap();
    assert!(paused, "the sweep ended without reaching the KTO cell's checkpoint");
    assert!(!kto_cell(&out).join("run/final").exists());
    let log = run_ok(&mut sweep(&config, &out));
    assert!(log.contains("resuming after step 2"), "{log}");
    assert!(!log.contains("sft · tiny · unpaired: training"), "the finished SFT cell was retrained:\n{log}");
    let metrics = |o: &Path| std::fs::read_to_string(kto_cell(o).join("run/metrics.jsonl")).unwrap();
    let losses = |text: String| -> Vec<f64> {
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    assert_eq!(losses(metrics(&out)), losses(metrics(&whole)));
    // The verdict, without the samples file's path (which names the output folder).
    let result = |o: &Path| {
        let mut r = results(o)["cells"][1]["result"].clone();
        r.as_object_mut().unwrap().remove("file");
        r
    };
    assert_eq!(result(&out), result(&whole));
    assert!(!kto_cell(&out).join("run/checkpoint").exists(), "a finished cell keeps no checkpoint");
    assert_eq!(result(&out)["n"], 3 * 2);

    // More samples per prompt: both cells are sampled and judged again, neither is retrained.
    let config = write_sweep(&dir, 3, 0.1);
    let log = run_ok(&mut sweep(&config, &out));
    assert!(
        log.contains("sft+kto · tiny · unpaired: sampling") && log.contains("sft · tiny · unpaired: sampling"),
        "{log}"
    );
    assert!(!log.contains(": training"), "a sampling setting retrained a cell:\n{log}");
    assert_eq!(result(&out)["n"], 3 * 3);

    // Another β: only the KTO cell trains again.
    let config = write_sweep(&dir, 3, 0.2);
    let log = run_ok(&mut sweep(&config, &out));
    assert!(log.contains("sft+kto · tiny · unpaired: training"), "{log}");
    assert!(!log.contains("sft · tiny · unpaired: training"), "{log}");
}

#[test]
fn bad_sweeps_are_errors_naming_the_place() {
    let dir = scratch("sweep-bad");
    let config = write_sweep(&dir, 2, 0.1);
    let text = std::fs::read_to_string(&config).unwrap();

    let typo = dir.join("typo.toml");
    std::fs::write(&typo, text.replace("samples_per_prompt", "samples_per_promt")).unwrap();
    let o = prospect(&["sweep", "--config", typo.to_str().unwrap()]);
    assert!(!o.status.success());
    let line = text.lines().position(|l| l.starts_with("samples_per_prompt")).unwrap() + 1;
    assert!(
        stderr(&o).contains(&format!("typo.toml:{line}")) && stderr(&o).contains("samples_per_promt"),
        "{}",
        stderr(&o)
    );

    let bad_key = dir.join("bad_key.toml");
    std::fs::write(&bad_key, text.replace("beta = 0.1", "beta = 0.1, betta = 2")).unwrap();
    let o = prospect(&["sweep", "--config", bad_key.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("methods.sft+kto: loss.betta"), "{}", stderr(&o));

    let o = prospect(&[
        "sweep",
        "--config",
        config.to_str().unwrap(),
        "--only",
        "dpo",
        "--output",
        dir.join("o").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`dpo` is not in the sweep (known: sft+kto)"), "{}", stderr(&o));
}
