//! What one optimizer step reports. Serialized as one line of `metrics.jsonl`, with TRL's key names
//! (`rewards/chosen`, `kl`, ...) so dashboards carry over.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::loss::Metrics;

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
    /// Seconds this step spent in collective calls (gathering metrics, summing gradients) across the ranks
    /// of a data-parallel run, waiting included (absent in one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_time_s: Option<f64>,
    /// Rows skipped as invalid when `skip_invalid = true` (absent otherwise).
    #[serde(default, rename = "data/skipped_invalid", skip_serializing_if = "Option::is_none")]
    pub skipped_invalid: Option<usize>,
}

/// The loss's named metrics (`kl`, `rewards/chosen`, ...), each averaged over the microbatches that
/// report it, as TRL does. Serialized flat into the step's line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectiveMetrics(BTreeMap<String, f64>);

impl ObjectiveMetrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.0.iter().map(|(k, &v)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Running mean of a metric over the microbatches that report it.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    count: usize,
}

/// Accumulates a step's microbatch [`Metrics`] into [`ObjectiveMetrics`].
#[derive(Debug, Clone, Default)]
pub struct ObjectiveAccumulator {
    means: BTreeMap<&'static str, Mean>,
}

impl ObjectiveAccumulator {
    pub fn add(&mut self, metrics: &Metrics) {
        for (name, value) in metrics.iter() {
            let m = self.means.entry(name).or_default();
            m.sum += value;
            m.count += 1;
        }
    }

    pub fn finish(&self) -> ObjectiveMetrics {
        ObjectiveMetrics(self.means.iter().map(|(k, m)| (k.to_string(), m.sum / m.count as f64)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_trl_key_names_and_skips_absent_metrics() {
        let m = StepMetrics {
            step: 1,
            objective: {
                let mut acc = ObjectiveAccumulator::default();
                acc.add(&Metrics::new().with("kl", 0.5).with("rewards/chosen", 0.25));
                acc.finish()
            },
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
        acc.add(&Metrics::new().with("rewards/chosen", 1.0).with("kl", 0.0));
        acc.add(&Metrics::new().with("kl", 1.0));
        acc.add(&Metrics::new().with("rewards/chosen", 3.0).with("kl", 2.0));
        let m = acc.finish();
        assert_eq!(m.get("rewards/chosen"), Some(2.0));
        assert_eq!(m.get("kl"), Some(1.0));
        assert_eq!(m.get("rewards/rejected"), None);
    }
}
