//! BCO: Binary Classifier Optimization (Jung et al., 2024, <https://arxiv.org/abs/2404.04656>).
//!
//! Trains on binary feedback, like KTO: a logistic classifier whose logit is the implicit reward, with
//! desirable rows as class 1 and undesirable rows as class 0, shifted by δ, the running mean of every
//! reward seen so far.
//!
//! ```text
//! r_i     = β · (log π_θ(y_i | x_i) − log π_ref(y_i | x_i))      (summed over completion tokens)
//! moments ← moments ⊕ {r_i : i in this microbatch}              (count, mean, var; detached)
//! δ       = moments.mean                                        (includes this microbatch; no gradient)
//! L_i     = −log σ(r_i − δ)        if y_i is desirable
//!           −log σ(−(r_i − δ))     if y_i is undesirable
//! loss    = mean of L_i over the microbatch
//! ```
//!
//! This follows TRL's `BCOTrainer.bco_loss` (`trl.experimental.bco`, last shipped in TRL 1.13): ⊕ is
//! its `RunningMoments.update`, Chan et al.'s merge of a batch's count, mean and population variance into
//! the running ones, starting from count 1e-24, mean 0, var 1. Each *training* microbatch updates the
//! moments before δ is read, so δ already counts that microbatch's rewards; evaluation reads δ without
//! updating it (TRL's `do_train=False`). The moments are the loss's [`LossState`], `[count, mean, var]`:
//! the forward merges this microbatch into a copy, reports the microbatch's own moments as metrics
//! (`bco/rows`, `bco/reward_mean`, `bco/reward_var`), and [`Loss::observe`] merges the same numbers into
//! the trainer's state, which the checkpoint saves (TRL saves it as `running.json`).
//!
//! Not here: TRL's underlying distribution matching (UDM, `embedding_func`: a logistic regression on
//! prompt embeddings from a separate embedding model reweights undesirable rows). Its keys
//! `prompt_sample_size`, `min_density_ratio` and `max_density_ratio` therefore do not exist.
//!
//! Because δ moves with every microbatch, one optimizer step depends on how its rows are cut into
//! microbatches ([`Loss::split_dependent`]), and data-parallel ranks, which run a step's microbatches at
//! the same time, cannot reproduce it ([`Loss::stateful`]: a world size above 1 is a config error).
//!
//! Hyperparameters (TRL's `BCOConfig` defaults): `beta` = 0.1.
//!
//! Shapes: every input is `[b]`, one value per row of the microbatch.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::kto::class_rewards;
use super::{check_positive, check_rows, class_metrics, log_sigmoid};
use super::{Loss, LossOutput, LossState, Metrics, UnpairedInputs, UnpairedLoss};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BcoConfig {
    /// Scale of the implicit reward β·log(π_θ/π_ref).
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for BcoConfig {
    fn default() -> Self {
        Self { beta: default_beta() }
    }
}

/// The metrics that carry a training microbatch's reward moments from the forward to [`Loss::observe`].
const ROWS: &str = "bco/rows";
const REWARD_MEAN: &str = "bco/reward_mean";
const REWARD_VAR: &str = "bco/reward_var";

impl Loss for BcoConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        check_positive("loss.beta", self.beta)
    }

    fn needs_reference(&self) -> bool {
        true
    }

    /// δ is updated after every microbatch.
    fn split_dependent(&self) -> bool {
        true
    }

    fn stateful(&self) -> bool {
        true
    }

    /// Merge the microbatch's reward moments, reported by the forward, into the running ones.
    fn observe(&self, state: &mut LossState, metrics: &Metrics) {
        let (Some(n), Some(mean), Some(var)) = (metrics.get(ROWS), metrics.get(REWARD_MEAN), metrics.get(REWARD_VAR))
        else {
            return; // an evaluation forward: nothing to merge
        };
        // The forward already read this state successfully; a malformed one fails there, with a message.
        if let Ok(running) = RunningMoments::from_state(state) {
            *state = running.merged(&BatchMoments { n, mean, var }).to_state();
        }
    }
}

impl UnpairedLoss for BcoConfig {
    fn forward(&self, x: &UnpairedInputs) -> Result<LossOutput> {
        let inputs = BcoInputs {
            policy_logps: x.policy,
            reference_logps: x.reference()?,
            labels: x.labels,
            running: RunningMoments::from_state(x.state)?,
            update: x.training,
        };
        Ok(bco_loss(self, &inputs)?.into())
    }
}

