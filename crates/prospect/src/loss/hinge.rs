//! Hinge loss on DPO's implicit reward margin (SLiC's calibration loss on log-ratios; Zhao et al. 2023,
//! <https://arxiv.org/abs/2305.10425>; Liu et al. 2023, RSO, <https://arxiv.org/abs/2309.06657>), as
//! TRL's `DPOTrainer(loss_type=["hinge"])` defines it.
//!
//! ```text
//! Δ    = [log π_θ(y_c|x) − log π_ref(y_c|x)] − [log π_θ(y_r|x) − log π_ref(y_r|x)]
//! loss = mean over pairs of max(0, 1 − βΔ)
//! ```
//!
//! Pairs whose margin βΔ already exceeds 1 give no gradient; β sets the margin (1/β in log-ratio units).
//! Hyperparameters: `beta` = 0.1 (TRL's default). Log-probs are summed over completion tokens.
//!
//! Shapes: every input is `[b]`, one value per pair.

use candle_core::D;
use serde::{Deserialize, Serialize};

use super::{check_positive, check_rows, relu, Loss, LossOutput, PairedInputs, PairedLoss, PairedOutput};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HingeConfig {
    /// Inverse margin: the loss is zero once β·Δ ≥ 1.
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for HingeConfig {
    fn default() -> Self {
        Self { beta: default_beta() }
    }
}

impl Loss for HingeConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)
    }

    fn needs_reference(&self) -> bool {
        true
    }
}

/// Rewards reported are β·(log π_θ − log π_ref), as for DPO.
impl PairedLoss for HingeConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        let (reference_chosen, reference_rejected) = x.reference()?;
        let b = x.policy_chosen.dims1()?;
        let inputs = [("policy_rejected", x.policy_rejected), ("ref_chosen", reference_chosen)];
        check_rows(b, &[inputs[0], inputs[1], ("ref_rejected", reference_rejected)])?;
        let chosen = (x.policy_chosen - reference_chosen)?; // [b]
        let rejected = (x.policy_rejected - reference_rejected)?; // [b]
        let margin = ((&chosen - &rejected)? * self.beta)?; // [b]
        let loss = relu(&(margin.neg()? + 1.0)?)?.mean(D::Minus1)?; // torch's relu'(0) = 0
        Ok(PairedOutput::new(loss, &(chosen * self.beta)?, &(rejected * self.beta)?)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossState;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn matches_hand_calculation() {
        // Δ = (−1 − −2) − (−4 − −3) = 2 and (−2 − −2) − (−1 − −1) = 0, β = 0.5: margins 1.0 and 0.
        // python: (max(0, 1 - 0.5*2) + max(0, 1 - 0.5*0)) / 2 = 0.5; d/dpc = [0 (at the hinge), -0.5/2]
        let pc = Var::new(&[-1f32, -2.], &Device::Cpu).unwrap();
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let (pr, rc, rr) = (t(&[-4., -1.]), t(&[-2., -2.]), t(&[-3., -1.]));
        let (ct, state) = ([1usize, 1], LossState::default());
        let x = PairedInputs {
            policy_chosen: pc.as_tensor(),
            policy_rejected: &pr,
            reference: Some((&rc, &rr)),
            chosen_tokens: &ct,
            rejected_tokens: &ct,
            state: &state,
        };
        let out = HingeConfig { beta: 0.5 }.forward(&x).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() - 0.5).abs() < 1e-7);
        let g: Vec<f32> = out.loss.backward().unwrap().get(pc.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![0.0, -0.25]);
        // rewards: β·[1, 0] chosen, β·[−1, 0] rejected.
        assert_eq!(out.metrics.get("rewards/chosen"), Some(0.25));
        assert_eq!(out.metrics.get("rewards/margins"), Some(0.5));
        assert_eq!(out.metrics.get("rewards/accuracies"), Some(0.5));
    }
}
