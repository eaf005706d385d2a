//! One microbatch: plan → padded batches → log-probs (policy and reference) → the family's inputs →
//! loss. This is the only place that calls models during training; the losses see log-probs only.
//!
//! Shapes: `b` rows in the microbatch.

use candle_core::{DType, Tensor};

use super::plan::{collate, logps, logps_with_kl, paired_logps, BatchSettings, Plan};
use super::reference::ReferenceLogps;
use crate::data::{Examples, SequenceBatch};
use crate::error::{Error, Result};
use crate::loss::{
    Family, KlInputs, LossConfig, LossState, Metrics, PairedInputs, PairedLoss, RewardLoss, SftLoss, TokenInputs,
    TokenLoss, UnpairedInputs, UnpairedLoss,
};
use crate::model::{token_logps, CausalLm, RewardModel, ValueHead};

/// The models a run trains and scores with, one variant per kind of trainable model. One value per run,
/// so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Models {
    /// A causal LM: the paired, unpaired and SFT families.
    Lm(LmModels),
    /// A reward model (backbone + `score`) on the trainable weights.
    Reward(RewardModel),
    /// A policy with a value head, for per-token losses.
    Token(TokenModels),
}

pub struct LmModels {
    /// The policy on trainable weights.
    pub policy: CausalLm,
    /// The same weights without gradient tracking: KTO's KL pairs, and evaluation.
    pub frozen: CausalLm,
    /// Where reference log-probs come from, when the loss has a reference.
    pub reference: Option<Reference>,
}

pub struct TokenModels {
    pub policy: CausalLm,
    pub frozen: CausalLm,
    pub value_head: ValueHead,
    /// Per-token reference log-probs need the model itself.
    pub reference: CausalLm,
    /// A frozen reward model scoring completions; `None`: rewards are ±1 from the labels.
    pub scorer: Option<RewardModel>,
}

/// The frozen reference: a model run on every microbatch, or its log-probs computed before training
/// (`precompute_ref_logps`, see [`super::reference`]). One value per run.
#[allow(clippy::large_enum_variant)]
pub enum Reference {
    Model(CausalLm),
    Cached(ReferenceLogps),
}

impl Reference {
    /// Summed reference log-probs `[b]` of `batch`, whose rows are the sequences `keys` name.
    fn logps(&self, batch: &SequenceBatch) -> Result<Tensor> {
        match self {
            Reference::Model(model) => Ok(logps(model, batch)?.detach()),
            Reference::Cached(cache) => cache.tensor(batch, batch.input_ids.device()),
        }
    }

    /// Reference log-probs `[2b]` of a paired batch (see [`paired_logps`]).
    fn paired_logps(&self, batch: &SequenceBatch) -> Result<Tensor> {
        match self {
            Reference::Model(model) => Ok(paired_logps(model, batch)?.detach()),
            Reference::Cached(cache) => cache.tensor(batch, batch.input_ids.device()),
        }
    }

    /// Reference log-probs `([b], [b])` of a microbatch's main rows and its KL rows, which share prompts
    /// (see [`logps_with_kl`]).
    fn logps_with_kl(&self, main: &SequenceBatch, kl: &SequenceBatch) -> Result<(Tensor, Tensor)> {
        match self {
            Reference::Model(model) => {
                let (main, kl) = logps_with_kl(model, model, main, kl)?;
                Ok((main.detach(), kl))
            }
            Reference::Cached(cache) => {
                let device = main.input_ids.device();
                Ok((cache.tensor(main, device)?, cache.tensor(kl, device)?))
            }
        }
    }
}

/// What one microbatch gives the step.
pub struct MicrobatchOutput {
    /// Scalar loss of this microbatch (before the step's microbatch weight).
    pub loss: Tensor,
    pub metrics: Metrics,
    /// Completion tokens of this microbatch's training sequences.
    pub completion_tokens: usize,
    /// Real tokens the policy processed.
    pub num_tokens: usize,
}

