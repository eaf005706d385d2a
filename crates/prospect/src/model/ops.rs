//! Differentiable building blocks for the training path.
//!
//! candle 0.11's fused `rms_norm`, `softmax_last_dim` and `rope` kernels have no backward pass: a model
//! built on them computes the right loss while its gradients silently stop (candle issue #2168). Every
//! op here is composed from primitives that do have a backward pass, and
//! `tests::every_op_passes_gradient` checks it.
//!
//! Shapes: `b` batch, `t` time, `h` heads, `k` key/value positions, `e` head dim, `d` model width.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// RMSNorm as Llama defines it: `w * x / sqrt(mean(x^2) + eps)`, computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?; // [b, t, d]
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [b, t, 1]
    let normed = x.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// LayerNorm with a bias, as `torch.nn.LayerNorm` computes it (biased variance):
/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension, in f32. Composed of ops with a backward
/// pass (the mean is not detached: LayerNorm's gradient goes through it).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?; // [..., d]
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?; // [..., d]
    let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [..., 1]
    let normed = centred.broadcast_mul(&inv_std)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Softmax over the last dimension. The max is subtracted for stability and detached: the result
/// does not depend on it, so no gradient needs to flow through it.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension, same stabilisation as [`softmax_last_dim`].
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// Rotary-embedding tables `cos`, `sin`, each `[t, e]`, for positions `0..t`.
///
/// Computed in f32 the way `transformers` does (`inv_freq = 1 / theta^(2i/e)`, `freqs = pos * inv_freq`,
/// `emb = cat(freqs, freqs)`), so that angles round identically.
pub fn rope_tables(seq_len: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> =
        (0..half).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(seq_len * head_dim);
    let mut sin = Vec::with_capacity(seq_len * head_dim);
    for pos in 0..seq_len {
        // `emb = cat(freqs, freqs)`: the same angles fill both halves.
        for _half in 0..2 {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (seq_len, head_dim), device)?; // [t, e]
    let sin = Tensor::from_vec(sin, (seq_len, head_dim), device)?; // [t, e]
    Ok((cos, sin))
}

/// Apply rotary embeddings in the "rotate half" layout Hugging Face Llama uses:
/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
/// `x` is `[b, h, t, e]`, `cos`/`sin` are `[t, e]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // [b, h, t, e]
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Additive causal mask `[t, t]`: 0 where key <= query, -inf above the diagonal.
pub fn causal_mask(seq_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq_len).flat_map(|q| (0..seq_len).map(move |k| if k <= q { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)?)
}

/// Repeat each K/V head `n_rep` times so grouped-query attention can use a plain matmul:
/// `[b, h_kv, t, e] -> [b, h_kv * n_rep, t, e]`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h_kv, t, e) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, h_kv, n_rep, t, e))?.contiguous()?.reshape((b, h_kv * n_rep, t, e))?)
}

