//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p, applied
//! in that order as `transformers`' `generate` does.

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: no limit).
    pub top_p: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The candidate tokens and their renormalised probabilities after temperature, top-k and top-p,
/// most likely first.
pub fn candidates(logits: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f64)> {
    let t = cfg.temperature.max(1e-8);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if cfg.top_k > 0 {
        order.truncate(cfg.top_k);
    }
    let max = logits[order[0] as usize] as f64 / t;
    let weights: Vec<f64> = order.iter().map(|&i| (logits[i as usize] as f64 / t - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (&i, w) in order.iter().zip(&weights) {
        let p = w / total;
        kept.push((i, p));
        mass += p;
        if mass >= cfg.top_p {
            break; // the token that crosses p is kept, so at least one always is
        }
    }
    let kept_mass: f64 = kept.iter().map(|(_, p)| p).sum();
    kept.into_iter().map(|(i, p)| (i, p / kept_mass)).collect()
}

/// Pick the next token.
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut impl Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let cands = candidates(logits, cfg);
    let mut u: f64 = rng.gen::<f64>();
    for (i, p) in &cands {
        if u < *p {
            return *i;
        }
        u -= p;
    }
    cands.last().map(|(i, _)| *i).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_is_argmax_with_first_tie() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(sample(&[0.1, 3.0, -1.0], &SamplingConfig::default(), &mut rng), 1);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // logits ln([0.5, 0.3, 0.15, 0.05]): probabilities 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let cfg = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.7 };
        let c = candidates(&logits, &cfg);
        // 0.5 < 0.7, 0.5 + 0.3 = 0.8 >= 0.7: keep two, renormalised to 0.625 / 0.375.
        assert_eq!(c.len(), 2);
        assert!((c[0].1 - 0.625).abs() < 1e-6 && (c[1].1 - 0.375).abs() < 1e-6, "{c:?}");
        let top_k = candidates(&logits, &SamplingConfig { temperature: 1.0, top_k: 3, top_p: 1.0 });
        assert_eq!(top_k.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!((top_k[2].1 - 0.15 / 0.95).abs() < 1e-6);
    }

    #[test]
    fn temperature_sharpens_and_seed_reproduces() {
        // T = 0.5 squares the odds: [0.6, 0.4] -> [0.36, 0.16] / 0.52.
        let logits: Vec<f32> = [0.6f32, 0.4].iter().map(|p| p.ln()).collect();
        let c = candidates(&logits, &SamplingConfig { temperature: 0.5, top_k: 0, top_p: 1.0 });
        assert!((c[0].1 - 0.36 / 0.52).abs() < 1e-6);
        let cfg = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let draw = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..200).map(|_| sample(&logits, &cfg, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let zeros = draw(7).iter().filter(|&&t| t == 0).count();
        assert!((90..150).contains(&zeros), "{zeros} of 200 draws at p = 0.6");
    }
}