/// Whether the policy's weights get gradients in this pass (training) or not (evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// One microbatch of `rows` through `loss`: the one dispatch on the loss family.
pub fn run(
    loss: &LossConfig,
    models: &Models,
    examples: &Examples,
    rows: &[usize],
    s: &BatchSettings,
    state: &LossState,
    mode: Mode,
) -> Result<MicrobatchOutput> {
    let plan = Plan::new(loss.family(), rows);
    match (loss.family(), models) {
        (Family::Paired(l), Models::Lm(m)) => paired(l, m, examples, &plan, s, state, mode),
        (Family::Unpaired(l), Models::Lm(m)) => unpaired(l, m, examples, rows, &plan, s, state, mode),
        (Family::Sft(l), Models::Lm(m)) => sft(l, m, examples, &plan, s, mode),
        (Family::Reward(l), Models::Reward(rm)) => reward(l, rm, examples, &plan, s),
        (Family::Token(l), Models::Token(m)) => token(l, m, examples, rows, &plan, s, mode),
        _ => Err(Error::Compute(format!("loss `{}` was set up with another family's models", loss.name()))),
    }
}

impl LmModels {
    fn policy(&self, mode: Mode) -> &CausalLm {
        match mode {
            Mode::Train => &self.policy,
            Mode::Eval => &self.frozen,
        }
    }

    /// Reference log-probs `[b]` of a planned batch, when the loss declares a reference.
    fn reference(&self, needed: bool, batch: &SequenceBatch) -> Result<Option<Tensor>> {
        needed.then(|| self.reference_logps(batch)).transpose()
    }

    fn reference_model(&self) -> Result<&Reference> {
        self.reference.as_ref().ok_or_else(|| Error::Compute("the loss needs a reference and the run has none".into()))
    }

    fn reference_logps(&self, batch: &SequenceBatch) -> Result<Tensor> {
        self.reference_model()?.logps(batch)
    }
}

fn output(loss: Tensor, metrics: Metrics, batch: &SequenceBatch, extra_tokens: usize) -> MicrobatchOutput {
    MicrobatchOutput {
        loss,
        metrics,
        completion_tokens: batch.total_completion_tokens(),
        num_tokens: batch.num_tokens + extra_tokens,
    }
}

/// Pairs: one forward pass over `[2b]`, chosen rows then rejected rows.
fn paired(
    loss: &dyn PairedLoss,
    m: &LmModels,
    examples: &Examples,
    plan: &Plan,
    s: &BatchSettings,
    state: &LossState,
    mode: Mode,
) -> Result<MicrobatchOutput> {
    let batch = collate(examples, &plan.main, s)?;
    let b = plan.main.len() / 2;
    // The rejected rows reuse the chosen rows' prompts (keys and values), in the policy and the reference.
    let policy = paired_logps(m.policy(mode), &batch)?; // [2b]
    let reference = loss.needs_reference().then(|| m.reference_model()?.paired_logps(&batch)).transpose()?; // [2b]
    let halves = |t: &Tensor| -> Result<(Tensor, Tensor)> { Ok((t.narrow(0, 0, b)?, t.narrow(0, b, b)?)) };
    let (policy_chosen, policy_rejected) = halves(&policy)?;
    let reference = reference.as_ref().map(halves).transpose()?;
    let (chosen_tokens, rejected_tokens) = batch.completion_tokens.split_at(b);
    let out = loss.forward(&PairedInputs {
        policy_chosen: &policy_chosen,
        policy_rejected: &policy_rejected,
        reference: reference.as_ref().map(|(c, r)| (c, r)),
        chosen_tokens,
        rejected_tokens,
        state,
    })?;
    Ok(output(out.loss, out.metrics, &batch, 0))
}

