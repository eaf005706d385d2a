//! A training run's state, and its four verbs: [`Run::setup`], [`Run::step`], [`Run::evaluate`] /
//! [`Run::checkpoint`], and [`Run::finish`]. [`super::train`] strings them together.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{self, TrainerState};
use super::data::{self, RunData};
use super::fingerprint::Fingerprint;
use super::metrics::{ObjectiveAccumulator, StepMetrics};
use super::microbatch::{self, LmModels, Mode, Models, Reference, TokenModels};
use super::optim::{accumulate, clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use super::plan::BatchSettings;
use super::reference::{LazyReference, ModelKey, ReferenceLogps};
use super::schedule::{learning_rate, Schedule};
use super::{Event, RunOptions};
use crate::config::TrainConfig;
use crate::data::Examples;
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::loss::{Family, LossConfig, LossState};
use crate::model::{
    load_frozen_computing_in, load_frozen_reward, CausalLm, Head, HfTokenizer, LoraStart, ModelSource, Policy,
};

/// Everything a run holds between steps.
pub struct Run {
    config: TrainConfig,
    /// The loss as it runs: the config's, with λ replaced when `auto_weights` is on.
    loss: LossConfig,
    loss_state: LossState,
    policy: Policy,
    models: Models,
    data: RunData,
    schedule: Schedule,
    settings: BatchSettings,
    opt: AdamW,
    start_step: usize,
    fingerprint: Fingerprint,
    /// `metrics.jsonl`, written by rank 0 only.
    log: Option<MetricsLog>,
    /// The ranks of a data-parallel run (`dist::Local` for one process).
    comm: Comm,
    /// The tokenizer to save with the model when the run changed it (CSFT's control tokens).
    changed_tokenizer: Option<Vec<u8>>,
}

impl Run {
    /// Load the policy and the data, resume from a checkpoint if asked, and set up the reference. Every
    /// rank of `comm` does the same; the ranks first check that they run the same config and data.
    pub fn setup(
        config: &TrainConfig,
        device: &Device,
        options: RunOptions,
        comm: Comm,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Run> {
        config.validate()?;
        check_world(config, comm.world_size())?;
        let (tok, policy, changed_tokenizer) = load_policy(config, device, on_event)?;
        if let Some(reference) = config.reference.as_deref().filter(|_| config.loss.needs_reference()) {
            // the reference scores the policy's token ids
            tok.check_fits(&crate::model::ModelSource::resolve(reference, None)?.base)?;
        }
        let data = data::load(config, &tok, on_event)?;
        let schedule = Schedule::new(config, data.train.len());
        let fingerprint = Fingerprint::of(config)?;
        check_same_run(&comm, &fingerprint)?;
        // Rank 0 reads the checkpoint first: reading may complete an interrupted checkpoint swap on disk,
        // which one process must do alone. The other ranks read it after.
        let ordered = options.resume && comm.world_size() > 1;
        if ordered && comm.rank() != 0 {
            comm.barrier()?;
        }
        let (opt, resumed) = resume(config, &policy, options, &fingerprint, device, on_event)?;
        if ordered && comm.rank() == 0 {
            comm.barrier()?;
        }
        let start_step = resumed.as_ref().map_or(0, |s| s.step);
        let loss_state = resumed.map(|s| s.loss_state).unwrap_or_default();
        let log = (comm.rank() == 0).then(|| MetricsLog::open(&config.output_dir, start_step)).transpose()?;
        let settings =
            BatchSettings { max_length: config.max_length, pad_id: tok.pad_token_id, device: device.clone() };
        let remaining: Vec<Vec<usize>> =
            (start_step..schedule.total_steps).flat_map(|s| schedule.microbatches(s)).collect();
        let scope = ReferenceScope { remaining: &remaining, settings: &settings, fingerprint: &fingerprint };
        let reference = reference(config, &policy, &data, scope, &comm, on_event)?;
        let models = build_models(&data.loss, &policy, reference, config, device)?;
        on_event(Event::Started {
            start_step,
            total_steps: schedule.total_steps,
            examples: data.train.len(),
            parameters: policy.params.num_elements(),
        });
        let loss = data.loss.clone();
        Ok(Run {
            config: config.clone(),
            loss,
            loss_state,
            policy,
            models,
            data,
            schedule,
            settings,
            opt,
            start_step,
            fingerprint,
            log,
            comm,
            changed_tokenizer,
        })
    }

    /// The optimizer steps still to run (0-based).
    pub fn steps(&self) -> std::ops::Range<usize> {
        self.start_step..self.schedule.total_steps
    }

    pub fn loss_name(&self) -> &'static str {
        self.loss.name()
    }

    /// One optimizer step: every microbatch's loss and gradient, then clip and AdamW. With several ranks,
    /// each runs its share of the microbatches ([`dist::deal`]); gradients are summed across the ranks and
    /// the microbatches' losses and metrics gathered, so every rank takes the step one process would.
    pub fn step(&mut self, step: usize) -> Result<StepMetrics> {
        let started = Instant::now();
        dist::fail_point(self.comm.rank(), step + 1)?;
        if let Some(adapter) = &self.policy.config.adapter {
            adapter.rng.start_step(self.config.seed, step); // LoRA dropout: masks fixed by (seed, step)
        }
        let microbatches = self.schedule.microbatches(step);
        let step_tokens: usize = microbatches
            .iter()
            .flatten()
            .map(|&i| completion_tokens(&self.data.train, i, self.config.max_length))
            .sum();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut mine = Vec::new();
        for index in dist::deal(microbatches.len(), self.comm.rank(), self.comm.world_size()) {
            let out = microbatch::run(
                &self.loss,
                &self.models,
                &self.data.train,
                &microbatches[index],
                &self.settings,
                &self.loss_state,
                Mode::Train,
            )?;
            let weight = self.loss.microbatch_weight(microbatches.len(), out.completion_tokens, step_tokens);
            let scaled = (&out.loss * weight)?;
            let value = scalar(&scaled)?;
            if !value.is_finite() {
                return Err(Error::Numerics(format!("non-finite loss {value}")));
            }
            // A stateful loss (BCO's δ) reads, in the next microbatch, the state this one leaves. Stateful
            // losses run in one process (`check_world`), so this rank sees every microbatch, in order.
            self.loss.spec().observe(&mut self.loss_state, &out.metrics);
            mine.push(MicrobatchRecord { loss: value, num_tokens: out.num_tokens, metrics: out.metrics });
            self.add_gradients(&mut grads, &scaled, microbatches.len() > 1 && self.config.exact_accumulation)?;
        }
        // Every microbatch's record, in microbatch order, on every rank (one process: its own).
        let comm_started = Instant::now();
        let records = gather_records(&self.comm, mine)?;
        self.all_reduce(&mut grads)?;
        let comm_time_s = (self.comm.world_size() > 1).then(|| comm_started.elapsed().as_secs_f64());
        let (mut loss, mut num_tokens, mut objective) = (0f64, 0usize, ObjectiveAccumulator::default());
        for record in records {
            (loss, num_tokens) = (loss + record.loss, num_tokens + record.num_tokens);
            objective.add(&record.metrics);
        }
        for g in grads.values_mut() {
            *g = g.to_dtype(DType::F32)?; // the exact sum, rounded once
        }
        let grad_norm = global_grad_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(Error::Numerics(format!("non-finite gradient norm {grad_norm}")));
        }
        clip_grad_norm(&mut grads, grad_norm, self.config.max_grad_norm)?;
        let c = &self.config;
        let lr = learning_rate(c.lr_scheduler, c.learning_rate, step, self.schedule.total_steps, c.warmup_steps);
        self.opt.step(&self.policy.params, &grads, lr)?;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: step + 1,
            epoch: self.schedule.epoch_at_end(step),
            loss,
            grad_norm,
            lr,
            objective: objective.finish(),
            num_tokens,
            step_time_s: elapsed,
            tokens_per_s: num_tokens as f64 / elapsed.max(1e-9),
            comm_time_s,
            skipped_invalid: self.config.skip_invalid.then_some(self.data.skipped_invalid),
        })
    }

    /// Sum the step's gradients across the ranks, in place, in f64. Every rank sends every parameter (zeros for
    /// one it has no gradient for) and a flag per parameter, so that a parameter no rank touched stays
    /// without a gradient, as in one process (AdamW then leaves it alone).
    fn all_reduce(&self, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        if self.comm.world_size() == 1 {
            return Ok(());
        }
        let params: Vec<(&String, &candle_core::Var)> = self.policy.params.iter().collect();
        let total: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        // f64: the ranks' partial sums are exact (see `add_gradients`), and so is their sum.
        let mut buf: Vec<f64> = Vec::with_capacity(total + params.len());
        for (name, var) in &params {
            match grads.get(*name) {
                Some(g) => buf.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
                None => buf.resize(buf.len() + var.elem_count(), 0.0),
            }
        }
        buf.extend(params.iter().map(|(name, _)| if grads.contains_key(*name) { 1f64 } else { 0.0 }));
        self.comm.all_reduce_sum_f64(&mut buf)?;
        grads.clear();
        let (values, flags) = buf.split_at(total);
        let mut offset = 0;
        for ((name, var), &flag) in params.iter().zip(flags) {
            let n = var.elem_count();
            if flag > 0.0 {
                let g = Tensor::from_slice(&values[offset..offset + n], var.shape(), var.device())?;
                grads.insert((*name).clone(), g);
            }
            offset += n;
        }
        Ok(())
    }

    /// Backpropagate a microbatch's weighted loss and add its gradients into the step's, in place, freeing
    /// each as it is added: the step's peak memory is here. With several microbatches (`exact`) the sum is
    /// kept in f64: f32 gradients then add up exactly, in any order and on any number of ranks, so a
    /// step's gradient does not depend on how its microbatches were split (or dealt out to ranks) before
    /// it is rounded to f32, once.
    fn add_gradients(&self, grads: &mut BTreeMap<String, Tensor>, loss: &Tensor, exact: bool) -> Result<()> {
        let mut store = loss.backward()?;
        for (name, var) in self.policy.params.iter() {
            if let Some(g) = store.remove(var.as_tensor()) {
                match grads.get(name) {
                    Some(acc) => accumulate(acc, &g)?,
                    // A copy the step owns (and may update in place), detached from the graph.
                    None if exact => _ = grads.insert(name.clone(), g.detach().to_dtype(DType::F64)?),
                    None => _ = grads.insert(name.clone(), g.detach().copy()?),
                }
            }
        }
        Ok(())
    }

    /// Append a step's metrics to `metrics.jsonl`.
    pub fn log(&mut self, metrics: &StepMetrics) -> Result<()> {
        match &mut self.log {
            Some(log) => log.append(metrics),
            None => Ok(()),
        }
    }

    pub fn eval_due(&self, step: usize) -> bool {
        let every = self.config.eval_every;
        self.comm.rank() == 0
            && self.data.eval.is_some()
            && ((every > 0 && (step + 1).is_multiple_of(every)) || step + 1 == self.schedule.total_steps)
    }

    /// The loss and metrics on the held-out rows with no gradient, in microbatches of `microbatch_size`
    /// in file order; the loss is the mean over microbatches. Logged under `eval/`.
    pub fn evaluate(&mut self, step: usize) -> Result<Event> {
        let examples = self.data.eval.as_ref().ok_or_else(|| Error::Compute("the run has no eval rows".into()))?;
        let mut objective = ObjectiveAccumulator::default();
        let (mut sum, mut count) = (0f64, 0usize);
        for rows in &eval_microbatches(examples, self.config.microbatch_size) {
            let out = microbatch::run(
                &self.loss,
                &self.models,
                examples,
                rows,
                &self.settings,
                &self.loss_state,
                Mode::Eval,
            )?;
            sum += scalar(&out.loss)?;
            count += 1;
            objective.add(&out.metrics);
        }
        let (loss, metrics) = (sum / count.max(1) as f64, objective.finish());
        let mut line = serde_json::Map::new();
        line.insert("step".into(), (step + 1).into());
        line.insert("eval/loss".into(), loss.into());
        for (k, v) in metrics.iter() {
            line.insert(format!("eval/{k}"), v.into());
        }
        if let Some(log) = &mut self.log {
            log.append(&line)?;
        }
        Ok(Event::Eval { step: step + 1, loss, metrics })
    }

    pub fn checkpoint_due(&self, step: usize) -> bool {
        self.comm.rank() == 0 && self.config.save_every > 0 && (step + 1).is_multiple_of(self.config.save_every)
    }

    /// Write `output_dir/checkpoint/`: weights, optimizer, step and loss state, resolved config.
    pub fn checkpoint(&self, step: usize) -> Result<PathBuf> {
        let state = TrainerState {
            step: step + 1,
            loss_state: self.loss_state.clone(),
            fingerprint: Some(self.fingerprint.clone()),
        };
        checkpoint::save(&self.config.output_dir, &self.policy.params, &self.opt, &state, &self.config.to_toml()?)
    }

    /// Save `output_dir/final/` as a Hugging Face folder, with the resolved config beside it.
    pub fn finish(self, on_event: &mut dyn FnMut(Event)) -> Result<PathBuf> {
        if self.config.skip_invalid {
            on_event(Event::Notice(format!(
                "skip_invalid: {} invalid rows were skipped (metrics.jsonl: `data/skipped_invalid`)",
                self.data.skipped_invalid
            )));
        }
        let final_dir = self.config.output_dir.join("final");
        if self.comm.rank() != 0 {
            self.comm.barrier()?; // rank 0 saves; the others wait for it
            return Ok(final_dir);
        }
        checkpoint::ensure_finite(&self.policy.params.detached_tensors(), &final_dir)?;
        let config_toml = self.config.to_toml()?;
        let mut extra: Vec<(&str, &[u8])> = vec![("prospect.toml", config_toml.as_bytes())];
        if let Some(bytes) = &self.changed_tokenizer {
            extra.push(("tokenizer.json", bytes));
        }
        if self.policy.lora.is_some() {
            let base = std::fs::canonicalize(&self.config.model).unwrap_or_else(|_| self.config.model.clone());
            self.policy.save_adapter(&final_dir, &base.to_string_lossy(), &extra)?;
        } else {
            self.policy.save_hf(&final_dir, &extra)?;
        }
        self.comm.barrier()?;
        Ok(final_dir)
    }
}

