//! Reference log-probs computed once, before training (`precompute_ref_logps = true`).
//!
//! The reference model is frozen, so Σ log p_ref of a sequence never changes during a run. One no-grad
//! pass over every microbatch the run will train on fills a table keyed by the sequence's identity; the
//! reference model is then dropped, and training holds one model instead of two (for KTO: two forward
//! passes per microbatch instead of four). TRL's `precompute_ref_log_probs` does the same. It works for
//! every loss whose reference is a sequence log-prob: the paired and unpaired families.
//!
//! The pass walks the training schedule and batches each microbatch by its [`Plan`], exactly as training
//! does (same rows, same padding), so in the first epoch the cached values are bit-identical to what the
//! reference model would have computed during training. A microbatch whose sequences are all cached
//! already (a later epoch without shuffling) is skipped; a sequence met again in a different microbatch
//! keeps its first value, which differs from a live pass by float rounding only (other padding).
//!
//! This module does not save the table; a run always recomputes it.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::plan::{collate, logps, BatchSettings, Plan, SeqKey};
use crate::data::Examples;
use crate::error::{Error, Result};
use crate::loss::Family;
use crate::model::Llama;

/// Σ log p_ref per sequence, for every sequence of the run.
#[derive(Debug, Default)]
pub struct ReferenceLogps {
    values: HashMap<SeqKey, f32>,
}

impl ReferenceLogps {
    /// Run `reference` (no gradient) over the planned sequences of every microbatch in `schedule`, in order.
    pub fn compute<'a>(
        family: Family,
        examples: &Examples,
        schedule: impl IntoIterator<Item = &'a [usize]>,
        reference: &Llama,
        settings: &BatchSettings,
    ) -> Result<Self> {
        let mut values = HashMap::new();
        for rows in schedule {
            let plan = Plan::new(family, rows);
            for keys in plan.batches() {
                if keys.iter().all(|k| values.contains_key(k)) {
                    continue;
                }
                let batch = collate(examples, keys, settings)?;
                let scored = logps(reference, &batch)?.to_vec1::<f32>()?; // [b]
                for (key, value) in keys.iter().zip(scored) {
                    values.entry(*key).or_insert(value);
                }
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
                    Error::Compute(format!("reference log-probs of {k:?} were not precomputed (the schedule changed)"))
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok(Tensor::from_vec(values, keys.len(), device)?) // [b]
    }
}
