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
pub mod data;
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
use crate::data::Examples;
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::model::{load_frozen, load_frozen_reward, Head, HfTokenizer, Policy};
use metrics::ObjectiveAccumulator;
pub use metrics::{ObjectiveMetrics, StepMetrics};
use microbatch::{truncated_completion_len, BatchSettings, Models, Reference};
use optim::{accumulate, clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use reference::ReferenceLogps;

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
pub fn train(
    config: &TrainConfig,
    device: &Device,
    options: RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<StepMetrics>> {
    config.validate()?;
    let mut tok = HfTokenizer::load(&config.model)?;
    let head = match &config.loss {
        LossConfig::Reward(_) => Head::Score,
        LossConfig::PpoOffline(_) => Head::Value,
        _ => Head::Lm,
    };
    let (mut policy, unused, initialised) = Policy::load_with_head(&config.model, device, head, config.seed)?;
    policy.pad_token_id = Some(tok.pad_token_id);
    if !unused.is_empty() {
        on_event(Event::Notice(format!("checkpoint tensors the model does not use, left out of training: {unused:?}")));
    }
    if !initialised.is_empty() {
        on_event(Event::Notice(format!(
            "{} has no {initialised:?}: initialised from N(0, initializer_range²) with seed {}",
            config.model.display(),
            config.seed
        )));
    }
    // CSFT: the control tokens, added to the tokenizer and the embeddings when missing.
    let mut saved_tokenizer: Option<Vec<u8>> = None;
    let control_ids = match &config.loss {
        LossConfig::Csft(c) => {
            let added = tok.add_special_tokens(&[c.good_token.as_str(), c.bad_token.as_str()])?;
            if !added.is_empty() {
                let grown = policy.grow_vocab(tok.vocab_size(), device)?;
                on_event(Event::Notice(format!(
                    "added control tokens {added:?} to the tokenizer{}",
                    if grown > 0 {
                        format!(" and {grown} embedding rows (the mean of the existing rows)")
                    } else {
                        String::new()
                    }
                )));
                saved_tokenizer = Some(tok.to_json_bytes()?);
            }
            Some((tok.token_id(&c.good_token)?, tok.token_id(&c.bad_token)?))
        }
        _ => None,
    };
    let mut reference = if config.loss.needs_reference() {
        let dir = config.reference.as_deref().unwrap_or(&config.model);
        Some(load_frozen(dir, device)?)
    } else {
        None
    };
    let scorer = match &config.loss {
        LossConfig::PpoOffline(ppo) => match &ppo.reward_model {
            Some(dir) => Some(load_frozen_reward(dir, device)?),
            None => None,
        },
        _ => None,
    };

    // Data: read (any layout), hold out, unpair + balance, tokenize; λ from the class counts if asked.
    let run_data = data::load(config, &tok, on_event)?;
    let (examples, eval_examples, loss) = (run_data.train, run_data.eval, run_data.loss);
    let skipped_invalid = config.skip_invalid.then_some(run_data.skipped_invalid);

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
    let resumed =
        if options.resume { checkpoint::load(&config.output_dir, &policy.params, opt_config, device)? } else { None };
    let (mut opt, start_step) = match resumed {
        Some((opt, state)) => {
            on_event(Event::Notice(format!(
                "resuming after step {} from {}",
                state.step,
                checkpoint::checkpoint_dir(&config.output_dir).display()
            )));
            keep_metrics_through(&metrics_path, state.step)?;
            (opt, state.step)
        }
        None => {
            crate::fsio::write_atomic(&metrics_path, b"")?;
            (AdamW::new(opt_config), 0)
        }
    };
    let mut metrics_file =
        std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;

    on_event(Event::Started { start_step, total_steps, examples: n, parameters: policy.params.num_elements() });

    let settings = BatchSettings { max_length: config.max_length, pad_id: tok.pad_token_id, device, control_ids };
    let schedule = Schedule {
        n,
        steps_per_epoch,
        batch_size: config.batch_size,
        microbatch_size: config.microbatch_size,
        shuffle: config.shuffle,
        seed: config.seed,
    };
    let cached = match reference.take() {
        Some(model) if config.precompute_ref_logps => {
            let started = Instant::now();
            let mbs: Vec<Vec<usize>> = (start_step..total_steps).flat_map(|step| schedule.microbatches(step)).collect();
            let cache =
                ReferenceLogps::compute(&config.loss, &examples, mbs.iter().map(Vec::as_slice), &model, &settings)?;
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
    let reward_model = if head == Head::Score { Some(policy.reward_model(device)?) } else { None };
    let value_head = if head == Head::Value { Some(policy.value_head(device)?) } else { None };
    let reference = match (&cached, &reference) {
        (Some(cache), _) => Some(Reference::Cached(cache)),
        (None, Some(model)) => Some(Reference::Model(model)),
        (None, None) => None,
    };
    let models = Models {
        policy: &model,
        policy_frozen: &frozen,
        reference,
        reward_model: reward_model.as_ref(),
        value_head: value_head.as_ref(),
        scorer: scorer.as_ref(),
    };
    let control_tokens = usize::from(control_ids.is_some());
    let mut history = Vec::new();

    for step in start_step..total_steps {
        let started = Instant::now();
        let (epoch, k) = (step / steps_per_epoch, step % steps_per_epoch);
        let batch = schedule.rows(step);
        let microbatches = schedule.microbatches(step);
        let step_tokens: usize = step_completion_tokens(&examples, &batch, config.max_length, control_tokens);

        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        let mut objective = ObjectiveAccumulator::default();
        let mut num_tokens = 0;
        for rows in &microbatches {
            let out = microbatch::run(&loss, &examples, rows, &models, &settings)?;
            let weight = loss.microbatch_weight(microbatches.len(), out.completion_tokens, step_tokens);
            let scaled = (&out.loss * weight)?;
            let value = scaled.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Numerics(format!("non-finite loss {value}")).in_step(step + 1, loss.name()));
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
            return Err(Error::Numerics(format!("non-finite gradient norm {grad_norm}")).in_step(step + 1, loss.name()));
        }
        clip_grad_norm(&mut grads, grad_norm, config.max_grad_norm)?;
        let lr =
            schedule::learning_rate(config.lr_scheduler, config.learning_rate, step, total_steps, config.warmup_steps);
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
            skipped_invalid,
        };
        let mut line = serde_json::to_string(&m).map_err(|e| Error::output(&metrics_path, e))?;
        line.push('\n');
        metrics_file.write_all(line.as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;
        metrics_file.flush().map_err(|e| Error::io(&metrics_path, e))?;
        on_event(Event::Step(m.clone()));
        history.push(m);

        if let Some(eval) = &eval_examples {
            if (config.eval_every > 0 && (step + 1) % config.eval_every == 0) || step + 1 == total_steps {
                // No gradient for the LM; the heads (reward model, value head) are read as they stand.
                let eval_models = Models { policy: &frozen, policy_frozen: &frozen, ..models };
                let (eval_loss, metrics) = evaluate(&loss, eval, &eval_models, &settings, config.microbatch_size)?;
                let mut line = serde_json::Map::new();
                line.insert("step".into(), (step + 1).into());
                line.insert("eval/loss".into(), eval_loss.into());
                if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&metrics) {
                    for (k, v) in fields {
                        line.insert(format!("eval/{k}"), v);
                    }
                }
                let mut text = serde_json::Value::Object(line).to_string();
                text.push('\n');
                metrics_file.write_all(text.as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;
                metrics_file.flush().map_err(|e| Error::io(&metrics_path, e))?;
                on_event(Event::Eval { step: step + 1, loss: eval_loss, metrics });
            }
        }

        if config.save_every > 0 && (step + 1) % config.save_every == 0 {
            let dir = checkpoint::save(
                &config.output_dir,
                &policy.params,
                &opt,
                &checkpoint::TrainerState { step: step + 1 },
                &config_toml,
            )?;
            on_event(Event::Checkpoint(dir));
        }
    }

    if let Some(n) = skipped_invalid {
        on_event(Event::Notice(format!(
            "skip_invalid: {n} invalid rows were skipped (metrics.jsonl: `data/skipped_invalid`)"
        )));
    }
    let final_dir = config.output_dir.join("final");
    let mut extra: Vec<(&str, &[u8])> = vec![("prospect.toml", config_toml.as_bytes())];
    if let Some(bytes) = &saved_tokenizer {
        extra.push(("tokenizer.json", bytes));
    }
    policy.save_hf(&final_dir, &extra)?;
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

/// Completion tokens (after truncation) of a step's rows: SFT and CSFT normalise by it. `prefix`
/// tokens are prepended to every completion (CSFT's control token).
fn step_completion_tokens(examples: &Examples, rows: &[usize], max_length: usize, prefix: usize) -> usize {
    match examples {
        Examples::Sft(v) => rows.iter().map(|&i| truncated_completion_len(&v[i], max_length)).sum(),
        Examples::Unpaired(v) => rows
            .iter()
            .map(|&i| (max_length.min(v[i].seq.len() + prefix)).saturating_sub(v[i].seq.prompt_ids.len()))
            .sum(),
        Examples::Paired(v) => rows
            .iter()
            .map(|&i| {
                truncated_completion_len(&v[i].chosen, max_length)
                    + truncated_completion_len(&v[i].rejected, max_length)
            })
            .sum(),
    }
}

/// The loss and metrics on held-out examples, with no gradient: the policy's current weights run
/// frozen, in microbatches of `microbatch_size` in file order; the loss is the mean over microbatches.
fn evaluate(
    loss: &LossConfig,
    examples: &Examples,
    models: &Models,
    settings: &BatchSettings,
    microbatch_size: usize,
) -> Result<(f64, ObjectiveMetrics)> {
    let order: Vec<usize> = (0..examples.len()).collect();
    let mut objective = ObjectiveAccumulator::default();
    let (mut sum, mut count) = (0f64, 0usize);
    for rows in order.chunks(microbatch_size) {
        let out = microbatch::run(loss, examples, rows, models, settings)?;
        sum += out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        count += 1;
        objective.add(&out.metrics);
    }
    Ok((sum / count.max(1) as f64, objective.finish()))
}

/// On resume: keep only the metrics lines of steps already checkpointed.
fn keep_metrics_through(path: &Path, step: usize) -> Result<()> {
    let text =
        if path.exists() { std::fs::read_to_string(path).map_err(|e| Error::io(path, e))? } else { String::new() };
    let mut kept = String::new();
    for line in text.lines() {
        // Step lines and `eval/` lines both carry `step`.
        let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if m.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::fsio::write_atomic(path, kept.as_bytes())
}
