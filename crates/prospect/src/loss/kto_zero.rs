//! KTO-zero: KTO with its reference point fixed at z0 = 0 (the ablation in Ethayarajh et al., 2024,
//! <https://arxiv.org/abs/2402.01306>, and HALOs' `KTOZeroTrainer`). It shows why KTO's KL term
//! matters and is not meant for real use.
//!
//! ```text
//! r_θ(x, y) = log π_θ(y|x) − log π_ref(y|x)                 (summed over completion tokens)
//! L(x, y)   = λ_D · (1 − σ(β · r_θ(x, y)))     if y is desirable
//!             λ_U · (1 − σ(−β · r_θ(x, y)))    if y is undesirable
//! loss      = mean of L over the microbatch
//! ```
//!
//! No KL pass over mismatched pairs, so a microbatch of one row is fine. Since 1 − σ(−x) = σ(x), this
//! is the same function as TRL's unpaired APO-zero ([`super::apo_zero_unpaired`]).
//!
//! Hyperparameters: `beta` = 0.1, `desirable_weight` λ_D = 1, `undesirable_weight` λ_U = 1 (HALOs'
//! `config/loss/kto-zero.yaml`).
//!
//! Shapes: every input is `[b]`, one value per row.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::kto::{class_rewards, value_losses, KtoConfig};
use super::{check_non_negative, check_positive, check_rows};
use super::{Loss, LossOutput, UnpairedInputs, UnpairedLoss};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoZeroConfig {
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// λ_D: weight of desirable rows.
    #[serde(default = "one")]
    pub desirable_weight: f64,
    /// λ_U: weight of undesirable rows.
    #[serde(default = "one")]
    pub undesirable_weight: f64,
}

fn default_beta() -> f64 {
    0.1
}
fn one() -> f64 {
    1.0
}

impl Default for KtoZeroConfig {
    fn default() -> Self {
        Self { beta: default_beta(), desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

impl Loss for KtoZeroConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)?;
        check_non_negative("loss.desirable_weight", self.desirable_weight)?;
        check_non_negative("loss.undesirable_weight", self.undesirable_weight)?;
        super::kto::check_some_weight(self.desirable_weight, self.undesirable_weight)
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn class_weights(&self) -> Option<(f64, f64)> {
        Some((self.desirable_weight, self.undesirable_weight))
    }

    fn set_class_weights(&mut self, desirable: f64, undesirable: f64) {
        (self.desirable_weight, self.undesirable_weight) = (desirable, undesirable);
    }
}

/// The loss of an unpaired objective and its per-class rewards (β·r, `None` for an absent class).
pub struct UnpairedOutput {
    /// Scalar: mean weighted loss over the microbatch.
    pub loss: Tensor,
    pub rewards_chosen: Option<f64>,
    pub rewards_rejected: Option<f64>,
}

impl From<UnpairedOutput> for LossOutput {
    fn from(out: UnpairedOutput) -> Self {
        LossOutput { loss: out.loss, metrics: super::class_metrics(out.rewards_chosen, out.rewards_rejected) }
    }
}

/// `labels[i]` is `true` for a desirable row.
pub fn kto_zero_loss(
    config: &KtoZeroConfig,
    policy_logps: &Tensor,
    reference_logps: &Tensor,
    labels: &[bool],
) -> Result<UnpairedOutput> {
    check_rows(labels.len(), &[("policy_logps", policy_logps), ("reference_logps", reference_logps)])?;
    let kto = KtoConfig {
        beta: config.beta,
        desirable_weight: config.desirable_weight,
        undesirable_weight: config.undesirable_weight,
    };
    let logratios = (policy_logps - reference_logps)?; // [b]
    let losses = value_losses(&kto, &logratios, labels, 0.0)?; // [b]
    let (rewards_chosen, rewards_rejected) = class_rewards(config.beta, &logratios, labels)?;
    Ok(UnpairedOutput { loss: losses.mean(D::Minus1)?, rewards_chosen, rewards_rejected })
}

impl UnpairedLoss for KtoZeroConfig {
    fn forward(&self, x: &UnpairedInputs) -> Result<LossOutput> {
        Ok(kto_zero_loss(self, x.policy, x.reference()?, x.labels)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn run(
        cfg: &KtoZeroConfig,
        pol: &[f32],
        refl: &[f32],
        labels: &[bool],
    ) -> (f64, Vec<f32>, UnpairedOutput) {
        let p = Var::new(pol, &Device::Cpu).unwrap();
        let out = kto_zero_loss(cfg, p.as_tensor(), &Tensor::new(refl, &Device::Cpu).unwrap(), labels).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let g = out.loss.backward().unwrap().get(p.as_tensor()).unwrap().to_vec1().unwrap();
        (loss, g, out)
    }

    #[test]
    fn matches_hand_calculation() {
        // r = [1, −2, 0.5], labels [D, U, D].
        // python: import math; s=lambda x:1/(1+math.exp(-x)); ((1-s(.1)) + (1-s(.2)) + (1-s(.05)))/3
        let (loss, g, out) = run(&KtoZeroConfig::default(), &[-1., -5., -2.5], &[-2., -3., -3.], &[true, false, true]);
        assert!((loss - 0.4708965).abs() < 1e-6, "{loss}");
        assert!(g[0] < 0.0 && g[2] < 0.0 && g[1] > 0.0, "{g:?}");
        assert!(
            (out.rewards_chosen.unwrap() - 0.075).abs() < 1e-6 && (out.rewards_rejected.unwrap() + 0.2).abs() < 1e-6
        );
    }

    #[test]
    fn policy_equal_to_reference_gives_one_half() {
        // r = 0 everywhere (the first step): loss ½ per row, gradient ∓β/4 per row before the mean.
        let (loss, g, _) = run(&KtoZeroConfig::default(), &[-3., -9.], &[-3., -9.], &[true, false]);
        assert!((loss - 0.5).abs() < 1e-7);
        // python: -.1*.25/2 = -0.0125 (desirable), +0.0125 (undesirable)
        assert!((g[0] + 0.0125).abs() < 1e-7 && (g[1] - 0.0125).abs() < 1e-7, "{g:?}");
    }

    #[test]
    fn one_class_and_extreme_ratios() {
        // All undesirable: no chosen rewards. r = ±1e4 saturates without NaN.
        let (loss, g, out) = run(&KtoZeroConfig::default(), &[1e4, -1e4], &[0., 0.], &[false, false]);
        assert!((loss - 0.5).abs() < 1e-6 && g.iter().all(|x| x.is_finite()), "{loss} {g:?}");
        assert!(out.rewards_chosen.is_none());
    }
}