/// `a · b` (candle's broadcasting matmul) with both operands rounded to `compute` for the product, which
/// comes back in `a`'s dtype: bf16 mixed precision, as `torch.autocast` runs a matmul. With `compute`
/// equal to `a`'s dtype it is the plain product. Differentiable: the casts pass gradients through, so an
/// f32 master weight gets an f32 gradient.
pub fn matmul_in(a: &Tensor, b: &Tensor, compute: DType) -> Result<Tensor> {
    if a.dtype() == compute && b.dtype() == compute {
        return Ok(a.broadcast_matmul(b)?);
    }
    Ok(a.to_dtype(compute)?.broadcast_matmul(&b.to_dtype(compute)?)?.to_dtype(a.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values in [-1, 1) from a tiny LCG, so tests need no RNG crate.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_matches_hand_value() {
        // x = [1, 2, 3, 4], mean(x^2) = 7.5, w = [1, 1, 2, 0.5], eps = 0
        // python: [w*v/math.sqrt(7.5) for v,w in zip([1,2,3,4],[1,1,2,.5])]
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 1., 2., 0.5], &Device::Cpu).unwrap();
        let y: Vec<f32> = rms_norm(&x, &w, 0.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = [0.36514837, 0.73029674, 2.1908903, 0.73029674];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn softmax_and_log_softmax_agree_with_definition() {
        // python: import math; e=[math.exp(v) for v in (1,2,3)]; [v/sum(e) for v in e]
        let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
        let p: Vec<f32> = softmax_last_dim(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = [0.09003057, 0.24472847, 0.66524096];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        let lp: Vec<f32> = log_softmax_last_dim(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in lp.iter().zip(want) {
            assert!((a - b.ln()).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        // At position 0 rope is the identity; at any position it preserves each (x_i, x_{i+e/2}) pair's norm.
        let (cos, sin) = rope_tables(5, 4, 10_000.0, &Device::Cpu).unwrap();
        let x = randn(&[1, 1, 5, 4], 3);
        let y = apply_rope(&x, &cos, &sin).unwrap();
        let xv: Vec<Vec<f32>> = x.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let yv: Vec<Vec<f32>> = y.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(xv[0], yv[0]);
        for (xr, yr) in xv.iter().zip(&yv) {
            for i in 0..2 {
                let nx = xr[i].hypot(xr[i + 2]);
                let ny = yr[i].hypot(yr[i + 2]);
                assert!((nx - ny).abs() < 1e-5);
            }
        }
        // position 1, first pair rotates by exactly 1 radian: y0 = x0 cos1 - x2 sin1
        let want = xv[1][0] * 1f32.cos() - xv[1][2] * 1f32.sin();
        assert!((yv[1][0] - want).abs() < 1e-6);
    }

    #[test]
    fn every_op_passes_gradient() {
        // Chain every op and check that each input receives a non-zero gradient. With candle's fused
        // kernels in their place, `x` and `w` would get no gradient at all.
        let x = Var::from_tensor(&randn(&[2, 3, 8], 1)).unwrap();
        let w = Var::from_tensor(&(randn(&[8], 2) + 1.0).unwrap()).unwrap();
        let h = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let q = h.reshape((2, 3, 2, 4)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap(); // [b, h, t, e]
        let (cos, sin) = rope_tables(3, 4, 10_000.0, &Device::Cpu).unwrap();
        let q = apply_rope(&q, &cos, &sin).unwrap();
        let k = repeat_kv(&q.narrow(1, 0, 1).unwrap(), 2).unwrap();
        let att = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .broadcast_add(&causal_mask(3, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let p = softmax_last_dim(&att).unwrap();
        let out = log_softmax_last_dim(&p.matmul(&q).unwrap()).unwrap();
        // A random projection of the output: sums of squares of normalised values would be
        // scale-invariant and give a genuinely zero gradient for `x`.
        let r = randn(out.dims(), 4);
        let loss = (out * r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in [("x", &x), ("w", &w)] {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 1e-8, "zero gradient for {name}");
        }
    }

    #[test]
    fn causal_mask_blocks_the_future() {
        let m: Vec<Vec<f32>> = causal_mask(3, DType::F32, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(m[0][0], 0.0);
        assert_eq!(m[0][1], f32::NEG_INFINITY);
        assert_eq!(m[2][1], 0.0);
    }

    #[test]
    fn matmul_in_bf16_rounds_the_operands_and_returns_f32_with_an_f32_gradient() {
        // 1 + 2⁻⁹ is below half of bf16's spacing at 1 (2⁻⁷), so it rounds to 1: in bf16 the product with 3
        // is exactly 3; in f32 it is 3·(1 + 2⁻⁹) = 3.005859375 (python: 3 * (1 + 2**-9)).
        let a = Var::new(&[[1.0f32 + 2f32.powi(-9)]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[3.0f32]], &Device::Cpu).unwrap();
        let full = matmul_in(a.as_tensor(), &b, DType::F32).unwrap();
        assert_eq!(full.to_vec2::<f32>().unwrap(), [[3.0 * (1.0 + 2f32.powi(-9))]]);
        let mixed = matmul_in(a.as_tensor(), &b, DType::BF16).unwrap();
        assert_eq!(mixed.dtype(), DType::F32);
        assert_eq!(mixed.to_vec2::<f32>().unwrap(), [[3.0]]);
        // ∂(a·b)/∂a = b = 3, in a's dtype (the master weight's gradient is f32).
        let grads = mixed.sum_all().unwrap().backward().unwrap();
        let g = grads.get(a.as_tensor()).unwrap();
        assert_eq!((g.dtype(), g.to_vec2::<f32>().unwrap()), (DType::F32, vec![vec![3.0]]));
    }
}
