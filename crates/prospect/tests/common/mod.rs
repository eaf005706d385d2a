//! Helpers shared by the integration tests: fixture paths, scratch folders, tolerant comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use prospect::config::LrScheduler;
use prospect::loss::LossConfig;
use prospect::TrainConfig;

/// `tests/fixtures/` at the repository root, written by `scripts/make_fixtures.py`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn fixture_json(name: &str) -> serde_json::Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A fresh scratch folder under the target dir, removed first if it exists.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// |a − b| ≤ rel·|b| + abs.
pub fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= rel * b.abs() + abs
}

/// The TRL fixtures' settings: tiny-llama, microbatch 2 × accumulation 4, lr 1e-2 constant,
/// no weight decay, clipping at 1, max_length 32, file order, 3 steps.
pub fn trl_config(data: &str, loss: LossConfig, out: &Path) -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        microbatch_size: 2,
        max_steps: Some(3),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduler::Constant,
        max_length: 32,
        shuffle: false,
        seed: 0,
        ..TrainConfig::with_defaults(
            fixtures().join("tiny-llama"),
            fixtures().join("data").join(data),
            out.to_path_buf(),
            loss,
        )
    }
}

/// Every tensor of a saved model folder, as f64.
pub fn weights(dir: &Path) -> std::collections::BTreeMap<String, candle_core::Tensor> {
    prospect::model::load_tensors(dir, candle_core::DType::F64, &candle_core::Device::Cpu).unwrap()
}

/// The largest absolute difference between two models' tensors (same names required).
pub fn max_abs_diff(
    a: &std::collections::BTreeMap<String, candle_core::Tensor>,
    b: &std::collections::BTreeMap<String, candle_core::Tensor>,
) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap())
        .fold(0.0, f64::max)
}

/// The parameters after a fixture's run: every tensor's sum and L2 norm against `final_params`.
pub fn check_final_params(fixture: &serde_json::Value, final_dir: &Path) {
    let tensors = weights(final_dir);
    let want = fixture["final_params"].as_object().unwrap();
    assert_eq!(tensors.len(), want.len(), "saved tensors: {:?}", tensors.keys().collect::<Vec<_>>());
    for (name, w) in want {
        let t = &tensors[name];
        let sum = t.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let l2 = t.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
        let (ws, wl) = (w["sum"].as_f64().unwrap(), w["l2_norm"].as_f64().unwrap());
        // Sums of ±values can be near 0, so they get an absolute slack scaled by the tensor's size.
        assert!(close(l2, wl, 1e-4, 1e-6), "{name}: l2 {l2} vs reference {wl}");
        assert!(close(sum, ws, 1e-3, 1e-5 * t.elem_count() as f64), "{name}: sum {sum} vs reference {ws}");
    }
}

/// A loss's reference trajectory: `tests/fixtures/trl_<name>.json` (TRL 1.16 itself) or
/// `torch_<name>.json` (a PyTorch reimplementation of the formula), whichever exists.
pub fn reference_fixture(name: &str) -> Option<(String, serde_json::Value)> {
    ["trl", "torch"].iter().map(|kind| format!("{kind}_{name}.json")).find(|file| fixtures().join(file).exists()).map(
        |file| {
            let value = fixture_json(&file);
            (file, value)
        },
    )
}

/// The run a trajectory fixture describes, in Prospect's terms. TRL fixtures give
/// `per_device_train_batch_size` × `gradient_accumulation_steps`; PyTorch ones give Prospect's keys.
pub fn config_from_fixture(fixture: &serde_json::Value, loss: LossConfig, out: &Path) -> TrainConfig {
    let c = &fixture["config"];
    let num = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("fixture config lacks `{k}`"));
    let (microbatch, batch) = match c.get("per_device_train_batch_size") {
        Some(mb) => {
            let mb = mb.as_u64().unwrap() as usize;
            (mb, mb * c["gradient_accumulation_steps"].as_u64().unwrap() as usize)
        }
        None => (num("microbatch_size") as usize, num("batch_size") as usize),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    TrainConfig {
        batch_size: batch,
        microbatch_size: microbatch,
        max_steps: Some(fixture["steps"].as_array().unwrap().len()),
        learning_rate: num("learning_rate"),
        lr_scheduler: LrScheduler::Constant,
        max_grad_norm: num("max_grad_norm"),
        max_length: num("max_length") as usize,
        shuffle: false,
        seed: 0,
        ..TrainConfig::with_defaults(
            root.join(c["model"].as_str().unwrap()),
            root.join(c["dataset"].as_str().unwrap()),
            out.to_path_buf(),
            loss,
        )
    }
}