/// TRL's `RunningMoments`: the count, mean and population variance of every reward merged so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningMoments {
    pub count: f64,
    pub mean: f64,
    pub var: f64,
}

/// TRL's starting point: a count of 1e-24 rather than 0 (the merge divides by the total count), mean 0
/// and variance 1, whose weight the first merge makes negligible.
impl Default for RunningMoments {
    fn default() -> Self {
        Self { count: 1e-24, mean: 0.0, var: 1.0 }
    }
}

/// The count, mean and population variance of one microbatch's rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchMoments {
    pub n: f64,
    pub mean: f64,
    pub var: f64,
}

impl BatchMoments {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n.max(1.0);
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n.max(1.0);
        Self { n, mean, var }
    }
}

impl RunningMoments {
    /// The moments a [`LossState`] holds: none yet (a fresh run) or `[count, mean, var]`.
    pub fn from_state(state: &LossState) -> Result<Self> {
        match state.values.as_slice() {
            [] => Ok(Self::default()),
            &[count, mean, var] => Ok(Self { count, mean, var }),
            other => Err(Error::Compute(format!(
                "BCO's running reward moments must be [count, mean, var], got {} values; the checkpoint's \
                 trainer_state.json was not written by a BCO run (start afresh without --resume)",
                other.len()
            ))),
        }
    }

    pub fn to_state(self) -> LossState {
        LossState { values: vec![self.count, self.mean, self.var] }
    }

    /// Chan et al.'s parallel merge, as TRL's `RunningMoments.update` writes it: the old sum of squared
    /// deviations is corrected for the shift of the mean, then both sums are divided by the total count.
    pub fn merged(&self, batch: &BatchMoments) -> Self {
        let shift = batch.mean - self.mean;
        let count = self.count + batch.n;
        let old_sum = self.var * self.count + shift * shift * self.count * batch.n / count;
        let new_sum = batch.var * batch.n;
        Self { count, mean: self.mean + shift * batch.n / count, var: (old_sum + new_sum) / count }
    }
}

/// Log-probs of one microbatch, summed over each row's completion tokens, and the running moments.
pub struct BcoInputs<'a> {
    /// `[b]` log π_θ(y_i | x_i).
    pub policy_logps: &'a Tensor,
    /// `[b]` log π_ref(y_i | x_i).
    pub reference_logps: &'a Tensor,
    /// `true` for desirable rows.
    pub labels: &'a [bool],
    /// The moments before this microbatch.
    pub running: RunningMoments,
    /// Merge this microbatch's rewards before reading δ (training), or read δ as it is (evaluation).
    pub update: bool,
}

/// The loss and what TRL logs for it.
pub struct BcoOutput {
    /// Scalar: the mean loss over the microbatch.
    pub loss: Tensor,
    /// δ, the reward shift this microbatch used.
    pub delta: f64,
    /// This microbatch's reward moments when they were merged (training), for [`Loss::observe`].
    pub batch: Option<BatchMoments>,
    /// Mean β·r over desirable rows; `None` when there are none.
    pub rewards_chosen: Option<f64>,
    /// Mean β·r over undesirable rows; `None` when there are none.
    pub rewards_rejected: Option<f64>,
    /// Mean log π_θ over desirable rows.
    pub logps_chosen: Option<f64>,
    /// Mean log π_θ over undesirable rows.
    pub logps_rejected: Option<f64>,
}

