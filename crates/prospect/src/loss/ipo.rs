//! IPO: Identity Preference Optimisation (Azar et al., 2023, "A General Theoretical Paradigm to
//! Understand Learning from Human Preferences", <https://arxiv.org/abs/2310.12036>, Eq. 17), in
//! TRL's length-normalised form (`DPOTrainer`, `loss_type = ["ipo"]`).
//!
//! ```text
//! h    = (log π_θ(y_c|x) − log π_ref(y_c|x)) / n_c  −  (log π_θ(y_r|x) − log π_ref(y_r|x)) / n_r
//! loss = mean over pairs of (h − 1/(2τ))²
//! ```
//!
//! n is a completion's token count after truncation (at least 1). TRL divides by it because the
//! summed log-ratio makes the squared loss grow with length; the IPO authors confirmed to TRL that
//! their reported results use this normalised form. Unlike DPO's, this loss is a regression: it pulls
//! the per-token margin to exactly 1/(2τ), no further.
//!
//! Hyperparameter: `tau` τ = 0.1 (TRL's `beta`, which it uses as τ for IPO). The reported rewards
//! are τ·(log π_θ − log π_ref), summed over tokens, as TRL logs them.
//!
//! Shapes: log-probs `[b]`, token counts one per pair.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_positive, check_rows, PairedOutput};
use super::{Loss, LossOutput, PairedInputs, PairedLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpoConfig {
    /// τ: the target per-token margin is 1/(2τ).
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_tau() -> f64 {
    0.1
}

impl Default for IpoConfig {
    fn default() -> Self {
        Self { tau: default_tau() }
    }
}

impl Loss for IpoConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.tau", self.tau)
    }

    fn needs_reference(&self) -> bool {
        true
    }
}

/// Token counts as a `[b]` float tensor, each at least 1 (TRL's `clamp(min=1)`).
pub(crate) fn counts(tokens: &[usize], like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = tokens.iter().map(|&n| n.max(1) as f32).collect();
    Ok(Tensor::from_vec(v, tokens.len(), like.device())?.to_dtype(like.dtype())?)
}

pub(crate) fn check_counts(b: usize, chosen_tokens: &[usize], rejected_tokens: &[usize]) -> Result<()> {
    if chosen_tokens.len() != b || rejected_tokens.len() != b {
        return Err(Error::Shape {
            name: "chosen_tokens / rejected_tokens".into(),
            expected: vec![b],
            got: vec![chosen_tokens.len(), rejected_tokens.len()],
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn ipo_loss(
    config: &IpoConfig,
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
    reference_chosen_logps: &Tensor,
    reference_rejected_logps: &Tensor,
    chosen_tokens: &[usize],
    rejected_tokens: &[usize],
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
    check_counts(b, chosen_tokens, rejected_tokens)?;
    let chosen = (policy_chosen_logps - reference_chosen_logps)?; // [b]
    let rejected = (policy_rejected_logps - reference_rejected_logps)?; // [b]
    let h = (chosen.div(&counts(chosen_tokens, &chosen)?)? - rejected.div(&counts(rejected_tokens, &rejected)?)?)?; // [b]
    let losses = (h - 1.0 / (2.0 * config.tau))?.sqr()?; // [b]
    PairedOutput::new(losses.mean(D::Minus1)?, &(chosen * config.tau)?, &(rejected * config.tau)?)
}

impl PairedLoss for IpoConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        let (rc, rr) = x.reference()?;
        Ok(ipo_loss(self, x.policy_chosen, x.policy_rejected, rc, rr, x.chosen_tokens, x.rejected_tokens)?.into())
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
        tau: f64,
        pc: &[f32],
        pr: &[f32],
        rc: &[f32],
        rr: &[f32],
        nc: &[usize],
        nr: &[usize],
    ) -> (f64, Vec<f32>, Vec<f32>, PairedOutput) {
        let (vc, vr) = (Var::new(pc, &Device::Cpu).unwrap(), Var::new(pr, &Device::Cpu).unwrap());
        let out = ipo_loss(&IpoConfig { tau }, vc.as_tensor(), vr.as_tensor(), &t(rc), &t(rr), nc, nr).unwrap();
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
        // chosen ratio 1 over 4 tokens, rejected ratio −0.5 over 2 tokens: h = 0.25 + 0.25 = 0.5.
        // python: (0.5 - 1/(2*0.1))**2 = 20.25; d/dpc = 2*(0.5-5)/4 = -2.25; d/dpr = -2*(0.5-5)/2 = 4.5
        let (loss, gc, gr, out) = run(0.1, &[-1.], &[-3.], &[-2.], &[-2.5], &[4], &[2]);
        assert!((loss - 20.25).abs() < 1e-5, "{loss}");
        assert!((gc[0] + 2.25).abs() < 1e-5 && (gr[0] - 4.5).abs() < 1e-5, "{gc:?} {gr:?}");
        // Rewards are τ·(summed log-ratio), as TRL logs them.
        assert!((out.rewards_chosen - 0.1).abs() < 1e-6 && (out.rewards_rejected + 0.05).abs() < 1e-6);
    }

    #[test]
    fn equal_chosen_and_rejected_give_the_target_squared() {
        // h = 0: loss = (1/(2τ))² = 25, gradient −2·5/n on chosen, +2·5/n on rejected (mean over 2 pairs).
        let (loss, gc, gr, _) = run(0.1, &[-4., -7.], &[-4., -7.], &[-4., -7.], &[-4., -7.], &[5, 5], &[5, 5]);
        assert!((loss - 25.0).abs() < 1e-5);
        // python: -2*5/5/2 = -1.0
        assert!(
            gc.iter().all(|g| (g + 1.0).abs() < 1e-6) && gr.iter().all(|g| (g - 1.0).abs() < 1e-6),
            "{gc:?} {gr:?}"
        );
    }

    #[test]
    fn long_completions_are_length_normalised() {
        // A ratio of 5000 over 1000 tokens is a per-token margin of 5 = 1/(2τ): loss 0, gradient 0.
        let (loss, gc, ..) = run(0.1, &[5000.], &[0.], &[0.], &[0.], &[1000], &[1000]);
        assert!(loss.abs() < 1e-6 && gc[0].abs() < 1e-6, "{loss} {gc:?}");
        // An empty completion counts as 1 token (no division by zero).
        let (loss, ..) = run(0.1, &[1.], &[0.], &[0.], &[0.], &[0], &[0]);
        assert!((loss - 16.0).abs() < 1e-5, "{loss}"); // (1 - 5)²
    }

    #[test]
    fn extreme_log_ratios_are_finite_and_pull_back() {
        // h = 1e4 far past the target: loss (1e4 − 5)², the chosen gradient is positive (pushes down).
        let (loss, gc, ..) = run(0.1, &[1e4], &[0.], &[0.], &[0.], &[1], &[1]);
        assert!(loss.is_finite() && (loss / 99900025.0 - 1.0).abs() < 1e-5, "{loss}");
        assert!(gc[0] > 0.0);
    }
}
