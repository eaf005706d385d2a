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
use crate::model::CausalLm;

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
        reference: &CausalLm,
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

    /// The table as bytes, to send to the other ranks: per sequence a tag byte, two u64 indices and the
    /// f32 value, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.values.len() * 21);
        for (key, value) in &self.values {
            let (tag, a, b) = match *key {
                SeqKey::Own(i) => (0u8, i, 0),
                SeqKey::Rejected(i) => (1, i, 0),
                SeqKey::Kl { prompt, completion } => (2, prompt, completion),
            };
            out.push(tag);
            out.extend((a as u64).to_le_bytes());
            out.extend((b as u64).to_le_bytes());
            out.extend(value.to_le_bytes());
        }
        out
    }

    /// The inverse of [`ReferenceLogps::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(21) {
            return Err(Error::Compute(format!("reference log-probs: {} bytes is not whole entries", bytes.len())));
        }
        let mut values = HashMap::new();
        for e in bytes.chunks_exact(21) {
            let u64_at = |o: usize| -> usize { u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or([0; 8])) as usize };
            let (a, b) = (u64_at(1), u64_at(9));
            let key = match e[0] {
                0 => SeqKey::Own(a),
                1 => SeqKey::Rejected(a),
                2 => SeqKey::Kl { prompt: a, completion: b },
                t => return Err(Error::Compute(format!("reference log-probs: unknown sequence tag {t}"))),
            };
            values.insert(key, f32::from_le_bytes([e[17], e[18], e[19], e[20]]));
        }
        Ok(Self { values })
    }

    /// The ranks' tables, in rank order, as one: a sequence present in several keeps the first value.
    pub fn merge(parts: impl IntoIterator<Item = Result<Self>>) -> Result<Self> {
        let mut values = HashMap::new();
        for part in parts {
            for (key, value) in part?.values {
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
                    Error::Compute(format!("reference log-probs of {k:?} were not precomputed (the schedule changed)"))
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok(Tensor::from_vec(values, keys.len(), device)?) // [b]
    }
}
