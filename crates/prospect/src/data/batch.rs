//! From token sequences to padded tensors, and the mismatched pairs KTO uses for its KL estimate.
//!
//! Shapes: `b` rows, `t` the longest row of the batch after truncation.

use candle_core::{Device, Tensor};

use super::tokenize::Sequence;
use crate::error::Result;

/// A right-padded batch of prompt + completion rows.
pub struct SequenceBatch {
    /// `[b, t]` u32, padded on the right with the pad id.
    pub input_ids: Tensor,
    /// `[b, t]` f32: 1 on completion tokens, 0 on prompt and padding.
    pub completion_mask: Tensor,
    /// Completion tokens per row, after truncation.
    pub completion_tokens: Vec<usize>,
    /// Real (non-padding) tokens in the whole batch.
    pub num_tokens: usize,
    /// Real tokens per row: row `i` is `input_ids[i, ..lengths[i]]`, then padding.
    pub lengths: Vec<usize>,
}

impl SequenceBatch {
    pub fn rows(&self) -> usize {
        self.completion_tokens.len()
    }

    pub fn total_completion_tokens(&self) -> usize {
        self.completion_tokens.iter().sum()
    }

    /// Rows `start..start + n` as a batch of their own, padded to their own longest row (the columns past
    /// it, padding in every one of these rows, are dropped).
    pub fn select_rows(&self, start: usize, n: usize) -> Result<SequenceBatch> {
        let lengths = self.lengths[start..start + n].to_vec();
        let t = lengths.iter().copied().max().unwrap_or(0);
        Ok(SequenceBatch {
            input_ids: self.input_ids.narrow(0, start, n)?.narrow(1, 0, t)?.contiguous()?, // [n, t]
            completion_mask: self.completion_mask.narrow(0, start, n)?.narrow(1, 0, t)?.contiguous()?, // [n, t]
            completion_tokens: self.completion_tokens[start..start + n].to_vec(),
            num_tokens: lengths.iter().sum(),
            lengths,
        })
    }
}

/// Join each row's prompt and completion, cut the end at `max_length`, and pad on the right to the
/// longest row (TRL's `keep_start` truncation and right padding).
pub fn collate(rows: &[(&[u32], &[u32])], max_length: usize, pad_id: u32, device: &Device) -> Result<SequenceBatch> {
    let joined: Vec<(Vec<u32>, Vec<f32>)> = rows
        .iter()
        .map(|(prompt, completion)| {
            let mut ids: Vec<u32> = prompt.iter().chain(completion.iter()).copied().collect();
            let mut mask: Vec<f32> =
                std::iter::repeat_n(0.0, prompt.len()).chain(std::iter::repeat_n(1.0, completion.len())).collect();
            ids.truncate(max_length);
            mask.truncate(max_length);
            (ids, mask)
        })
        .collect();
    let t = joined.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let b = joined.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let mut completion_tokens = Vec::with_capacity(b);
    let mut num_tokens = 0;
    let mut lengths = Vec::with_capacity(b);
    for (row_ids, row_mask) in &joined {
        num_tokens += row_ids.len();
        lengths.push(row_ids.len());
        completion_tokens.push(row_mask.iter().filter(|&&m| m > 0.0).count());
        ids.extend(row_ids.iter().copied().chain(std::iter::repeat(pad_id)).take(t));
        mask.extend(row_mask.iter().copied().chain(std::iter::repeat(0.0)).take(t));
    }
    Ok(SequenceBatch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        completion_mask: Tensor::from_vec(mask, (b, t), device)?,
        completion_tokens,
        num_tokens,
        lengths,
    })
}

/// Collate whole sequences.
pub fn collate_sequences(seqs: &[&Sequence], max_length: usize, pad_id: u32, device: &Device) -> Result<SequenceBatch> {
    let rows: Vec<(&[u32], &[u32])> =
        seqs.iter().map(|s| (s.prompt_ids.as_slice(), s.completion_ids.as_slice())).collect();
    collate(&rows, max_length, pad_id, device)
}

/// KTO's mismatched pairs: prompt `x_i` with completion `y_{i−1}`, and `x_1` with `y_m` (TRL's rotation
/// of completions by one). Returns, for each row `i`, the index of the completion it is paired with.
pub fn rotate_for_kl(m: usize) -> Vec<usize> {
    (0..m).map(|i| (i + m - 1) % m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_pairs_each_prompt_with_the_previous_completion() {
        assert_eq!(rotate_for_kl(4), vec![3, 0, 1, 2]);
        assert_eq!(rotate_for_kl(2), vec![1, 0]);
        assert_eq!(rotate_for_kl(1), vec![0]);
    }

    #[test]
    fn collate_truncates_the_end_and_pads_right() {
        let a = (&[1u32, 2][..], &[3u32, 4, 5][..]);
        let b = (&[6u32][..], &[7u32][..]);
        let batch = collate(&[a, b], 4, 0, &Device::Cpu).unwrap();
        let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
        let mask: Vec<Vec<f32>> = batch.completion_mask.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![1, 2, 3, 4], vec![6, 7, 0, 0]]);
        assert_eq!(mask, vec![vec![0., 0., 1., 1.], vec![0., 1., 0., 0.]]);
        assert_eq!(batch.completion_tokens, vec![2, 1]);
        assert_eq!(batch.num_tokens, 6);
        assert_eq!(batch.lengths, vec![4, 2]);
        let second = batch.select_rows(1, 1).unwrap();
        assert_eq!(second.input_ids.to_vec2::<u32>().unwrap(), vec![vec![6, 7]]);
        assert_eq!(second.completion_mask.to_vec2::<f32>().unwrap(), vec![vec![0., 1.]]);
        assert_eq!((second.completion_tokens, second.num_tokens, second.lengths), (vec![1], 2, vec![2]));
    }
}
