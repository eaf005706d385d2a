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
use crate::model::{completion_logps, completion_logps_of, CausalLm};

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

/// How many leading positions a KL row can take from its main row's pass: the common prefix of their
/// real tokens (`main`, `kl`), ending before the KL row's last token ahead of its first completion token
/// (that token's output predicts the completion, so the KL row must compute it). `kl_mask` is the KL row's
/// completion mask.
pub(crate) fn shared_positions(main: &[u32], kl: &[u32], kl_mask: &[f32]) -> usize {
    let common = main.iter().zip(kl).take_while(|(x, y)| x == y).count();
    let first_completion = kl_mask.iter().position(|&w| w != 0.0).unwrap_or(kl.len());
    common.min(first_completion.saturating_sub(1))
}

/// Summed completion log-probs `([b], [b])` of a microbatch's main rows and of its KL rows, where KL row
/// `i` starts with the prompt of main row `i` (KTO's pairs (x_i, y_{i−1}) beside (x_i, y_i)). The main rows
/// run under `main` (with gradient when its weights track one); the KL rows, under `kl` (the same weights,
/// no gradient), reuse the main rows' prompts ([`logps_sharing_prompts`]).
pub fn logps_with_kl(
    main: &CausalLm,
    kl: &CausalLm,
    main_batch: &SequenceBatch,
    kl_batch: &SequenceBatch,
) -> Result<(Tensor, Tensor)> {
    let ids = |batch: &SequenceBatch| batch.input_ids.to_vec2::<u32>();
    let mask = |batch: &SequenceBatch| batch.completion_mask.to_vec2::<f32>();
    if ids(main_batch)? == ids(kl_batch)? && mask(main_batch)? == mask(kl_batch)? {
        // A one-row microbatch pairs its prompt with its own completion: the KL row is the main row.
        let logps = logps(main, main_batch)?;
        return Ok((logps.clone(), logps.detach()));
    }
    logps_sharing_prompts(main, kl, main_batch, kl_batch, Sharing::Detached)
}

/// Summed completion log-probs `[2b]` of a paired batch (chosen rows, then rejected rows), the rejected
/// rows reusing the chosen rows' prompts, with gradient through both ([`logps_sharing_prompts`]).
pub fn paired_logps(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    let b = batch.rows() / 2;
    if batch.rows() != 2 * b || b == 0 {
        return Err(Error::Compute(format!("a paired batch has chosen and rejected rows; got {}", batch.rows())));
    }
    let (chosen, rejected) = (batch.select_rows(0, b)?, batch.select_rows(b, b)?);
    let (chosen, rejected) = logps_sharing_prompts(model, model, &chosen, &rejected, Sharing::Attached)?; // [b] each
    Ok(Tensor::cat(&[&chosen, &rejected], 0)?) // [2b]
}

/// Whether the second rows of [`logps_sharing_prompts`] pass a gradient back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// No (KTO's KL rows): the shared keys and values are detached, and so are the second log-probs.
    Detached,
    /// Yes (DPO's rejected rows): their gradient reaches the weights through their own tokens and through
    /// the first rows' prompt, as if each rejected row had run its prompt itself.
    Attached,
}