/// The tokenizer and the policy with the head the loss family trains; CSFT's control tokens are added
/// to both when missing (the changed tokenizer is returned, to be saved with the model).
fn load_policy(
    config: &TrainConfig,
    device: &Device,
    on_event: &mut dyn FnMut(Event),
) -> Result<(HfTokenizer, Policy, Option<Vec<u8>>)> {
    let mut tok = HfTokenizer::load(&config.model)?;
    let head = match config.loss.family() {
        Family::Reward(_) => Head::Score,
        Family::Token(_) => Head::Value,
        _ => Head::Lm,
    };
    let lora = config.lora.as_ref().map(|table| LoraStart { table, seed: config.seed });
    let (mut policy, unused, initialised) = Policy::load_for_training(&config.model, device, head, config.seed, lora)?;
    policy.config.compute = config.dtype; // bf16 products on f32 master weights, when the config asks
    if let Some(settings) = &policy.lora {
        let frozen = policy.frozen_parameters();
        let trainable = policy.params.num_elements();
        on_event(Event::Notice(format!(
            "LoRA r={} alpha={} on {:?}: {trainable} trainable parameters, {:.3}% of {}",
            settings.r,
            settings.alpha,
            settings.target_modules,
            100.0 * trainable as f64 / (trainable + frozen) as f64,
            trainable + frozen
        )));
    }
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
    let Some((good, bad)) = config.loss.spec().control_tokens() else { return Ok((tok, policy, None)) };
    let added = tok.add_special_tokens(&[good, bad])?;
    if added.is_empty() {
        return Ok((tok, policy, None));
    }
    let grown = policy.grow_vocab(tok.vocab_size(), device)?;
    let rows =
        if grown > 0 { format!(" and {grown} embedding rows (the mean of the existing rows)") } else { String::new() };
    on_event(Event::Notice(format!("added control tokens {added:?} to the tokenizer{rows}")));
    let bytes = tok.to_json_bytes()?;
    Ok((tok, policy, Some(bytes)))
}

