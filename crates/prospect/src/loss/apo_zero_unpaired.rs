//! Unpaired APO-zero: Anchored Preference Optimization, zero anchor, for binary feedback (D'Oosterlinck
//! et al., 2024, "Anchored Preference Optimization and Contrastive Revisions",
//! <https://arxiv.org/abs/2408.06266>, Eq. 7, unpaired), as TRL's `KTOTrainer` with
//! `loss_type = "apo_zero_unpaired"` computes it.
//!
//! ```text
//! r_θ(x, y) = log π_θ(y|x) − log π_ref(y|x)              (summed over completion tokens)
//! L(x, y)   = λ_D · (1 − σ(β · r_θ))    if y is desirable
//!             λ_U · σ(β · r_θ)          if y is undesirable
//! loss      = mean of L over the microbatch
//! ```
//!
//! Desirable completions are pushed up and undesirable ones down, each relative to the reference
//! (the anchor), with no KL estimate. As a function this equals [`super::kto_zero`]
//! (σ(x) = 1 − σ(−x)); it is kept as its own loss so configs and logs carry TRL's name.
//!
//! Hyperparameters: `beta` = 0.1, `desirable_weight` = 1, `undesirable_weight` = 1 (TRL's `KTOConfig`).
//!
//! Shapes: every input is `[b]`, one value per row.

use candle_core::{Tensor, D};

use super::kto::class_rewards;
use super::kto_zero::KtoZeroConfig;
use super::kto_zero::UnpairedOutput;
use super::{check_rows, sigmoid};
use super::{Loss, LossOutput, UnpairedInputs, UnpairedLoss};
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// Same keys and defaults as KTO-zero (`beta`, `desirable_weight`, `undesirable_weight`), so it wraps
/// that struct; a type of its own lets it carry its own forward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApoZeroUnpairedConfig(pub KtoZeroConfig);

impl Loss for ApoZeroUnpairedConfig {
    fn validate(&self, microbatch_size: usize) -> Result<()> {
        self.0.validate(microbatch_size)
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn class_weights(&self) -> Option<(f64, f64)> {
        self.0.class_weights()
    }

    fn set_class_weights(&mut self, desirable: f64, undesirable: f64) {
        self.0.set_class_weights(desirable, undesirable)
    }
}

impl UnpairedLoss for ApoZeroUnpairedConfig {
    fn forward(&self, x: &UnpairedInputs) -> Result<LossOutput> {
        Ok(apo_zero_unpaired_loss(self, x.policy, x.reference()?, x.labels)?.into())
    }
}

/// `labels[i]` is `true` for a desirable row.
pub fn apo_zero_unpaired_loss(
    config: &ApoZeroUnpairedConfig,
    policy_logps: &Tensor,
    reference_logps: &Tensor,
    labels: &[bool],
) -> Result<UnpairedOutput> {
    let b = labels.len();
    check_rows(b, &[("policy_logps", policy_logps), ("reference_logps", reference_logps)])?;
    let device = policy_logps.device();
    let logratios = (policy_logps - reference_logps)?; // [b]
    let s = sigmoid(&(&logratios * config.0.beta)?)?; // [b]
                                                      // Written as TRL writes it: desirable 1 − σ(βr), undesirable σ(βr); `is_d` selects per row.
    let is_d: Vec<u8> = labels.iter().map(|&l| l as u8).collect();
    let is_d = Tensor::from_vec(is_d, b, device)?;
    let losses =
        is_d.where_cond(&((s.neg()? + 1.0)? * config.0.desirable_weight)?, &(&s * config.0.undesirable_weight)?)?; // [b]
    let (rewards_chosen, rewards_rejected) = class_rewards(config.0.beta, &logratios, labels)?;
    Ok(UnpairedOutput { loss: losses.mean(D::Minus1)?, rewards_chosen, rewards_rejected })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::kto_zero::{kto_zero_loss, KtoZeroConfig};
    use candle_core::{Device, Var};

    fn run(cfg: &ApoZeroUnpairedConfig, pol: &[f32], refl: &[f32], labels: &[bool]) -> (f64, Vec<f32>) {
        let p = Var::new(pol, &Device::Cpu).unwrap();
        let out =
            apo_zero_unpaired_loss(cfg, p.as_tensor(), &Tensor::new(refl, &Device::Cpu).unwrap(), labels).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        (loss, out.loss.backward().unwrap().get(p.as_tensor()).unwrap().to_vec1().unwrap())
    }

    #[test]
    fn matches_hand_calculation_and_kto_zero() {
        // r = [1, −2, 0.5], labels [D, U, D], λ_D = 2, λ_U = 0.5.
        // python: import math; s=lambda x:1/(1+math.exp(-x)); (2*(1-s(.1)) + .5*s(-.2) + 2*(1-s(.05)))/3
        let cfg = ApoZeroUnpairedConfig(KtoZeroConfig { beta: 0.1, desirable_weight: 2.0, undesirable_weight: 0.5 });
        let (pol, refl, labels) = ([-1f32, -5., -2.5], [-2f32, -3., -3.], [true, false, true]);
        let (loss, g) = run(&cfg, &pol, &refl, &labels);
        assert!((loss - 0.7167099).abs() < 1e-6, "{loss}");
        let kz = KtoZeroConfig { beta: 0.1, desirable_weight: 2.0, undesirable_weight: 0.5 };
        let p = Var::new(&pol, &Device::Cpu).unwrap();
        let out = kto_zero_loss(&kz, p.as_tensor(), &Tensor::new(&refl, &Device::Cpu).unwrap(), &labels).unwrap();
        let gk: Vec<f32> = out.loss.backward().unwrap().get(p.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - loss).abs() < 1e-7);
        for (a, b) in g.iter().zip(&gk) {
            assert!((a - b).abs() < 1e-8, "{g:?} vs {gk:?}");
        }
    }

    #[test]
    fn policy_equal_to_reference_and_saturation() {
        let (loss, g) = run(&ApoZeroUnpairedConfig::default(), &[-3., -9.], &[-3., -9.], &[true, false]);
        assert!((loss - 0.5).abs() < 1e-7 && (g[0] + 0.0125).abs() < 1e-7 && (g[1] - 0.0125).abs() < 1e-7, "{g:?}");
        // Undesirable row with r = +1e4: loss λ_U = 1 (saturated), gradient 0, finite.
        let (loss, g) = run(&ApoZeroUnpairedConfig::default(), &[1e4], &[0.], &[false]);
        assert!((loss - 1.0).abs() < 1e-6 && g[0].abs() < 1e-12, "{loss} {g:?}");
    }
}
