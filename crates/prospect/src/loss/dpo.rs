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

use super::{check_positive, log_sigmoid, mean_f64};
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

impl DpoConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        check_positive("loss.beta", self.beta)
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

pub struct DpoOutput {
    /// Scalar: mean loss over the pairs.
    pub loss: Tensor,
    /// Mean β·(log π_θ(y_c) − log π_ref(y_c)).
    pub rewards_chosen: f64,
    /// Mean β·(log π_θ(y_r) − log π_ref(y_r)).
    pub rewards_rejected: f64,
    /// Mean of chosen minus rejected reward.
    pub rewards_margins: f64,
    /// Fraction of pairs whose chosen reward is strictly above the rejected one.
    pub rewards_accuracies: f64,
}

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

    let chosen_rewards = (chosen.detach() * config.beta)?;
    let rejected_rewards = (rejected.detach() * config.beta)?;
    let margins = (&chosen_rewards - &rejected_rewards)?;
    let accuracies = chosen_rewards.gt(&rejected_rewards)?.to_dtype(candle_core::DType::F32)?;
    let mean = |t: &Tensor| -> Result<f64> { Ok(mean_f64(t)?.unwrap_or(0.0)) };
    Ok(DpoOutput {
        loss,
        rewards_chosen: mean(&chosen_rewards)?,
        rewards_rejected: mean(&rejected_rewards)?,
        rewards_margins: mean(&margins)?,
        rewards_accuracies: mean(&accuracies)?,
    })
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
