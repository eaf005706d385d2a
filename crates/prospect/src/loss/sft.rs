//! SFT: supervised fine-tuning on completions (negative log-likelihood).
//!
//! ```text
//! loss = − Σ_{completion tokens} log π_θ(y_t | x, y_<t) / N
//! ```
//!
//! N counts the completion tokens of the microbatch; prompt tokens are masked out (TRL's
//! `completion_only_loss`). The trainer weights each microbatch by its share of the optimizer
//! batch's tokens (see [`LossConfig::microbatch_weight`](super::LossConfig::microbatch_weight)), so a
//! step's loss is the mean over **all** completion tokens of the optimizer batch, whatever the split
//! into microbatches. No hyperparameters, no reference model.
//!
//! Shapes: `logps` is `[b]` (summed log-probs per row), `token_counts` the matching counts.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Loss, LossOutput, Metrics, SftLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {}

impl Loss for SftConfig {}

impl SftLoss for SftConfig {
    fn forward(&self, logps: &Tensor, tokens: usize) -> Result<LossOutput> {
        Ok(LossOutput { loss: sft_loss(logps, tokens)?, metrics: Metrics::new() })
    }
}

/// Mean negative log-likelihood per completion token of the microbatch. Scalar.
pub fn sft_loss(logps: &Tensor, num_tokens: usize) -> Result<Tensor> {
    if num_tokens == 0 {
        return Err(Error::Compute("SFT microbatch has no completion tokens".into()));
    }
    Ok((logps.sum_all()?.neg()? / num_tokens as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn mean_over_tokens_not_rows() {
        // rows with 2 and 6 tokens, summed logps -3 and -9: 12 / 8 = 1.5 (mean of row means would be 1.5/1.5 -> 1.5 too,
        // so take -2 and -9 instead: 11/8 = 1.375, while the mean of row means is (1 + 1.5)/2 = 1.25).
        let x = Var::new(&[-2f32, -9.], &Device::Cpu).unwrap();
        let loss = sft_loss(x.as_tensor(), 8).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - 1.375).abs() < 1e-7);
        let g: Vec<f32> = loss.backward().unwrap().get(x.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![-0.125, -0.125]); // −1/N for every row's summed logp
    }

    #[test]
    fn empty_microbatch_is_an_error() {
        let x = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        assert!(sft_loss(&x, 0).is_err());
    }
}
