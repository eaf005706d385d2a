//! The training loop, flat like nanoGPT's `train.py`. [`train`] is the whole of it:
//!
//! ```text
//! Run::setup   tokenizer, policy (Vars), data, resume, reference (model or cache)   run.rs, data.rs
//! for each optimizer step:
//!     run.step   for each microbatch: plan → batch → logps → loss → backward    microbatch.rs, plan.rs
//!                grad norm → clip → AdamW (lr from the schedule)                  optim.rs, schedule.rs
//!     log a line of metrics.jsonl; evaluate and checkpoint when due
//! run.finish   save output_dir/final/ as a Hugging Face folder
//! ```
//!
//! The library reports progress as [`Event`]s; printing is the binary's business.

pub mod checkpoint;
pub mod data;
pub mod fingerprint;
pub mod metrics;
pub mod microbatch;
pub mod optim;
pub mod plan;
pub mod reference;
pub mod run;
pub mod schedule;

use std::path::PathBuf;

use candle_core::Device;

use crate::config::TrainConfig;
use crate::error::Result;
pub use metrics::{ObjectiveMetrics, StepMetrics};
pub use run::Run;
pub use schedule::epoch_order;

/// Progress of a run, for the caller to display.
#[derive(Debug, Clone)]
pub enum Event {
    /// Something the user should know (data dropped, weights advice, ...).
    Notice(String),
    Started {
        start_step: usize,
        total_steps: usize,
        examples: usize,
        parameters: usize,
    },
    Step(StepMetrics),
    /// Metrics on the held-out rows after `step` (the same keys as training, logged under `eval/`).
    Eval {
        step: usize,
        loss: f64,
        metrics: ObjectiveMetrics,
    },
    Checkpoint(PathBuf),
    Finished(PathBuf),
}

/// How to start a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Continue from `output_dir/checkpoint/`; an error when there is none, or when it was written by a
    /// run with another fingerprint (config, model or data).
    pub resume: bool,
    /// With `resume`: continue even though the fingerprint differs (e.g. more steps on purpose).
    pub resume_force: bool,
}

/// Train as `config` says and save `output_dir/final/`. Returns the metrics of the steps it ran.
pub fn train(
    config: &TrainConfig,
    device: &Device,
    options: RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<StepMetrics>> {
    train_with(config, device, options, crate::dist::local(), on_event)
}

/// [`train`] as one rank of a data-parallel run over `comm` (every rank calls it with the same config).
/// Only rank 0 writes `metrics.jsonl`, checkpoints and `final/`; every rank returns the same metrics.
pub fn train_with(
    config: &TrainConfig,
    device: &Device,
    options: RunOptions,
    comm: crate::dist::Comm,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<StepMetrics>> {
    let mut run = Run::setup(config, device, options, comm, on_event)?;
    let mut history = Vec::new();
    for step in run.steps() {
        let metrics = run.step(step).map_err(|e| e.in_step(step + 1, run.loss_name()))?;
        run.log(&metrics)?;
        if metrics.grad_norm == 0.0 {
            on_event(Event::Notice(format!(
                "step {}: the gradient is exactly zero, so the weights did not learn (saturated or destroyed \
                 weights, e.g. a learning rate far too high)",
                step + 1
            )));
        }
        on_event(Event::Step(metrics.clone()));
        history.push(metrics);
        if run.eval_due(step) {
            on_event(run.evaluate(step)?);
        }
        if run.checkpoint_due(step) {
            on_event(Event::Checkpoint(run.checkpoint(step)?));
        }
    }
    let final_dir = run.finish(on_event)?;
    on_event(Event::Finished(final_dir));
    Ok(history)
}
