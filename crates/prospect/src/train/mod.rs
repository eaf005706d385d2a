//! The training loop, flat like nanoGPT's `train.py`:
//!
//! ```text
//! load tokenizer, policy (Vars), reference (frozen)       model::
//! read + tokenize rows                                    data::
//! [precompute_ref_logps: reference log-probs of every
//!  microbatch, then drop the reference model]             reference::
//! for each optimizer step:
//!     for each microbatch:   batch → logps → loss → backward, gradients summed
//!     grad norm → clip → AdamW (lr from the schedule)
//!     append a line to metrics.jsonl; checkpoint every `save_every` steps
//! save output_dir/final/ as a Hugging Face folder
//! ```
//!
//! The library reports progress as [`Event`]s; printing is the binary's business.

pub mod checkpoint;
pub mod metrics;
pub mod microbatch;
pub mod optim;
pub mod reference;
pub mod schedule;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::config::TrainConfig;
use crate::data::{prepare, read_jsonl, Examples, PrepareReport};
use crate::error::{Error, Result};
use crate::loss::{kto::class_weight_advice, LossConfig};
use crate::model::{load_frozen, HfTokenizer, Policy};
pub use metrics::{ObjectiveMetrics, StepMetrics};
use metrics::ObjectiveAccumulator;
use microbatch::{truncated_completion_len, BatchSettings, Models, Reference};
use reference::ReferenceLogps;
use optim::{accumulate, clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};

/// Progress of a run, for the caller to display.
#[derive(Debug, Clone)]
pub enum Event {
    /// Something the user should know (data dropped, weights advice, ...).
    Notice(String),
    Started { start_step: usize, total_steps: usize, examples: usize, parameters: usize },
    Step(StepMetrics),
    Checkpoint(PathBuf),
    Finished(PathBuf),
}

/// How to start a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Continue from `output_dir/checkpoint/` if there is one.
    pub resume: bool,
}

/// The row order of one epoch: file order, or a shuffle seeded by (`seed`, epoch).
pub fn epoch_order(n: usize, epoch: usize, shuffle: bool, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
    }
    order
}

