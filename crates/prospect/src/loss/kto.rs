//! KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024, <https://arxiv.org/abs/2402.01306>).
//!
//! Trains on binary feedback: each completion is desirable or undesirable, no pairs needed.
//!
//! ```text
//! r_θ(x, y) = Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]        (completion tokens only)
//! z0        = max(0, mean_i r_θ(x_i, y_{i−1}))                              (mismatched pairs, no gradient)
//! L(x, y)   = λ_D · (1 − σ(β · (r_θ(x, y) − z0)))   if y is desirable
//!             λ_U · (1 − σ(β · (z0 − r_θ(x, y))))   if y is undesirable
//! loss      = mean of L over the microbatch
//! ```
//!
//! z0 is the reference point: a biased estimate of KL(π_θ ‖ π_ref) from completions paired with the
//! wrong prompts inside the same microbatch. The pairing follows TRL's rotation (x_i with y_{i−1}, x_1
//! with y_m; see [`crate::data::rotate_for_kl`]), so numbers can be checked against TRL's `KTOTrainer`.
//!
//! Hyperparameters (paper defaults): `beta` = 0.1, `desirable_weight` λ_D = 1, `undesirable_weight`
//! λ_U = 1. The paper recommends λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]; see [`class_weight_advice`].
//!
//! Shapes: every input is `[b]`, one value per row of the microbatch.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_non_negative, check_positive, mean_f64, sigmoid};
use super::{Loss, LossOutput, UnpairedInputs, UnpairedLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoConfig {
    /// Inverse temperature of the value function.
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

impl Default for KtoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

impl Loss for KtoConfig {
    fn validate(&self, microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)?;
        check_non_negative("loss.desirable_weight", self.desirable_weight)?;
        check_non_negative("loss.undesirable_weight", self.undesirable_weight)?;
        check_some_weight(self.desirable_weight, self.undesirable_weight)?;
        if microbatch_size < 2 {
            return Err(Error::config(
                "microbatch_size",
                format!(
                    "KTO estimates its KL reference point from mismatched pairs inside a microbatch, \
                     so it needs at least 2 rows per microbatch; got {microbatch_size}"
                ),
            ));
        }
        Ok(())
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

    /// z0 is estimated inside each microbatch.
    fn split_dependent(&self) -> bool {
        true
    }
}

impl UnpairedLoss for KtoConfig {
    fn kl_pairs(&self) -> bool {
        true
    }

    fn forward(&self, x: &UnpairedInputs) -> Result<LossOutput> {
        let kl = x.kl.ok_or_else(|| Error::Compute("KTO needs the log-probs of its KL pairs".into()))?;
        let inputs = KtoInputs {
            policy_logps: x.policy,
            reference_logps: x.reference()?,
            policy_kl_logps: kl.policy,
            reference_kl_logps: kl.reference,
            labels: x.labels,
        };
        Ok(kto_loss(self, &inputs)?.into())
    }
}

/// λ_D = λ_U = 0 would train nothing while looking like a run.
pub(crate) fn check_some_weight(desirable: f64, undesirable: f64) -> Result<()> {
    if desirable == 0.0 && undesirable == 0.0 {
        return Err(Error::config("loss.desirable_weight", "desirable_weight and undesirable_weight are both 0"));
    }
    Ok(())
}

/// Log-probs of one microbatch, summed over each row's completion tokens.
pub struct KtoInputs<'a> {
    /// `[b]` log π_θ(y_i | x_i).
    pub policy_logps: &'a Tensor,
    /// `[b]` log π_ref(y_i | x_i).
    pub reference_logps: &'a Tensor,
    /// `[b]` log π_θ(y_{i−1} | x_i), the mismatched pairs. Treated as constant.
    pub policy_kl_logps: &'a Tensor,
    /// `[b]` log π_ref(y_{i−1} | x_i).
    pub reference_kl_logps: &'a Tensor,
    /// `true` for desirable rows.
    pub labels: &'a [bool],
}

/// The loss and what TRL logs for it.
pub struct KtoOutput {
    /// Scalar: the mean weighted loss over the microbatch.
    pub loss: Tensor,
    /// z0 after the clamp.
    pub kl: f64,
    /// z0 before the clamp (can be negative).
    pub kl_raw: f64,
    /// Mean β·r over desirable rows; `None` when there are none.
    pub rewards_chosen: Option<f64>,
    /// Mean β·r over undesirable rows; `None` when there are none.
    pub rewards_rejected: Option<f64>,
}

pub fn kto_loss(config: &KtoConfig, inputs: &KtoInputs) -> Result<KtoOutput> {
    let b = inputs.labels.len();
    for (name, t) in [
        ("policy_logps", inputs.policy_logps),
        ("reference_logps", inputs.reference_logps),
        ("policy_kl_logps", inputs.policy_kl_logps),
        ("reference_kl_logps", inputs.reference_kl_logps),
    ] {
        if t.dims() != [b] {
            return Err(Error::Shape { name: name.into(), expected: vec![b], got: t.dims().to_vec() });
        }
    }
    // z0: no gradient, clamped at 0.
    let kl_raw = (inputs.policy_kl_logps - inputs.reference_kl_logps)?
        .detach()
        .mean(D::Minus1)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    let kl = kl_raw.max(0.0);

    let logratios = (inputs.policy_logps - inputs.reference_logps)?; // [b]
    let losses = value_losses(config, &logratios, inputs.labels, kl)?; // [b]
    let (rewards_chosen, rewards_rejected) = class_rewards(config.beta, &logratios, inputs.labels)?;
    Ok(KtoOutput { loss: losses.mean(D::Minus1)?, kl, kl_raw, rewards_chosen, rewards_rejected })
}

impl From<KtoOutput> for LossOutput {
    fn from(out: KtoOutput) -> Self {
        let metrics = super::class_metrics(out.rewards_chosen, out.rewards_rejected);
        LossOutput { loss: out.loss, metrics: metrics.with("kl", out.kl).with("kl_raw", out.kl_raw) }
    }
}

/// The per-row KTO value loss against reference point `z0`: `λ·(1 − σ(β·s·(r − z0)))` with s = +1 for
/// desirable rows and −1 for undesirable ones. `[b]`. Shared with [`super::kto_zero`] (z0 = 0).
pub(crate) fn value_losses(config: &KtoConfig, logratios: &Tensor, labels: &[bool], z0: f64) -> Result<Tensor> {
    let b = labels.len();
    let device = logratios.device();
    // Desirable rows push r above z0, undesirable rows push it below: sign ±1 folds both cases into
    // one expression, 1 − σ(β·s·(r − z0)).
    let sign: Vec<f32> = labels.iter().map(|&l| if l { 1.0 } else { -1.0 }).collect();
    let weight: Vec<f32> =
        labels.iter().map(|&l| if l { config.desirable_weight } else { config.undesirable_weight } as f32).collect();
    let sign = Tensor::from_vec(sign, b, device)?.to_dtype(logratios.dtype())?; // [b]
    let weight = Tensor::from_vec(weight, b, device)?.to_dtype(logratios.dtype())?; // [b]
    let value = sigmoid(&((logratios.clone() - z0)? * config.beta)?.mul(&sign)?)?; // [b]
    Ok((value.neg()? + 1.0)?.mul(&weight)?) // [b]
}

/// Mean β·r over desirable and over undesirable rows (`None` for a class the microbatch lacks).
pub(crate) fn class_rewards(beta: f64, logratios: &Tensor, labels: &[bool]) -> Result<(Option<f64>, Option<f64>)> {
    let device = logratios.device();
    let rewards = (logratios.detach() * beta)?; // [b]
    let pick = |want: bool| -> Result<Option<f64>> {
        let idx: Vec<u32> = labels.iter().enumerate().filter(|(_, &l)| l == want).map(|(i, _)| i as u32).collect();
        if idx.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::new(idx.as_slice(), device)?;
        mean_f64(&rewards.index_select(&idx, 0)?)
    };
    Ok((pick(true)?, pick(false)?))
}

/// The paper's advice on class weights (its Eq. 8): with n_D desirable and n_U undesirable rows,
/// keep λ_D·n_D / (λ_U·n_U) in [1, 4/3]. Returns `None` when the current weights satisfy it,
/// otherwise a message with the recommended ranges for λ_D (λ_U fixed) or λ_U (λ_D fixed).
pub fn class_weight_advice(
    desirable_weight: f64,
    undesirable_weight: f64,
    n_desirable: usize,
    n_undesirable: usize,
) -> Option<String> {
    let (nd, nu) = (n_desirable.max(1) as f64, n_undesirable.max(1) as f64);
    let ratio = desirable_weight * nd / (undesirable_weight * nu);
    if (1.0..=4.0 / 3.0).contains(&ratio) {
        return None;
    }
    let d_lo = undesirable_weight * nu / nd;
    let u_hi = desirable_weight * nd / nu;
    Some(format!(
        "KTO class balance: {n_desirable} desirable and {n_undesirable} undesirable rows give \
         λ_D·n_D/(λ_U·n_U) = {ratio:.3}, outside the paper's recommended [1, 4/3]. Set EITHER \
         desirable_weight in [{:.3}, {:.3}] OR undesirable_weight in [{:.3}, {:.3}].",
        d_lo,
        d_lo * 4.0 / 3.0,
        u_hi * 3.0 / 4.0,
        u_hi
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Runs the loss and returns (loss, kl, kl_raw, d loss / d policy_logps).
    fn run(
        cfg: &KtoConfig,
        pol: &[f32],
        refl: &[f32],
        pkl: &[f32],
        rkl: &[f32],
        labels: &[bool],
    ) -> (f64, f64, f64, Vec<f32>) {
        let p = Var::new(pol, &Device::Cpu).unwrap();
        let out = kto_loss(
            cfg,
            &KtoInputs {
                policy_logps: p.as_tensor(),
                reference_logps: &t(refl),
                policy_kl_logps: &t(pkl),
                reference_kl_logps: &t(rkl),
                labels,
            },
        )
        .unwrap();
        let loss = out.loss.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let g = out.loss.backward().unwrap();
        let g: Vec<f32> = g.get(p.as_tensor()).unwrap().to_vec1().unwrap();
        (loss, out.kl, out.kl_raw, g)
    }

    #[test]
    fn mixed_microbatch_matches_hand_calculation() {
        // r = [1, -2, 0.5], labels [D, U, D]; KL pairs: policy [-3, -4, -5] ref [-4, -4, -4.5] -> mean(1, 0, -0.5) = 1/6
        // python: s=lambda x:1/(1+math.exp(-x)); z=1/6; (1-s(.1*(1-z)) + 1-s(.1*(z+2)) + 1-s(.1*(.5-z)))/3
        let cfg = KtoConfig::default();
        let (loss, kl, kl_raw, g) =
            run(&cfg, &[-1., -5., -2.5], &[-2., -3., -3.], &[-3., -4., -5.], &[-4., -4., -4.5], &[true, false, true]);
        let z = 1.0 / 6.0;
        let want = (1.0 - sig(0.1 * (1.0 - z)) + 1.0 - sig(0.1 * (z + 2.0)) + 1.0 - sig(0.1 * (0.5 - z))) / 3.0;
        assert!((kl_raw - z).abs() < 1e-6 && (kl - z).abs() < 1e-6);
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        assert!((want - 0.4722968).abs() < 1e-6);
        // Gradient sign: desirable rows are pushed up (d loss / d logp < 0), undesirable down (> 0).
        assert!(g[0] < 0.0 && g[2] < 0.0 && g[1] > 0.0, "{g:?}");
        // d/dr of (1 − σ(β(r − z)))/3 = −β σ'(β(r−z))/3; python: -.1*s(.1*(1-z))*(1-s(.1*(1-z)))/3
        let sp = sig(0.1 * (1.0 - z));
        assert!((g[0] as f64 - (-0.1 * sp * (1.0 - sp) / 3.0)).abs() < 1e-7);
    }

    #[test]
    fn kl_is_clamped_at_zero_and_carries_no_gradient() {
        // KL pairs average to −2: z0 = 0, kl_raw = −2. All desirable, r = [0, 0] -> loss = 1 − σ(0) = 0.5.
        let cfg = KtoConfig::default();
        let (loss, kl, kl_raw, g) = run(&cfg, &[-1., -1.], &[-1., -1.], &[-5., -5.], &[-3., -3.], &[true, true]);
        assert_eq!(kl, 0.0);
        assert!((kl_raw + 2.0).abs() < 1e-6);
        assert!((loss - 0.5).abs() < 1e-7);
        // python: -.1*.25/2 = -0.0125 per row: no contribution from the KL inputs.
        for gi in g {
            assert!((gi as f64 + 0.0125).abs() < 1e-7);
        }
    }

    #[test]
    fn all_undesirable_microbatch_works() {
        // r = [-1, 3], z0 = mean(2, 0) = 1. python: ((1-s(.1*(1+1))) + (1-s(.1*(1-3))))/2
        let cfg = KtoConfig::default();
        let (loss, _, _, g) = run(&cfg, &[-2., 0.], &[-1., -3.], &[0., -1.], &[-2., -1.], &[false, false]);
        let want = ((1.0 - sig(0.2)) + (1.0 - sig(-0.2))) / 2.0;
        assert!((loss - want).abs() < 1e-7, "{loss} vs {want}");
        assert!((want - 0.5).abs() < 1e-7); // symmetric around z0
        assert!(g.iter().all(|&gi| gi > 0.0), "undesirable rows must be pushed down: {g:?}");
    }

    #[test]
    fn class_weights_scale_each_side() {
        // λ_D = 2, λ_U = 0.5, z0 = 0, r = [1, 1], labels [D, U].
        // python: (2*(1-s(.1)) + .5*(1-s(-.1)))/2
        let cfg = KtoConfig { beta: 0.1, desirable_weight: 2.0, undesirable_weight: 0.5 };
        let (loss, ..) = run(&cfg, &[0., 0.], &[-1., -1.], &[0., 0.], &[0., 0.], &[true, false]);
        let want = (2.0 * (1.0 - sig(0.1)) + 0.5 * (1.0 - sig(-0.1))) / 2.0;
        assert!((loss - want).abs() < 1e-7, "{loss} vs {want}");
    }

    #[test]
    fn extreme_log_ratios_saturate_without_nan() {
        // r = ±1e4: σ saturates, loss is 0 or λ, gradients are 0 and finite.
        let cfg = KtoConfig::default();
        let (loss, _, _, g) = run(&cfg, &[1e4, 1e4], &[0., 0.], &[0., 0.], &[0., 0.], &[true, false]);
        assert!((loss - 0.5).abs() < 1e-7, "{loss}");
        assert!(g.iter().all(|x| x.is_finite() && x.abs() < 1e-12));
    }

    #[test]
    fn advice_follows_the_paper_range() {
        let cfg = KtoConfig::default();
        assert!(class_weight_advice(cfg.desirable_weight, cfg.undesirable_weight, 100, 100).is_none());
        assert!(class_weight_advice(cfg.desirable_weight, cfg.undesirable_weight, 120, 100).is_none()); // ratio 1.2 in [1, 4/3]
                                                                                                        // 10 desirable vs 100 undesirable: λ_D in [10, 13.333].
        let msg = class_weight_advice(cfg.desirable_weight, cfg.undesirable_weight, 10, 100).unwrap();
        assert!(msg.contains("desirable_weight in [10.000, 13.333]"), "{msg}");
    }
}