/// One step's value of `key` in Prospect's metrics (`loss`, `grad_norm`, or a loss metric).
pub fn metric(m: &prospect::train::StepMetrics, key: &str) -> Option<f64> {
    match key {
        "loss" => Some(m.loss),
        "grad_norm" => Some(m.grad_norm),
        other => m.objective.get(other),
    }
}

/// Compare `keys` of every step against a fixture's `steps` (TRL fixtures nest them under `log`), to
/// `rel[i]` relative at step i. `loss` and `grad_norm` get an absolute slack of 1e-6; the reward
/// metrics, differences of summed log-probs that can land near 0, get 1e-5.
pub fn compare_steps(
    name: &str,
    fixture: &serde_json::Value,
    ours: &[prospect::train::StepMetrics],
    keys: &[&str],
    rel: &[f64],
) {
    let steps = fixture["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps.len(), "{name}: number of steps");
    for ((m, s), &rel) in ours.iter().zip(steps).zip(rel) {
        let log = if s.get("log").is_some() { &s["log"] } else { s };
        for key in keys {
            let want = log[*key].as_f64().unwrap_or_else(|| panic!("{name}: reference lacks `{key}`"));
            let got = metric(m, key).unwrap_or_else(|| panic!("{name} step {}: we logged no `{key}`", m.step));
            let abs = if matches!(*key, "loss" | "grad_norm") { 1e-6 } else { 1e-5 };
            assert!(close(got, want, rel, abs), "{name} step {} `{key}`: prospect {got} vs reference {want}", m.step);
        }
    }
}

/// The reference Python (`PROSPECT_PYTHON`, set by `scripts/test.sh`) for the `live-reference` tests.
/// Panics with the way to get it: a live test never skips.
#[cfg(feature = "live-reference")]
pub fn python() -> String {
    std::env::var("PROSPECT_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PROSPECT_PYTHON is not set: run the tests through `bash scripts/test.sh`, which creates the \
             reference Python environment (torch + transformers, pinned) and points PROSPECT_PYTHON at it"
        )
    })
}

/// Run `scripts/SCRIPT` with the reference Python on the model folder `dir` and the token ids `ids` (as
/// JSON), offline; returns its JSON output. Fails with the script's stderr when it fails.
#[cfg(feature = "live-reference")]
pub fn run_reference_script(script: &str, dir: &Path, ids: &[Vec<u32>]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts").join(script);
    let python = python();
    let run = std::process::Command::new(&python)
        .arg(&script)
        .arg(dir)
        .arg(serde_json::to_string(ids).unwrap())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run PROSPECT_PYTHON={python}: {e}"));
    assert!(
        run.status.success(),
        "transformers failed to load {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

/// `scripts/hf_scores.py`: `transformers`' `AutoModelForSequenceClassification` scores of right-padded
/// `ids` for the reward-model folder `dir`. Returns (loaded class, num_labels, scores).
#[cfg(feature = "live-reference")]
pub fn hf_scores(dir: &Path, ids: &[Vec<u32>]) -> (String, u64, Vec<f64>) {
    let json = run_reference_script("hf_scores.py", dir, ids);
    let scores = serde_json::from_value(json["scores"].clone()).unwrap();
    (json["class"].as_str().unwrap().to_string(), json["num_labels"].as_u64().unwrap(), scores)
}

/// Run `config` on `world` thread ranks; returns each rank's result. A rank that fails aborts the job,
/// as the binary does.
pub fn run_ranks(
    config: &TrainConfig,
    world: usize,
    options: prospect::train::RunOptions,
) -> Vec<prospect::Result<Vec<prospect::train::StepMetrics>>> {
    run_ranks_each(vec![config.clone(); world], options)
}

/// [`run_ranks`] with one config per rank (they should agree; the ranks check that they do).
pub fn run_ranks_each(
    configs: Vec<TrainConfig>,
    options: prospect::train::RunOptions,
) -> Vec<prospect::Result<Vec<prospect::train::StepMetrics>>> {
    use prospect::dist::{threads, Comm};
    let handles: Vec<_> = threads::group(configs.len())
        .into_iter()
        .zip(configs)
        .map(|(rank, config)| {
            std::thread::spawn(move || {
                let comm: Comm = std::rc::Rc::new(rank);
                let result =
                    prospect::train::train_with(&config, &candle_core::Device::Cpu, options, comm.clone(), &mut |_| {});
                if result.is_err() && comm.world_size() > 1 {
                    let message = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                    // Abort like the binary (here: the other ranks' next collective call fails).
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| comm.abort(1)));
                    return Err(prospect::Error::Compute(message));
                }
                result
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
}
