//! The loss families: what a loss consumes, grouped by the shape of its inputs.
//!
//! A loss is a config struct (its TOML keys) that implements [`Loss`] plus the trait of its family. The
//! trainer builds the family's inputs from the models (see `train::microbatch`), calls `forward`, and
//! gets back a [`LossOutput`]: the scalar loss and the named metrics it logs.
//!
//! | family | inputs | losses |
//! |---|---|---|
//! | [`PairedLoss`] | chosen/rejected log-probs `[b]`, reference optional, completion lengths | dpo, cdpo, ipo, slic, simpo, orpo |
//! | [`UnpairedLoss`] | labelled log-probs `[b]`, reference optional, KTO's KL pairs when asked | kto, kto_zero, apo_zero_unpaired, bco |
//! | [`SftLoss`] | summed log-probs `[b]`, the microbatch's completion tokens | sft, csft (a data transform + SFT) |
//! | [`RewardLoss`] | chosen/rejected scores `[b]` of a reward model | reward |
//! | [`TokenLoss`] | per-token log-probs, values, rewards `[b, t]` | ppo_offline |

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What every loss declares, whatever its family. The defaults suit a stateless loss with no reference.
pub trait Loss {
    /// Check the hyperparameters; `microbatch_size` is the rows per microbatch.
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        Ok(())
    }

    /// Whether the loss compares against a frozen reference model.
    fn needs_reference(&self) -> bool {
        false
    }

    /// Whether one optimizer step depends on how its rows are cut into microbatches (KTO's z0 is
    /// estimated per microbatch). The conformance suite checks split invariance for the others.
    fn split_dependent(&self) -> bool {
        false
    }

    /// Control tokens to put before each completion, (desirable, undesirable): CSFT's data transform.
    fn control_tokens(&self) -> Option<(&str, &str)> {
        None
    }

    /// (λ_D, λ_U) for losses that weight desirable and undesirable rows (KTO and its variants):
    /// `auto_weights` sets them from the class counts.
    fn class_weights(&self) -> Option<(f64, f64)> {
        None
    }

    fn set_class_weights(&mut self, _desirable: f64, _undesirable: f64) {}

    /// Losses with state across steps (BCO's running mean of rewards) update it here after each
    /// training microbatch, from that microbatch's metrics, before the next microbatch runs. The trainer
    /// checkpoints the state in `trainer_state.json` and hands it to every forward (`state` in the inputs).
    fn observe(&self, _state: &mut LossState, _metrics: &Metrics) {}

    /// Whether [`Loss::observe`] keeps a state that each training microbatch reads after the microbatches
    /// before it updated it (BCO's δ). Data-parallel ranks run a step's microbatches at the same time, so
    /// such a loss trains in one process only.
    fn stateful(&self) -> bool {
        false
    }
}

/// A loss's numbers carried across steps, laid out as the loss chooses (BCO: count, mean, var). Empty
/// for stateless losses. Saved in every checkpoint, restored on resume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossState {
    #[serde(default)]
    pub values: Vec<f64>,
}

/// What a loss computed on one microbatch.
pub struct LossOutput {
    /// Scalar: the microbatch loss (before the trainer's microbatch weight).
    pub loss: Tensor,
    pub metrics: Metrics,
}

/// Named values a loss reports, with TRL's key names (`rewards/chosen`, `kl`, ...). The trainer averages
/// each name over the microbatches that report it and logs it in `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics(Vec<(&'static str, f64)>);

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `name = value`.
    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        self.0.push((name, value));
        self
    }

    /// Add `name = value` when there is a value (e.g. no desirable rows: no `rewards/chosen`).
    pub fn with_opt(self, name: &'static str, value: Option<f64>) -> Self {
        match value {
            Some(v) => self.with(name, v),
            None => self,
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.0.iter().copied()
    }
}

/// Metrics travel between the ranks of a data-parallel run as `[[name, value], ...]`.
impl serde::Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Metrics {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let pairs: Vec<(String, f64)> = serde::Deserialize::deserialize(d)?;
        Ok(Self(pairs.into_iter().map(|(name, value)| (intern(&name), value)).collect()))
    }
}

/// The `'static` name for a metric received from another rank. Metric names are a small fixed set
/// (TRL's keys), so the table stays a few dozen entries however long the run.
fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = names.iter().find(|&&n| n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

/// A microbatch of pairs: rows 0..b of each tensor are the same b prompts.
pub struct PairedInputs<'a> {
    /// `[b]` Σ log π_θ(y_c | x)
    pub policy_chosen: &'a Tensor,
    /// `[b]` Σ log π_θ(y_r | x)
    pub policy_rejected: &'a Tensor,
    /// `[b]` each, Σ log π_ref of chosen and rejected; `Some` iff the loss needs a reference.
    pub reference: Option<(&'a Tensor, &'a Tensor)>,
    /// Completion tokens per chosen and per rejected row (after truncation).
    pub chosen_tokens: &'a [usize],
    pub rejected_tokens: &'a [usize],
    pub state: &'a LossState,
}