pub fn bco_loss(config: &BcoConfig, inputs: &BcoInputs) -> Result<BcoOutput> {
    let labels = inputs.labels;
    let b = labels.len();
    check_rows(b, &[("policy_logps", inputs.policy_logps), ("reference_logps", inputs.reference_logps)])?;
    let logratios = (inputs.policy_logps - inputs.reference_logps)?; // [b]
    let rewards = (&logratios * config.beta)?; // [b]
    let values: Vec<f64> = rewards.detach().to_dtype(DType::F64)?.to_vec1()?;
    let batch = inputs.update.then(|| BatchMoments::of(&values));
    let running = batch.as_ref().map_or(inputs.running, |m| inputs.running.merged(m));
    let delta = running.mean;
    // Desirable rows push r above δ and undesirable rows below it: the sign folds both into −log σ(s·(r − δ)).
    let sign: Vec<f32> = labels.iter().map(|&l| if l { 1.0 } else { -1.0 }).collect();
    let sign = Tensor::from_vec(sign, b, rewards.device())?.to_dtype(rewards.dtype())?; // [b]
    let losses = log_sigmoid(&(&rewards - delta)?.mul(&sign)?)?.neg()?; // [b]
    let (rewards_chosen, rewards_rejected) = class_rewards(config.beta, &logratios, labels)?;
    // The same per-class means, of the policy's log-probs (a "reward" with β = 1 and no reference).
    let (logps_chosen, logps_rejected) = class_rewards(1.0, inputs.policy_logps, labels)?;
    Ok(BcoOutput {
        loss: losses.mean(D::Minus1)?,
        delta,
        batch,
        rewards_chosen,
        rewards_rejected,
        logps_chosen,
        logps_rejected,
    })
}