/// Labelled rows, plus the KL pairs when the loss asks for them (scored without gradient).
#[allow(clippy::too_many_arguments)]
fn unpaired(
    loss: &dyn UnpairedLoss,
    m: &LmModels,
    examples: &Examples,
    rows: &[usize],
    plan: &Plan,
    s: &BatchSettings,
    state: &LossState,
    mode: Mode,
) -> Result<MicrobatchOutput> {
    let labels = labels(examples, rows)?;
    let batch = collate(examples, &plan.main, s)?;
    let mut kl_tokens = 0;
    let (policy, reference, kl) = if plan.kl.is_empty() {
        let policy = logps(m.policy(mode), &batch)?; // [b]
        (policy, m.reference(loss.needs_reference(), &batch)?, None)
    } else {
        // The KL rows (x_i, y_{i-1}) reuse the prompts' keys and values of the rows (x_i, y_i).
        let kl_batch = collate(examples, &plan.kl, s)?;
        kl_tokens = kl_batch.num_tokens;
        let (policy, policy_kl) = logps_with_kl(m.policy(mode), &m.frozen, &batch, &kl_batch)?; // [b] each
        let (reference, reference_kl) = m.reference_model()?.logps_with_kl(&batch, &kl_batch)?; // [b] each
        (policy, loss.needs_reference().then_some(reference), Some((policy_kl, reference_kl)))
    };
    let out = loss.forward(&UnpairedInputs {
        policy: &policy,
        reference: reference.as_ref(),
        kl: kl.as_ref().map(|(policy, reference)| KlInputs { policy, reference }),
        labels: &labels,
        state,
        training: mode == Mode::Train,
    })?;
    Ok(output(out.loss, out.metrics, &batch, kl_tokens))
}

fn sft(
    loss: &dyn SftLoss,
    m: &LmModels,
    examples: &Examples,
    plan: &Plan,
    s: &BatchSettings,
    mode: Mode,
) -> Result<MicrobatchOutput> {
    let batch = collate(examples, &plan.main, s)?;
    let policy = logps(m.policy(mode), &batch)?; // [b]
    let out = loss.forward(&policy, batch.total_completion_tokens())?;
    Ok(output(out.loss, out.metrics, &batch, 0))
}

/// TRL's `RewardTrainer`: chosen rows then rejected rows, each prompt + response, scored at the last
/// real token.
fn reward(
    loss: &dyn RewardLoss,
    rm: &RewardModel,
    examples: &Examples,
    plan: &Plan,
    s: &BatchSettings,
) -> Result<MicrobatchOutput> {
    let batch = collate(examples, &plan.main, s)?;
    let b = plan.main.len() / 2;
    let scores = rm.scores(&batch.input_ids, s.pad_id)?; // [2b]
    let out = loss.forward(&scores.narrow(0, 0, b)?, &scores.narrow(0, b, b)?)?;
    Ok(output(out.loss, out.metrics, &batch, 0))
}

/// Per-token log-probs, values and rewards of labelled completions.
fn token(
    loss: &dyn TokenLoss,
    m: &TokenModels,
    examples: &Examples,
    rows: &[usize],
    plan: &Plan,
    s: &BatchSettings,
    mode: Mode,
) -> Result<MicrobatchOutput> {
    let batch = collate(examples, &plan.main, s)?;
    let policy = if mode == Mode::Train { &m.policy } else { &m.frozen };
    let (hidden, logits) = policy.forward_with_hidden(&batch.input_ids)?; // [b, t, d], [b, t, v]
    let (policy_logps, mask) = token_logps(&logits, &batch.input_ids, &batch.completion_mask)?; // [b, t-1]
    let t = hidden.dim(1)?;
    let values = m.value_head.forward(&hidden)?.narrow(1, 0, t - 1)?; // [b, t-1]: h_t predicts token t+1
    let ref_logits = m.reference.forward(&batch.input_ids)?; // [b, t, v]
    let reference_logps = token_logps(&ref_logits, &batch.input_ids, &batch.completion_mask)?.0.detach(); // [b, t-1]
    let rewards: Vec<f32> = match &m.scorer {
        Some(rm) => rm.scores(&batch.input_ids, s.pad_id)?.detach().to_dtype(DType::F32)?.to_vec1()?,
        None => labels(examples, rows)?.iter().map(|&l| if l { 1.0 } else { -1.0 }).collect(),
    };
    let out = loss.forward(&TokenInputs {
        policy_logps: &policy_logps,
        reference_logps: &reference_logps,
        values: &values,
        mask: &mask,
        rewards: &rewards,
    })?;
    Ok(output(out.loss, out.metrics, &batch, 0))
}

fn labels(examples: &Examples, rows: &[usize]) -> Result<Vec<bool>> {
    match examples {
        Examples::Unpaired(v) => Ok(rows.iter().map(|&i| v[i].label).collect()),
        _ => Err(Error::Compute("an unpaired loss got examples without labels".into())),
    }
}
