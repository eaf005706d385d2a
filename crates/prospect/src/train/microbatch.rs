//! One microbatch: examples → padded batch → log-probs (policy and reference) → loss.
//!
//! This is the only place that calls models during training; the losses it calls see log-probs only.
//!
//! Shapes: `b` rows in the microbatch.

use candle_core::{Device, Tensor};

use super::metrics::ObjectiveMetrics;
use super::reference::{ReferenceLogps, SeqKey};
use crate::data::{
    collate_sequences, rotate_for_kl, Examples, PairedExample, Sequence, SequenceBatch, UnpairedExample,
};
use crate::error::{Error, Result};
use crate::loss::{
    apo_zero_unpaired_loss, cdpo_loss, dpo_loss, ipo_loss, kto_loss, kto_zero::UnpairedOutput, kto_zero_loss,
    orpo_loss, ppo_offline_loss, reward_loss, sft_loss, simpo_loss, slic_loss, DpoInputs, KtoInputs, LossConfig,
    PairedOutput, PpoInputs,
};
use crate::model::{completion_logps, token_logps, Llama, RewardModel, ValueHead};

/// The models a microbatch needs.
pub struct Models<'a> {
    /// The policy on trainable weights (for a reward model: its backbone, without an LM head).
    pub policy: &'a Llama,
    /// The policy's current weights with no gradient tracking (for KTO's KL pairs).
    pub policy_frozen: &'a Llama,
    /// Where reference log-probs come from, when the loss has a reference.
    pub reference: Option<Reference<'a>>,
    /// `reward`: the reward model being trained (backbone + `score`, on the trainable weights).
    pub reward_model: Option<&'a RewardModel>,
    /// `ppo_offline`: the value head being trained.
    pub value_head: Option<&'a ValueHead>,
    /// `ppo_offline` with `reward_model = ...`: the frozen reward model that scores completions.
    pub scorer: Option<&'a RewardModel>,
}

/// The frozen reference: a model run on every microbatch, or its log-probs computed before training
/// (`precompute_ref_logps`, see [`super::reference`]).
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    Model(&'a Llama),
    Cached(&'a ReferenceLogps),
}

impl Reference<'_> {
    /// Summed reference log-probs `[b]` of `batch`, whose rows are the sequences `keys` name.
    fn logps(&self, batch: &SequenceBatch, keys: &[SeqKey], device: &Device) -> Result<Tensor> {
        match self {
            Reference::Model(model) => Ok(logps(model, batch)?.detach()),
            Reference::Cached(cache) => cache.tensor(keys, device),
        }
    }
}

pub struct MicrobatchOutput {
    /// Scalar loss of this microbatch (before the step's microbatch weight).
    pub loss: Tensor,
    pub metrics: ObjectiveMetrics,
    /// Completion tokens of this microbatch's training sequences.
    pub completion_tokens: usize,
    /// Real tokens the policy processed.
    pub num_tokens: usize,
}

pub struct BatchSettings<'a> {
    pub max_length: usize,
    pub pad_id: u32,
    pub device: &'a Device,
    /// `csft`: token ids of the (good, bad) control tokens.
    pub control_ids: Option<(u32, u32)>,
}

/// Summed completion log-probs of a batch under a model: `[b]`.
fn logps(model: &Llama, batch: &SequenceBatch) -> Result<Tensor> {
    // The LM head runs on completion positions only; `sequence_logps(&model.forward(..)?, ..)` is the
    // plain equivalent (compared in tests/model_parity.rs).
    Ok(completion_logps(model, &batch.input_ids, &batch.completion_mask)?.logps)
}

fn reference<'a>(models: &Models<'a>) -> Result<Reference<'a>> {
    models.reference.ok_or_else(|| Error::Compute("this loss needs a reference model".into()))
}

/// The reference as a model, for losses whose reference log-probs are not precomputed.
fn reference_model<'a>(models: &Models<'a>) -> Result<&'a Llama> {
    match reference(models)? {
        Reference::Model(m) => Ok(m),
        Reference::Cached(_) => Err(Error::Compute("precompute_ref_logps covers kto and dpo only".into())),
    }
}

/// Log-probs of a microbatch of pairs: one forward pass over chosen rows (0..b) then rejected rows
/// (b..2b), as TRL's `DPOTrainer` concatenates them.
struct PairedLogps {
    batch: SequenceBatch,
    /// `[2b]`
    policy: Tensor,
    /// `[2b]`, when asked for.
    reference: Option<Tensor>,
    b: usize,
}