/// TRL's keys (`rewards/*`, `logps/*`, `delta`; its `logits/*` need the logits, which a loss never sees),
/// plus the microbatch's reward moments when the state is to take them.
impl From<BcoOutput> for LossOutput {
    fn from(out: BcoOutput) -> Self {
        let mut metrics = class_metrics(out.rewards_chosen, out.rewards_rejected)
            .with_opt("logps/chosen", out.logps_chosen)
            .with_opt("logps/rejected", out.logps_rejected)
            .with("delta", out.delta);
        if let Some(batch) = out.batch {
            metrics = metrics.with(ROWS, batch.n).with(REWARD_MEAN, batch.mean).with(REWARD_VAR, batch.var);
        }
        LossOutput { loss: out.loss, metrics }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Runs the loss from `running` and returns (loss, d loss / d policy_logps, output).
    fn run(
        pol: &[f32],
        refl: &[f32],
        labels: &[bool],
        running: RunningMoments,
        update: bool,
    ) -> (f64, Vec<f32>, BcoOutput) {
        let p = Var::new(pol, &Device::Cpu).unwrap();
        let r = Tensor::new(refl, &Device::Cpu).unwrap();
        let inputs = BcoInputs { policy_logps: p.as_tensor(), reference_logps: &r, labels, running, update };
        let out = bco_loss(&BcoConfig::default(), &inputs).unwrap();
        let loss = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let g = out.loss.backward().unwrap().get(p.as_tensor()).unwrap().to_vec1().unwrap();
        (loss, g, out)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn first_microbatch_matches_hand_calculation() {
        // r = 0.1·[1, −2, 0.5] = [0.1, −0.2, 0.05], labels [D, U, D]; a fresh state, so δ = mean(r) = −1/60.
        // python: import math; ls=lambda x:-math.log1p(math.exp(-x)); r=[.1,-.2,.05]; d=sum(r)/3
        //         -(ls(r[0]-d) + ls(-(r[1]-d)) + ls(r[2]-d))/3            -> 0.6341865346858202
        let (loss, g, out) =
            run(&[-1., -5., -2.5], &[-2., -3., -3.], &[true, false, true], RunningMoments::default(), true);
        assert!(close(out.delta, -1.0 / 60.0, 1e-9), "{}", out.delta);
        assert!(close(loss, 0.6341865346858202, 1e-6), "{loss}");
        // δ carries no gradient: d/dp_0 = −β(1 − σ(r_0 − δ))/3, d/dp_1 = β σ(r_1 − δ)/3.
        // python: s=lambda x:1/(1+math.exp(-x)); -.1*(1-s(r[0]-d))/3, .1*s(r[1]-d)/3
        assert!(close(g[0] as f64, -0.01569554569759844, 1e-7) && close(g[1] as f64, 0.015143153747186472, 1e-7));
        assert!(g[2] < 0.0, "desirable rows are pushed up: {g:?}");
        // The microbatch's moments: 3 rows, mean −1/60, population variance
        // python: sum((x-d)**2 for x in r)/3                                -> 0.017222222222222226
        let batch = out.batch.unwrap();
        assert!(batch.n == 3.0 && close(batch.mean, -1.0 / 60.0, 1e-9) && close(batch.var, 0.017222222222222226, 1e-8));
        assert!(close(out.rewards_chosen.unwrap(), 0.075, 1e-7) && close(out.rewards_rejected.unwrap(), -0.2, 1e-7));
        assert!(close(out.logps_chosen.unwrap(), -1.75, 1e-7) && close(out.logps_rejected.unwrap(), -5.0, 1e-7));
    }

    #[test]
    fn running_moments_carry_over_and_observe_applies_the_same_merge() {
        // State (count 4, mean 0.5, var 2); this microbatch's rewards [1, −1]: n 2, mean 0, var 1.
        // python: c,m,v=4,.5,2.; dl=0-m; t=c+2; m+dl*2/t, (v*c + dl*dl*c*2/t + 1*2)/t   -> 1/3, 1.7222222222222223
        //         -(ls(1-1/3) + ls(-(-1-1/3)))/2                                         -> 0.3241663059648101
        let state = LossState { values: vec![4.0, 0.5, 2.0] };
        let running = RunningMoments::from_state(&state).unwrap();
        let (loss, _, out) = run(&[0., -20.], &[-10., -10.], &[true, false], running, true);
        assert!(close(out.delta, 1.0 / 3.0, 1e-9) && close(loss, 0.3241663059648101, 1e-6), "{} {loss}", out.delta);
        // observe, from the metrics alone, leaves the state the forward computed.
        let mut observed = state.clone();
        let cfg = BcoConfig::default();
        cfg.observe(&mut observed, &LossOutput::from(out).metrics);
        let want = [6.0, 1.0 / 3.0, 1.7222222222222223];
        assert!(observed.values.iter().zip(want).all(|(a, b)| close(*a, b, 1e-12)), "{observed:?}");
    }

    #[test]
    fn evaluation_reads_delta_without_updating_it() {
        // python: -(ls(1-.5) + ls(-(-1-.5)))/2                                 -> 0.33774513108142956
        let running = RunningMoments { count: 4.0, mean: 0.5, var: 2.0 };
        let (loss, _, out) = run(&[0., -20.], &[-10., -10.], &[true, false], running, false);
        assert!(close(out.delta, 0.5, 0.0) && close(loss, 0.33774513108142956, 1e-6), "{loss}");
        let metrics = LossOutput::from(out).metrics;
        assert!(metrics.get(ROWS).is_none() && metrics.get("delta") == Some(0.5));
        let mut state = running.to_state();
        BcoConfig::default().observe(&mut state, &metrics);
        assert_eq!(state, running.to_state(), "evaluation must leave the state alone");
    }

    #[test]
    fn first_merge_gives_the_batch_moments_and_state_round_trips() {
        // TRL's count 1e-24 start: after one merge, the moments are the batch's own (to f64 precision).
        let merged = RunningMoments::default().merged(&BatchMoments::of(&[1.0, 2.0, 6.0]));
        assert!(merged.count == 3.0 && close(merged.mean, 3.0, 1e-15) && close(merged.var, 14.0 / 3.0, 1e-12));
        assert_eq!(RunningMoments::from_state(&merged.to_state()).unwrap(), merged);
        assert_eq!(RunningMoments::from_state(&LossState::default()).unwrap(), RunningMoments::default());
        let err = RunningMoments::from_state(&LossState { values: vec![1.0] }).unwrap_err().to_string();
        assert!(err.contains("[count, mean, var]"), "{err}");
    }

    #[test]
    fn one_class_and_extreme_rewards_stay_finite() {
        // All undesirable, r = ±1e3: δ = 0, one row saturates at loss 0, the other at 1e3 with gradient β/2.
        let (loss, g, out) = run(&[1e4, -1e4], &[0., 0.], &[false, false], RunningMoments::default(), true);
        assert!(out.rewards_chosen.is_none() && close(out.delta, 0.0, 1e-9));
        assert!(close(loss, 500.0, 1e-3), "{loss}");
        assert!(g.iter().all(|x| x.is_finite()) && close(g[0] as f64, 0.05, 1e-7) && g[1].abs() < 1e-12, "{g:?}");
    }

    #[test]
    fn beta_must_be_positive() {
        let err = BcoConfig { beta: 0.0 }.validate(2).unwrap_err().to_string();
        assert!(err.contains("beta"), "{err}");
        assert!(BcoConfig::default().validate(1).is_ok(), "one row per microbatch is fine");
    }
}
