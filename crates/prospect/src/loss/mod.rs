//! Training objectives. Each loss is a pure function of per-sequence log-probs: it never sees a model,
//! a tokenizer or a file, so every number it produces can be checked by hand.
//!
//! A loss is one file: its config struct (the `[loss]` keys, with defaults), its formula in the doc
//! comment, and the impl of [`Loss`] and of its family's trait ([`family`]). The [`losses!`] table
//! below is the only list of losses in the crate: it generates [`LossConfig`] (the `[loss]` table,
//! tagged by `type`), [`LossConfig::NAMES`], and the one dispatch [`LossConfig::family`]. Adding a loss
//! is one new file plus one line in that table (and its example config and reference fixture).

pub mod family;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use apo_zero_unpaired::apo_zero_unpaired_loss;
pub use bco::{bco_loss, BatchMoments, BcoInputs, BcoOutput, RunningMoments};
pub use cdpo::cdpo_loss;
pub use dpo::{dpo_loss, DpoInputs};
pub use family::{
    Family, KlInputs, Loss, LossOutput, LossState, Metrics, PairedInputs, PairedLoss, RewardLoss, SftLoss, TokenInputs,
    TokenLoss, UnpairedInputs, UnpairedLoss,
};
pub use ipo::ipo_loss;
pub use kto::{kto_loss, KtoInputs, KtoOutput};
pub use kto_zero::kto_zero_loss;
pub use orpo::orpo_loss;
pub use ppo_offline::{ppo_offline_loss, PpoInputs, PpoOutput};
pub use reward::{reward_loss, RewardOutput};
pub use sft::sft_loss;
pub use simpo::simpo_loss;
pub use slic::slic_loss;

/// The registry: `module: Variant(ConfigType) in Family`. The module's file is `loss/<module>.rs`, and its
/// name is the loss's TOML `type`. Each config type implements [`Loss`] and its family's trait there.
macro_rules! losses {
    ($($module:ident: $variant:ident($config:ident) in $family:ident,)+) => {
        $(pub mod $module;)+
        $(pub use $module::$config;)+

        /// The `[loss]` table: `type` picks the objective, the other keys are its hyperparameters.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum LossConfig {
            $($variant($config),)+
        }


        impl LossConfig {
            /// Every loss's TOML name, in table order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($module)),+];

            pub fn name(&self) -> &'static str {
                match self {
                    $(LossConfig::$variant(_) => stringify!($module),)+
                }
            }

            /// The loss through its family's trait: the one dispatch on the loss.
            pub fn family(&self) -> Family<'_> {
                match self {
                    $(LossConfig::$variant(c) => Family::$family(c),)+
                }
            }

            /// The loss's own declarations ([`Loss`]).
            pub fn spec(&self) -> &dyn Loss {
                match self {
                    $(LossConfig::$variant(c) => c,)+
                }
            }

            fn spec_mut(&mut self) -> &mut dyn Loss {
                match self {
                    $(LossConfig::$variant(c) => c,)+
                }
            }

            /// The loss named `name` with every hyperparameter at its default.
            pub fn default_for(name: &str) -> Option<LossConfig> {
                match name {
                    $(stringify!($module) => Some(LossConfig::$variant($config::default())),)+
                    _ => None,
                }
            }
        }
    };
}

losses! {
    kto: Kto(KtoConfig) in Unpaired,
    dpo: Dpo(DpoConfig) in Paired,
    sft: Sft(SftConfig) in Sft,
    csft: Csft(CsftConfig) in Sft,
    cdpo: Cdpo(CdpoConfig) in Paired,
    ipo: Ipo(IpoConfig) in Paired,
    slic: Slic(SlicConfig) in Paired,
    simpo: Simpo(SimpoConfig) in Paired,
    orpo: Orpo(OrpoConfig) in Paired,
    kto_zero: KtoZero(KtoZeroConfig) in Unpaired,
    apo_zero_unpaired: ApoZeroUnpaired(ApoZeroUnpairedConfig) in Unpaired,
    reward: Reward(RewardConfig) in Reward,
    ppo_offline: PpoOffline(PpoOfflineConfig) in Token,
    hinge: Hinge(HingeConfig) in Paired,
    bco: Bco(BcoConfig) in Unpaired,
}

