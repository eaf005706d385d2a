//! cDPO: conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences",
//! <https://ericmitchell.ai/cdpo.pdf>), as HALOs' `CDPOTrainer` and TRL's `label_smoothing` define it.
//!
//! ```text
//! Δ    = [log π_θ(y_c|x) − log π_ref(y_c|x)] − [log π_θ(y_r|x) − log π_ref(y_r|x)]
//! loss = mean over pairs of (1 − ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ))
//! ```
//!
//! ε is the assumed fraction of pairs whose label is flipped: the loss is DPO's on the label as given
//! plus DPO's on the flipped label. With ε = 0 it is DPO; with ε = 0.5 its gradient vanishes at Δ = 0
//! and it pulls βΔ towards log((1 − ε)/ε) instead of +∞.
//!
//! Hyperparameters: `beta` = 0.1, `label_smoothing` ε = 0.2 (HALOs' `config/loss/cdpo.yaml`; TRL's
//! `label_smoothing` defaults to 0, which is plain DPO). Log-probs are summed over completion tokens.
//!
//! Shapes: every input is `[b]`, one value per pair.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_positive, check_probability, check_rows, log_sigmoid, PairedOutput};
use super::{Loss, LossOutput, PairedInputs, PairedLoss};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdpoConfig {
    /// Strength of the implicit KL penalty.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// ε: assumed fraction of mislabelled pairs, in [0, 0.5].
    #[serde(default = "default_label_smoothing")]
    pub label_smoothing: f64,
}

fn default_beta() -> f64 {
    0.1
}
fn default_label_smoothing() -> f64 {
    0.2
}

impl Default for CdpoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), label_smoothing: default_label_smoothing() }
    }
}

impl Loss for CdpoConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)?;
        check_probability("loss.label_smoothing", self.label_smoothing)
    }

    fn needs_reference(&self) -> bool {
        true
    }
}

/// Rewards reported are β·(log π_θ − log π_ref), as for DPO.
pub fn cdpo_loss(
    config: &CdpoConfig,
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
    reference_chosen_logps: &Tensor,
    reference_rejected_logps: &Tensor,
) -> Result<PairedOutput> {
    let b = policy_chosen_logps.dims1()?;
    check_rows(
        b,
        &[
            ("policy_rejected_logps", policy_rejected_logps),
            ("reference_chosen_logps", reference_chosen_logps),
            ("reference_rejected_logps", reference_rejected_logps),
        ],
    )?;
    let chosen = ((policy_chosen_logps - reference_chosen_logps)? * config.beta)?; // [b]
    let rejected = ((policy_rejected_logps - reference_rejected_logps)? * config.beta)?; // [b]
    let logits = (&chosen - &rejected)?; // [b], βΔ
    let eps = config.label_smoothing;
    let forward = log_sigmoid(&logits)?.neg()?; // [b]
    let reverse = log_sigmoid(&logits.neg()?)?.neg()?; // [b]
    let losses = ((forward * (1.0 - eps))? + (reverse * eps)?)?; // [b]
    PairedOutput::new(losses.mean(D::Minus1)?, &chosen, &rejected)
}

impl PairedLoss for CdpoConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        let (rc, rr) = x.reference()?;
        Ok(cdpo_loss(self, x.policy_chosen, x.policy_rejected, rc, rr)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn run(
        cfg: &CdpoConfig,
        pc: &[f32],
        pr: &[f32],
        rc: &[f32],
        rr: &[f32],
    ) -> (f64, Vec<f32>, Vec<f32>, PairedOutput) {
        let (vc, vr) = (Var::new(pc, &Device::Cpu).unwrap(), Var::new(pr, &Device::Cpu).unwrap());
        let out = cdpo_loss(cfg, vc.as_tensor(), vr.as_tensor(), &t(rc), &t(rr)).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let g = out.loss.backward().unwrap();
        let gc = g.get(vc.as_tensor()).unwrap().to_vec1().unwrap();
        let gr = g.get(vr.as_tensor()).unwrap().to_vec1().unwrap();
        (loss, gc, gr, out)
    }

    #[test]
    fn matches_hand_calculation() {
        // Δ = 1.5, βΔ = 0.15, ε = 0.2.
        // python: import math; ls=lambda x:-math.log1p(math.exp(-x)); -(0.8*ls(.15)+0.2*ls(-.15))
        let (loss, gc, gr, out) = run(&CdpoConfig::default(), &[-1.], &[-3.], &[-2.], &[-2.5]);
        assert!((loss - 0.6509570).abs() < 1e-6, "{loss}");
        // d/dΔ = β·(−0.8·σ(−βΔ) + 0.2·σ(βΔ)); python: s=lambda x:1/(1+math.exp(-x)); .1*(-.8*s(-.15)+.2*s(.15))
        assert!((gc[0] as f64 - -0.0262570).abs() < 1e-6, "{gc:?}");
        assert!((gr[0] as f64 - 0.0262570).abs() < 1e-6, "{gr:?}");
        assert!((out.rewards_margins - 0.15).abs() < 1e-6 && out.rewards_accuracies == 1.0);
    }

    #[test]
    fn zero_smoothing_is_dpo_and_half_smoothing_is_flat_at_zero() {
        // ε = 0: DPO's 0.6209570 on the same numbers.
        let cfg = CdpoConfig { beta: 0.1, label_smoothing: 0.0 };
        let (loss, ..) = run(&cfg, &[-1.], &[-3.], &[-2.], &[-2.5]);
        assert!((loss - 0.6209570).abs() < 1e-6, "{loss}");
        // Equal chosen and rejected (Δ = 0), ε = 0.5: loss log 2, gradient exactly 0.
        let cfg = CdpoConfig { beta: 0.1, label_smoothing: 0.5 };
        let (loss, gc, gr, out) = run(&cfg, &[-4., -7.], &[-4., -7.], &[-4., -7.], &[-4., -7.]);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6);
        assert!(gc.iter().chain(&gr).all(|g| g.abs() < 1e-9), "{gc:?} {gr:?}");
        assert_eq!(out.rewards_accuracies, 0.0);
    }

    #[test]
    fn extreme_margins_stay_finite() {
        // βΔ = 100: forward term ≈ 0, reverse term = 100 exactly, loss = ε·100 = 20.
        // Gradient: β·(−0.8·0 + 0.2·1) = 0.2 on the chosen side (the flipped label pulls back).
        let cfg = CdpoConfig { beta: 1.0, label_smoothing: 0.2 };
        let (loss, gc, ..) = run(&cfg, &[100.], &[0.], &[0.], &[0.]);
        assert!((loss - 20.0).abs() < 1e-4, "{loss}");
        assert!((gc[0] - 0.2).abs() < 1e-6, "{gc:?}");
    }
}
