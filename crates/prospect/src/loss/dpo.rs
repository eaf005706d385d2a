//! DPO: Direct Preference Optimization (Rafailov et al., 2023, <https://arxiv.org/abs/2305.18290>),
//! the sigmoid loss.
//!
//! ```text
//! Δ    = [log π_θ(y_c|x) − log π_ref(y_c|x)] − [log π_θ(y_r|x) − log π_ref(y_r|x)]
//! loss = mean over pairs of −log σ(β · Δ)
//! ```
//!
//! Log-probs are summed over completion tokens. `log σ` is computed by the stable
//! [`log_sigmoid`](super::log_sigmoid). Hyperparameter: `beta` = 0.1 (TRL's default).
//!
//! Shapes: every input is `[b]`, one value per pair.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_positive, log_sigmoid, PairedOutput};
use super::{Loss, LossOutput, PairedInputs, PairedLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Strength of the implicit KL penalty.
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: default_beta() }
    }
}

impl Loss for DpoConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)
    }

    fn needs_reference(&self) -> bool {
        true
    }
}

pub struct DpoInputs<'a> {
    /// `[b]` log π_θ(y_c | x)
    pub policy_chosen_logps: &'a Tensor,
    /// `[b]` log π_θ(y_r | x)
    pub policy_rejected_logps: &'a Tensor,
    /// `[b]` log π_ref(y_c | x)
    pub reference_chosen_logps: &'a Tensor,
    /// `[b]` log π_ref(y_r | x)
    pub reference_rejected_logps: &'a Tensor,
}

/// DPO reports what every paired loss reports (TRL's `rewards/*`).
pub use super::PairedOutput as DpoOutput;

pub fn dpo_loss(config: &DpoConfig, inputs: &DpoInputs) -> Result<DpoOutput> {
    let b = inputs.policy_chosen_logps.dims1()?;
    for (name, t) in [
        ("policy_rejected_logps", inputs.policy_rejected_logps),
        ("reference_chosen_logps", inputs.reference_chosen_logps),
        ("reference_rejected_logps", inputs.reference_rejected_logps),
    ] {
        if t.dims() != [b] {
            return Err(Error::Shape { name: name.into(), expected: vec![b], got: t.dims().to_vec() });
        }
    }
    let chosen = (inputs.policy_chosen_logps - inputs.reference_chosen_logps)?; // [b]
    let rejected = (inputs.policy_rejected_logps - inputs.reference_rejected_logps)?; // [b]
    let logits = ((&chosen - &rejected)? * config.beta)?; // [b]
    let loss = log_sigmoid(&logits)?.neg()?.mean(D::Minus1)?;

    PairedOutput::new(loss, &(chosen * config.beta)?, &(rejected * config.beta)?)
}

impl PairedLoss for DpoConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        let (reference_chosen_logps, reference_rejected_logps) = x.reference()?;
        let inputs = DpoInputs {
            policy_chosen_logps: x.policy_chosen,
            policy_rejected_logps: x.policy_rejected,
            reference_chosen_logps,
            reference_rejected_logps,
        };
        Ok(dpo_loss(self, &inputs)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn run(beta: f64, pc: &[f32], pr: &[f32], rc: &[f32], rr: &[f32]) -> (DpoOutput, Vec<f32>, Vec<f32>) {
        let pc = Var::new(pc, &Device::Cpu).unwrap();
        let pr = Var::new(pr, &Device::Cpu).unwrap();
        let out = dpo_loss(
            &DpoConfig { beta },
            &DpoInputs {
                policy_chosen_logps: pc.as_tensor(),
                policy_rejected_logps: pr.as_tensor(),
                reference_chosen_logps: &t(rc),
                reference_rejected_logps: &t(rr),
            },
        )
        .unwrap();
        let g = out.loss.backward().unwrap();
        let gc = g.get(pc.as_tensor()).unwrap().to_vec1().unwrap();
        let gr = g.get(pr.as_tensor()).unwrap().to_vec1().unwrap();
        (out, gc, gr)
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(candle_core::DType::F64).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn matches_hand_calculation_and_gradient_signs() {
        // chosen ratio = -1 - (-2) = 1, rejected ratio = -3 - (-2.5) = -0.5, Δ = 1.5
        // python: s=lambda x:1/(1+math.exp(-x)); -math.log(s(0.15))
        let (out, gc, gr) = run(0.1, &[-1.], &[-3.], &[-2.], &[-2.5]);
        assert!((scalar(&out.loss) - 0.6209570).abs() < 1e-6, "{}", scalar(&out.loss));
        assert!((out.rewards_chosen - 0.1).abs() < 1e-6);
        assert!((out.rewards_rejected + 0.05).abs() < 1e-6);
        assert!((out.rewards_margins - 0.15).abs() < 1e-6);
        assert_eq!(out.rewards_accuracies, 1.0);
        // d loss / d logπ(y_c) = −β σ(−βΔ); python: -.1*s(-.15) = -0.0462570
        assert!((gc[0] as f64 + 0.0462570).abs() < 1e-6, "{gc:?}");
        assert!((gr[0] as f64 - 0.0462570).abs() < 1e-6, "{gr:?}");
    }

    #[test]
    fn equal_chosen_and_rejected_give_log_two() {
        // Δ = 0 (e.g. the first step, policy = reference): loss = log 2, gradient ∓β/2, accuracy 0.
        let (out, gc, gr) = run(0.1, &[-4., -7.], &[-4., -7.], &[-4., -7.], &[-4., -7.]);
        assert!((scalar(&out.loss) - std::f64::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.rewards_accuracies, 0.0);
        // mean over 2 pairs: each gradient is −0.1·0.5/2 = −0.025
        assert!(gc.iter().all(|g| (*g as f64 + 0.025).abs() < 1e-7), "{gc:?}");
        assert!(gr.iter().all(|g| (*g as f64 - 0.025).abs() < 1e-7), "{gr:?}");
    }

    #[test]
    fn extreme_margins_stay_finite() {
        // βΔ = −50: loss = 50 exactly (a naive log(sigmoid) gives inf); βΔ = +50: loss ≈ 0.
        let (out, gc, _) = run(1.0, &[-50.], &[0.], &[0.], &[0.]);
        assert!((scalar(&out.loss) - 50.0).abs() < 1e-5);
        assert!((gc[0] + 1.0).abs() < 1e-6);
        let (out, gc, _) = run(1.0, &[50.], &[0.], &[0.], &[0.]);
        assert!(scalar(&out.loss).abs() < 1e-6 && gc[0].abs() < 1e-6);
    }
}