impl LossConfig {
    /// The data shape the loss reads. CSFT reads labelled rows and turns them into SFT examples.
    pub fn shape(&self) -> crate::data::Shape {
        match self.spec().control_tokens() {
            Some(_) => crate::data::Shape::Unpaired,
            None => self.family().shape(),
        }
    }

    /// (λ_D, λ_U) of a loss that weights its classes.
    pub fn class_weights(&self) -> Option<(f64, f64)> {
        self.spec().class_weights()
    }

    pub fn set_class_weights(&mut self, desirable: f64, undesirable: f64) {
        self.spec_mut().set_class_weights(desirable, undesirable)
    }

    /// Whether `precompute_ref_logps` can replace the reference model: the loss compares sequence
    /// log-probs with a reference (the paired and unpaired families).
    pub fn can_precompute_reference(&self) -> bool {
        self.needs_reference() && matches!(self.family(), Family::Paired(_) | Family::Unpaired(_))
    }

    pub fn needs_reference(&self) -> bool {
        self.spec().needs_reference()
    }

    pub(crate) fn validate(&self, microbatch_size: usize) -> Result<()> {
        self.spec().validate(microbatch_size)
    }

    /// How much one microbatch's loss counts towards the optimizer step's objective.
    ///
    /// Preference losses average their microbatch losses (TRL divides each by the accumulation count).
    /// The SFT family averages over every completion token of the optimizer batch, so a microbatch counts
    /// in proportion to its tokens; that makes the update independent of how the batch is split.
    pub fn microbatch_weight(
        &self,
        microbatches_in_step: usize,
        tokens_in_microbatch: usize,
        tokens_in_step: usize,
    ) -> f64 {
        match self.family() {
            Family::Sft(_) if tokens_in_step == 0 => 0.0,
            Family::Sft(_) => tokens_in_microbatch as f64 / tokens_in_step as f64,
            _ => 1.0 / microbatches_in_step as f64,
        }
    }
}

/// Numerically stable `log σ(x)`, elementwise:
/// `−log(1 + exp(−x))` for x ≥ 0 and `x − log(1 + exp(x))` for x < 0.
///
/// The naive `log(sigmoid(x))` underflows to `-inf` below about −88 in f32; this form stays exact
/// (`log σ(−50) = −50`). Each branch only ever sees arguments of one sign, so neither overflows, and
/// the gradient at x = 0 is exactly σ(0) = 0.5 (a `min`/`abs` formulation gets ties wrong there,
/// which matters: DPO's first step has policy = reference, so x = 0 exactly).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let is_pos = x.ge(&zero)?; // no gradient: a comparison
    let x_pos = is_pos.where_cond(x, &zero)?; // x where x >= 0, else 0
    let x_neg = is_pos.where_cond(&zero, x)?; // x where x < 0, else 0
    let pos_branch = (x_pos.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let neg_branch = (&x_neg - (x_neg.exp()? + 1.0)?.log()?)?;
    Ok(is_pos.where_cond(&pos_branch, &neg_branch)?)
}

/// `max(0, x)` with torch's gradient: 1 where x > 0 and 0 elsewhere, **including x = 0** (candle's
/// `relu` passes gradient at exactly 0, which differs from `torch.relu` / `clamp(min=0)` at ties).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    let active = x.gt(&x.zeros_like()?)?.to_dtype(x.dtype())?; // no gradient: a comparison
    Ok(x.mul(&active)?)
}

/// Logistic sigmoid with a backward pass (candle-nn's custom op carries one).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}

