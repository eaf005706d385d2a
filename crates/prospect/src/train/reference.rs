//! Reference log-probs computed once (`precompute_ref_logps`, on by default), and kept on disk beside the
//! run so that a second run does not compute them again.
//!
//! The reference model is frozen, so Σ log p_ref of a batch never changes. One no-grad pass over every
//! microbatch the run will train on fills a table; the reference model is then dropped, and training holds
//! one model instead of two (for KTO: two forward passes per microbatch instead of four). TRL's
//! `precompute_ref_log_probs` does the same.
//!
//! The table is keyed by **what the reference model reads**: a SHA-256 digest of each collated batch (its
//! padded token ids and completion mask). The pass walks the training schedule and batches each microbatch
//! by its [`Plan`], exactly as training does, and training looks its batches up by the same digest. So every
//! value is the one a live reference pass would compute on that very batch, bit for bit, in every epoch:
//! a cached run has the numbers of `precompute_ref_logps = false`. A batch met again (a later epoch without
//! shuffling) is computed once.
//!
//! On disk (`output_dir/reference_logps.bin`, written atomically by rank 0) the table carries a
//! [`ModelKey`]: a digest of the reference model's files, its LoRA settings, the compute dtype and the
//! device kind. A run whose key differs (another reference, bf16 instead of f32) starts from an empty table
//! and replaces the file; one whose key matches computes only the batches the file lacks (none, when it
//! repeats a run with other optimizer settings).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::plan::{collate, logps, logps_with_kl, paired_logps, BatchSettings, Plan};
use crate::data::{Examples, SequenceBatch};
use crate::error::{Error, Result};
use crate::loss::Family;
use crate::model::CausalLm;

/// The cache file, in the run's output folder.
pub const CACHE_FILE: &str = "reference_logps.bin";
const MAGIC: &[u8; 8] = b"PRREFv1\n";

/// The SHA-256 of a collated batch: its shape, padded token ids and completion mask.
pub type BatchDigest = [u8; 32];

/// What the cached values depend on besides the batch: the reference model and how it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelKey(pub [u8; 32]);

impl ModelKey {
    /// A digest of `parts` (`name = value` strings: file digests, settings), in order.
    pub fn of(parts: &[String]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        ModelKey(h.finalize().into())
    }
}

pub fn batch_digest(batch: &SequenceBatch) -> Result<BatchDigest> {
    let ids = batch.input_ids.flatten_all()?.to_vec1::<u32>()?;
    let mask = batch.completion_mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut h = Sha256::new();
    for d in batch.input_ids.dims() {
        h.update((*d as u64).to_le_bytes());
    }
    ids.iter().for_each(|i| h.update(i.to_le_bytes()));
    mask.iter().for_each(|m| h.update(m.to_le_bytes()));
    Ok(h.finalize().into())
}

/// Σ log p_ref per row of every batch the run uses, by batch digest.
#[derive(Debug, Default)]
pub struct ReferenceLogps {
    values: HashMap<BatchDigest, Vec<f32>>,
}

/// How a [`ReferenceLogps::compute`] pass went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassCounts {
    /// Batches whose values were already in the table (from the file, or met earlier in the schedule).
    pub reused: usize,
    /// Batches the reference model scored.
    pub computed: usize,
}

/// The reference model, loaded on first use: a run whose cache file has every batch never loads it.
pub struct LazyReference<'a> {
    load: Box<dyn Fn() -> Result<CausalLm> + 'a>,
    model: Option<CausalLm>,
}

impl<'a> LazyReference<'a> {
    pub fn new(load: impl Fn() -> Result<CausalLm> + 'a) -> Self {
        Self { load: Box::new(load), model: None }
    }

    fn get(&mut self) -> Result<&CausalLm> {
        if self.model.is_none() {
            self.model = Some((self.load)()?);
        }
        self.model.as_ref().ok_or_else(|| Error::Compute("the reference model did not load".into()))
    }

    /// Whether the model was needed (and loaded).
    pub fn loaded(&self) -> bool {
        self.model.is_some()
    }
}