/// Summed completion log-probs `([b], [b])` of two batches whose row `i` begins with the same prompt.
///
/// The first batch runs whole under `first`, keeping its keys and values. Each row of the second batch
/// runs under `second` (the same weights) only from the end of what it shares with its first row (at
/// most its prompt less the last token, whose output predicts the first completion token), against those
/// cached positions. The shared part is found token by token, so rows that share nothing simply run whole.
/// Equal to scoring both batches on their own up to float rounding (`tests/shared_prompt.rs`: 1e-6
/// relative, gradients included).
pub fn logps_sharing_prompts(
    first: &CausalLm,
    second: &CausalLm,
    first_batch: &SequenceBatch,
    second_batch: &SequenceBatch,
    sharing: Sharing,
) -> Result<(Tensor, Tensor)> {
    let b = first_batch.rows();
    if second_batch.rows() != b {
        return Err(Error::Compute(format!("{} rows to score after {b} prompts", second_batch.rows())));
    }
    let first_ids: Vec<Vec<u32>> = first_batch.input_ids.to_vec2()?;
    let ids: Vec<Vec<u32>> = second_batch.input_ids.to_vec2()?;
    let mask: Vec<Vec<f32>> = second_batch.completion_mask.to_vec2()?;
    let shared: Vec<usize> = (0..b)
        .map(|i| {
            let (f, s) = (&first_ids[i][..first_batch.lengths[i]], &ids[i][..second_batch.lengths[i]]);
            shared_positions(f, s, &mask[i])
        })
        .collect();
    let prefix = shared.iter().copied().max().unwrap_or(0);
    let mut cache = first.new_cache();
    let hidden = first.hidden_states_keeping_kv(&first_batch.input_ids, &mut cache)?; // [b, t, d]
    let first_logps = completion_logps_of(first, &hidden, &first_batch.input_ids, &first_batch.completion_mask)?;
    drop(hidden);
    let mut cache = match (prefix, sharing) {
        (0, _) => second.new_cache(),
        (_, Sharing::Detached) => cache.first(prefix)?.detach(), // [b, g, prefix, e] per layer
        (_, Sharing::Attached) => cache.first(prefix)?,
    };
    let (rest, rest_mask, attention) = rest_of_rows(&ids, &mask, &second_batch.lengths, &shared, prefix);
    let device = second_batch.input_ids.device();
    let s = rest.len() / b;
    let rest = Tensor::from_vec(rest, (b, s), device)?; // [b, s]
    let rest_mask = Tensor::from_vec(rest_mask, (b, s), device)?; // [b, s]
    let hidden = second.hidden_states_cached(&rest, &attention, &mut cache)?; // [b, s, d]
    let second_logps = completion_logps_of(second, &hidden, &rest, &rest_mask)?.logps;
    let second_logps = match sharing {
        Sharing::Detached => second_logps.detach(),
        Sharing::Attached => second_logps,
    };
    Ok((first_logps.logps, second_logps))
}

/// What each second row still has to run, right-padded to the longest (`s` tokens, at least 1): its ids
/// and completion mask from position `shared[i]` on, flattened `[b * s]`, and each row's attention mask
/// over the `prefix` cached positions (its first `shared[i]` are its own) then its `s` new ones.
fn rest_of_rows(
    ids: &[Vec<u32>],
    mask: &[Vec<f32>],
    lengths: &[usize],
    shared: &[usize],
    prefix: usize,
) -> (Vec<u32>, Vec<f32>, Vec<Vec<u8>>) {
    let b = ids.len();
    let s = (0..b).map(|i| lengths[i] - shared[i]).max().unwrap_or(0).max(1);
    let (mut rest, mut rest_mask, mut attention) = (Vec::with_capacity(b * s), Vec::with_capacity(b * s), Vec::new());
    for i in 0..b {
        let range = shared[i]..lengths[i];
        let n = range.len();
        rest.extend(ids[i][range.clone()].iter().copied().chain(std::iter::repeat(0)).take(s));
        rest_mask.extend(mask[i][range].iter().copied().chain(std::iter::repeat(0.0)).take(s));
        let seen = |real: usize, width: usize| (0..width).map(move |j| u8::from(j < real));
        attention.push(seen(shared[i], prefix).chain(seen(n, s)).collect());
    }
    (rest, rest_mask, attention)
}

#[cfg(test)]
mod tests {
    use super::shared_positions;

    #[test]
    fn kl_rows_share_the_prompt_less_its_last_token() {
        // Prompt [1, 2, 3], main completion [4, 5], KL completion [6]: positions 0 and 1 are shared; token 3
        // (position 2) predicts the KL row's first completion token, so the KL row runs from it.
        assert_eq!(shared_positions(&[1, 2, 3, 4, 5], &[1, 2, 3, 6], &[0., 0., 0., 1.]), 2);
        // The main row's completion begins like the KL row's: still only the prompt less one token.
        assert_eq!(shared_positions(&[1, 2, 3, 6, 7], &[1, 2, 3, 6], &[0., 0., 0., 1.]), 2);
        // Prompts that differ at position 1 share position 0 only.
        assert_eq!(shared_positions(&[1, 9, 3, 4], &[1, 2, 3, 6], &[0., 0., 0., 1.]), 1);
        // A one-token prompt shares nothing; so does a KL row without completion tokens, past its end.
        assert_eq!(shared_positions(&[1, 4], &[1, 6], &[0., 1.]), 0);
        assert_eq!(shared_positions(&[1, 2, 3, 4], &[1, 2, 3], &[0., 0., 0.]), 2);
    }
}
