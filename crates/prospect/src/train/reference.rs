//! Reference log-probs computed once, before training (`precompute_ref_logps = true`).
//!
//! The reference model is frozen, so Σ log p_ref of a sequence never changes during a run. One no-grad
//! pass over every microbatch the run will train on fills a table keyed by the sequence's identity; the
//! reference model is then dropped, and training runs two forward passes per KTO microbatch instead of
//! four, holding one model instead of two. TRL's `precompute_ref_log_probs` does the same.
//!
//! The pass walks the training schedule itself and batches each microbatch exactly as training does
//! (same rows, same padding), so in the first epoch the cached values are bit-identical to what the
//! reference model would have computed during training. A microbatch whose sequences are all cached
//! already (a later epoch without shuffling) is skipped; a sequence met again in a different microbatch
//! keeps its first value, which differs from a live pass by float rounding only (other padding).
//!
//! This module does not save the table; a run always recomputes it.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::microbatch::{reference_logps, BatchSettings};
use crate::data::Examples;
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::model::Llama;

/// Which sequence a cached log-prob belongs to. Indices are positions in the run's [`Examples`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeqKey {
    /// Example i's own sequence: KTO's target, DPO's chosen.
    Own(usize),
    /// DPO: example i's rejected sequence.
    Rejected(usize),
    /// KTO's mismatched KL pair: the prompt of example `prompt` with the completion of example `completion`.
    Kl { prompt: usize, completion: usize },
}

/// Σ log p_ref per sequence, for every sequence of the run.
#[derive(Debug, Default)]
pub struct ReferenceLogps {
    values: HashMap<SeqKey, f32>,
}

impl ReferenceLogps {
    /// Run `reference` (no gradient) over the sequences of every microbatch in `schedule`, in order.
    pub fn compute<'a>(
        loss: &LossConfig,
        examples: &Examples,
        schedule: impl IntoIterator<Item = &'a [usize]>,
        reference: &Llama,
        settings: &BatchSettings,
    ) -> Result<Self> {
        let mut values = HashMap::new();
        for rows in schedule {
            if keys_of(loss, examples, rows).iter().all(|k| values.contains_key(k)) {
                continue;
            }
            for (key, value) in reference_logps(loss, examples, rows, reference, settings)? {
                values.entry(key).or_insert(value);
            }
        }
        Ok(Self { values })
    }

    /// Sequences cached.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The cached log-probs of `keys` as a `[b]` f32 tensor.
    pub fn tensor(&self, keys: &[SeqKey], device: &Device) -> Result<Tensor> {
        let values = keys
            .iter()
            .map(|k| {
                self.values.get(k).copied().ok_or_else(|| {
                    Error::Compute(format!(
                        "reference log-probs of {k:?} were not precomputed (a bug: the schedule changed)"
                    ))
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok(Tensor::from_vec(values, keys.len(), device)?) // [b]
    }
}

/// The keys of a microbatch's sequences, as `microbatch::run` will ask for them.
fn keys_of(loss: &LossConfig, examples: &Examples, rows: &[usize]) -> Vec<SeqKey> {
    match (loss, examples) {
        (LossConfig::Kto(_), Examples::Unpaired(_)) => {
            let rotation = crate::data::rotate_for_kl(rows.len());
            rows.iter()
                .map(|&i| SeqKey::Own(i))
                .chain(
                    rotation.into_iter().enumerate().map(|(i, j)| SeqKey::Kl { prompt: rows[i], completion: rows[j] }),
                )
                .collect()
        }
        _ => rows.iter().map(|&i| SeqKey::Own(i)).chain(rows.iter().map(|&i| SeqKey::Rejected(i))).collect(),
    }
}