/// Train as `config` says and save `output_dir/final/`. Returns the final metrics.
pub fn train(config: &TrainConfig, device: &Device, options: RunOptions, on_event: &mut dyn FnMut(Event)) -> Result<Vec<StepMetrics>> {
    config.validate()?;
    let tok = HfTokenizer::load(&config.model)?;
    let (policy, unused) = Policy::load(&config.model, device)?;
    if !unused.is_empty() {
        on_event(Event::Notice(format!("checkpoint tensors the model does not use, left out of training: {unused:?}")));
    }
    let mut reference = if config.loss.needs_reference() {
        let dir = config.reference.as_deref().unwrap_or(&config.model);
        Some(load_frozen(dir, device)?)
    } else {
        None
    };

    // Data.
    let rows = read_jsonl(&config.train_data)?;
    let (examples, report) = prepare(rows, config.loss.data_kind(), &tok, config.max_length, &config.train_data)?;
    report_data(config, &examples, &report, on_event);

    // Schedule.
    let n = examples.len();
    let steps_per_epoch = n.div_ceil(config.batch_size);
    let total_steps = config.max_steps.unwrap_or(config.epochs * steps_per_epoch);

    // Optimizer, or a checkpoint to resume from.
    let opt_config = AdamWConfig {
        beta1: config.adam_beta1,
        beta2: config.adam_beta2,
        eps: config.adam_epsilon,
        weight_decay: config.weight_decay,
    };
    let config_toml = config.to_toml()?;
    let metrics_path = config.output_dir.join("metrics.jsonl");
    std::fs::create_dir_all(&config.output_dir).map_err(|e| Error::io(&config.output_dir, e))?;
    let resumed = if options.resume { checkpoint::load(&config.output_dir, &policy.params, opt_config, device)? } else { None };
    let (mut opt, start_step) = match resumed {
        Some((opt, state)) => {
            on_event(Event::Notice(format!("resuming after step {} from {}", state.step, checkpoint::checkpoint_dir(&config.output_dir).display())));
            keep_metrics_through(&metrics_path, state.step)?;
            (opt, state.step)
        }
        None => {
            crate::fsio::write_atomic(&metrics_path, b"")?;
            (AdamW::new(opt_config), 0)
        }
    };
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    on_event(Event::Started { start_step, total_steps, examples: n, parameters: policy.params.num_elements() });

    let settings = BatchSettings { max_length: config.max_length, pad_id: tok.pad_token_id, device };
    let schedule = Schedule { n, steps_per_epoch, batch_size: config.batch_size, microbatch_size: config.microbatch_size, shuffle: config.shuffle, seed: config.seed };
    let cached = match reference.take() {
        Some(model) if config.precompute_ref_logps => {
            let started = Instant::now();
            let mbs: Vec<Vec<usize>> = (start_step..total_steps).flat_map(|step| schedule.microbatches(step)).collect();
            let cache = ReferenceLogps::compute(&config.loss, &examples, mbs.iter().map(Vec::as_slice), &model, &settings)?;
            on_event(Event::Notice(format!(
                "reference log-probs of {} sequences precomputed in {:.1} s; reference model freed",
                cache.len(),
                started.elapsed().as_secs_f64()
            )));
            Some(cache) // `model` drops here: training holds only the policy.
        }
        other => {
            reference = other;
            None
        }
    };

    let model = policy.model(device)?;
    let frozen = policy.frozen_model(device)?;
    let reference = match (&cached, &reference) {
        (Some(cache), _) => Some(Reference::Cached(cache)),
        (None, Some(model)) => Some(Reference::Model(model)),
        (None, None) => None,
    };
    let models = Models { policy: &model, policy_frozen: &frozen, reference };
    let mut history = Vec::new();

    for step in start_step..total_steps {
        let started = Instant::now();
        let (epoch, k) = (step / steps_per_epoch, step % steps_per_epoch);
        let batch = schedule.rows(step);
        let microbatches = schedule.microbatches(step);
        let step_tokens: usize = step_completion_tokens(&examples, &batch, config.max_length);

        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        let mut objective = ObjectiveAccumulator::default();
        let mut num_tokens = 0;
        for rows in &microbatches {
            let out = microbatch::run(&config.loss, &examples, rows, &models, &settings)?;
            let weight = config.loss.microbatch_weight(microbatches.len(), out.completion_tokens, step_tokens);
            let scaled = (&out.loss * weight)?;
            let value = scaled.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Train(format!("non-finite loss {value} at step {}", step + 1)));
            }
            loss_sum += value;
            objective.add(&out.metrics);
            num_tokens += out.num_tokens;
            let mut store = scaled.backward()?;
            // Sum into the step's gradients in place, freeing each microbatch gradient as it is added:
            // the peak of a step is here, with the step's and this microbatch's gradients both alive.
            for (name, var) in policy.params.iter() {
                if let Some(g) = store.remove(var.as_tensor()) {
                    match grads.get(name) {
                        Some(acc) => accumulate(acc, &g)?,
                        // A copy the step owns (and may update in place), detached from the graph.
                        None => _ = grads.insert(name.clone(), g.detach().copy()?),
                    }
                }
            }
            drop(store);
        }

        let grad_norm = global_grad_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(Error::Train(format!("non-finite gradient norm at step {}", step + 1)));
        }
        clip_grad_norm(&mut grads, grad_norm, config.max_grad_norm)?;
        let lr = schedule::learning_rate(config.lr_scheduler, config.learning_rate, step, total_steps, config.warmup_steps);
        opt.step(&policy.params, &grads, lr)?;

        let elapsed = started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: step + 1,
            // Rows consumed so far, in epochs (what `transformers` logs: 0.8 after 8 of 10 rows).
            epoch: epoch as f64 + ((k + 1) * config.batch_size).min(n) as f64 / n as f64,
            loss: loss_sum,
            grad_norm,
            lr,
            objective: objective.finish(),
            num_tokens,
            step_time_s: elapsed,
            tokens_per_s: num_tokens as f64 / elapsed.max(1e-9),
        };
        let mut line = serde_json::to_string(&m).map_err(|e| Error::Train(e.to_string()))?;
        line.push('\n');
        metrics_file.write_all(line.as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;
        metrics_file.flush().map_err(|e| Error::io(&metrics_path, e))?;
        on_event(Event::Step(m.clone()));
        history.push(m);

        if config.save_every > 0 && (step + 1) % config.save_every == 0 {
            let dir = checkpoint::save(&config.output_dir, &policy.params, &opt, &checkpoint::TrainerState { step: step + 1 }, &config_toml)?;
            on_event(Event::Checkpoint(dir));
        }
    }

    let final_dir = config.output_dir.join("final");
    policy.save_hf(&final_dir, &[("prospect.toml", config_toml.as_bytes())])?;
    on_event(Event::Finished(final_dir));
    Ok(history)
}

