//! Offline PPO as HALOs implements it (`PPOTrainer` in ContextualAI/HALOs `train/trainers.py`;
//! Ethayarajh et al., 2024, <https://arxiv.org/abs/2402.01306>, Appendix B): one PPO update per batch
//! of *fixed* (offline) completions, with π_old = π_ref, an asymmetric ratio clip, a value head
//! trained on discounted rewards, GAE advantages, and a KL penalty.
//!
//! Per token t of the completion (prompt and padding masked out, `mask` = 1 on completion tokens):
//!
//! ```text
//! r_t      = R on the row's last completion token, 0 elsewhere    (R = ±1 from the label, or a
//!                                                                   reward model's score)
//! V_t      = value head on the hidden state that predicts token t  (gradient flows)
//! δ_t      = r_t + γ·V̄_{t+1} − V̄_t                                 (V̄ = V detached and masked, V̄_T = 0)
//! A_t      = δ_t + γλ·A_{t+1}                                       (GAE, right to left, A_T = 0)
//! Â_t      = (A_t − mean_m A) / sqrt(var_m A + 1e-8)                (mean/var over masked tokens of the
//!                                                                   microbatch; biased var, as HALOs'
//!                                                                   `train/utils.py` masked_var; no gradient)
//! G_t      = Σ_{k>t} γ^{k−t−1} r_k                                  (rewards-to-go *after* t, HALOs'
//!                                                                   `discounted_future_rewards`)
//! ρ_t      = exp(log π_θ(y_t) − log π_ref(y_t))
//! L_policy = mean_m max(−Â_t·ρ_t, −Â_t·clip(ρ_t, ε, 1/ε))          (asymmetric clip: [ε, 1/ε])
//! L_critic = ½ · mean_m (V_t − G_t)²
//! KL       = mean_m (log π_ref(y_t) − log π_θ(y_t))
//! loss     = L_policy + critic_coef · L_critic + kl_coef · KL
//! ```
//!
//! `mean_m` averages over the masked (completion) tokens of the whole microbatch. With π_old = π_ref
//! the ratio starts at 1, so the clip bounds how far the policy may move from the reference on each
//! token. HALOs computes advantages from the values at the start of the batch and runs `ppo_epochs`
//! updates per batch; with its default `ppo_epochs = 1` those values are the current ones, which is
//! what this loss takes (so it supports exactly that default).
//!
//! Hyperparameters (HALOs' `config/loss/ppo.yaml`): `cliprange` ε = 0.5, `gamma` γ = 0.99, `lam`
//! λ = 0.95, `critic_coef` = 0.01, `kl_coef` = 0.1; `reward_model` = a folder with a reward model
//! (see [`super::reward`]) to score completions instead of the ±1 labels.
//!
//! Shapes: `policy_logps`, `reference_logps`, `values`, `mask` are `[b, n]` (n = t − 1, one column per
//! predicted token); `rewards` is `[b]`.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{check_non_negative, check_positive};
use super::{Loss, LossOutput, Metrics, TokenInputs, TokenLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoOfflineConfig {
    /// ε: the ratio is clipped to [ε, 1/ε]; must be in (0, 1).
    #[serde(default = "default_cliprange")]
    pub cliprange: f64,
    /// Discount γ.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// GAE λ.
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// Weight of the value-head (critic) loss.
    #[serde(default = "default_critic_coef")]
    pub critic_coef: f64,
    /// Weight of the KL penalty against the reference.
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// Score completions with this reward model (a folder saved by a `reward` run) instead of ±1 labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<PathBuf>,
}

fn default_cliprange() -> f64 {
    0.5
}
fn default_gamma() -> f64 {
    0.99
}
fn default_lam() -> f64 {
    0.95
}
fn default_critic_coef() -> f64 {
    0.01
}
fn default_kl_coef() -> f64 {
    0.1
}

impl Default for PpoOfflineConfig {
    fn default() -> Self {
        Self {
            cliprange: default_cliprange(),
            gamma: default_gamma(),
            lam: default_lam(),
            critic_coef: default_critic_coef(),
            kl_coef: default_kl_coef(),
            reward_model: None,
        }
    }
}

impl Loss for PpoOfflineConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.cliprange", self.cliprange)?;
        if self.cliprange >= 1.0 {
            return Err(Error::config(
                "loss.cliprange",
                format!("must be in (0, 1): the ratio is clipped to [ε, 1/ε]; got {}", self.cliprange),
            ));
        }
        for (key, v) in [("loss.gamma", self.gamma), ("loss.lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(key, format!("must be in [0, 1], got {v}")));
            }
        }
        check_non_negative("loss.critic_coef", self.critic_coef)?;
        check_non_negative("loss.kl_coef", self.kl_coef)
    }

    fn needs_reference(&self) -> bool {
        true
    }

    /// The advantages are normalised over each microbatch's tokens.
    fn split_dependent(&self) -> bool {
        true
    }
}

