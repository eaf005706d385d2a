//! The CUDA side of [`super::kernels`] (the `cuda` feature): the fused ops' forward and backward
//! kernels, in `kernels.cu`, compiled once per process with NVRTC for the GPU at hand and loaded through
//! candle's module cache. Each function here is one op's `cuda_fwd`: contiguous f32 (and u32 target)
//! inputs in, a new contiguous f32 output out, the same formula as the CPU loop.
//!
//! `tests/cuda_kernels.rs` compares every kernel, forward and backward, with the CPU kernel on the GPU
//! machine; `nvrtc_compiles_every_kernel` below needs only NVRTC.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape};

const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "prospect_kernels";
/// Threads per block of the row kernels (`BLOCK` in kernels.cu).
const BLOCK: u32 = 256;

/// `kernels.cu` as PTX, compiled on first use.
pub fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        let opts = CompileOptions { name: Some("kernels.cu".into()), ..Default::default() };
        compile_ptx_with_opts(SOURCE, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    });
    compiled.as_deref().map_err(|e| candle_core::Error::Msg(format!("NVRTC could not compile kernels.cu: {e}")))
}

/// The contiguous part of a storage a layout covers.
fn view<'a, T: CudaDType>(op: &str, s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn rows(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn elements(count: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(count as u32)
}

fn output(
    dev: &CudaDevice,
    len: usize,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>> {
    // SAFETY: every element is written by the kernel that receives it.
    unsafe { dev.alloc::<f32>(len) }
}

fn done(
    dev: &CudaDevice,
    out: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    shape: Shape,
) -> (CudaStorage, Shape) {
    (CudaStorage::wrap_cuda_slice(out, dev.clone()), shape)
}

/// `[n, v]` logits and `[n]` targets → `[n]` log-probs.
pub fn token_logps(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, v) = l1.shape().dims2()?;
    let dev = s1.device();
    let (logits, targets) = (view::<f32>("token-logps", s1, l1)?, view::<u32>("token-logps", s2, l2)?);
    let out = output(dev, n)?;
    let v = v as i32;
    let func = dev.get_or_load_custom_func("token_logps", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&logits).arg(&targets).arg(&out).arg(&v);
    // SAFETY: the argument list matches the kernel's signature; sizes are checked above.
    unsafe { b.launch(rows(n)) }.w()?;
    Ok(done(dev, out, Shape::from(n)))
}

/// Logits `[n, v]`, targets `[n]`, upstream gradient `[n]` → `[n, v]`.
pub fn token_logps_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, v) = l1.shape().dims2()?;
    let dev = s1.device();
    let op = "token-logps-backward";
    let (logits, targets, grad) = (view::<f32>(op, s1, l1)?, view::<u32>(op, s2, l2)?, view::<f32>(op, s3, l3)?);
    let out = output(dev, n * v)?;
    let vi = v as i32;
    let func = dev.get_or_load_custom_func("token_logps_backward", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&logits).arg(&targets).arg(&grad).arg(&out).arg(&vi);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(rows(n)) }.w()?;
    Ok(done(dev, out, Shape::from((n, v))))
}

/// `x` `[n, d]`, `w` `[d]` → `[n, d]`.
pub fn rms_norm(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    eps: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let d = l2.shape().elem_count();
    let n = l1.shape().elem_count() / d.max(1);
    let dev = s1.device();
    let (x, w) = (view::<f32>("rms-norm", s1, l1)?, view::<f32>("rms-norm", s2, l2)?);
    let out = output(dev, n * d)?;
    let di = d as i32;
    let func = dev.get_or_load_custom_func("rms_norm", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&x).arg(&w).arg(&out).arg(&di).arg(&eps);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(rows(n)) }.w()?;
    Ok(done(dev, out, l1.shape().clone()))
}

/// `x` `[n, d]`, `w` `[d]`, `dy` `[n, d]` → `dx` `[n, d]`.
pub fn rms_norm_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let d = l2.shape().elem_count();
    let n = l1.shape().elem_count() / d.max(1);
    let dev = s1.device();
    let op = "rms-norm-backward";
    let (x, w, dy) = (view::<f32>(op, s1, l1)?, view::<f32>(op, s2, l2)?, view::<f32>(op, s3, l3)?);
    let out = output(dev, n * d)?;
    let di = d as i32;
    let func = dev.get_or_load_custom_func("rms_norm_backward", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&x).arg(&w).arg(&dy).arg(&out).arg(&di).arg(&eps);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(rows(n)) }.w()?;
    Ok(done(dev, out, l1.shape().clone()))
}

