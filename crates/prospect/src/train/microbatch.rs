//! One microbatch: examples → padded batch → log-probs (policy and reference) → loss.
//!
//! This is the only place that calls models during training; the losses it calls see log-probs only.
//!
//! Shapes: `b` rows in the microbatch.

use candle_core::{Device, Tensor};

use super::metrics::ObjectiveMetrics;
use crate::data::{collate_sequences, rotate_for_kl, Examples, Sequence, SequenceBatch};
use crate::error::{Error, Result};
use crate::loss::{dpo_loss, kto_loss, sft_loss, DpoInputs, KtoInputs, LossConfig};
use crate::model::{sequence_logps, Llama};

/// The models a microbatch needs.
pub struct Models<'a> {
    /// The policy on trainable weights.
    pub policy: &'a Llama,
    /// The policy's current weights with no gradient tracking (for KTO's KL pairs).
    pub policy_frozen: &'a Llama,
    /// The frozen reference, when the loss has one.
    pub reference: Option<&'a Llama>,
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
    let logits = model.forward(&batch.input_ids)?; // [b, t, v]
    Ok(sequence_logps(&logits, &batch.input_ids, &batch.completion_mask)?.logps)
}

fn reference<'a>(models: &Models<'a>) -> Result<&'a Llama> {
    models.reference.ok_or_else(|| Error::Train("this loss needs a reference model".into()))
}

pub fn run(loss: &LossConfig, examples: &Examples, rows: &[usize], models: &Models, s: &BatchSettings) -> Result<MicrobatchOutput> {
    match (loss, examples) {
        (LossConfig::Kto(cfg), Examples::Unpaired(all)) => {
            let picked: Vec<&crate::data::UnpairedExample> = rows.iter().map(|&i| &all[i]).collect();
            let labels: Vec<bool> = picked.iter().map(|e| e.label).collect();
            let target: Vec<&Sequence> = picked.iter().map(|e| &e.seq).collect();
            // Mismatched pairs: prompt of row i, completion of row i−1 (TRL's rotation).
            let kl_seqs: Vec<Sequence> = rotate_for_kl(picked.len())
                .into_iter()
                .zip(&picked)
                .map(|(j, e)| Sequence { prompt_ids: e.seq.prompt_ids.clone(), completion_ids: picked[j].seq.completion_ids.clone() })
                .collect();
            let target = collate_sequences(&target, s.max_length, s.pad_id, s.device)?;
            let kl = collate_sequences(&kl_seqs.iter().collect::<Vec<_>>(), s.max_length, s.pad_id, s.device)?;
            let reference = reference(models)?;
            let policy_logps = logps(models.policy, &target)?; // [b]
            let policy_kl_logps = logps(models.policy_frozen, &kl)?; // [b], no gradient
            let reference_logps = logps(reference, &target)?.detach(); // [b]
            let reference_kl_logps = logps(reference, &kl)?.detach(); // [b]
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
            let seqs: Vec<&Sequence> = rows
                .iter()
                .map(|&i| &all[i].chosen)
                .chain(rows.iter().map(|&i| &all[i].rejected))
                .collect();
            let batch = collate_sequences(&seqs, s.max_length, s.pad_id, s.device)?;
            let policy = logps(models.policy, &batch)?; // [2b]
            let reference = logps(reference(models)?, &batch)?.detach(); // [2b]
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