/// A fresh optimizer, or the one in `output_dir/checkpoint/` (loading its weights into `policy`).
fn resume(
    config: &TrainConfig,
    policy: &Policy,
    options: RunOptions,
    fingerprint: &Fingerprint,
    device: &Device,
    on_event: &mut dyn FnMut(Event),
) -> Result<(AdamW, Option<TrainerState>)> {
    let opt_config = AdamWConfig {
        beta1: config.adam_beta1,
        beta2: config.adam_beta2,
        eps: config.adam_epsilon,
        weight_decay: config.weight_decay,
    };
    std::fs::create_dir_all(&config.output_dir).map_err(|e| Error::io(&config.output_dir, e))?;
    if !options.resume {
        return Ok((AdamW::new(opt_config), None));
    }
    let (opt, state, recovered) =
        checkpoint::load(&config.output_dir, &policy.params, opt_config, device, fingerprint, options.resume_force)?;
    for line in recovered {
        on_event(Event::Notice(format!("checkpoint recovery: {line}")));
    }
    let dir = checkpoint::checkpoint_dir(&config.output_dir);
    on_event(Event::Notice(format!("resuming after step {} from {}", state.step, dir.display())));
    Ok((opt, Some(state)))
}

/// What the reference pre-pass covers: the microbatches still to train, batched as training batches them,
/// and the run's fingerprint (its file digests name the reference model).
struct ReferenceScope<'a> {
    remaining: &'a [Vec<usize>],
    settings: &'a BatchSettings,
    fingerprint: &'a Fingerprint,
}