impl PairedLogps {
    fn run(
        all: &[PairedExample],
        rows: &[usize],
        models: &Models,
        s: &BatchSettings,
        with_reference: bool,
    ) -> Result<Self> {
        let b = rows.len();
        let seqs: Vec<&Sequence> =
            rows.iter().map(|&i| &all[i].chosen).chain(rows.iter().map(|&i| &all[i].rejected)).collect();
        let batch = collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?;
        let policy = logps(models.policy, &batch)?; // [2b]
        let reference = if with_reference { Some(logps(reference_model(models)?, &batch)?.detach()) } else { None }; // [2b]
        Ok(Self { batch, policy, reference, b })
    }

    fn policy(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.policy.narrow(0, 0, self.b)?, self.policy.narrow(0, self.b, self.b)?))
    }

    fn reference(&self) -> Result<(Tensor, Tensor)> {
        let r = self.reference.as_ref().ok_or_else(|| Error::Compute("reference log-probs were not computed".into()))?;
        Ok((r.narrow(0, 0, self.b)?, r.narrow(0, self.b, self.b)?))
    }

    /// Completion tokens of the (chosen, rejected) rows.
    fn tokens(&self) -> (&[usize], &[usize]) {
        self.batch.completion_tokens.split_at(self.b)
    }

    fn output(&self, out: PairedOutput) -> MicrobatchOutput {
        MicrobatchOutput {
            loss: out.loss,
            metrics: ObjectiveMetrics {
                rewards_chosen: Some(out.rewards_chosen),
                rewards_rejected: Some(out.rewards_rejected),
                rewards_margins: Some(out.rewards_margins),
                rewards_accuracies: Some(out.rewards_accuracies),
                ..Default::default()
            },
            completion_tokens: self.batch.total_completion_tokens(),
            num_tokens: self.batch.num_tokens,
        }
    }
}

/// Policy and reference log-probs of unpaired rows (no KL pass), for KTO-zero and APO-zero.
fn unpaired_without_kl(
    all: &[UnpairedExample],
    rows: &[usize],
    models: &Models,
    s: &BatchSettings,
    loss: impl FnOnce(&Tensor, &Tensor, &[bool]) -> Result<UnpairedOutput>,
) -> Result<MicrobatchOutput> {
    let picked: Vec<&UnpairedExample> = rows.iter().map(|&i| &all[i]).collect();
    let labels: Vec<bool> = picked.iter().map(|e| e.label).collect();
    let seqs: Vec<&Sequence> = picked.iter().map(|e| &e.seq).collect();
    let batch = collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?;
    let policy_logps = logps(models.policy, &batch)?; // [b]
    let reference_logps = logps(reference_model(models)?, &batch)?.detach(); // [b]
    let out = loss(&policy_logps, &reference_logps, &labels)?;
    let margins = match (out.rewards_chosen, out.rewards_rejected) {
        (Some(c), Some(r)) => Some(c - r),
        _ => None,
    };
    Ok(MicrobatchOutput {
        loss: out.loss,
        metrics: ObjectiveMetrics {
            rewards_chosen: out.rewards_chosen,
            rewards_rejected: out.rewards_rejected,
            rewards_margins: margins,
            ..Default::default()
        },
        completion_tokens: batch.total_completion_tokens(),
        num_tokens: batch.num_tokens,
    })
}

/// A KTO microbatch's two batches and the keys of their rows: the target sequences, and the mismatched
/// KL pairs (prompt of row i, completion of row i−1: TRL's rotation).
struct KtoBatches {
    target: SequenceBatch,
    target_keys: Vec<SeqKey>,
    kl: SequenceBatch,
    kl_keys: Vec<SeqKey>,
}

