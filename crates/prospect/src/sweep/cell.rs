//! One cell of the grid: train → sample the held-out prompts → judge against the SFT model's samples.
//!
//! A cell's folder holds `run/` (the training run: `metrics.jsonl`, `checkpoint/` while it trains,
//! `final/`), `samples.jsonl`, `eval/` (the judge's comparisons) and `cell.json`, its state. The state
//! records two fingerprints:
//! - `train_fingerprint`: the run's [`Fingerprint`] (every key that changes the numbers, and digests of
//!   the model, reference and data), so a changed config or file retrains the cell;
//! - `eval_fingerprint`: the sampling and judge settings, the prompts' and judge model's digests, the
//!   training fingerprint and the SFT baseline's eval fingerprint, so a new judge re-judges without
//!   retraining.
//!
//! Each stage is recorded in `cell.json` (written atomically) as it completes, so a killed sweep redoes at
//! most the stage it was in, and training itself resumes from its last checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::EvalSettings;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::eval::files::read_rows;
use crate::eval::generate::generate_rows;
use crate::eval::judge::JudgeSpec;
use crate::eval::report::{evaluate, CandidateResult, LlmOptions};
use crate::model::ModelSource;
use crate::train::checkpoint::checkpoint_dir;
use crate::train::fingerprint::{digest, Fingerprint};
use crate::train::{train, Event, RunOptions};

/// A cell's place in the grid; `method` is [`super::config::SFT`] for the baseline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellId {
    pub dataset: String,
    pub model: String,
    pub method: String,
}

impl CellId {
    /// `cells/DATASET/MODEL/METHOD` under the sweep's output.
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join("cells").join(&self.dataset).join(&self.model).join(&self.method)
    }
}

impl std::fmt::Display for CellId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} · {} · {}", self.method, self.model, self.dataset)
    }
}

/// The judge's verdict on a cell against its SFT baseline: `prospect eval`'s record of one candidate.
pub type CellResult = CandidateResult;

/// `cell.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CellState {
    pub train_fingerprint: String,
    #[serde(default)]
    pub eval_fingerprint: String,
    /// `run/final/` is complete.
    #[serde(default)]
    pub trained: bool,
    /// `samples.jsonl` is complete.
    #[serde(default)]
    pub sampled: bool,
    /// Judged (or, for the SFT baseline, sampled): nothing is left to do.
    #[serde(default)]
    pub done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CellResult>,
    #[serde(default)]
    pub steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_loss: Option<f64>,
    /// Seconds spent training, summed over resumed attempts.
    #[serde(default)]
    pub train_seconds: f64,
}