impl<'a> PairedInputs<'a> {
    /// The reference log-probs `[b]` of (chosen, rejected), for losses that declare a reference.
    pub fn reference(&self) -> Result<(&'a Tensor, &'a Tensor)> {
        self.reference.ok_or_else(missing_reference)
    }
}

fn missing_reference() -> Error {
    Error::Compute("this loss needs reference log-probs, and the trainer set it up without them".into())
}

/// Losses over chosen/rejected pairs.
pub trait PairedLoss: Loss {
    fn forward(&self, x: &PairedInputs) -> Result<LossOutput>;
}

/// A microbatch of labelled rows.
pub struct UnpairedInputs<'a> {
    /// `[b]` Σ log π_θ(y_i | x_i)
    pub policy: &'a Tensor,
    /// `[b]` Σ log π_ref(y_i | x_i); `Some` iff the loss needs a reference.
    pub reference: Option<&'a Tensor>,
    /// `Some` iff [`UnpairedLoss::kl_pairs`]: the mismatched pairs (x_i, y_{i−1}), no gradient.
    pub kl: Option<KlInputs<'a>>,
    /// `true` for desirable rows.
    pub labels: &'a [bool],
    pub state: &'a LossState,
    /// `true` for a training microbatch, whose metrics then go to [`Loss::observe`]; `false` in
    /// evaluation, which reads the state without moving it (TRL's BCO reads δ there without updating it).
    pub training: bool,
}

impl<'a> UnpairedInputs<'a> {
    /// The reference log-probs `[b]`, for losses that declare a reference.
    pub fn reference(&self) -> Result<&'a Tensor> {
        self.reference.ok_or_else(missing_reference)
    }
}

/// Log-probs of KTO's mismatched pairs under the policy (detached) and the reference, `[b]` each.
#[derive(Clone, Copy)]
pub struct KlInputs<'a> {
    pub policy: &'a Tensor,
    pub reference: &'a Tensor,
}

/// Losses over binary feedback.
pub trait UnpairedLoss: Loss {
    /// Whether the trainer also scores the mismatched pairs (x_i, y_{i−1}) of TRL's rotation.
    fn kl_pairs(&self) -> bool {
        false
    }

    fn forward(&self, x: &UnpairedInputs) -> Result<LossOutput>;
}

/// Maximum likelihood on completions. The trainer weights each microbatch by its share of the optimizer
/// batch's completion tokens, so the step's loss is a per-token mean whatever the split.
pub trait SftLoss: Loss {
    /// `logps` `[b]`: summed completion log-probs; `tokens`: completion tokens in the microbatch.
    fn forward(&self, logps: &Tensor, tokens: usize) -> Result<LossOutput>;
}

/// Bradley-Terry style losses on a scalar reward model's scores, `[b]` each.
pub trait RewardLoss: Loss {
    fn forward(&self, chosen_scores: &Tensor, rejected_scores: &Tensor) -> Result<LossOutput>;
}

/// Per-token inputs of a policy-gradient loss over a microbatch of completions.
pub struct TokenInputs<'a> {
    /// `[b, t-1]` log π_θ of each next token.
    pub policy_logps: &'a Tensor,
    /// `[b, t-1]` log π_ref of each next token (no gradient).
    pub reference_logps: &'a Tensor,
    /// `[b, t-1]` the value head at each position.
    pub values: &'a Tensor,
    /// `[b, t-1]` 1 on completion tokens.
    pub mask: &'a Tensor,
    /// One scalar reward per row.
    pub rewards: &'a [f32],
}

/// Policy-gradient losses on per-token log-probs and a value head (offline PPO).
pub trait TokenLoss: Loss {
    /// Where rewards come from: a reward model folder, or `None` for ±1 from the labels.
    fn reward_model(&self) -> Option<&std::path::Path> {
        None
    }

    fn forward(&self, x: &TokenInputs) -> Result<LossOutput>;
}

/// A loss seen through its family: what the trainer dispatches on, once per microbatch.
#[derive(Clone, Copy)]
pub enum Family<'a> {
    Paired(&'a dyn PairedLoss),
    Unpaired(&'a dyn UnpairedLoss),
    Sft(&'a dyn SftLoss),
    Reward(&'a dyn RewardLoss),
    Token(&'a dyn TokenLoss),
}

impl Family<'_> {
    /// The data shape the family trains on.
    pub fn shape(&self) -> crate::data::Shape {
        use crate::data::Shape;
        match self {
            Family::Paired(_) | Family::Reward(_) => Shape::Paired,
            Family::Unpaired(_) | Family::Token(_) => Shape::Unpaired,
            Family::Sft(_) => Shape::Sft,
        }
    }
}