/// The reference, when the loss has one: the frozen model, or (with `precompute_ref_logps`) its
/// log-probs over every remaining microbatch, read from the run folder's cache where it has them, after
/// which the model is dropped.
fn reference(
    config: &TrainConfig,
    policy: &Policy,
    data: &RunData,
    scope: ReferenceScope,
    comm: &Comm,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<Reference>> {
    if !data.loss.needs_reference() || matches!(data.loss.family(), Family::Token(_)) {
        return Ok(None);
    }
    let settings = scope.settings;
    if !config.precomputes_reference() {
        return Ok(Some(Reference::Model(reference_model(config, policy, &settings.device)?)));
    }
    let mut model = LazyReference::new(|| reference_model(config, policy, &settings.device));
    let started = Instant::now();
    let (key, path) =
        (reference_key(config, scope.fingerprint, &settings.device), ReferenceLogps::path(&config.output_dir));
    let mut cache = ReferenceLogps::load(&path, key)?;
    // Each rank scores its share of the microbatches (what the file lacks); the tables are then merged.
    let share = &scope.remaining[dist::deal(scope.remaining.len(), comm.rank(), comm.world_size())];
    let family = data.loss.family();
    let mut counts = cache.compute(family, &data.train, share.iter().map(Vec::as_slice), &mut model, settings)?;
    if let Some(eval) = &data.eval {
        let batches = eval_microbatches(eval, config.microbatch_size);
        let more = cache.compute(family, eval, batches.iter().map(Vec::as_slice), &mut model, settings)?;
        (counts.computed, counts.reused) = (counts.computed + more.computed, counts.reused + more.reused);
    }
    let cache = match comm.world_size() {
        1 => cache,
        _ => ReferenceLogps::merge(comm.all_gather(&cache.to_bytes())?.iter().map(|b| ReferenceLogps::from_bytes(b)))?,
    };
    if comm.rank() == 0 && counts.computed > 0 {
        cache.save(&path, key)?;
    }
    on_event(Event::Notice(format!(
        "reference log-probs: {} batches computed in {:.1} s, {} reused from {}; reference model {}",
        counts.computed,
        started.elapsed().as_secs_f64(),
        counts.reused,
        path.display(),
        if model.loaded() { "freed" } else { "not needed" }
    )));
    Ok(Some(Reference::Cached(cache))) // `model` drops here: training holds only the policy.
}

/// The microbatches of an evaluation: the eval rows in file order, `microbatch_size` at a time. Shared by
/// [`Run::evaluate`] and the reference pre-pass, which must batch them alike.
fn eval_microbatches(examples: &Examples, microbatch_size: usize) -> Vec<Vec<usize>> {
    (0..examples.len()).collect::<Vec<_>>().chunks(microbatch_size).map(<[usize]>::to_vec).collect()
}

/// What cached reference log-probs depend on besides the batches: the reference model's files (or the
/// starting policy's, with its LoRA settings and initial adapter), the compute dtype and the device kind.
fn reference_key(config: &TrainConfig, fingerprint: &Fingerprint, device: &Device) -> ModelKey {
    let mut parts: Vec<String> = fingerprint
        .entries
        .iter()
        .filter(|(k, _)| k.starts_with("model.") || k.starts_with("reference.") || k.starts_with("lora."))
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    parts.push(format!("dtype = {:?}", config.dtype));
    parts.push(format!("device = {}", if device.is_cpu() { "cpu" } else { "cuda" }));
    ModelKey::of(&parts)
}

/// The reference model: `reference` when the config names one (a model or an adapter folder), else the
/// policy as it starts; with LoRA that costs no second copy of the base ([`Policy::lora_reference`]).
fn reference_model(config: &TrainConfig, policy: &Policy, device: &Device) -> Result<CausalLm> {
    let frozen = |dir: &Path| load_frozen_computing_in(&ModelSource::resolve(dir, None)?, device, config.dtype);
    if let Some(dir) = &config.reference {
        return frozen(dir);
    }
    match policy.lora_reference(device)? {
        Some(model) => Ok(model),
        None => frozen(&config.model),
    }
}

/// The models of the loss's family, on the policy's weights.
fn build_models(
    loss: &LossConfig,
    policy: &Policy,
    reference: Option<Reference>,
    config: &TrainConfig,
    device: &Device,
) -> Result<Models> {
    Ok(match loss.family() {
        Family::Reward(_) => Models::Reward(policy.reward_model(device)?),
        Family::Token(token) => Models::Token(TokenModels {
            policy: policy.model(device)?,
            frozen: policy.frozen_model(device)?,
            value_head: policy.value_head(device)?,
            reference: reference_model(config, policy, device)?,
            scorer: token.reward_model().map(|dir| load_frozen_reward(dir, device)).transpose()?,
        }),
        _ => Models::Lm(LmModels { policy: policy.model(device)?, frozen: policy.frozen_model(device)?, reference }),
    })
}

/// `batch_size` is the global optimizer batch: with N ranks it must split into N equal shares of whole
/// microbatches. A stateful loss needs its microbatches in order, in one process.
fn check_world(config: &TrainConfig, world: usize) -> Result<()> {
    if world > 1 && config.loss.spec().stateful() {
        return Err(Error::config(
            "loss.type",
            format!(
                "`{}` cannot train data-parallel: each training microbatch updates a running state (BCO's reward \
                 shift δ, the running mean of every reward so far) that the next microbatch reads, and {world} \
                 ranks run a step's microbatches at the same time, so they cannot reproduce the δ of one \
                 process. Run it in one process (world size 1), with the same batch_size",
                config.loss.name()
            ),
        ));
    }
    if world > 1 && !config.batch_size.is_multiple_of(config.microbatch_size * world) {
        return Err(Error::config(
            "batch_size",
            format!(
                "is the global batch: with {world} ranks it must be microbatch_size × accumulation × {world}, \
                 a multiple of {} × {world} = {}; got {}",
                config.microbatch_size,
                config.microbatch_size * world,
                config.batch_size
            ),
        ));
    }
    Ok(())
}

/// Every rank must run the same config on the same model and data: compare fingerprints with rank 0's.
fn check_same_run(comm: &Comm, fingerprint: &Fingerprint) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mine = serde_json::to_vec(fingerprint).map_err(|e| Error::Compute(e.to_string()))?;
    let all: Vec<Fingerprint> = comm
        .all_gather(&mine)?
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).map_err(|e| Error::Compute(format!("a rank's fingerprint: {e}"))))
        .collect::<Result<_>>()?;
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        let diff = all[0].differences(theirs);
        if !diff.is_empty() {
            return Err(Error::Compute(format!(
                "rank {rank} runs a different config or data than rank 0: {}",
                diff.join("; ")
            )));
        }
    }
    Ok(())
}

