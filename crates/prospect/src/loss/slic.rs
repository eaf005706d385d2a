//! SLiC-HF: Sequence Likelihood Calibration with Human Feedback (Zhao et al., 2023,
//! <https://arxiv.org/abs/2305.10425>), as HALOs' `SLiCTrainer` defines it: the rank calibration
//! loss plus a cross-entropy regulariser on the chosen completion, with no reference model.
//!
//! ```text
//! loss = mean over pairs of max(0, δ − log π_θ(y_c|x) + log π_θ(y_r|x)) + λ·(−log π_θ(y_c|x))
//! ```
//!
//! Log-probs are summed over completion tokens. The hinge stops pushing once the chosen completion is
//! δ nats more likely than the rejected one; the λ term keeps the chosen completion likely (the
//! paper regularises towards the SFT targets; HALOs uses the chosen completion, as here).
//!
//! Hyperparameters: `delta` δ = 1.0, `lambda_coef` λ = 0.1 (HALOs' `config/loss/slic.yaml`, where δ
//! is called `beta`). Reported rewards are the summed policy log-probs, as HALOs reports them.
//!
//! Shapes: every input is `[b]`, one value per pair.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_non_negative, check_rows, PairedOutput};
use super::{Loss, LossOutput, PairedInputs, PairedLoss};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlicConfig {
    /// δ: the calibration margin, in nats.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// λ: weight of the chosen completion's negative log-likelihood.
    #[serde(default = "default_lambda_coef")]
    pub lambda_coef: f64,
}

fn default_delta() -> f64 {
    1.0
}
fn default_lambda_coef() -> f64 {
    0.1
}

impl Default for SlicConfig {
    fn default() -> Self {
        Self { delta: default_delta(), lambda_coef: default_lambda_coef() }
    }
}

impl Loss for SlicConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_non_negative("loss.delta", self.delta)?;
        check_non_negative("loss.lambda_coef", self.lambda_coef)
    }
}

pub fn slic_loss(
    config: &SlicConfig,
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
) -> Result<PairedOutput> {
    let b = policy_chosen_logps.dims1()?;
    check_rows(b, &[("policy_rejected_logps", policy_rejected_logps)])?;
    // max(0, x) with gradient 0 at exactly 0, as torch.clamp(min=0) has it.
    let hinge = super::relu(&((policy_rejected_logps - policy_chosen_logps)? + config.delta)?)?; // [b]
    let nll = (policy_chosen_logps.neg()? * config.lambda_coef)?; // [b]
    let losses = (hinge + nll)?; // [b]
    PairedOutput::new(losses.mean(D::Minus1)?, policy_chosen_logps, policy_rejected_logps)
}

impl PairedLoss for SlicConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        Ok(slic_loss(self, x.policy_chosen, x.policy_rejected)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn run(cfg: &SlicConfig, pc: &[f32], pr: &[f32]) -> (f64, Vec<f32>, Vec<f32>, PairedOutput) {
        let (vc, vr) = (Var::new(pc, &Device::Cpu).unwrap(), Var::new(pr, &Device::Cpu).unwrap());
        let out = slic_loss(cfg, vc.as_tensor(), vr.as_tensor()).unwrap();
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
        // Pair 1: hinge max(0, 1 + 3 − (−3.5)) ... take log π_c = −3, log π_r = −3.5:
        //   hinge = 1 − (−3) + (−3.5) = 0.5, nll = 0.1·3 = 0.3  -> 0.8
        // Pair 2: log π_c = −2, log π_r = −6: hinge = max(0, 1 + 2 − 6) = 0, nll = 0.2 -> 0.2
        // python: (max(0,1+3-3.5)+.3 + max(0,1+2-6)+.2)/2 = 0.5
        let (loss, gc, gr, out) = run(&SlicConfig::default(), &[-3., -2.], &[-3.5, -6.]);
        assert!((loss - 0.5).abs() < 1e-6, "{loss}");
        // Gradients (mean over 2): pair 1 chosen (−1 − 0.1)/2, rejected 1/2; pair 2 only the nll: −0.1/2, 0.
        assert!((gc[0] + 0.55).abs() < 1e-6 && (gc[1] + 0.05).abs() < 1e-6, "{gc:?}");
        assert!((gr[0] - 0.5).abs() < 1e-6 && gr[1].abs() < 1e-9, "{gr:?}");
        assert!((out.rewards_chosen + 2.5).abs() < 1e-6 && out.rewards_accuracies == 1.0);
    }

    #[test]
    fn equal_chosen_and_rejected_pay_the_full_margin() {
        // hinge = δ = 1, nll = 0.1·4 = 0.4.
        let (loss, gc, gr, out) = run(&SlicConfig::default(), &[-4.], &[-4.]);
        assert!((loss - 1.4).abs() < 1e-6, "{loss}");
        assert!((gc[0] + 1.1).abs() < 1e-6 && (gr[0] - 1.0).abs() < 1e-6);
        assert_eq!(out.rewards_accuracies, 0.0);
    }

    #[test]
    fn very_long_and_extreme_completions_stay_finite() {
        // log π_c = −1e4 (a long completion), log π_r = 0: hinge 1e4 + 1, nll 1e3.
        let (loss, gc, ..) = run(&SlicConfig::default(), &[-1e4], &[0.]);
        assert!((loss - 11001.0).abs() < 1e-2, "{loss}");
        assert!((gc[0] + 1.1).abs() < 1e-6);
        // Chosen far more likely: the hinge is off, only the nll remains.
        let (loss, gc, gr, _) = run(&SlicConfig::default(), &[-1.], &[-1e4]);
        assert!((loss - 0.1).abs() < 1e-6 && (gc[0] + 0.1).abs() < 1e-6 && gr[0] == 0.0);
    }
}