pub use super::family::TokenInputs as PpoInputs;

pub struct PpoOutput {
    /// Scalar total loss.
    pub loss: Tensor,
    pub policy_loss: f64,
    pub critic_loss: f64,
    /// mean_m (log π_ref − log π_θ).
    pub kl: f64,
    /// Fraction of masked tokens where the clipped objective is the larger one.
    pub clipfrac: f64,
}

/// `[b][n]` per-token values, one row per sequence.
type Rows = Vec<Vec<f64>>;

/// GAE advantages (normalised) and rewards-to-go, computed without gradient.
pub(crate) fn advantages_and_returns(
    values: &[Vec<f32>],
    mask: &[Vec<f32>],
    rewards: &[f32],
    gamma: f64,
    lam: f64,
) -> Result<(Rows, Rows)> {
    let mut adv = Vec::with_capacity(values.len());
    let mut ret = Vec::with_capacity(values.len());
    for ((v, m), &r) in values.iter().zip(mask).zip(rewards) {
        let n = v.len();
        let last = m.iter().rposition(|&x| x > 0.0);
        let reward = |t: usize| if Some(t) == last { r as f64 } else { 0.0 };
        let value = |t: usize| if t < n { v[t] as f64 * m[t] as f64 } else { 0.0 };
        let (mut a_row, mut g_row) = (vec![0.0; n], vec![0.0; n]);
        let (mut gae, mut future) = (0.0, 0.0);
        for t in (0..n).rev() {
            let delta = reward(t) + gamma * value(t + 1) - value(t);
            gae = delta + gamma * lam * gae;
            a_row[t] = gae * m[t] as f64;
            g_row[t] = future * m[t] as f64; // rewards strictly after t
            future = reward(t) + gamma * future;
        }
        adv.push(a_row);
        ret.push(g_row);
    }
    // Whiten over the masked tokens of the microbatch (biased variance, as HALOs' masked_var).
    let (mut sum, mut count) = (0.0, 0.0);
    for (a, m) in adv.iter().zip(mask) {
        for (x, w) in a.iter().zip(m) {
            sum += x * *w as f64;
            count += *w as f64;
        }
    }
    if count == 0.0 {
        return Err(Error::Compute("PPO microbatch has no completion tokens".into()));
    }
    let mean = sum / count;
    let mut var = 0.0;
    for (a, m) in adv.iter().zip(mask) {
        for (x, w) in a.iter().zip(m) {
            var += (x - mean).powi(2) * *w as f64;
        }
    }
    let scale = 1.0 / (var / count + 1e-8).sqrt();
    for (a, m) in adv.iter_mut().zip(mask) {
        for (x, w) in a.iter_mut().zip(m) {
            *x = (*x - mean) * scale * *w as f64;
        }
    }
    Ok((adv, ret))
}

