//! Fused CPU kernels with hand-written backward passes, for the hot spots the profile in
//! `docs/BENCHMARKS.md` shows. Each has a composite reference in [`super::ops`] or [`super::logps`]
//! built from candle primitives, and a test comparing the two, forward and backward, on random shapes.
//!
//! Written in the style of llm.c's `train_gpt2.c`: one forward loop and one backward loop per op, rows
//! spread over threads with rayon. f32, contiguous inputs, CPU only; anything else is an error, not a
//! silent fallback.
//!
//! Shapes: `n` rows (batch × time), `v` vocab.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 slice behind a storage and layout, or an error naming the op.
fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn u32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<u32>()?[start..end])
}

/// `(max, Σ exp(x − max))` of one row: log-sum-exp = `max + ln(sum)`.
fn max_and_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = row.iter().map(|&x| (x - max).exp()).sum::<f32>();
    (max, sum)
}

/// `log_softmax(logits)[target]` per row, without materialising the `[n, v]` log-probs.
///
/// Forward: `logp_i = x_i[t_i] − max_i − ln Σ_j exp(x_ij − max_i)`.
/// Backward: `∂logp_i/∂x_ij = 1[j = t_i] − softmax(x_i)_j`, recomputed from the logits (one `[n, v]`
/// gradient, nothing saved between the passes).
struct TokenLogps;

impl CustomOp2 for TokenLogps {
    fn name(&self) -> &'static str {
        "token-logps"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let logits = f32_slice(self.name(), s1, l1)?; // [n, v]
        let targets = u32_slice(self.name(), s2, l2)?; // [n]
        let out: Vec<f32> = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let (max, sum) = max_and_sum_exp(row);
                row[t as usize] - max - sum.ln()
            })
            .collect(); // [n]
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_res = grad_res.contiguous()?;
        let grad_logits = logits.apply_op3_no_bwd(targets, &grad_res, &TokenLogpsBackward)?; // [n, v]
        Ok((Some(grad_logits), None))
    }
}

/// The backward of [`TokenLogps`]: `g_i · (1[j = t_i] − softmax(x_i)_j)`.
struct TokenLogpsBackward;

impl CustomOp3 for TokenLogpsBackward {
    fn name(&self) -> &'static str {
        "token-logps-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let logits = f32_slice(self.name(), s1, l1)?; // [n, v]
        let targets = u32_slice(self.name(), s2, l2)?; // [n]
        let grad = f32_slice(self.name(), s3, l3)?; // [n]
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).enumerate().for_each(|(i, dx)| {
            let g = grad[i];
            if g == 0.0 {
                return; // masked positions (prompt, padding) contribute nothing
            }
            let row = &logits[i * v..(i + 1) * v];
            let (max, sum) = max_and_sum_exp(row);
            let scale = -g / sum;
            for (d, &x) in dx.iter_mut().zip(row) {
                *d = scale * (x - max).exp();
            }
            dx[targets[i] as usize] += g;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

/// `log_softmax(logits, -1)` gathered at `targets`, fused: `logits` `[n, v]` f32, `targets` `[n]` u32,
/// result `[n]` f32. Differentiable with respect to `logits`.
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        candle_core::bail!("token_logps: targets must be [{n}], got {:?}", targets.dims());
    }
    if let Some(bad) = targets.to_vec1::<u32>()?.into_iter().find(|&t| t as usize >= v) {
        candle_core::bail!("token_logps: target id {bad} is outside the vocabulary of {v}");
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, TokenLogps)
}
