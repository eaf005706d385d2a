//! `sequence_logps`: the one place where logits become log-probabilities.
//!
//! Shapes: `b` batch, `t` time, `v` vocab.

use candle_core::{DType, Tensor, D};

use super::ops::log_softmax_last_dim;
use crate::error::{Error, Result};

/// Per-sequence completion log-probs.
pub struct SequenceLogps {
    /// `[b]` Σ log p(token) over each row's completion tokens.
    pub logps: Tensor,
    /// Completion tokens per row (the length of each sum).
    pub token_counts: Vec<usize>,
}

/// Sum the log-probs of completion tokens.
///
/// Position `t` of the logits predicts token `t + 1`, so logits `[:, :-1]` are scored against
/// `input_ids[:, 1:]`, masked by `completion_mask[:, 1:]`. The log-softmax runs in f32 whatever the
/// model's dtype.
///
/// - `logits`: `[b, t, v]`
/// - `input_ids`: `[b, t]` u32
/// - `completion_mask`: `[b, t]`, 1 on completion tokens and 0 on prompt and padding
pub fn sequence_logps(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<SequenceLogps> {
    let (token_logps, mask) = token_logps(logits, input_ids, completion_mask)?; // [b, t-1] each
    let logps = token_logps.sum(D::Minus1)?; // [b]
    let token_counts = mask.sum(D::Minus1)?.to_vec1::<f32>()?.into_iter().map(|c| c as usize).collect();
    Ok(SequenceLogps { logps, token_counts })
}

/// Per-token completion log-probs, for losses that work token by token (offline PPO).
///
/// Returns `([b, t-1] log p of token t+1 at position t, zero off the completion; [b, t-1] mask)`.
pub fn token_logps(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, _v) = logits.dims3()?;
    if input_ids.dims() != [b, t] || completion_mask.dims() != [b, t] {
        return Err(Error::Shape {
            name: "input_ids / completion_mask".into(),
            expected: vec![b, t],
            got: input_ids.dims().to_vec(),
        });
    }
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?; // [b, t-1, v]
    let targets = input_ids.narrow(1, 1, t - 1)?.contiguous()?; // [b, t-1]
    let mask = completion_mask.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?; // [b, t-1]
    let logp = log_softmax_last_dim(&logits)?; // [b, t-1, v]
    let token_logps = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?; // [b, t-1]
    Ok(((token_logps * &mask)?, mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gathers_shifted_completion_tokens_only() {
        // One row, t = 3, v = 2. Logits at positions 0 and 1 score tokens 1 and 2.
        // mask = [0, 0, 1]: only the last token (id 1, scored by position 1) counts.
        // python: import math; 2 - math.log(math.exp(0)+math.exp(2))  (log-softmax of [0, 2] at index 1)
        let logits = Tensor::new(&[[[5f32, 1.], [0., 2.], [9., 9.]]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 0, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 0., 1.]], &Device::Cpu).unwrap();
        let out = sequence_logps(&logits, &ids, &mask).unwrap();
        let v: Vec<f32> = out.logps.to_vec1().unwrap();
        assert!((v[0] - (-0.12692805)).abs() < 1e-6, "{v:?}");
        assert_eq!(out.token_counts, vec![1]);
    }
}
