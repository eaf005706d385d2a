//! One microbatch: examples → padded batch → log-probs (policy and reference) → loss.
//!
//! This is the only place that calls models during training; the losses it calls see log-probs only.
//!
//! Shapes: `b` rows in the microbatch.

use candle_core::{Device, Tensor};

use super::metrics::ObjectiveMetrics;
use super::reference::{ReferenceLogps, SeqKey};
use crate::data::{collate_sequences, rotate_for_kl, Examples, Sequence, SequenceBatch};
use crate::error::{Error, Result};
use crate::loss::{dpo_loss, kto_loss, sft_loss, DpoInputs, KtoInputs, LossConfig};
use crate::model::{completion_logps, Llama};

/// The models a microbatch needs.
pub struct Models<'a> {
    /// The policy on trainable weights.
    pub policy: &'a Llama,
    /// The policy's current weights with no gradient tracking (for KTO's KL pairs).
    pub policy_frozen: &'a Llama,
    /// Where reference log-probs come from, when the loss has a reference.
    pub reference: Option<Reference<'a>>,
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
}

/// Summed completion log-probs of a batch under a model: `[b]`.
fn logps(model: &Llama, batch: &SequenceBatch) -> Result<Tensor> {
    // The LM head runs on completion positions only; `sequence_logps(&model.forward(..)?, ..)` is the
    // plain equivalent (compared in tests/model_parity.rs).
    Ok(completion_logps(model, &batch.input_ids, &batch.completion_mask)?.logps)
}

fn reference<'a>(models: &Models<'a>) -> Result<Reference<'a>> {
    models.reference.ok_or_else(|| Error::Train("this loss needs a reference model".into()))
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
    let pairing: Vec<(usize, usize)> = rotate_for_kl(rows.len()).into_iter().enumerate().map(|(i, j)| (rows[i], rows[j])).collect();
    let kl_seqs: Vec<Sequence> = pairing
        .iter()
        .map(|&(p, c)| Sequence { prompt_ids: all[p].seq.prompt_ids.clone(), completion_ids: all[c].seq.completion_ids.clone() })
        .collect();
    Ok(KtoBatches {
        target: collate_sequences(&target, s.max_length, s.pad_id, s.device)?,
        target_keys: rows.iter().map(|&i| SeqKey::Own(i)).collect(),
        kl: collate_sequences(&kl_seqs.iter().collect::<Vec<_>>(), s.max_length, s.pad_id, s.device)?,
        kl_keys: pairing.into_iter().map(|(prompt, completion)| SeqKey::Kl { prompt, completion }).collect(),
    })
}

/// DPO's one batch: rows 0..b are the chosen sequences, b..2b the rejected ones.
fn dpo_batch(all: &[crate::data::PairedExample], rows: &[usize], s: &BatchSettings) -> Result<(SequenceBatch, Vec<SeqKey>)> {
    let seqs: Vec<&Sequence> = rows.iter().map(|&i| &all[i].chosen).chain(rows.iter().map(|&i| &all[i].rejected)).collect();
    let keys = rows.iter().map(|&i| SeqKey::Own(i)).chain(rows.iter().map(|&i| SeqKey::Rejected(i))).collect();
    Ok((collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?, keys))
}

/// The reference log-probs of one microbatch's sequences, batched exactly as [`run`] batches them (so
/// that the cached values are the ones `run` would compute): `(key, Σ log p_ref)` per sequence.
pub fn reference_logps(loss: &LossConfig, examples: &Examples, rows: &[usize], reference: &Llama, s: &BatchSettings) -> Result<Vec<(SeqKey, f32)>> {
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
        (loss, _) => return Err(Error::Train(format!("loss `{}` has no reference log-probs to precompute", loss.name()))),
    }
    Ok(out)
}

pub fn run(loss: &LossConfig, examples: &Examples, rows: &[usize], models: &Models, s: &BatchSettings) -> Result<MicrobatchOutput> {
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
                    rewards_accuracies: None,
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
        (loss, _) => Err(Error::Train(format!("loss `{}` got examples of the wrong shape", loss.name()))),
    }
}

/// Completion tokens a sequence keeps after truncation at `max_length`.
pub fn truncated_completion_len(seq: &Sequence, max_length: usize) -> usize {
    max_length.min(seq.len()).saturating_sub(seq.prompt_ids.len())
}