impl CellState {
    pub fn read(dir: &Path) -> Option<CellState> {
        let bytes = std::fs::read(dir.join("cell.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, dir: &Path) -> Result<()> {
        crate::fsio::write_json_atomic(&dir.join("cell.json"), self)
    }
}

/// What a cell needs beyond its training config.
pub struct CellJob<'a> {
    pub id: CellId,
    pub dir: PathBuf,
    pub train: TrainConfig,
    pub eval: &'a EvalSettings,
    pub prompts: &'a Path,
    /// Tokens appended to prompts when sampling (CSFT's good token).
    pub append_tokens: Vec<String>,
    /// The SFT cell's folder and eval fingerprint; `None` for the SFT cell itself.
    pub baseline: Option<(PathBuf, String)>,
}

/// Where a finished cell's model is: `run/merged` when training saved a LoRA adapter (merged so that
/// later runs can start from it), else `run/final`.
pub fn model_dir(cell_dir: &Path) -> PathBuf {
    let merged = cell_dir.join("run/merged");
    if merged.is_dir() {
        merged
    } else {
        cell_dir.join("run/final")
    }
}

pub fn samples_path(cell_dir: &Path) -> PathBuf {
    cell_dir.join("samples.jsonl")
}

/// The two fingerprints of a job, as hex digests.
pub fn fingerprints(job: &CellJob) -> Result<(String, String)> {
    let train = Fingerprint::of(&job.train)?;
    let train_fp = hex_digest(&serde_json::to_vec(&train.entries).map_err(|e| Error::output(&job.dir, e))?);
    let judge_digest = match job.eval.judge_spec()? {
        JudgeSpec::Reward(dir) => digest(&dir)?,
        _ => String::new(),
    };
    let eval = serde_json::json!({
        "eval": job.eval,
        "prompts": digest(job.prompts)?,
        "judge_model": judge_digest,
        "append_tokens": job.append_tokens,
        "train": train_fp,
        "baseline": job.baseline.as_ref().map(|b| &b.1),
    });
    Ok((train_fp, hex_digest(eval.to_string().as_bytes())))
}

fn hex_digest(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Run whatever is left of a cell. `on_stage` hears "training", "sampling", "judging" as they start;
/// `on_train` hears the training run's events. Returns the cell's final state.
pub fn run_cell(
    job: &CellJob,
    on_stage: &mut dyn FnMut(&'static str),
    on_train: &mut dyn FnMut(Event),
) -> Result<CellState> {
    let (train_fp, eval_fp) = fingerprints(job)?;
    let mut state = match CellState::read(&job.dir) {
        Some(s) if s.train_fingerprint == train_fp => s,
        previous => {
            if previous.is_some() || job.dir.exists() {
                on_train(Event::Notice(format!(
                    "{}: its config, model or data changed since it ran; starting it again",
                    job.id
                )));
                std::fs::remove_dir_all(&job.dir).map_err(|e| Error::io(&job.dir, e))?;
            }
            CellState { train_fingerprint: train_fp.clone(), ..Default::default() }
        }
    };
    if state.eval_fingerprint != eval_fp {
        state = CellState { eval_fingerprint: eval_fp, sampled: false, done: false, result: None, ..state };
    }
    if state.done {
        return Ok(state);
    }
    // Recorded before training, so that a sweep killed mid-run finds its checkpoint again.
    state.write(&job.dir)?;
    if !state.trained {
        on_stage("training");
        train_stage(job, &mut state, on_train)?;
        state.write(&job.dir)?;
    }
    if !state.sampled {
        on_stage("sampling");
        sample_stage(job)?;
        state.sampled = true;
        state.write(&job.dir)?;
    }
    if let Some((baseline_dir, _)) = &job.baseline {
        on_stage("judging");
        state.result = Some(judge_stage(job, baseline_dir)?);
    }
    state.done = true;
    state.write(&job.dir)?;
    Ok(state)
}

/// Train (resuming from `run/checkpoint/` if a previous attempt left one), merge a LoRA adapter, and
/// drop the checkpoint once `final/` is written.
fn train_stage(job: &CellJob, state: &mut CellState, on_train: &mut dyn FnMut(Event)) -> Result<()> {
    let started = Instant::now();
    let resume = has_checkpoint(&job.train.output_dir, on_train)?;
    let device = crate::device::open(job.train.device.as_deref().unwrap_or("cpu"), "sweep [train]")?;
    let history = train(&job.train, &device, RunOptions { resume, resume_force: false }, on_train)?;
    state.train_seconds += started.elapsed().as_secs_f64();
    if let Some(last) = history.last() {
        state.steps = last.step;
        state.final_loss = Some(last.loss);
    }
    let final_dir = job.train.output_dir.join("final");
    if crate::model::lora::is_adapter_dir(&final_dir) {
        let base = ModelSource::resolve(&final_dir, None)?.base;
        crate::model::merge_adapter(&base, &final_dir, &job.train.output_dir.join("merged"), &Device::Cpu)?;
    }
    let checkpoint = checkpoint_dir(&job.train.output_dir);
    if checkpoint.is_dir() {
        std::fs::remove_dir_all(&checkpoint).map_err(|e| Error::io(&checkpoint, e))?;
    }
    state.trained = true;
    Ok(())
}

/// Whether `output_dir` holds a checkpoint to resume from, after finishing a folder swap that a kill
/// interrupted (a checkpoint can be complete but not yet renamed into place).
pub(super) fn has_checkpoint(output_dir: &Path, on_train: &mut dyn FnMut(Event)) -> Result<bool> {
    let checkpoint = checkpoint_dir(output_dir);
    for done in crate::fsio::recover(&checkpoint)? {
        on_train(Event::Notice(done));
    }
    Ok(checkpoint.is_dir())
}

fn sample_stage(job: &CellJob) -> Result<()> {
    let rows = read_rows(job.prompts, false)?;
    let source = ModelSource::resolve(&job.train.output_dir.join("final"), None)?;
    let cfg = job.eval.generate_config(job.append_tokens.clone());
    let device = crate::device::open(job.train.device.as_deref().unwrap_or("cpu"), "sweep [train]")?;
    let gens = generate_rows(&source, job.prompts, &rows, job.eval.samples_per_prompt, &cfg, &device, &mut |_| {})?;
    let mut text = String::new();
    for row in gens {
        text.push_str(&serde_json::Value::Object(row).to_string());
        text.push('\n');
    }
    crate::fsio::write_atomic(&samples_path(&job.dir), text.as_bytes())
}

fn judge_stage(job: &CellJob, baseline_dir: &Path) -> Result<CellResult> {
    let judge = job.eval.judge_spec()?;
    let llm = LlmOptions {
        model: job.eval.judge_model.clone(),
        api_key: std::env::var("OPENAI_API_KEY").ok(),
        prompt_template: None,
    };
    let report = evaluate(
        &[samples_path(&job.dir)],
        &samples_path(baseline_dir),
        &judge,
        &llm,
        job.eval.seed,
        &job.dir.join("eval"),
    )?;
    report.candidates.into_iter().next().ok_or_else(|| Error::Compute("the judge returned no result".into()))
}
