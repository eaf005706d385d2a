//! Learning-rate schedules, as `transformers`' `get_scheduler` defines them. `step` counts optimizer
//! steps from 0; the value returned is the learning rate *used* by that step.
//!
//! ```text
//! warmup (step < w):  lr · step / w
//! constant:           lr
//! linear:             lr · max(0, (total − step) / (total − w))
//! cosine:             lr · max(0, ½ (1 + cos(π · (step − w) / (total − w))))
//! ```

use crate::config::LrScheduler;

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
