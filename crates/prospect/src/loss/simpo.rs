//! SimPO: Simple Preference Optimization with a reference-free reward (Meng et al., 2024,
//! <https://arxiv.org/abs/2405.14734>, Eq. 6).
//!
//! ```text
//! avg(y) = log π_θ(y|x) / |y|                      (mean log-prob over completion tokens)
//! loss   = mean over pairs of −log σ(β·(avg(y_c) − avg(y_r)) − γ)
//! ```
//!
//! No reference model. On the same log-probs this equals TRL's `CPOTrainer` loss with
//! `loss_type = "simpo"`, `cpo_alpha = 0`, `label_smoothing = 0` (TRL writes γ/β inside the β·(...)).
//!
//! Hyperparameters: `beta` β = 2.0, `gamma` γ = 0.5 (HALOs' `config/loss/simpo.yaml`; TRL's
//! `simpo_gamma` is also 0.5, its `CPOConfig.beta` = 0.1 is CPO's). Reported rewards are β·avg.
//!
//! Shapes: log-probs `[b]`, token counts one per pair (an empty completion counts as 1).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::ipo::{check_counts, counts};
use super::{check_non_negative, check_positive, check_rows, log_sigmoid, PairedOutput};
use super::{Loss, LossOutput, PairedInputs, PairedLoss};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpoConfig {
    /// Scale of the average log-prob reward.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Target reward margin γ.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
}

fn default_beta() -> f64 {
    2.0
}
fn default_gamma() -> f64 {
    0.5
}

impl Default for SimpoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), gamma: default_gamma() }
    }
}

impl Loss for SimpoConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)?;
        check_non_negative("loss.gamma", self.gamma)
    }
}

pub fn simpo_loss(
    config: &SimpoConfig,
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
    chosen_tokens: &[usize],
    rejected_tokens: &[usize],
) -> Result<PairedOutput> {
    let b = policy_chosen_logps.dims1()?;
    check_rows(b, &[("policy_rejected_logps", policy_rejected_logps)])?;
    check_counts(b, chosen_tokens, rejected_tokens)?;
    let chosen = (policy_chosen_logps.div(&counts(chosen_tokens, policy_chosen_logps)?)? * config.beta)?; // [b]
    let rejected = (policy_rejected_logps.div(&counts(rejected_tokens, policy_rejected_logps)?)? * config.beta)?; // [b]
    let logits = ((&chosen - &rejected)? - config.gamma)?; // [b]
    let losses = log_sigmoid(&logits)?.neg()?; // [b]
    PairedOutput::new(losses.mean(D::Minus1)?, &chosen, &rejected)
}

impl PairedLoss for SimpoConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        Ok(simpo_loss(self, x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn run(cfg: &SimpoConfig, pc: &[f32], pr: &[f32], nc: &[usize], nr: &[usize]) -> (f64, Vec<f32>, Vec<f32>) {
        let (vc, vr) = (Var::new(pc, &Device::Cpu).unwrap(), Var::new(pr, &Device::Cpu).unwrap());
        let out = simpo_loss(cfg, vc.as_tensor(), vr.as_tensor(), nc, nr).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let g = out.loss.backward().unwrap();
        (loss, g.get(vc.as_tensor()).unwrap().to_vec1().unwrap(), g.get(vr.as_tensor()).unwrap().to_vec1().unwrap())
    }

    #[test]
    fn matches_hand_calculation() {
        // avg_c = −4/4 = −1, avg_r = −6/3 = −2: x = 2·(−1 + 2) − 0.5 = 1.5.
        // python: import math; s=lambda x:1/(1+math.exp(-x)); math.log1p(math.exp(-1.5)), -2*s(-1.5)/4, 2*s(-1.5)/3
        let (loss, gc, gr) = run(&SimpoConfig::default(), &[-4.], &[-6.], &[4], &[3]);
        assert!((loss - 0.2014133).abs() < 1e-6, "{loss}");
        assert!((gc[0] as f64 + 0.0912128).abs() < 1e-6 && (gr[0] as f64 - 0.1216170).abs() < 1e-6, "{gc:?} {gr:?}");
    }

    #[test]
    fn equal_chosen_and_rejected_pay_the_margin() {
        // x = −γ = −0.5. python: math.log1p(math.exp(0.5)) = 0.9740770
        let (loss, gc, gr) = run(&SimpoConfig::default(), &[-3.], &[-3.], &[3], &[3]);
        assert!((loss - 0.9740770).abs() < 1e-6, "{loss}");
        assert!(gc[0] < 0.0 && gr[0] > 0.0);
    }

    #[test]
    fn long_completions_and_extreme_margins() {
        // Long completions are averaged: −2000 over 1000 tokens vs −3000 over 1000 -> x = 2·1 − 0.5 = 1.5.
        let (loss, ..) = run(&SimpoConfig::default(), &[-2000.], &[-3000.], &[1000], &[1000]);
        assert!((loss - 0.2014133).abs() < 1e-5, "{loss}");
        // x = 2·(−100 − 0) − 0.5 = −200.5: loss 200.5 exactly, no overflow.
        let (loss, gc, _) = run(&SimpoConfig::default(), &[-100.], &[0.], &[1], &[1]);
        assert!((loss - 200.5).abs() < 1e-3 && (gc[0] + 2.0).abs() < 1e-6, "{loss} {gc:?}");
    }
}