/// What a paired loss reports besides the loss, averaged over the pairs of the microbatch (TRL's
/// `rewards/*` keys). Each loss says what its "reward" is (β·log-ratio for DPO-like losses, β·average
/// log-prob for SimPO/ORPO, log π for SLiC, the score for the reward model).
pub struct PairedOutput {
    /// Scalar: the microbatch loss.
    pub loss: Tensor,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_margins: f64,
    /// Fraction of pairs whose chosen reward is strictly above the rejected one.
    pub rewards_accuracies: f64,
}

impl PairedOutput {
    /// Build the metrics from per-pair rewards `[b]` (detached here).
    pub(crate) fn new(loss: Tensor, chosen_rewards: &Tensor, rejected_rewards: &Tensor) -> Result<Self> {
        let (c, r) = (chosen_rewards.detach(), rejected_rewards.detach());
        let margins = (&c - &r)?;
        let accuracies = c.gt(&r)?.to_dtype(candle_core::DType::F32)?;
        let mean = |t: &Tensor| -> Result<f64> { Ok(mean_f64(t)?.unwrap_or(0.0)) };
        Ok(Self {
            loss,
            rewards_chosen: mean(&c)?,
            rewards_rejected: mean(&r)?,
            rewards_margins: mean(&margins)?,
            rewards_accuracies: mean(&accuracies)?,
        })
    }
}

impl From<PairedOutput> for LossOutput {
    fn from(out: PairedOutput) -> Self {
        let metrics = Metrics::new()
            .with("rewards/chosen", out.rewards_chosen)
            .with("rewards/rejected", out.rewards_rejected)
            .with("rewards/margins", out.rewards_margins)
            .with("rewards/accuracies", out.rewards_accuracies);
        LossOutput { loss: out.loss, metrics }
    }
}

/// Per-class rewards of an unpaired loss as metrics: `rewards/margins` only when both classes are present.
pub(crate) fn class_metrics(chosen: Option<f64>, rejected: Option<f64>) -> Metrics {
    let margins = chosen.zip(rejected).map(|(c, r)| c - r);
    Metrics::new()
        .with_opt("rewards/chosen", chosen)
        .with_opt("rewards/rejected", rejected)
        .with_opt("rewards/margins", margins)
}

/// Every tensor must be `[b]`: one value per row or pair.
pub(crate) fn check_rows(b: usize, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if t.dims() != [b] {
            return Err(Error::Shape { name: (*name).into(), expected: vec![b], got: t.dims().to_vec() });
        }
    }
    Ok(())
}

/// Mean of a 1-D tensor's values as `f64`, or `None` when it is empty (metrics over an empty class).
pub(crate) fn mean_f64(x: &Tensor) -> Result<Option<f64>> {
    let v: Vec<f32> = x.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64))
}

pub(crate) fn check_positive(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::config(key, format!("must be a finite number > 0, got {value}")))
    }
}

pub(crate) fn check_probability(key: &str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::config(key, format!("must be in [0, 1], got {value}")))
    }
}

pub(crate) fn check_non_negative(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::config(key, format!("must be a finite number >= 0, got {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn log_sigmoid_is_exact_at_the_extremes() {
        // python: import math; [-math.log1p(math.exp(-v)) if v>0 else v-math.log1p(math.exp(v)) for v in (-50,-1,0,1,50)]
        let x = Tensor::new(&[-50f32, -1., 0., 1., 50.], &Device::Cpu).unwrap();
        let y: Vec<f32> = log_sigmoid(&x).unwrap().to_vec1().unwrap();
        let want = [-50.0, -1.3132616875, -std::f64::consts::LN_2, -0.3132616875, -1.9287498e-22]; // log σ(0) = −ln 2
        for (a, b) in y.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn log_sigmoid_gradient_is_sigmoid_of_minus_x() {
        // d/dx log σ(x) = σ(−x): at −50 it is 1, at 50 it is ~0, never NaN.
        let x = Var::new(&[-50f32, 0., 50.], &Device::Cpu).unwrap();
        let g = log_sigmoid(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((g[0] - 1.0).abs() < 1e-6 && (g[1] - 0.5).abs() < 1e-6 && g[2].abs() < 1e-6, "{g:?}");
    }
}