/// What a microbatch contributes to a step's log: its weighted loss, tokens and metrics.
#[derive(serde::Serialize, serde::Deserialize)]
struct MicrobatchRecord {
    loss: f64,
    num_tokens: usize,
    metrics: crate::loss::Metrics,
}

/// Every rank's records, in rank order: with contiguous shares, that is microbatch order.
fn gather_records(comm: &Comm, mine: Vec<MicrobatchRecord>) -> Result<Vec<MicrobatchRecord>> {
    if comm.world_size() == 1 {
        return Ok(mine);
    }
    let bytes = serde_json::to_vec(&mine).map_err(|e| Error::Compute(e.to_string()))?;
    let mut all = Vec::new();
    for part in comm.all_gather(&bytes)? {
        let records: Vec<MicrobatchRecord> =
            serde_json::from_slice(&part).map_err(|e| Error::Compute(format!("gathered metrics: {e}")))?;
        all.extend(records);
    }
    Ok(all)
}

/// Completion tokens example `i` keeps after truncation at `max_length` (a pair counts both sides):
/// the SFT family's step normaliser.
fn completion_tokens(examples: &Examples, i: usize, max_length: usize) -> usize {
    let kept = |s: &crate::data::Sequence| max_length.min(s.len()).saturating_sub(s.prompt_ids.len());
    match examples {
        Examples::Sft(v) => kept(&v[i]),
        Examples::Unpaired(v) => kept(&v[i].seq),
        Examples::Paired(v) => kept(&v[i].chosen) + kept(&v[i].rejected),
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `output_dir/metrics.jsonl`, one JSON object per line, flushed as written.
struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Start the file afresh, or (resuming after `step`) keep only the lines of steps up to `step`.
    fn open(output_dir: &Path, step: usize) -> Result<Self> {
        let path = output_dir.join("metrics.jsonl");
        let text = match step {
            0 => String::new(),
            _ if path.exists() => std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?,
            _ => String::new(),
        };
        let kept: String = text
            .lines()
            .filter(|line| {
                // Step lines and `eval/` lines both carry `step`.
                let value = serde_json::from_str::<serde_json::Value>(line).ok();
                value.and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s as usize <= step)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        crate::fsio::write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    fn append(&mut self, value: &impl serde::Serialize) -> Result<()> {
        let mut line = serde_json::to_string(value).map_err(|e| Error::output(&self.path, e))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}