/// Scores `[..., r*t, t]` → causal softmax probabilities, same shape.
pub fn causal_softmax(s: &CudaStorage, l: &Layout, scale: f32) -> candle_core::Result<(CudaStorage, Shape)> {
    let t = l.shape().dims().last().copied().unwrap_or(1);
    let count = l.shape().elem_count();
    let dev = s.device();
    let x = view::<f32>("causal-softmax", s, l)?;
    let out = output(dev, count)?;
    let ti = t as i32;
    let func = dev.get_or_load_custom_func("causal_softmax", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&x).arg(&out).arg(&ti).arg(&scale);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(rows(count / t.max(1))) }.w()?;
    Ok(done(dev, out, l.shape().clone()))
}

/// Softmax output `y` and its gradient `dy` (same shape, rows of `t`) → the scores' gradient.
pub fn softmax_backward(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    scale: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let t = l1.shape().dims().last().copied().unwrap_or(1);
    let count = l1.shape().elem_count();
    let dev = s1.device();
    let (y, dy) = (view::<f32>("softmax-backward", s1, l1)?, view::<f32>("softmax-backward", s2, l2)?);
    let out = output(dev, count)?;
    let ti = t as i32;
    let func = dev.get_or_load_custom_func("softmax_backward", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&y).arg(&dy).arg(&out).arg(&ti).arg(&scale);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(rows(count / t.max(1))) }.w()?;
    Ok(done(dev, out, l1.shape().clone()))
}

/// `x` `[b, h, t, e]` through its strides, `cos`/`sin` `[t, e]` → contiguous `[b, h, t, e]`.
pub fn rope(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    inverse: bool,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (_, h, t, e) = l1.shape().dims4()?;
    let count = l1.shape().elem_count();
    let dev = s1.device();
    let x = s1.as_cuda_slice::<f32>()?; // read through `l1`'s strides and offset
    let (cos, sin) = (view::<f32>("rope", s2, l2)?, view::<f32>("rope", s3, l3)?);
    let out = output(dev, count)?;
    let st: Vec<i64> = l1.stride().iter().map(|&s| s as i64).collect();
    let (hi, ti, ei) = (h as i32, t as i32, e as i32);
    let (off, sign, nrows) = (l1.start_offset() as i64, if inverse { -1f32 } else { 1.0 }, (count / e.max(1)) as i64);
    let func = dev.get_or_load_custom_func("rope", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(x).arg(&cos).arg(&sin).arg(&out).arg(&hi).arg(&ti).arg(&ei);
    b.arg(&st[0]).arg(&st[1]).arg(&st[2]).arg(&st[3]).arg(&off).arg(&sign).arg(&nrows);
    // SAFETY: as in `token_logps`; every index the kernel reads lies inside `x`'s layout.
    unsafe { b.launch(elements(count / 2)) }.w()?;
    Ok(done(dev, out, l1.shape().clone()))
}

/// `silu(g) · u`, elementwise.
pub fn swiglu(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let count = l1.shape().elem_count();
    let dev = s1.device();
    let (g, u) = (view::<f32>("swiglu", s1, l1)?, view::<f32>("swiglu", s2, l2)?);
    let out = output(dev, count)?;
    let n = count as i64;
    let func = dev.get_or_load_custom_func("swiglu", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&g).arg(&u).arg(&out).arg(&n);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(elements(count)) }.w()?;
    Ok(done(dev, out, l1.shape().clone()))
}

/// `g`, `u`, `dy` `[..., f]` → `[..., 2f]`: `dg` then `du` per row.
pub fn swiglu_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dims = l1.shape().dims();
    let f = dims.last().copied().unwrap_or(1);
    let count = l1.shape().elem_count();
    let dev = s1.device();
    let op = "swiglu-backward";
    let (g, u, dy) = (view::<f32>(op, s1, l1)?, view::<f32>(op, s2, l2)?, view::<f32>(op, s3, l3)?);
    let out = output(dev, 2 * count)?;
    let (fi, n) = (f as i32, count as i64);
    let func = dev.get_or_load_custom_func("swiglu_backward", MODULE, ptx()?)?;
    let mut b = func.builder();
    b.arg(&g).arg(&u).arg(&dy).arg(&out).arg(&fi).arg(&n);
    // SAFETY: as in `token_logps`.
    unsafe { b.launch(elements(count)) }.w()?;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = 2 * f;
    }
    Ok(done(dev, out, Shape::from(shape)))
}

#[cfg(test)]
mod tests {
    /// NVRTC alone (no GPU): every kernel of kernels.cu compiles and is in the PTX.
    #[test]
    fn nvrtc_compiles_every_kernel() {
        let ptx = super::ptx().unwrap();
        for name in [
            "token_logps",
            "token_logps_backward",
            "rms_norm",
            "rms_norm_backward",
            "causal_softmax",
            "softmax_backward",
            "rope",
            "swiglu",
            "swiglu_backward",
        ] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}