impl ReferenceLogps {
    /// Score (no gradient) every planned batch of every microbatch in `schedule` that the table lacks.
    pub fn compute<'a>(
        &mut self,
        family: Family,
        examples: &Examples,
        schedule: impl IntoIterator<Item = &'a [usize]>,
        reference: &mut LazyReference,
        settings: &BatchSettings,
    ) -> Result<PassCounts> {
        let mut counts = PassCounts::default();
        for rows in schedule {
            let plan = Plan::new(family, rows);
            if !plan.kl.is_empty() {
                self.compute_with_kl(examples, &plan, reference, settings, &mut counts)?;
                continue;
            }
            for keys in plan.batches() {
                let batch = collate(examples, keys, settings)?;
                let digest = batch_digest(&batch)?;
                if self.values.contains_key(&digest) {
                    counts.reused += 1;
                    continue;
                }
                // Scored as training scores it: a paired batch's rejected rows after the chosen rows' prompts.
                let values = match family {
                    Family::Paired(_) => paired_logps(reference.get()?, &batch)?, // [2b]
                    _ => logps(reference.get()?, &batch)?,                        // [b]
                };
                self.values.insert(digest, values.to_vec1::<f32>()?);
                counts.computed += 1;
            }
        }
        Ok(counts)
    }

    /// A plan's main and KL batches together, as training scores them ([`logps_with_kl`]: the KL rows
    /// reuse the main rows' prompts), so that the values are those of a live reference.
    fn compute_with_kl(
        &mut self,
        examples: &Examples,
        plan: &Plan,
        reference: &mut LazyReference,
        settings: &BatchSettings,
        counts: &mut PassCounts,
    ) -> Result<()> {
        let (main, kl) = (collate(examples, &plan.main, settings)?, collate(examples, &plan.kl, settings)?);
        let digests = [batch_digest(&main)?, batch_digest(&kl)?];
        let missing = digests.iter().filter(|d| !self.values.contains_key(*d)).count();
        counts.reused += 2 - missing;
        if missing == 0 {
            return Ok(());
        }
        let model = reference.get()?;
        let (main_logps, kl_logps) = logps_with_kl(model, model, &main, &kl)?; // [b] each
        for (digest, logps) in digests.into_iter().zip([main_logps, kl_logps]) {
            if let std::collections::hash_map::Entry::Vacant(e) = self.values.entry(digest) {
                e.insert(logps.to_vec1::<f32>()?);
                counts.computed += 1;
            }
        }
        Ok(())
    }

    /// The table as bytes (to send to the other ranks, or to save): per batch its digest, its row count
    /// (u32) and its values (f32), little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut entries: Vec<(&BatchDigest, &Vec<f32>)> = self.values.iter().collect();
        entries.sort_by_key(|(d, _)| **d); // the same table gives the same bytes
        let mut out = Vec::new();
        for (digest, values) in entries {
            out.extend(digest);
            out.extend((values.len() as u32).to_le_bytes());
            values.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
        out
    }

    /// The inverse of [`ReferenceLogps::to_bytes`].
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self> {
        let bad = |what: &str| Error::Compute(format!("reference log-probs: {what}"));
        let mut values = HashMap::new();
        while !bytes.is_empty() {
            if bytes.len() < 36 {
                return Err(bad("a truncated entry"));
            }
            let digest: BatchDigest = bytes[..32].try_into().map_err(|_| bad("a truncated digest"))?;
            let n = u32::from_le_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]) as usize;
            let body = bytes.get(36..36 + 4 * n).ok_or_else(|| bad("a truncated entry"))?;
            let row: Vec<f32> = body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            values.insert(digest, row);
            bytes = &bytes[36 + 4 * n..];
        }
        Ok(Self { values })
    }

    /// The ranks' tables as one.
    pub fn merge(parts: impl IntoIterator<Item = Result<Self>>) -> Result<Self> {
        let mut values = HashMap::new();
        for part in parts {
            values.extend(part?.values);
        }
        Ok(Self { values })
    }

    /// The cache file of a run folder.
    pub fn path(output_dir: &Path) -> PathBuf {
        output_dir.join(CACHE_FILE)
    }

    /// The table saved at `path` for `key`; an empty table when there is no file, or when it was written
    /// for another model key (the caller then replaces it). A damaged file is an error naming it.
    pub fn load(path: &Path, key: ModelKey) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        if bytes.len() < 40 || &bytes[..8] != MAGIC {
            return Err(Error::model(path, "not a reference log-prob cache (delete it to recompute)"));
        }
        if bytes[8..40] != key.0 {
            return Ok(Self::default());
        }
        Self::from_bytes(&bytes[40..]).map_err(|e| Error::model(path, format!("{e} (delete it to recompute)")))
    }

    /// Write the table for `key` to `path`, atomically.
    pub fn save(&self, path: &Path, key: ModelKey) -> Result<()> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend(key.0);
        bytes.extend(self.to_bytes());
        crate::fsio::write_atomic(path, &bytes)
    }

    /// Batches cached.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The cached log-probs of `batch` as a `[b]` f32 tensor.
    pub fn tensor(&self, batch: &SequenceBatch, device: &Device) -> Result<Tensor> {
        let values = self.values.get(&batch_digest(batch)?).ok_or_else(|| {
            Error::Compute("reference log-probs of a batch were not precomputed (the schedule changed)".into())
        })?;
        Ok(Tensor::from_vec(values.clone(), values.len(), device)?) // [b]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ReferenceLogps {
        let mut values = HashMap::new();
        values.insert([1u8; 32], vec![-1.5f32, -2.25]);
        values.insert([7u8; 32], vec![-0.125f32]);
        ReferenceLogps { values }
    }

    #[test]
    fn bytes_round_trip_and_damage_is_an_error() {
        let t = table();
        let bytes = t.to_bytes();
        assert_eq!(bytes.len(), (32 + 4 + 8) + (32 + 4 + 4));
        let back = ReferenceLogps::from_bytes(&bytes).unwrap();
        assert_eq!(back.values, t.values);
        assert!(ReferenceLogps::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn the_file_is_used_only_for_its_model_key() {
        let dir = std::env::temp_dir().join(format!("prospect-refcache-{}", std::process::id()));
        let path = ReferenceLogps::path(&dir);
        let (a, b) = (ModelKey::of(&["model = x".into()]), ModelKey::of(&["model = y".into()]));
        assert!(ReferenceLogps::load(&path, a).unwrap().is_empty(), "no file: empty");
        table().save(&path, a).unwrap();
        assert_eq!(ReferenceLogps::load(&path, a).unwrap().values, table().values);
        assert!(ReferenceLogps::load(&path, b).unwrap().is_empty(), "another model: empty");
        std::fs::write(&path, b"garbage").unwrap();
        let e = ReferenceLogps::load(&path, a).unwrap_err().to_string();
        assert!(e.contains(CACHE_FILE) && e.contains("delete it"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
