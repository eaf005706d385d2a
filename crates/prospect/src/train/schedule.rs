//! The schedule of a run: which rows each step trains on ([`Schedule`]), and the learning rate.
//!
//! Learning-rate schedules, as `transformers`' `get_scheduler` defines them. `step` counts optimizer
//! steps from 0; the value returned is the learning rate *used* by that step.
//!
//! ```text
//! warmup (step < w):  lr · step / w
//! constant:           lr
//! linear:             lr · max(0, (total − step) / (total − w))
//! cosine:             lr · max(0, ½ (1 + cos(π · (step − w) / (total − w))))
//! ```

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::config::{LrScheduler, TrainConfig};

pub fn learning_rate(kind: LrScheduler, peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let factor = match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::Linear => ((total as f64 - step as f64) / span).max(0.0),
        LrScheduler::Cosine => {
            let progress = (step - warmup) as f64 / span;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    peak * factor
}

/// The row order of one epoch: file order, or a shuffle seeded by (`seed`, epoch).
pub fn epoch_order(n: usize, epoch: usize, shuffle: bool, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
    }
    order
}

/// Which rows each optimizer step and each microbatch uses: the epoch's order, cut into batches, each cut
/// into microbatches. The training loop and the reference pre-pass both read it.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Training examples.
    pub n: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub batch_size: usize,
    pub microbatch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
}

impl Schedule {
    pub fn new(config: &TrainConfig, n: usize) -> Self {
        let steps_per_epoch = n.div_ceil(config.batch_size);
        Schedule {
            n,
            steps_per_epoch,
            total_steps: config.max_steps.unwrap_or(config.epochs * steps_per_epoch),
            batch_size: config.batch_size,
            microbatch_size: config.microbatch_size,
            shuffle: config.shuffle,
            seed: config.seed,
        }
    }

    /// The rows of optimizer step `step` (0-based), in order.
    pub fn rows(&self, step: usize) -> Vec<usize> {
        let (epoch, k) = (step / self.steps_per_epoch, step % self.steps_per_epoch);
        let order = epoch_order(self.n, epoch, self.shuffle, self.seed);
        order[k * self.batch_size..((k + 1) * self.batch_size).min(self.n)].to_vec()
    }

    /// The microbatches of step `step`.
    pub fn microbatches(&self, step: usize) -> Vec<Vec<usize>> {
        self.rows(step).chunks(self.microbatch_size).map(<[usize]>::to_vec).collect()
    }

    /// Rows consumed by the end of `step`, in epochs (what `transformers` logs: 0.8 after 8 of 10 rows).
    pub fn epoch_at_end(&self, step: usize) -> f64 {
        let (epoch, k) = (step / self.steps_per_epoch, step % self.steps_per_epoch);
        epoch as f64 + ((k + 1) * self.batch_size).min(self.n) as f64 / self.n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_hand_values() {
        // total 10, warmup 2, peak 1: warmup gives 0, 0.5; linear then 8/8, 7/8, ...
        let lin: Vec<f64> = (0..10).map(|s| learning_rate(LrScheduler::Linear, 1.0, s, 10, 2)).collect();
        assert_eq!(lin[..4], [0.0, 0.5, 1.0, 0.875]);
        assert_eq!(lin[9], 0.125);
        // cosine at the midpoint of the decay (step 6 of 2..10) is 0.5; python: 0.5*(1+math.cos(math.pi*4/8))
        assert!((learning_rate(LrScheduler::Cosine, 1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(LrScheduler::Constant, 0.01, 7, 10, 0), 0.01);
    }
}
