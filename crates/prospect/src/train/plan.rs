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
/// `i` starts with the prompt of main row `i` (KTO's pairs (x_i, y_{i−1}) beside (x_i, y_i)).
///
/// The main rows run under `main` (with gradient when its weights track one). Their keys and values,
/// detached, then serve the KL rows under `kl`, which must hold the same weights: each KL row runs only
/// from the end of what it shares with its main row (at most its prompt less the last token, whose
/// output predicts the first completion token), against the cached prefix. The shared part is checked
/// token by token, so rows that share nothing are simply run whole. Equal to scoring both batches on
/// their own up to float rounding (`tests/shared_prompt.rs`: 1e-6 relative).
pub fn logps_with_kl(
    main: &CausalLm,
    kl: &CausalLm,
    main_batch: &SequenceBatch,
    kl_batch: &SequenceBatch,
) -> Result<(Tensor, Tensor)> {
    let b = main_batch.rows();
    if kl_batch.rows() != b {
        return Err(Error::Compute(format!("{} KL rows for {b} rows", kl_batch.rows())));
    }
    let main_ids: Vec<Vec<u32>> = main_batch.input_ids.to_vec2()?;
    let kl_ids: Vec<Vec<u32>> = kl_batch.input_ids.to_vec2()?;
    let kl_mask: Vec<Vec<f32>> = kl_batch.completion_mask.to_vec2()?;
    let shared: Vec<usize> = (0..b)
        .map(|i| {
            let (m, k) = (&main_ids[i][..main_batch.lengths[i]], &kl_ids[i][..kl_batch.lengths[i]]);
            shared_positions(m, k, &kl_mask[i])
        })
        .collect();
    let prefix = shared.iter().copied().max().unwrap_or(0);
    let mut cache = main.new_cache();
    let hidden = main.hidden_states_keeping_kv(&main_batch.input_ids, &mut cache)?; // [b, t, d]
    let main_logps = completion_logps_of(main, &hidden, &main_batch.input_ids, &main_batch.completion_mask)?.logps;
    drop(hidden);
    if main_ids == kl_ids && main_batch.completion_mask.to_vec2::<f32>()? == kl_mask {
        // A one-row microbatch pairs its prompt with its own completion: the KL row is the main row.
        return Ok((main_logps.clone(), main_logps.detach()));
    }
    let mut cache = match prefix {
        0 => kl.new_cache(),
        _ => cache.first(prefix)?, // [b, g, prefix, e] per layer
    };
    // The rest of each KL row, right-padded to `s` tokens, behind its `shared[i]` cached positions.
    let s = (0..b).map(|i| kl_batch.lengths[i] - shared[i]).max().unwrap_or(0).max(1);
    let (mut ids, mut mask, mut attention) = (Vec::with_capacity(b * s), Vec::with_capacity(b * s), Vec::new());
    for i in 0..b {
        let rest = shared[i]..kl_batch.lengths[i];
        let n = rest.len();
        ids.extend(kl_ids[i][rest.clone()].iter().copied().chain(std::iter::repeat(0)).take(s));
        mask.extend(kl_mask[i][rest].iter().copied().chain(std::iter::repeat(0.0)).take(s));
        let seen = |real: usize, width: usize| (0..width).map(move |j| u8::from(j < real));
        attention.push(seen(shared[i], prefix).chain(seen(n, s)).collect::<Vec<u8>>());
    }
    let device = &kl_batch.input_ids.device().clone();
    let ids = Tensor::from_vec(ids, (b, s), device)?; // [b, s]
    let mask = Tensor::from_vec(mask, (b, s), device)?; // [b, s]
    let hidden = kl.hidden_states_cached(&ids, &attention, &mut cache)?; // [b, s, d]
    let kl_logps = completion_logps_of(kl, &hidden, &ids, &mask)?.logps.detach();
    Ok((main_logps, kl_logps))
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
