//! ORPO: Monolithic Preference Optimization without Reference Model (Hong et al., 2024,
//! <https://arxiv.org/abs/2403.07691>, Eqs. 4–7).
//!
//! ```text
//! avg(y)      = log π_θ(y|x) / |y|                         (mean log-prob over completion tokens)
//! log odds(y) = avg(y) − log(1 − exp(avg(y)))
//! L_OR        = mean over pairs of log σ(log odds(y_c) − log odds(y_r))
//! NLL         = −Σ_pairs log π_θ(y_c|x) / Σ_pairs |y_c|     (mean over the chosen completion tokens)
//! loss        = NLL − β · L_OR
//! ```
//!
//! No reference model. The odds are on the average token probability, as in the paper and TRL's
//! `odds_ratio_loss`. Unlike TRL's `ORPOTrainer`, the NLL covers completion tokens only (the paper's
//! SFT term); TRL also puts the prompt into it and prepends BOS, so the trainers differ, while this
//! formula matches the paper and TRL's `odds_ratio_loss` on the same log-probs.
//!
//! `log(1 − exp(a))` is computed in f64 and `a` is capped at −1e-12 (a completion of probability
//! exactly 1 has infinite odds).
//!
//! Hyperparameter: `beta` β = 0.1 (TRL's `ORPOConfig` default, the paper's λ). Reported rewards are
//! β·avg, as TRL logs them.
//!
//! Shapes: log-probs `[b]`, token counts one per pair.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::ipo::{check_counts, counts};
use super::{check_positive, check_rows, log_sigmoid, PairedOutput};
use super::{Loss, LossOutput, PairedInputs, PairedLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrpoConfig {
    /// λ in the paper: weight of the odds-ratio term.
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: default_beta() }
    }
}

impl Loss for OrpoConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)
    }

    /// The NLL term is a mean over the chosen tokens of each microbatch (as TRL's `ORPOTrainer` has it).
    fn split_dependent(&self) -> bool {
        true
    }
}

/// `log(1 − exp(a))` for `a < 0`, elementwise, in f64.
fn log1m_exp(a: &Tensor) -> Result<Tensor> {
    Ok((a.exp()?.neg()? + 1.0)?.log()?)
}

pub fn orpo_loss(
    config: &OrpoConfig,
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
    chosen_tokens: &[usize],
    rejected_tokens: &[usize],
) -> Result<PairedOutput> {
    let b = policy_chosen_logps.dims1()?;
    check_rows(b, &[("policy_rejected_logps", policy_rejected_logps)])?;
    check_counts(b, chosen_tokens, rejected_tokens)?;
    let total_chosen: usize = chosen_tokens.iter().sum();
    if total_chosen == 0 {
        return Err(Error::Compute("ORPO microbatch has no chosen completion tokens".into()));
    }
    let dtype = policy_chosen_logps.dtype();
    let pc = policy_chosen_logps.to_dtype(DType::F64)?;
    let pr = policy_rejected_logps.to_dtype(DType::F64)?;
    let avg_c = pc.div(&counts(chosen_tokens, &pc)?)?.minimum(-1e-12)?; // [b]
    let avg_r = pr.div(&counts(rejected_tokens, &pr)?)?.minimum(-1e-12)?; // [b]
    let log_odds = ((&avg_c - &avg_r)? - (log1m_exp(&avg_c)? - log1m_exp(&avg_r)?)?)?; // [b]
    let odds_ratio = log_sigmoid(&log_odds)?.mean(D::Minus1)?; // scalar, L_OR
    let nll = (pc.sum_all()?.neg()? / total_chosen as f64)?; // scalar
    let loss = (nll - (odds_ratio * config.beta)?)?.to_dtype(dtype)?;
    let chosen_rewards = (policy_chosen_logps.div(&counts(chosen_tokens, policy_chosen_logps)?)? * config.beta)?;
    let rejected_rewards =
        (policy_rejected_logps.div(&counts(rejected_tokens, policy_rejected_logps)?)? * config.beta)?;
    PairedOutput::new(loss, &chosen_rewards, &rejected_rewards)
}

impl PairedLoss for OrpoConfig {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput> {
        Ok(orpo_loss(self, x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn run(beta: f64, pc: &[f32], pr: &[f32], nc: &[usize], nr: &[usize]) -> (f64, Vec<f32>, Vec<f32>) {
        let (vc, vr) = (Var::new(pc, &Device::Cpu).unwrap(), Var::new(pr, &Device::Cpu).unwrap());
        let out = orpo_loss(&OrpoConfig { beta }, vc.as_tensor(), vr.as_tensor(), nc, nr).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let g = out.loss.backward().unwrap();
        (loss, g.get(vc.as_tensor()).unwrap().to_vec1().unwrap(), g.get(vr.as_tensor()).unwrap().to_vec1().unwrap())
    }

    #[test]
    fn matches_hand_calculation() {
        // avg_c = −2/4 = −0.5, avg_r = −3/2 = −1.5; NLL = 2/4 = 0.5.
        // python: import math; lo=lambda a:a-math.log(1-math.exp(a)); x=lo(-.5)-lo(-1.5); 0.5-0.1*(-math.log1p(math.exp(-x)))
        let (loss, gc, gr) = run(0.1, &[-2.], &[-3.], &[4], &[2]);
        assert!((loss - 0.5170859).abs() < 1e-6, "{loss}");
        // python (torch.autograd on the same formula): d/dpc = -0.2599792, d/dpr = 0.0101085
        assert!((gc[0] as f64 + 0.2599792).abs() < 1e-6 && (gr[0] as f64 - 0.0101085).abs() < 1e-6, "{gc:?} {gr:?}");
    }

    #[test]
    fn equal_chosen_and_rejected_give_nll_plus_beta_log_two() {
        // log odds ratio 0: L_OR = log ½. NLL = 3/3 = 1. loss = 1 + 0.1·ln 2.
        let (loss, gc, gr) = run(0.1, &[-3.], &[-3.], &[3], &[3]);
        assert!((loss - (1.0 + 0.1 * std::f64::consts::LN_2)).abs() < 1e-6, "{loss}");
        assert!(gc[0] < 0.0 && gr[0] > 0.0, "{gc:?} {gr:?}");
    }

    #[test]
    fn near_certain_and_very_long_completions_stay_finite() {
        // avg_c → 0 (probability 1): log odds capped, not infinite.
        let (loss, gc, gr) = run(0.1, &[0.], &[-5.], &[3], &[3]);
        assert!(loss.is_finite() && gc[0].is_finite() && gr[0].is_finite(), "{loss} {gc:?} {gr:?}");
        // 1000-token completions with avg −2 and −3 behave like 1-token ones (per-token odds), NLL = 2.
        let (long, ..) = run(0.1, &[-2000.], &[-3000.], &[1000], &[1000]);
        let (short, ..) = run(0.1, &[-2.], &[-3.], &[1], &[1]);
        assert!((long - short).abs() < 1e-5, "{long} vs {short}");
    }
}
