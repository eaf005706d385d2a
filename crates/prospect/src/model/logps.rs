//! `sequence_logps`: the one place where logits become log-probabilities.
//!
//! Shapes: `b` batch, `t` time, `v` vocab.

use candle_core::{DType, Tensor, D};

use super::causal_lm::CausalLm;
use super::kernels;
use super::ops::log_softmax_last_dim;
use crate::error::{Error, Result};

/// Per-sequence completion log-probs.
pub struct SequenceLogps {
    /// `[b]` Σ log p(token) over each row's completion tokens.
    pub logps: Tensor,
    /// Completion tokens per row (the length of each sum).
    pub token_counts: Vec<usize>,
}

/// Sum the log-probs of completion tokens.
///
/// Position `t` of the logits predicts token `t + 1`, so logits `[:, :-1]` are scored against
/// `input_ids[:, 1:]`, masked by `completion_mask[:, 1:]`. The log-softmax runs in f32 whatever the
/// model's dtype.
///
/// - `logits`: `[b, t, v]`
/// - `input_ids`: `[b, t]` u32
/// - `completion_mask`: `[b, t]`, 1 on completion tokens and 0 on prompt and padding
///
/// This is the fast path: the fused [`token_logps`] kernel scores every position without building the
/// `[b, t, v]` log-probs (the last position is scored against a dummy token 0 and masked out, which
/// spares a copy of the logits). [`sequence_logps_composite`] is the same computation from candle
/// primitives, kept as its reference.
pub fn sequence_logps(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<SequenceLogps> {
    let (b, t, v) = check_shapes(logits, input_ids, completion_mask)?;
    let device = logits.device();
    let logits = logits.to_dtype(DType::F32)?.reshape((b * t, v))?; // [b*t, v]
    let pad_ids = Tensor::zeros((b, 1), DType::U32, device)?;
    let targets = Tensor::cat(&[&input_ids.narrow(1, 1, t - 1)?, &pad_ids], 1)?; // [b, t]
    let pad_mask = Tensor::zeros((b, 1), DType::F32, device)?;
    let mask = Tensor::cat(&[&completion_mask.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?, &pad_mask], 1)?; // [b, t]
    let token_logps = kernels::token_logps(&logits, &targets.flatten_all()?)?.reshape((b, t))?; // [b, t]
    let logps = (token_logps * &mask)?.sum(D::Minus1)?; // [b]
    let token_counts = mask.sum(D::Minus1)?.to_vec1::<f32>()?.into_iter().map(|c| c as usize).collect();
    Ok(SequenceLogps { logps, token_counts })
}

/// Per-token completion log-probs, for losses that work token by token (offline PPO).
///
/// Returns `([b, t-1] log p of token t+1 at position t, zero off the completion; [b, t-1] mask)`.
pub fn token_logps(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_b, t, _v) = check_shapes(logits, input_ids, completion_mask)?;
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?; // [b, t-1, v]
    let targets = input_ids.narrow(1, 1, t - 1)?.contiguous()?; // [b, t-1]
    let mask = completion_mask.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?; // [b, t-1]
    let logp = log_softmax_last_dim(&logits)?; // [b, t-1, v]
    let token_logps = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?; // [b, t-1]
    Ok(((token_logps * &mask)?, mask))
}

/// [`sequence_logps`] straight from a model, with the LM head applied only where it is needed: at the
/// positions whose next token is a completion token. Prompt and padding positions never become logits,
/// which spares their share of the LM head's matmul (a `[d, v]` product per position, about a fifth of
/// a SmolLM2 forward pass) forward and backward, and the `[b, t, v]` logits tensor.
///
/// Same value as `sequence_logps(&model.forward(input_ids)?, input_ids, completion_mask)` up to float
/// rounding (the per-row sums run in another order); `tests/model_parity.rs` checks both against
/// `transformers`.
pub fn completion_logps(model: &CausalLm, input_ids: &Tensor, completion_mask: &Tensor) -> Result<SequenceLogps> {
    let hidden = model.hidden_states(input_ids)?; // [b, t, d]
    completion_logps_of(model, &hidden, input_ids, completion_mask)
}

