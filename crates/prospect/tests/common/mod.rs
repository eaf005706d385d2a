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
