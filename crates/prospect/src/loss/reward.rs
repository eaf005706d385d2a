//! Reward model: the Bradley–Terry pairwise loss (Bradley & Terry, 1952; as used for RLHF reward models
//! by Ouyang et al., 2022, <https://arxiv.org/abs/2203.02155>, Eq. 1), as TRL's `RewardTrainer`
//! computes it.
//!
//! ```text
//! s(x, y) = score · h_θ(x, y)[last non-pad token]       (a linear head on the final hidden state)
//! loss    = mean over pairs of −log σ(s(x, y_c) − s(x, y_r))  +  c · mean((s_c + s_r)²)
//! ```
//!
//! The score is produced by [`crate::model::RewardModel`] exactly as Hugging Face's
//! `LlamaForSequenceClassification` with `num_labels = 1` produces it; this file only sees the scores.
//! The optional centring term (`center_rewards_coefficient` c, Eisenstein et al., 2023) keeps the
//! scores near zero; it is off by default, as in TRL.
//!
//! Metrics (TRL's keys): `accuracy`, the fraction of pairs with s_c > s_r, and `margin`, the mean of
//! s_c − s_r. No reference model.
//!
//! Shapes: `chosen_scores`, `rejected_scores` are `[b]`.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_non_negative, check_rows, log_sigmoid, mean_f64};
use super::{Loss, LossOutput, Metrics, RewardLoss};
use crate::error::Result;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// c: weight of the centring penalty mean((s_c + s_r)²); absent means off (TRL's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center_rewards_coefficient: Option<f64>,
}

impl Loss for RewardConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        match self.center_rewards_coefficient {
            Some(c) => check_non_negative("loss.center_rewards_coefficient", c),
            None => Ok(()),
        }
    }
}

pub struct RewardOutput {
    /// Scalar: mean loss over the pairs.
    pub loss: Tensor,
    /// Fraction of pairs whose chosen score is strictly above the rejected one.
    pub accuracy: f64,
    /// Mean of s_c − s_r.
    pub margin: f64,
}

pub fn reward_loss(config: &RewardConfig, chosen_scores: &Tensor, rejected_scores: &Tensor) -> Result<RewardOutput> {
    let b = chosen_scores.dims1()?;
    check_rows(b, &[("rejected_scores", rejected_scores)])?;
    let diff = (chosen_scores - rejected_scores)?; // [b]
    let mut loss = log_sigmoid(&diff)?.neg()?.mean(D::Minus1)?;
    if let Some(c) = config.center_rewards_coefficient {
        let centre = (chosen_scores + rejected_scores)?.sqr()?.mean(D::Minus1)?;
        loss = (loss + (centre * c)?)?;
    }
    let diff = diff.detach();
    let accuracy = diff.gt(&diff.zeros_like()?)?.to_dtype(candle_core::DType::F32)?;
    Ok(RewardOutput { loss, accuracy: mean_f64(&accuracy)?.unwrap_or(0.0), margin: mean_f64(&diff)?.unwrap_or(0.0) })
}

impl RewardLoss for RewardConfig {
    fn forward(&self, chosen_scores: &Tensor, rejected_scores: &Tensor) -> Result<LossOutput> {
        let out = reward_loss(self, chosen_scores, rejected_scores)?;
        Ok(LossOutput {
            loss: out.loss,
            metrics: Metrics::new().with("accuracy", out.accuracy).with("margin", out.margin),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn run(cfg: &RewardConfig, c: &[f32], r: &[f32]) -> (f64, Vec<f32>, Vec<f32>, RewardOutput) {
        let (vc, vr) = (Var::new(c, &Device::Cpu).unwrap(), Var::new(r, &Device::Cpu).unwrap());
        let out = reward_loss(cfg, vc.as_tensor(), vr.as_tensor()).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let g = out.loss.backward().unwrap();
        (
            loss,
            g.get(vc.as_tensor()).unwrap().to_vec1().unwrap(),
            g.get(vr.as_tensor()).unwrap().to_vec1().unwrap(),
            out,
        )
    }

    #[test]
    fn matches_hand_calculation() {
        // diffs 1 and −0.5. python: import math; (math.log1p(math.exp(-1)) + math.log1p(math.exp(.5)))/2
        let (loss, gc, gr, out) = run(&RewardConfig::default(), &[0.5, -1.], &[-0.5, -0.5]);
        assert!((loss - 0.6436693).abs() < 1e-6, "{loss}");
        // d/ds_c = −σ(−diff)/2; python: -1/(1+math.exp(1))/2, -1/(1+math.exp(-.5))/2
        assert!((gc[0] as f64 + 0.1344707).abs() < 1e-6 && (gc[1] as f64 + 0.3112297).abs() < 1e-6, "{gc:?}");
        assert!((gr[0] as f64 - 0.1344707).abs() < 1e-6);
        assert_eq!(out.accuracy, 0.5);
        assert!((out.margin - 0.25).abs() < 1e-7);
    }

    #[test]
    fn equal_scores_give_log_two_and_no_accuracy() {
        let (loss, gc, _, out) = run(&RewardConfig::default(), &[3.], &[3.]);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6 && (gc[0] + 0.5).abs() < 1e-7);
        assert_eq!(out.accuracy, 0.0);
    }

    #[test]
    fn extreme_scores_and_centring() {
        // diff = −100: loss 100 exactly; +100: 0.
        let (loss, gc, ..) = run(&RewardConfig::default(), &[-50.], &[50.]);
        assert!((loss - 100.0).abs() < 1e-4 && (gc[0] + 1.0).abs() < 1e-6, "{loss}");
        // Centring with c = 0.01 on s = (2, 0): log1p(e^-2) + 0.01·4. python: math.log1p(math.exp(-2)) + .04
        let cfg = RewardConfig { center_rewards_coefficient: Some(0.01) };
        let (loss, ..) = run(&cfg, &[2.], &[0.]);
        assert!((loss - 0.1669280).abs() < 1e-6, "{loss}");
    }
}
