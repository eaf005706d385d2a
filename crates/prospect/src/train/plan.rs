//! Which sequences a microbatch scores, and how they are batched: one plan, read by the training
//! forward pass ([`super::microbatch`]) and by the reference pre-pass ([`super::reference`]), so the
//! cached reference log-probs are exactly the ones a live reference would compute.
//!
//! Shapes: `b` rows in the microbatch.

use std::borrow::Cow;

use candle_core::{Device, Tensor};

use crate::data::{collate_sequences, rotate_for_kl, Examples, Sequence, SequenceBatch};
use crate::error::{Error, Result};
use crate::loss::Family;
use crate::model::{completion_logps, CausalLm};

/// Which sequence a log-prob belongs to. Indices are positions in the run's [`Examples`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeqKey {
    /// Example i's own sequence: an unpaired or SFT row, a pair's chosen side.
    Own(usize),
    /// A pair's rejected side.
    Rejected(usize),
    /// KTO's mismatched KL pair: the prompt of example `prompt` with the completion of example `completion`.
    Kl { prompt: usize, completion: usize },
}

/// The sequences one microbatch scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The sequences the loss trains on, in batch order: the rows, or chosen rows then rejected rows
    /// (one forward pass over `[2b]`, as TRL's `DPOTrainer` concatenates them).
    pub main: Vec<SeqKey>,
    /// The mismatched pairs (x_i, y_{i−1}) of TRL's rotation, for losses that ask for them; else empty.
    pub kl: Vec<SeqKey>,
}

impl Plan {
    pub fn new(family: Family, rows: &[usize]) -> Self {
        let own = rows.iter().map(|&i| SeqKey::Own(i));
        match family {
            Family::Paired(_) | Family::Reward(_) => {
                Plan { main: own.chain(rows.iter().map(|&i| SeqKey::Rejected(i))).collect(), kl: Vec::new() }
            }
            Family::Unpaired(loss) if loss.kl_pairs() => {
                let kl = rotate_for_kl(rows.len())
                    .into_iter()
                    .enumerate()
                    .map(|(i, j)| SeqKey::Kl { prompt: rows[i], completion: rows[j] })
                    .collect();
                Plan { main: own.collect(), kl }
            }
            _ => Plan { main: own.collect(), kl: Vec::new() },
        }
    }

    /// The planned batches that are not empty: `main`, then `kl`.
    pub fn batches(&self) -> impl Iterator<Item = &[SeqKey]> {
        [self.main.as_slice(), self.kl.as_slice()].into_iter().filter(|k| !k.is_empty())
    }
}

/// How sequences become a padded batch.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub max_length: usize,
    pub pad_id: u32,
    pub device: Device,
}

/// The sequence a key names.
pub fn sequence(examples: &Examples, key: SeqKey) -> Result<Cow<'_, Sequence>> {
    Ok(match (examples, key) {
        (Examples::Unpaired(v), SeqKey::Own(i)) => Cow::Borrowed(&v[i].seq),
        (Examples::Unpaired(v), SeqKey::Kl { prompt, completion }) => Cow::Owned(Sequence {
            prompt_ids: v[prompt].seq.prompt_ids.clone(),
            completion_ids: v[completion].seq.completion_ids.clone(),
        }),
        (Examples::Paired(v), SeqKey::Own(i)) => Cow::Borrowed(&v[i].chosen),
        (Examples::Paired(v), SeqKey::Rejected(i)) => Cow::Borrowed(&v[i].rejected),
        (Examples::Sft(v), SeqKey::Own(i)) => Cow::Borrowed(&v[i]),
        (_, key) => return Err(Error::Compute(format!("{key:?} does not name a sequence of these examples"))),
    })
}

/// The padded batch of `keys`' sequences.
pub fn collate(examples: &Examples, keys: &[SeqKey], s: &BatchSettings) -> Result<SequenceBatch> {
    let seqs = keys.iter().map(|&k| sequence(examples, k)).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Sequence> = seqs.iter().map(|s| s.as_ref()).collect();
    collate_sequences(&refs, s.max_length, s.pad_id, &s.device)
}

/// Summed completion log-probs of a batch under a model: `[b]`.
pub fn logps(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    // The LM head runs on completion positions only; `sequence_logps(&model.forward(..)?, ..)` is the
    // plain equivalent (compared in tests/model_parity.rs).
    Ok(completion_logps(model, &batch.input_ids, &batch.completion_mask)?.logps)
}