pub fn ppo_offline_loss(config: &PpoOfflineConfig, inputs: &PpoInputs) -> Result<PpoOutput> {
    let (b, n) = inputs.policy_logps.dims2()?;
    for (name, t) in [("reference_logps", inputs.reference_logps), ("values", inputs.values), ("mask", inputs.mask)] {
        if t.dims() != [b, n] {
            return Err(Error::Shape { name: name.into(), expected: vec![b, n], got: t.dims().to_vec() });
        }
    }
    if inputs.rewards.len() != b {
        return Err(Error::Shape { name: "rewards".into(), expected: vec![b], got: vec![inputs.rewards.len()] });
    }
    let dtype = inputs.policy_logps.dtype();
    let device = inputs.policy_logps.device();
    let mask = inputs.mask.to_dtype(dtype)?; // [b, n]
    let values_now: Vec<Vec<f32>> = inputs.values.detach().to_dtype(DType::F32)?.to_vec2()?;
    let mask_rows: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
    let (adv, ret) = advantages_and_returns(&values_now, &mask_rows, inputs.rewards, config.gamma, config.lam)?;
    let to_tensor = |rows: Rows| -> Result<Tensor> {
        let flat: Vec<f32> = rows.into_iter().flatten().map(|x| x as f32).collect();
        Ok(Tensor::from_vec(flat, (b, n), device)?.to_dtype(dtype)?)
    };
    let adv = to_tensor(adv)?; // [b, n], no gradient
    let ret = to_tensor(ret)?; // [b, n], no gradient
    let count = mask.sum_all()?;
    let masked_mean = |x: &Tensor| -> Result<Tensor> { Ok(x.mul(&mask)?.sum_all()?.div(&count)?) };

    let critic = (masked_mean(&(inputs.values - &ret)?.sqr()?)? * 0.5)?;
    let log_ratio = (inputs.policy_logps - inputs.reference_logps)?; // [b, n]
    let ratio = log_ratio.exp()?; // [b, n]
    let unclipped = adv.neg()?.mul(&ratio)?; // [b, n]
    let clipped = adv.neg()?.mul(&ratio.clamp(config.cliprange, 1.0 / config.cliprange)?)?; // [b, n]
    let policy = masked_mean(&unclipped.maximum(&clipped)?)?;
    let kl = masked_mean(&log_ratio.neg()?)?;
    let loss = ((&policy + (&critic * config.critic_coef)?)? + (&kl * config.kl_coef)?)?;

    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let clipfrac = masked_mean(&clipped.gt(&unclipped)?.to_dtype(dtype)?)?;
    Ok(PpoOutput {
        policy_loss: scalar(&policy)?,
        critic_loss: scalar(&critic)?,
        kl: scalar(&kl)?,
        clipfrac: scalar(&clipfrac)?,
        loss,
    })
}

impl TokenLoss for PpoOfflineConfig {
    fn reward_model(&self) -> Option<&std::path::Path> {
        self.reward_model.as_deref()
    }