fn kto_batches(all: &[crate::data::UnpairedExample], rows: &[usize], s: &BatchSettings) -> Result<KtoBatches> {
    let target: Vec<&Sequence> = rows.iter().map(|&i| &all[i].seq).collect();
    let pairing: Vec<(usize, usize)> =
        rotate_for_kl(rows.len()).into_iter().enumerate().map(|(i, j)| (rows[i], rows[j])).collect();
    let kl_seqs: Vec<Sequence> = pairing
        .iter()
        .map(|&(p, c)| Sequence {
            prompt_ids: all[p].seq.prompt_ids.clone(),
            completion_ids: all[c].seq.completion_ids.clone(),
        })
        .collect();
    Ok(KtoBatches {
        target: collate_sequences(&target, s.max_length, s.pad_id, s.device)?,
        target_keys: rows.iter().map(|&i| SeqKey::Own(i)).collect(),
        kl: collate_sequences(&kl_seqs.iter().collect::<Vec<_>>(), s.max_length, s.pad_id, s.device)?,
        kl_keys: pairing.into_iter().map(|(prompt, completion)| SeqKey::Kl { prompt, completion }).collect(),
    })
}

/// DPO's one batch: rows 0..b are the chosen sequences, b..2b the rejected ones.
fn dpo_batch(
    all: &[crate::data::PairedExample],
    rows: &[usize],
    s: &BatchSettings,
) -> Result<(SequenceBatch, Vec<SeqKey>)> {
    let seqs: Vec<&Sequence> =
        rows.iter().map(|&i| &all[i].chosen).chain(rows.iter().map(|&i| &all[i].rejected)).collect();
    let keys = rows.iter().map(|&i| SeqKey::Own(i)).chain(rows.iter().map(|&i| SeqKey::Rejected(i))).collect();
    Ok((collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?, keys))
}

/// The reference log-probs of one microbatch's sequences, batched exactly as [`run`] batches them (so
/// that the cached values are the ones `run` would compute): `(key, Σ log p_ref)` per sequence.
pub fn reference_logps(
    loss: &LossConfig,
    examples: &Examples,
    rows: &[usize],
    reference: &Llama,
    s: &BatchSettings,
) -> Result<Vec<(SeqKey, f32)>> {
    let mut out = Vec::new();
    let mut run_batch = |batch: &SequenceBatch, keys: Vec<SeqKey>| -> Result<()> {
        let values = logps(reference, batch)?.to_vec1::<f32>()?; // [b]
        out.extend(keys.into_iter().zip(values));
        Ok(())
    };
    match (loss, examples) {
        (LossConfig::Kto(_), Examples::Unpaired(all)) => {
            let b = kto_batches(all, rows, s)?;
            run_batch(&b.target, b.target_keys)?;
            run_batch(&b.kl, b.kl_keys)?;
        }
        (LossConfig::Dpo(_), Examples::Paired(all)) => {
            let (batch, keys) = dpo_batch(all, rows, s)?;
            run_batch(&batch, keys)?;
        }
        (loss, _) => {
            return Err(Error::Compute(format!("loss `{}` has no reference log-probs to precompute", loss.name())))
        }
    }
    Ok(out)
}

