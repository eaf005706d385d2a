//! What one optimizer step reports. Serialized as one line of `metrics.jsonl`, with TRL's key names
//! (`rewards/chosen`, `kl`, ...) so dashboards carry over.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step, from 1.
    pub step: usize,
    /// Fractional epoch at the end of this step.
    pub epoch: f64,
    /// The step's objective: the weighted sum of its microbatch losses (for KTO and DPO the mean of
    /// the microbatch losses, for SFT the mean NLL over the step's completion tokens).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    #[serde(flatten)]
    pub objective: ObjectiveMetrics,
    /// Real (non-padding) tokens processed by the policy's forward passes in this step.
    pub num_tokens: usize,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// Rows skipped as invalid when `skip_invalid = true` (absent otherwise).
    #[serde(default, rename = "data/skipped_invalid", skip_serializing_if = "Option::is_none")]
    pub skipped_invalid: Option<usize>,
}

/// Loss-specific metrics, each averaged over the microbatches that define it (as TRL does).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveMetrics {
    /// KTO: z0 after the clamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// KTO: z0 before the clamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_raw: Option<f64>,
    #[serde(default, rename = "rewards/chosen", skip_serializing_if = "Option::is_none")]
    pub rewards_chosen: Option<f64>,
    #[serde(default, rename = "rewards/rejected", skip_serializing_if = "Option::is_none")]
    pub rewards_rejected: Option<f64>,
    #[serde(default, rename = "rewards/margins", skip_serializing_if = "Option::is_none")]
    pub rewards_margins: Option<f64>,
    #[serde(default, rename = "rewards/accuracies", skip_serializing_if = "Option::is_none")]
    pub rewards_accuracies: Option<f64>,
    /// Reward model: fraction of pairs scored chosen > rejected (TRL's `RewardTrainer` key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Reward model: mean chosen − rejected score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// Offline PPO: the clipped policy term.
    #[serde(default, rename = "loss/policy", skip_serializing_if = "Option::is_none")]
    pub policy_loss: Option<f64>,
    /// Offline PPO: the value-head term (before `critic_coef`).
    #[serde(default, rename = "loss/critic", skip_serializing_if = "Option::is_none")]
    pub critic_loss: Option<f64>,
    /// Offline PPO: fraction of completion tokens where the clip is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipfrac: Option<f64>,
}

/// Running mean of a metric over the microbatches that report it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean {
    sum: f64,
    count: usize,
}

impl Mean {
    pub fn add(&mut self, value: Option<f64>) {
        if let Some(v) = value {
            self.sum += v;
            self.count += 1;
        }
    }

    pub fn get(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Accumulates [`ObjectiveMetrics`] over a step's microbatches.
#[derive(Debug, Clone, Default)]
pub struct ObjectiveAccumulator {
    kl: Mean,
    kl_raw: Mean,
    chosen: Mean,
    rejected: Mean,
    margins: Mean,
    accuracies: Mean,
    accuracy: Mean,
    margin: Mean,
    policy_loss: Mean,
    critic_loss: Mean,
    clipfrac: Mean,
}

impl ObjectiveAccumulator {
    pub fn add(&mut self, m: &ObjectiveMetrics) {
        self.kl.add(m.kl);
        self.kl_raw.add(m.kl_raw);
        self.chosen.add(m.rewards_chosen);
        self.rejected.add(m.rewards_rejected);
        self.margins.add(m.rewards_margins);
        self.accuracies.add(m.rewards_accuracies);
        self.accuracy.add(m.accuracy);
        self.margin.add(m.margin);
        self.policy_loss.add(m.policy_loss);
        self.critic_loss.add(m.critic_loss);
        self.clipfrac.add(m.clipfrac);
    }

    pub fn finish(&self) -> ObjectiveMetrics {
        ObjectiveMetrics {
            kl: self.kl.get(),
            kl_raw: self.kl_raw.get(),
            rewards_chosen: self.chosen.get(),
            rewards_rejected: self.rejected.get(),
            rewards_margins: self.margins.get(),
            rewards_accuracies: self.accuracies.get(),
            accuracy: self.accuracy.get(),
            margin: self.margin.get(),
            policy_loss: self.policy_loss.get(),
            critic_loss: self.critic_loss.get(),
            clipfrac: self.clipfrac.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_trl_key_names_and_skips_absent_metrics() {
        let m = StepMetrics {
            step: 1,
            objective: ObjectiveMetrics { kl: Some(0.5), rewards_chosen: Some(0.25), ..Default::default() },
            ..Default::default()
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"kl\":0.5") && json.contains("\"rewards/chosen\":0.25"), "{json}");
        assert!(!json.contains("rewards/rejected"), "{json}");
        let back: StepMetrics = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn means_skip_microbatches_without_a_value() {
        // KTO: a microbatch with no desirable rows has no rewards/chosen; the step averages the others.
        let mut acc = ObjectiveAccumulator::default();
        acc.add(&ObjectiveMetrics { rewards_chosen: Some(1.0), kl: Some(0.0), ..Default::default() });
        acc.add(&ObjectiveMetrics { rewards_chosen: None, kl: Some(1.0), ..Default::default() });
        acc.add(&ObjectiveMetrics { rewards_chosen: Some(3.0), kl: Some(2.0), ..Default::default() });
        let m = acc.finish();
        assert_eq!(m.rewards_chosen, Some(2.0));
        assert_eq!(m.kl, Some(1.0));
        assert_eq!(m.rewards_rejected, None);
    }
}