    fn forward(&self, x: &TokenInputs) -> Result<LossOutput> {
        let out = ppo_offline_loss(self, x)?;
        let metrics = Metrics::new()
            .with("kl", out.kl)
            .with("loss/policy", out.policy_loss)
            .with("loss/critic", out.critic_loss)
            .with("clipfrac", out.clipfrac);
        Ok(LossOutput { loss: out.loss, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(v: &[[f32; 3]; 1]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn gae_and_returns_match_hand_calculation() {
        // One row, 3 positions, mask [0, 1, 1] (first is prompt), values [9, 0.5, 0.2], reward 1, γ = 0.5, λ = 1.
        // masked V̄ = [0, 0.5, 0.2]; δ_2 = 1 − 0.2 = 0.8; δ_1 = 0 + 0.5·0.2 − 0.5 = −0.4; δ_0 = 0.5·0.5 − 0 = 0.25
        // A_2 = 0.8, A_1 = −0.4 + 0.5·0.8 = 0, A_0 masked. G_2 = 0, G_1 = 1 (the reward after it).
        let (adv, ret) = advantages_and_returns(&[vec![9., 0.5, 0.2]], &[vec![0., 1., 1.]], &[1.], 0.5, 1.0).unwrap();
        // Whitened over {0.8, 0}: mean 0.4, biased var 0.16 -> ±1 (up to the 1e-8).
        assert!((adv[0][2] - 1.0).abs() < 1e-6 && (adv[0][1] + 1.0).abs() < 1e-6 && adv[0][0] == 0.0, "{adv:?}");
        assert_eq!(ret[0], vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn loss_matches_hand_calculation_at_policy_equal_reference() {
        // ρ = 1 everywhere: policy loss = −mean_m Â = 0 (whitened), KL = 0; critic = ½·mean((V − G)²).
        // Row: mask [0, 1, 1], V = [9, 0.5, 0.2], G = [0, 1, 0] -> ½·((0.5 − 1)² + 0.2²)/2 = 0.0725.
        // python: 0.5*((0.5-1)**2 + 0.2**2)/2
        let cfg = PpoOfflineConfig { gamma: 0.5, lam: 1.0, critic_coef: 1.0, ..Default::default() };
        let logp = Var::new(&[[-1f32, -2., -3.]], &Device::Cpu).unwrap();
        let values = Var::new(&[[9f32, 0.5, 0.2]], &Device::Cpu).unwrap();
        let out = ppo_offline_loss(
            &cfg,
            &PpoInputs {
                policy_logps: logp.as_tensor(),
                reference_logps: &t2(&[[-1., -2., -3.]]),
                values: values.as_tensor(),
                mask: &t2(&[[0., 1., 1.]]),
                rewards: &[1.0],
            },
        )
        .unwrap();
        assert!(out.policy_loss.abs() < 1e-6 && out.kl.abs() < 1e-9, "{} {}", out.policy_loss, out.kl);
        assert!((out.critic_loss - 0.0725).abs() < 1e-6, "{}", out.critic_loss);
        let g = out.loss.backward().unwrap();
        // d/dlogπ_t = (−Â_t·ρ_t − kl_coef)/2 on masked tokens: Â = [·, −1, 1] -> [0, (1 − 0.1)/2, (−1 − 0.1)/2]
        let gl: Vec<Vec<f32>> = g.get(logp.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(gl[0][0] == 0.0 && (gl[0][1] - 0.45).abs() < 1e-5 && (gl[0][2] + 0.55).abs() < 1e-5, "{gl:?}");
        // d/dV_t = (V_t − G_t)/2 on masked tokens: [0, −0.25, 0.1]
        let gv: Vec<Vec<f32>> = g.get(values.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(gv[0][0] == 0.0 && (gv[0][1] + 0.25).abs() < 1e-6 && (gv[0][2] - 0.1).abs() < 1e-6, "{gv:?}");
    }

    #[test]
    fn the_clip_is_asymmetric_and_extreme_ratios_stay_finite() {
        // Two rows, one token each, rewards +1 and −1: Â = [+1, −1]. Log-ratios +50 and −50.
        // Row 1 (Â = 1): max(−ρ, −clip(ρ)) = −2 (clip at 1/ε = 2); row 2 (Â = −1): max(ρ, clip(ρ)) = 0.5.
        // policy = (−2 + 0.5)/2 = −0.75; both clipped: no gradient through the ratio.
        let cfg = PpoOfflineConfig { kl_coef: 0.0, critic_coef: 0.0, ..Default::default() };
        let logp = Var::new(&[[0f32], [-50.]], &Device::Cpu).unwrap();
        let out = ppo_offline_loss(
            &cfg,
            &PpoInputs {
                policy_logps: logp.as_tensor(),
                reference_logps: &Tensor::new(&[[-50f32], [0.]], &Device::Cpu).unwrap(),
                values: &Tensor::new(&[[0f32], [0.]], &Device::Cpu).unwrap(),
                mask: &Tensor::new(&[[1f32], [1.]], &Device::Cpu).unwrap(),
                rewards: &[1.0, -1.0],
            },
        )
        .unwrap();
        assert!((out.policy_loss + 0.75).abs() < 1e-5 && out.clipfrac == 1.0, "{} {}", out.policy_loss, out.clipfrac);
        let g: Vec<Vec<f32>> = out.loss.backward().unwrap().get(logp.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(g.iter().flatten().all(|x| x.is_finite() && x.abs() < 1e-6), "{g:?}");
    }

    #[test]
    fn cliprange_must_be_below_one() {
        assert!(PpoOfflineConfig { cliprange: 1.0, ..Default::default() }.validate(2).is_err());
    }
}