pub fn run(
    loss: &LossConfig,
    examples: &Examples,
    rows: &[usize],
    models: &Models,
    s: &BatchSettings,
) -> Result<MicrobatchOutput> {
    match (loss, examples) {
        (LossConfig::Kto(cfg), Examples::Unpaired(all)) => {
            let labels: Vec<bool> = rows.iter().map(|&i| all[i].label).collect();
            let KtoBatches { target, target_keys, kl, kl_keys } = kto_batches(all, rows, s)?;
            let reference = reference(models)?;
            let policy_logps = logps(models.policy, &target)?; // [b]
            let policy_kl_logps = logps(models.policy_frozen, &kl)?; // [b], no gradient
            let reference_logps = reference.logps(&target, &target_keys, s.device)?; // [b]
            let reference_kl_logps = reference.logps(&kl, &kl_keys, s.device)?; // [b]
            let out = kto_loss(
                cfg,
                &KtoInputs {
                    policy_logps: &policy_logps,
                    reference_logps: &reference_logps,
                    policy_kl_logps: &policy_kl_logps,
                    reference_kl_logps: &reference_kl_logps,
                    labels: &labels,
                },
            )?;
            let margins = match (out.rewards_chosen, out.rewards_rejected) {
                (Some(c), Some(r)) => Some(c - r),
                _ => None,
            };
            Ok(MicrobatchOutput {
                loss: out.loss,
                metrics: ObjectiveMetrics {
                    kl: Some(out.kl),
                    kl_raw: Some(out.kl_raw),
                    rewards_chosen: out.rewards_chosen,
                    rewards_rejected: out.rewards_rejected,
                    rewards_margins: margins,
                    ..Default::default()
                },
                completion_tokens: target.total_completion_tokens(),
                num_tokens: target.num_tokens + kl.num_tokens,
            })
        }
        (LossConfig::Dpo(cfg), Examples::Paired(all)) => {
            // Chosen and rejected go through one forward pass: rows 0..b are chosen, b..2b rejected.
            let b = rows.len();
            let (batch, keys) = dpo_batch(all, rows, s)?;
            let policy = logps(models.policy, &batch)?; // [2b]
            let reference = reference(models)?.logps(&batch, &keys, s.device)?; // [2b]
            let out = dpo_loss(
                cfg,
                &DpoInputs {
                    policy_chosen_logps: &policy.narrow(0, 0, b)?,
                    policy_rejected_logps: &policy.narrow(0, b, b)?,
                    reference_chosen_logps: &reference.narrow(0, 0, b)?,
                    reference_rejected_logps: &reference.narrow(0, b, b)?,
                },
            )?;
            Ok(MicrobatchOutput {
                loss: out.loss,
                metrics: ObjectiveMetrics {
                    rewards_chosen: Some(out.rewards_chosen),
                    rewards_rejected: Some(out.rewards_rejected),
                    rewards_margins: Some(out.rewards_margins),
                    rewards_accuracies: Some(out.rewards_accuracies),
                    ..Default::default()
                },
                completion_tokens: batch.total_completion_tokens(),
                num_tokens: batch.num_tokens,
            })
        }
        (LossConfig::Cdpo(cfg), Examples::Paired(all)) => {
            let lp = PairedLogps::run(all, rows, models, s, true)?;
            let ((pc, pr), (rc, rr)) = (lp.policy()?, lp.reference()?);
            Ok(lp.output(cdpo_loss(cfg, &pc, &pr, &rc, &rr)?))
        }
        (LossConfig::Ipo(cfg), Examples::Paired(all)) => {
            let lp = PairedLogps::run(all, rows, models, s, true)?;
            let ((pc, pr), (rc, rr), (nc, nr)) = (lp.policy()?, lp.reference()?, lp.tokens());
            Ok(lp.output(ipo_loss(cfg, &pc, &pr, &rc, &rr, nc, nr)?))
        }
        (LossConfig::Slic(cfg), Examples::Paired(all)) => {
            let lp = PairedLogps::run(all, rows, models, s, false)?;
            let (pc, pr) = lp.policy()?;
            Ok(lp.output(slic_loss(cfg, &pc, &pr)?))
        }
        (LossConfig::Simpo(cfg), Examples::Paired(all)) => {
            let lp = PairedLogps::run(all, rows, models, s, false)?;
            let ((pc, pr), (nc, nr)) = (lp.policy()?, lp.tokens());
            Ok(lp.output(simpo_loss(cfg, &pc, &pr, nc, nr)?))
        }
        (LossConfig::Orpo(cfg), Examples::Paired(all)) => {
            let lp = PairedLogps::run(all, rows, models, s, false)?;
            let ((pc, pr), (nc, nr)) = (lp.policy()?, lp.tokens());
            Ok(lp.output(orpo_loss(cfg, &pc, &pr, nc, nr)?))
        }
        (LossConfig::KtoZero(cfg), Examples::Unpaired(all)) => {
            unpaired_without_kl(all, rows, models, s, |p, r, l| kto_zero_loss(cfg, p, r, l))
        }
        (LossConfig::ApoZeroUnpaired(cfg), Examples::Unpaired(all)) => {
            unpaired_without_kl(all, rows, models, s, |p, r, l| apo_zero_unpaired_loss(cfg, p, r, l))
        }
        (LossConfig::Reward(cfg), Examples::Paired(all)) => {
            // TRL's RewardTrainer: chosen rows then rejected rows, each prompt + response + eos.
            let b = rows.len();
            let seqs: Vec<&Sequence> =
                rows.iter().map(|&i| &all[i].chosen).chain(rows.iter().map(|&i| &all[i].rejected)).collect();
            let batch = collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?;
            let rm = models.reward_model.ok_or_else(|| Error::Compute("`reward` needs a reward model".into()))?;
            let scores = rm.scores(&batch.input_ids, s.pad_id)?; // [2b]
            let out = reward_loss(cfg, &scores.narrow(0, 0, b)?, &scores.narrow(0, b, b)?)?;
            Ok(MicrobatchOutput {
                loss: out.loss,
                metrics: ObjectiveMetrics {
                    accuracy: Some(out.accuracy),
                    margin: Some(out.margin),
                    ..Default::default()
                },
                completion_tokens: batch.total_completion_tokens(),
                num_tokens: batch.num_tokens,
            })
        }
        (LossConfig::PpoOffline(cfg), Examples::Unpaired(all)) => {
            let picked: Vec<&UnpairedExample> = rows.iter().map(|&i| &all[i]).collect();
            let seqs: Vec<&Sequence> = picked.iter().map(|e| &e.seq).collect();
            let batch = collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?;
            let value_head =
                models.value_head.ok_or_else(|| Error::Compute("`ppo_offline` needs a value head".into()))?;
            let (hidden, logits) = models.policy.forward_with_hidden(&batch.input_ids)?; // [b, t, d], [b, t, v]
            let (policy_logps, mask) = token_logps(&logits, &batch.input_ids, &batch.completion_mask)?; // [b, t-1]
            let t = hidden.dim(1)?;
            let values = value_head.forward(&hidden)?.narrow(1, 0, t - 1)?; // [b, t-1]: h_t predicts token t+1
            let ref_logits = reference_model(models)?.forward(&batch.input_ids)?; // [b, t, v]
            let reference_logps = token_logps(&ref_logits, &batch.input_ids, &batch.completion_mask)?.0.detach(); // [b, t-1]
            let rewards: Vec<f32> = match models.scorer {
                Some(rm) => {
                    rm.scores(&batch.input_ids, s.pad_id)?.detach().to_dtype(candle_core::DType::F32)?.to_vec1()?
                }
                None => picked.iter().map(|e| if e.label { 1.0 } else { -1.0 }).collect(),
            };
            let out = ppo_offline_loss(
                cfg,
                &PpoInputs {
                    policy_logps: &policy_logps,
                    reference_logps: &reference_logps,
                    values: &values,
                    mask: &mask,
                    rewards: &rewards,
                },
            )?;
            Ok(MicrobatchOutput {
                loss: out.loss,
                metrics: ObjectiveMetrics {
                    kl: Some(out.kl),
                    policy_loss: Some(out.policy_loss),
                    critic_loss: Some(out.critic_loss),
                    clipfrac: Some(out.clipfrac),
                    ..Default::default()
                },
                completion_tokens: batch.total_completion_tokens(),
                num_tokens: batch.num_tokens,
            })
        }
        (LossConfig::Csft(_), Examples::Unpaired(all)) => {
            // The control token becomes the first completion token: <|good|> y or <|bad|> y.
            let (good, bad) = s.control_ids.ok_or_else(|| Error::Compute("`csft` needs its control token ids".into()))?;
            let seqs: Vec<Sequence> = rows
                .iter()
                .map(|&i| {
                    let e = &all[i];
                    let control = if e.label { good } else { bad };
                    let completion_ids = std::iter::once(control).chain(e.seq.completion_ids.iter().copied()).collect();
                    Sequence { prompt_ids: e.seq.prompt_ids.clone(), completion_ids }
                })
                .collect();
            let batch = collate_sequences(&seqs.iter().collect::<Vec<_>>(), s.max_length, s.pad_id, s.device)?;
            let policy = logps(models.policy, &batch)?; // [b]
            let tokens = batch.total_completion_tokens();
            Ok(MicrobatchOutput {
                loss: sft_loss(&policy, tokens)?,
                metrics: ObjectiveMetrics::default(),
                completion_tokens: tokens,
                num_tokens: batch.num_tokens,
            })
        }
        (LossConfig::Sft(_), Examples::Sft(all)) => {
            let seqs: Vec<&Sequence> = rows.iter().map(|&i| &all[i]).collect();
            let batch = collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?;
            let policy = logps(models.policy, &batch)?; // [b]
            let tokens = batch.total_completion_tokens();
            Ok(MicrobatchOutput {
                loss: sft_loss(&policy, tokens)?,
                metrics: ObjectiveMetrics::default(),
                completion_tokens: tokens,
                num_tokens: batch.num_tokens,
            })
        }
        (loss, _) => Err(Error::Compute(format!("loss `{}` got examples of the wrong shape", loss.name()))),
    }
}

/// Completion tokens a sequence keeps after truncation at `max_length`.
pub fn truncated_completion_len(seq: &Sequence, max_length: usize) -> usize {
    max_length.min(seq.len()).saturating_sub(seq.prompt_ids.len())
}