/// [`completion_logps`] from final hidden states `[b, t, d]` the model has already computed for
/// `input_ids` (e.g. by [`CausalLm::hidden_states_cached`], after a cached prefix).
pub fn completion_logps_of(
    model: &CausalLm,
    hidden: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<SequenceLogps> {
    let (b, t) = input_ids.dims2()?;
    if completion_mask.dims() != [b, t] {
        return Err(Error::Shape {
            name: "completion_mask".into(),
            expected: vec![b, t],
            got: completion_mask.dims().to_vec(),
        });
    }
    let device = input_ids.device();
    let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
    let mask: Vec<Vec<f32>> = completion_mask.to_dtype(DType::F32)?.to_vec2()?;
    // Position p of row r is scored against token p + 1 when that token is a completion token.
    let (mut positions, mut targets, mut rows, mut weights) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut token_counts = vec![0usize; b];
    for r in 0..b {
        for p in 0..t.saturating_sub(1) {
            if mask[r][p + 1] != 0.0 {
                positions.push((r * t + p) as u32);
                targets.push(ids[r][p + 1]);
                rows.push(r);
                weights.push(mask[r][p + 1]);
                token_counts[r] += 1;
            }
        }
    }
    let n = positions.len();
    if n == 0 {
        return Ok(SequenceLogps { logps: Tensor::zeros(b, DType::F32, device)?, token_counts });
    }
    let d = hidden.dim(2)?;
    let positions = Tensor::from_vec(positions, n, device)?;
    let picked = hidden.reshape((b * t, d))?.index_select(&positions, 0)?; // [n, d]
    let logits = model.logits(&picked)?.to_dtype(DType::F32)?; // [n, v]
    let token_logps = kernels::token_logps(&logits, &Tensor::from_vec(targets, n, device)?)?; // [n]
                                                                                              // Per-row sums as one small matmul: [b, n] (mask weight where token k belongs to row r) x [n, 1].
    let mut rows_of = vec![0f32; b * n];
    for (k, (&r, &w)) in rows.iter().zip(&weights).enumerate() {
        rows_of[r * n + k] = w;
    }
    let rows_of = Tensor::from_vec(rows_of, (b, n), device)?; // [b, n]
    let logps = rows_of.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?; // [b]
    Ok(SequenceLogps { logps, token_counts })
}

fn check_shapes(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, t, v) = logits.dims3()?;
    if input_ids.dims() != [b, t] || completion_mask.dims() != [b, t] {
        return Err(Error::Shape {
            name: "input_ids / completion_mask".into(),
            expected: vec![b, t],
            got: input_ids.dims().to_vec(),
        });
    }
    Ok((b, t, v))
}

/// [`sequence_logps`] from candle primitives: log-softmax over the vocabulary (`[b, t-1, v]`), then
/// gather. The reference the fused path is tested against.
pub fn sequence_logps_composite(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<SequenceLogps> {
    let (token_logps, mask) = token_logps(logits, input_ids, completion_mask)?; // [b, t-1] each
    let logps = token_logps.sum(D::Minus1)?; // [b]
    let token_counts = mask.sum(D::Minus1)?.to_vec1::<f32>()?.into_iter().map(|c| c as usize).collect();
    Ok(SequenceLogps { logps, token_counts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-scale, scale) from a tiny LCG.
    fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    #[test]
    fn fused_matches_composite_forward_and_backward() {
        // Random shapes, odd sizes included; logits scaled up to 8 so the softmax is far from uniform.
        for (case, &(b, t, v)) in [(1, 2, 3), (3, 7, 50), (2, 5, 1031), (4, 13, 97)].iter().enumerate() {
            let seed = case as u64 * 10;
            let logits = Var::from_vec(uniform(b * t * v, seed, 8.0), (b, t, v), &Device::Cpu).unwrap();
            let ids: Vec<u32> =
                uniform(b * t, seed + 1, 1.0).iter().map(|x| ((x + 1.0) / 2.0 * v as f32) as u32 % v as u32).collect();
            let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
            let mask: Vec<f32> = uniform(b * t, seed + 2, 1.0).iter().map(|&x| f32::from(x > -0.3)).collect();
            let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
            // A random weight per row, so that the backward sees distinct upstream gradients.
            let w = Tensor::from_vec(uniform(b, seed + 3, 1.0), b, &Device::Cpu).unwrap();

            let fused = sequence_logps(logits.as_tensor(), &ids, &mask).unwrap();
            let composite = sequence_logps_composite(logits.as_tensor(), &ids, &mask).unwrap();
            let fwd = max_rel_diff(&fused.logps, &composite.logps);
            assert!(fwd < 1e-5, "case {case} [{b}, {t}, {v}]: forward max relative difference {fwd}");
            assert_eq!(fused.token_counts, composite.token_counts);

            let g_fused = (fused.logps * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g_composite = (composite.logps * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (g_fused.get(logits.as_tensor()).unwrap(), g_composite.get(logits.as_tensor()).unwrap());
            let bwd = max_rel_diff(gf, gc);
            assert!(bwd < 1e-5, "case {case} [{b}, {t}, {v}]: backward max relative difference {bwd}");
        }
    }

    #[test]
    fn composite_gathers_shifted_completion_tokens_only() {
        let logits = Tensor::new(&[[[5f32, 1.], [0., 2.], [9., 9.]]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 0, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 0., 1.]], &Device::Cpu).unwrap();
        let v: Vec<f32> = sequence_logps_composite(&logits, &ids, &mask).unwrap().logps.to_vec1().unwrap();
        assert!((v[0] - (-0.12692805)).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn gathers_shifted_completion_tokens_only() {
        // One row, t = 3, v = 2. Logits at positions 0 and 1 score tokens 1 and 2.
        // mask = [0, 0, 1]: only the last token (id 1, scored by position 1) counts.
        // python: import math; 2 - math.log(math.exp(0)+math.exp(2))  (log-softmax of [0, 2] at index 1)
        let logits = Tensor::new(&[[[5f32, 1.], [0., 2.], [9., 9.]]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 0, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 0., 1.]], &Device::Cpu).unwrap();
        let out = sequence_logps(&logits, &ids, &mask).unwrap();
        let v: Vec<f32> = out.logps.to_vec1().unwrap();
        assert!((v[0] - (-0.12692805)).abs() < 1e-6, "{v:?}");
        assert_eq!(out.token_counts, vec![1]);
    }
}