/// Which rows each optimizer step and each microbatch uses: the epoch's order, cut into batches, each cut
/// into microbatches. The training loop and the reference pre-pass both read it.
struct Schedule {
    n: usize,
    steps_per_epoch: usize,
    batch_size: usize,
    microbatch_size: usize,
    shuffle: bool,
    seed: u64,
}

impl Schedule {
    /// The rows of optimizer step `step` (0-based), in order.
    fn rows(&self, step: usize) -> Vec<usize> {
        let (epoch, k) = (step / self.steps_per_epoch, step % self.steps_per_epoch);
        let order = epoch_order(self.n, epoch, self.shuffle, self.seed);
        order[k * self.batch_size..((k + 1) * self.batch_size).min(self.n)].to_vec()
    }

    /// The microbatches of step `step`.
    fn microbatches(&self, step: usize) -> Vec<Vec<usize>> {
        self.rows(step).chunks(self.microbatch_size).map(<[usize]>::to_vec).collect()
    }
}

/// Completion tokens (after truncation) of a step's rows: SFT normalises by it.
fn step_completion_tokens(examples: &Examples, rows: &[usize], max_length: usize) -> usize {
    match examples {
        Examples::Sft(v) => rows.iter().map(|&i| truncated_completion_len(&v[i], max_length)).sum(),
        Examples::Unpaired(v) => rows.iter().map(|&i| truncated_completion_len(&v[i].seq, max_length)).sum(),
        Examples::Paired(v) => rows
            .iter()
            .map(|&i| truncated_completion_len(&v[i].chosen, max_length) + truncated_completion_len(&v[i].rejected, max_length))
            .sum(),
    }
}

fn report_data(config: &TrainConfig, examples: &Examples, report: &PrepareReport, on_event: &mut dyn FnMut(Event)) {
    let path = config.train_data.display();
    on_event(Event::Notice(format!("{path}: {} rows read, {} training examples", report.rows_read, examples.len())));
    if report.rows_unused > 0 {
        on_event(Event::Notice(format!("{path}: {} rows not used by `{}` (SFT keeps desirable/chosen completions)", report.rows_unused, config.loss.name())));
    }
    if report.dropped_long_prompt > 0 {
        on_event(Event::Notice(format!(
            "{path}: dropped {} examples whose prompt alone fills max_length = {}",
            report.dropped_long_prompt, config.max_length
        )));
    }
    if report.tokenize.prompt_not_prefix > 0 {
        on_event(Event::Notice(format!(
            "{path}: in {} rows the tokenized prompt is not a prefix of prompt + completion (tokens merge across the boundary); \
             the completion starts where they diverge. First dropped prompt text: {:?}",
            report.tokenize.prompt_not_prefix,
            report.tokenize.first_mismatch.as_deref().unwrap_or("")
        )));
    }
    if let (LossConfig::Kto(kto), Examples::Unpaired(v)) = (&config.loss, examples) {
        let nd = v.iter().filter(|e| e.label).count();
        if let Some(advice) = class_weight_advice(kto, nd, v.len() - nd) {
            on_event(Event::Notice(advice));
        }
    }
}

/// On resume: keep only the metrics lines of steps already checkpointed.
fn keep_metrics_through(path: &Path, step: usize) -> Result<()> {
    let text = if path.exists() { std::fs::read_to_string(path).map_err(|e| Error::io(path, e))? } else { String::new() };
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(m) = serde_json::from_str::<StepMetrics>(line) else { continue };
        if m.step <= step {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::fsio::write_atomic(path, kept.as_bytes())
}
