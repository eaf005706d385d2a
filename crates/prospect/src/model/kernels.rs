//! Fused CPU kernels with hand-written backward passes, for the hot spots the profile in
//! `docs/BENCHMARKS.md` shows. Each has a composite reference in [`super::ops`] or [`super::logps`]
//! built from candle primitives, and a test comparing the two, forward and backward, on random shapes.
//!
//! Written in the style of llm.c's `train_gpt2.c`: one forward loop and one backward loop per op, rows
//! spread over threads with rayon. f32, contiguous inputs.
//!
//! On a GPU (the `cuda` feature) each op's `cuda_fwd` runs its CUDA kernel, from `kernels_cuda.rs`; the
//! backward ops are custom ops too, so both passes run there. The one fused product with a frozen weight
//! ([`swiglu_down_frozen`]) has no CUDA kernel and runs its parts there. docs/CUDA.md lists each op.
//!
//! Shapes: `n` rows (batch × time), `v` vocab.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 slice behind a storage and layout, or an error naming the op.
fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn u32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::token_logps(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
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

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::token_logps_backward((s1, l1), (s2, l2), (s3, l3))
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

/// RMSNorm over the last dimension: `y = w · x / sqrt(mean(x²) + ε)`, `x` `[n, d]`, `w` `[d]`.
///
/// The forward pass keeps no intermediate (the composite form in [`super::ops::rms_norm`] keeps six
/// `[n, d]` tensors per norm alive until the backward pass). Backward, with `r = 1/sqrt(mean(x²) + ε)`:
/// `dw = Σ_rows dy · x · r`, `dx = r · w · dy − x · r³ / d · Σ_j (w_j dy_j x_j)`.
struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x²) + ε)` of one row, in the composite's order of operations.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::rms_norm(s1, l1, s2, l2, self.eps)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count();
        let x = f32_slice(self.name(), s1, l1)?; // [n, d]
        let w = f32_slice(self.name(), s2, l2)?; // [d]
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = (x * r) * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: a gradient built from tracked tensors would carry their graph, and with it every
        // activation of the forward pass, for as long as the gradient lives.
        let (x, dy) = (x.detach(), dy.detach().contiguous()?);
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBackward { eps: self.eps })?; // [n, d]
                                                                                  // dw is a reduction over rows: composite, and transient (only during the backward pass).
        let r = (x.sqr()?.mean_keepdim(1)? + self.eps as f64)?.sqrt()?.recip()?; // [n, 1]
        let dw = (dy * x.broadcast_mul(&r)?)?.sum(0)?; // [d]
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx` of [`RmsNorm`], from `x`, `w` and `dy`.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::rms_norm_backward((s1, l1), (s2, l2), (s3, l3), self.eps)
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
        let d = l2.shape().elem_count();
        let x = f32_slice(self.name(), s1, l1)?; // [n, d]
        let w = f32_slice(self.name(), s2, l2)?; // [d]
        let dy = f32_slice(self.name(), s3, l3)?; // [n, d]
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(dx, (x, dy))| {
            let r = inv_rms(x, self.eps);
            let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| w * dy * x).sum();
            let c = r * r * r * dot / d as f32;
            for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                *dx = r * w * dy - c * x;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Fused RMSNorm of `x` `[..., d]` with weight `w` `[d]`, computed in f32 (like the composite); see
/// [`RmsNorm`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = w.dims1()?;
    if x.dim(candle_core::D::Minus1)? != d {
        candle_core::bail!("rms_norm: x is {:?}, weight is [{d}]", x.dims());
    }
    let (dims, dtype) = (x.dims().to_vec(), x.dtype());
    let x2 = x.to_dtype(DType::F32)?.contiguous()?.reshape(((), d))?; // [n, d]
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    x2.apply_op2(&w, RmsNorm { eps: eps as f32 })?.reshape(dims)?.to_dtype(dtype)
}

/// Causal attention probabilities from raw scores: `softmax(scale · s + causal mask)` over the last
/// dimension of `s` `[..., t, t]` (query `q` sees keys `0..=q`; row `i` is query `i mod t`). Fuses the composite's scale, mask,
/// max, exp, sum and divide (five `[b, h, t, t]` tensors kept for the backward pass) into one output.
/// Backward: `ds = scale · y · (dy − Σ_k dy_k y_k)` (masked entries have `y = 0`, so no gradient).
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::causal_softmax(s, l, self.scale)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let t = dims[dims.len() - 1];
        let x = f32_slice(self.name(), s, l)?; // [m, t, t] flattened rows of t
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(row, (y, x))| {
            let q = row % t; // query position: keys 0..=q are visible
            let visible = &x[..=q];
            let max = visible.iter().map(|&v| v * self.scale).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &v) in y[..=q].iter_mut().zip(visible) {
                *y = (v * self.scale - max).exp();
                sum += *y;
            }
            for y in &mut y[..=q] {
                *y /= sum;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&dy, &SoftmaxBackward { scale: self.scale })?))
    }
}

/// `scale · y · (dy − Σ dy·y)` per row, from the softmax output `y` and its gradient `dy`.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::softmax_backward(s1, l1, s2, l2, self.scale)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let t = dims[dims.len() - 1];
        let y = f32_slice(self.name(), s1, l1)?;
        let dy = f32_slice(self.name(), s2, l2)?;
        let mut ds = vec![0f32; y.len()];
        ds.par_chunks_mut(t).zip(y.par_chunks(t).zip(dy.par_chunks(t))).for_each(|(ds, (y, dy))| {
            let dot: f32 = y.iter().zip(dy).map(|(y, dy)| y * dy).sum();
            for ((ds, &y), &dy) in ds.iter_mut().zip(y).zip(dy) {
                *ds = self.scale * y * (dy - dot);
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

/// Fused causal softmax of raw attention scores `s` `[..., t, t]` (f32) scaled by `scale`; see
/// [`CausalSoftmax`].
/// The rows may also be `[..., r*t, t]`: `r` blocks of `t` queries each (grouped-query attention).
pub fn causal_softmax(s: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dims = s.dims();
    if dims.len() < 2 || dims[dims.len() - 1] == 0 || !dims[dims.len() - 2].is_multiple_of(dims[dims.len() - 1]) {
        candle_core::bail!("causal_softmax: scores must be [..., r*t, t], got {dims:?}");
    }
    s.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

/// Rotary embeddings in Hugging Face's "rotate half" layout: with `x = [x1, x2]` split at `e/2`,
/// `y1 = x1·cos − x2·sin`, `y2 = x2·cos + x1·sin` (`cos`/`sin` are `[t, e]`, both halves equal).
/// The backward pass is the inverse rotation: `dx1 = dy1·cos + dy2·sin`, `dx2 = dy2·cos − dy1·sin`.
/// The composite form ([`super::ops::apply_rope`]) keeps four `[b, h, t, e]` intermediates per call.
struct Rope {
    /// Rotate by −angle (the backward pass).
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::rope((s1, l1), (s2, l2), (s3, l3), self.inverse)
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
        let (t, e) = l2.shape().dims2()?;
        // `x` may be strided (the attention passes `[b, t, h, e]` transposed to `[b, h, t, e]`, a view):
        // reading through its strides spares a contiguous copy that the graph would keep alive.
        let (_, h, _, _) = l1.shape().dims4()?;
        let (st, off) = (l1.stride(), l1.start_offset());
        let xs = s1.as_slice::<f32>()?;
        let cos = f32_slice(self.name(), s2, l2)?; // [t, e]
        let sin = f32_slice(self.name(), s3, l3)?; // [t, e]
        let half = e / 2;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut y = vec![0f32; l1.shape().elem_count()]; // [b, h, t, e], contiguous
        y.par_chunks_mut(e).enumerate().for_each(|(row, y)| {
            let (pos, head, batch) = (row % t, (row / t) % h, row / (t * h));
            let base = off + batch * st[0] + head * st[1] + pos * st[2];
            let x = |i: usize| xs[base + i * st[3]];
            let (c, s) = (&cos[pos * e..(pos + 1) * e], &sin[pos * e..(pos + 1) * e]);
            for i in 0..half {
                let (x1, x2) = (x(i), x(i + half));
                y[i] = x1 * c[i] - sign * x2 * s[i];
                y[i + half] = x2 * c[i + half] + sign * x1 * s[i + half];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.detach().contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

/// Fused rotary embeddings: `x` `[b, h, t, e]` (any strides), `cos`/`sin` `[t, e]` (f32); the result is
/// contiguous. See [`Rope`].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, e) = x.dims4()?;
    if cos.dims() != [t, e] || sin.dims() != [t, e] || e % 2 != 0 {
        candle_core::bail!(
            "apply_rope: x {:?} needs cos/sin [{t}, {e}] and an even head dim, got {:?}",
            x.dims(),
            cos.dims()
        );
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?; // any strides
    let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
    x.apply_op3(&cos, &sin, Rope { inverse: false })?.to_dtype(dtype)
}

/// SwiGLU's gate: `silu(g) · u = g · σ(g) · u`, without keeping `silu(g)` for the backward pass.
/// Backward: `du = dy · silu(g)`, `dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))`.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::swiglu(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(self.name(), s1, l1)?;
        let u = f32_slice(self.name(), s2, l2)?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g / (1.0 + (-g).exp()) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (g.detach(), u.detach(), dy.detach().contiguous()?);
        let dgu = g.apply_op3_no_bwd(&u, &dy, &SwiGluBackward)?; // [n, 2f]: dg then du, per row of f
        let f = g.dim(candle_core::D::Minus1)?;
        let dg = dgu.narrow(candle_core::D::Minus1, 0, f)?.contiguous()?;
        let du = dgu.narrow(candle_core::D::Minus1, f, f)?.contiguous()?;
        Ok((Some(dg), Some(du)))
    }
}

/// Both gradients of [`SwiGlu`] in one pass, side by side in the last dimension: `[..., 2f]`.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::kernels_cuda::swiglu_backward((s1, l1), (s2, l2), (s3, l3))
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
        let dims = l1.shape().dims();
        let f = dims[dims.len() - 1];
        let g = f32_slice(self.name(), s1, l1)?;
        let u = f32_slice(self.name(), s2, l2)?;
        let dy = f32_slice(self.name(), s3, l3)?;
        let mut out = vec![0f32; 2 * g.len()];
        out.par_chunks_mut(2 * f).zip(g.par_chunks(f).zip(u.par_chunks(f).zip(dy.par_chunks(f)))).for_each(
            |(out, (g, (u, dy)))| {
                let (dg, du) = out.split_at_mut(f);
                for i in 0..f {
                    let sig = 1.0 / (1.0 + (-g[i]).exp());
                    du[i] = dy[i] * g[i] * sig;
                    dg[i] = dy[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
                }
            },
        );
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("dims has at least one entry") = 2 * f;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `swiglu(g, u) Wᵀ` for a frozen down projection `w` `[d, f]`: the `[.., f]` product `swiglu(g, u)` is made
/// in the forward pass and dropped, not kept for the backward pass, which needs only `g`, `u` and `W`
/// (`dh = dy W`, then [`SwiGluBackward`]). With LoRA on the attention only, this spares one `[b, t, f]`
/// activation per layer.
struct SwiGluDown {
    w: Tensor,
}

impl CustomOp2 for SwiGluDown {
    fn name(&self) -> &'static str {
        "swiglu-down"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, _) = SwiGlu.cpu_fwd(s1, l1, s2, l2)?;
        super::lora::matmul_wt(&h, &Layout::contiguous(l1.shape()), &self.w)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dh = dy.broadcast_matmul(&super::lora::dense_weight(&self.w, dy.dtype())?)?; // [.., f]
        SwiGlu.bwd(g, u, _res, &dh)
    }
}

/// `swiglu(gate, up) · wᵀ` with `w` frozen (f32 activations, `w` in any dtype); see [`SwiGluDown`].
pub fn swiglu_down_frozen(gate: &Tensor, up: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        candle_core::bail!("swiglu-down: gate {:?} and up {:?} must be f32 of one shape", gate.dims(), up.dims());
    }
    if !gate.device().is_cpu() {
        // Fused with the product on the CPU only: on a GPU, the gate, then the frozen product.
        return super::lora::frozen_matmul(&swiglu(gate, up)?, w).map_err(candle_core::Error::wrap);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGluDown { w: w.detach() })
}

/// Fused `silu(gate) · up` (f32, same shapes); see [`SwiGlu`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gate.dims(), up.dims());
    }
    let dtype = gate.dtype();
    let (g, u) = (gate.to_dtype(DType::F32)?.contiguous()?, up.to_dtype(DType::F32)?.contiguous()?);
    g.apply_op2(&u, SwiGlu)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The composite references are Prospect's own `model::ops` (candle primitives, each with a backward
    // pass: `ops::tests::every_op_passes_gradient`), not candle's fused `candle_nn::ops`.
    use crate::model::ops as composite_ops;
    use candle_core::{Device, Var, D};

    fn uniform(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Largest |a − b| relative to the largest |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30);
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
    }

    #[test]
    fn rms_norm_matches_composite_forward_and_backward() {
        for (case, shape) in [vec![1, 1, 3], vec![2, 7, 13], vec![3, 5, 64], vec![4, 31, 576]].into_iter().enumerate() {
            let d = shape[2];
            let x = Var::from_tensor(&uniform(&shape, case as u64, 3.0)).unwrap();
            let w = Var::from_tensor(&(uniform(&[d], 100 + case as u64, 1.0) + 1.0).unwrap()).unwrap();
            let r = uniform(&shape, 200 + case as u64, 1.0); // random upstream gradient
            let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            let composite = composite_ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            assert!(rel(&fused, &composite) < 1e-5, "case {case}: forward {}", rel(&fused, &composite));
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composite * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w)] {
                let e = rel(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(e < 1e-5, "case {case}: d{name} differs by {e}");
            }
        }
    }

    #[test]
    fn rope_matches_composite_forward_and_backward() {
        for (case, shape) in
            [vec![1, 1, 1, 2], vec![2, 3, 5, 8], vec![1, 9, 17, 64], vec![3, 2, 31, 6]].into_iter().enumerate()
        {
            let (t, e) = (shape[2], shape[3]);
            let (cos, sin) = composite_ops::rope_tables(t, e, 10_000.0, &Device::Cpu).unwrap();
            let x = Var::from_tensor(&uniform(&shape, case as u64, 2.0)).unwrap();
            let r = uniform(&shape, 400 + case as u64, 1.0);
            let fused = apply_rope(x.as_tensor(), &cos, &sin).unwrap();
            let composite = composite_ops::apply_rope(x.as_tensor(), &cos, &sin).unwrap();
            // The same values through a transposed view ([b, t, h, e] seen as [b, h, t, e]), as the model passes them.
            let strided = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
            assert!(!strided.is_contiguous() || shape[1] == 1 || shape[2] == 1);
            let fused_strided = apply_rope(&strided, &cos, &sin).unwrap();
            assert!(rel(&fused_strided, &composite) < 1e-5, "case {case}: strided forward");
            assert!(rel(&fused, &composite) < 1e-5, "case {case}: forward {}", rel(&fused, &composite));
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composite * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
            assert!(e < 1e-5, "case {case}: backward differs by {e}");
        }
    }

    #[test]
    fn swiglu_matches_composite_forward_and_backward() {
        for (case, shape) in [vec![1, 1, 1], vec![2, 7, 13], vec![4, 33, 1536]].into_iter().enumerate() {
            let g = Var::from_tensor(&uniform(&shape, case as u64, 6.0)).unwrap();
            let u = Var::from_tensor(&uniform(&shape, 50 + case as u64, 2.0)).unwrap();
            let r = uniform(&shape, 500 + case as u64, 1.0);
            let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let composite = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
            assert!(rel(&fused, &composite) < 1e-5, "case {case}: forward {}", rel(&fused, &composite));
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composite * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("gate", &g), ("up", &u)] {
                let e = rel(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(e < 1e-5, "case {case}: d{name} differs by {e}");
            }
        }
    }

    #[test]
    fn swiglu_down_frozen_equals_swiglu_then_the_product() {
        let (g, u) = (
            Var::from_tensor(&uniform(&[2, 3, 8], 1, 2.0)).unwrap(),
            Var::from_tensor(&uniform(&[2, 3, 8], 2, 2.0)).unwrap(),
        );
        let w = uniform(&[5, 8], 3, 1.0);
        let fused = swiglu_down_frozen(g.as_tensor(), u.as_tensor(), &w).unwrap();
        let plain = swiglu(g.as_tensor(), u.as_tensor()).unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(rel(&fused, &plain), 0.0);
        let (gf, gp) = (
            fused.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
            plain.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
        );
        for v in [&g, &u] {
            assert!(rel(gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn causal_softmax_matches_composite_forward_and_backward() {
        for (case, shape) in
            [vec![1, 1, 1, 1], vec![2, 3, 5, 5], vec![1, 9, 17, 17], vec![4, 2, 64, 64]].into_iter().enumerate()
        {
            let t = shape[3];
            let scale = 0.125;
            let s = Var::from_tensor(&uniform(&shape, case as u64, 6.0)).unwrap();
            let r = uniform(&shape, 300 + case as u64, 1.0);
            let fused = causal_softmax(s.as_tensor(), scale).unwrap();
            let mask = composite_ops::causal_mask(t, DType::F32, &Device::Cpu).unwrap();
            let composite =
                composite_ops::softmax_last_dim(&(s.as_tensor() * scale).unwrap().broadcast_add(&mask).unwrap())
                    .unwrap();
            assert!(rel(&fused, &composite) < 1e-5, "case {case}: forward {}", rel(&fused, &composite));
            let sums: Vec<f32> = fused.sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composite * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel(gf.get(s.as_tensor()).unwrap(), gc.get(s.as_tensor()).unwrap());
            assert!(e < 1e-5, "case {case}: backward differs by {e}");
        }
    }
}
