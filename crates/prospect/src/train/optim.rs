//! AdamW with decoupled weight decay (Loshchilov & Hutter, 2019), written out so its state can be
//! saved and resumed, and so biases and norm weights can skip decay.
//!
//! One step, for each parameter p with gradient g, at step count k (from 1), as `torch.optim.AdamW`:
//! ```text
//! p ← p · (1 − lr·λ)                          (only for parameters in the decay group)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − (lr / (1 − β1^k)) · m / (sqrt(v) / sqrt(1 − β2^k) + ε)
//! ```

//!
//! [`AdamW::step`] runs the update in place with one fused loop per tensor ([`AdamW::step_composite`]
//! is the same arithmetic from candle tensor ops, kept as its reference): the composite form allocates
//! about ten parameter-sized temporaries per tensor, which for the 108 MiB embedding of SmolLM2 set the
//! run's peak memory. The fused loops repeat the composite's operations in the same order and precision
//! (candle's `x * f64` is `x * (f as f32) + 0`), so both give bit-identical weights.

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, Device, InplaceOp2, InplaceOp3, Layout, Tensor};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{save_tensors, Params};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    config: AdamWConfig,
    /// Optimizer steps taken so far.
    step: usize,
    /// First and second moments by parameter name; created at a parameter's first gradient.
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

/// Whether a parameter is decayed. Like `transformers`' Trainer: biases and normalisation weights
/// are not; everything else (including embeddings) is.
pub fn decays(name: &str) -> bool {
    let leaf = name.rsplit('.').nth(1).unwrap_or("");
    !(name.ends_with("bias") || leaf.contains("norm"))
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, moments: BTreeMap::new() }
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Apply one update with learning rate `lr`, in place. Parameters without a gradient are left untouched.
    ///
    /// The numerics guard: the fused loop counts updated weights that are not finite, and the step fails
    /// on the first such parameter, naming it (the run then stops before anything is saved).
    ///
    /// On a GPU the update is [`AdamW::step_composite`] (candle's CUDA ops; the fused loops are CPU code),
    /// followed by the same non-finite check.
    pub fn step(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        if params.iter().next().is_some_and(|(_, v)| !v.device().is_cpu()) {
            self.step_composite(params, grads, lr)?;
            return check_finite(params, grads);
        }
        self.step += 1;
        let c = self.config;
        let k = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(k);
        let bias2_sqrt = (1.0 - c.beta2.powi(k)).sqrt();
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let g = g.contiguous()?;
            if !self.moments.contains_key(name) {
                self.moments.insert(name.clone(), (g.zeros_like()?, g.zeros_like()?));
            }
            let (m, v) = &self.moments[name];
            m.inplace_op2(&g, &MomentUpdate { beta: c.beta1, square: false })?;
            v.inplace_op2(&g, &MomentUpdate { beta: c.beta2, square: true })?;
            let decay = if c.weight_decay != 0.0 && decays(name) { Some(1.0 - lr * c.weight_decay) } else { None };
            let update = ParamUpdate {
                decay,
                inv_bias2_sqrt: 1.0 / bias2_sqrt,
                eps: c.eps,
                step_size: lr / bias1,
                non_finite: AtomicUsize::new(0),
            };
            var.as_tensor().inplace_op3(m, v, &update)?;
            let bad = update.non_finite.into_inner();
            if bad > 0 {
                return Err(Error::Numerics(format!(
                    "the AdamW update (lr {lr:e}) made {bad} of {} weights of `{name}` non-finite",
                    var.elem_count()
                )));
            }
        }
        Ok(())
    }

    /// [`AdamW::step`] from candle tensor ops: the reference for the fused loops.
    pub fn step_composite(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let k = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(k);
        let bias2_sqrt = (1.0 - c.beta2.powi(k)).sqrt();
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let (m, v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut p = var.as_tensor().detach();
            if c.weight_decay != 0.0 && decays(name) {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            var.set(&(p - update)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// Save the moments (`m.NAME`, `v.NAME`) as safetensors; the step count goes in the trainer state.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            tensors.insert(format!("m.{name}"), m.clone());
            tensors.insert(format!("v.{name}"), v.clone());
        }
        save_tensors(&tensors, path)
    }

    /// Restore moments saved by [`AdamW::save`] after `steps` optimizer steps.
    pub fn load(config: AdamWConfig, path: &Path, steps: usize, device: &Device) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let file = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&file, device)
            .map_err(|e| Error::model(dir, format!("cannot read optimizer state: {e}")))?;
        let mut moments = BTreeMap::new();
        for (key, m) in &tensors {
            if let Some(name) = key.strip_prefix("m.") {
                let v = tensors
                    .get(&format!("v.{name}"))
                    .ok_or_else(|| Error::model(dir, format!("optimizer state has m.{name} but no v.{name}")))?;
                moments.insert(name.to_string(), (m.clone(), v.clone()));
            }
        }
        Ok(Self { config, step: steps, moments })
    }
}

/// The global L2 norm of all gradients, as `torch.nn.utils.clip_grad_norm_` computes it.
/// `m ← β·m + (1 − β)·g` (or `g²` when `square`), in place in `m`.
struct MomentUpdate {
    beta: f64,
    square: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("adamw-moment: tensors must be contiguous")
        };
        let (beta, one_minus) = (self.beta as f32, (1.0 - self.beta) as f32);
        let CpuStorage::F32(m) = s1 else { candle_core::bail!("adamw-moment: f32 only") };
        let m = &mut m[a0..a1];
        let g = &s2.as_slice::<f32>()?[b0..b1];
        let square = self.square;
        m.par_iter_mut().zip(g.par_iter()).for_each(|(m, &g)| {
            let g = if square { g * g } else { g };
            *m = *m * beta + g * one_minus;
        });
        Ok(())
    }
}

/// `p ← p·decay − step_size · m / (sqrt(v)·inv_bias2_sqrt + ε)`, in place in `p`.
struct ParamUpdate {
    decay: Option<f64>,
    inv_bias2_sqrt: f64,
    eps: f64,
    step_size: f64,
    /// Updated weights that came out non-finite, counted as the loop runs (the numerics guard).
    non_finite: AtomicUsize,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((p0, p1)), Some((m0, m1)), Some((v0, v1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("adamw-param: tensors must be contiguous")
        };
        let decay = self.decay.map(|d| d as f32);
        let (inv_b2, eps, step) = (self.inv_bias2_sqrt as f32, self.eps as f32, self.step_size as f32);
        let CpuStorage::F32(p) = s1 else { candle_core::bail!("adamw-param: f32 only") };
        let p = &mut p[p0..p1];
        let m = &s2.as_slice::<f32>()?[m0..m1];
        let v = &s3.as_slice::<f32>()?[v0..v1];
        let non_finite: usize = p
            .par_iter_mut()
            .zip(m.par_iter().zip(v.par_iter()))
            .map(|(p, (&m, &v))| {
                let p_decayed = match decay {
                    Some(d) => *p * d,
                    None => *p,
                };
                let denom = v.sqrt() * inv_b2 + eps;
                *p = p_decayed - (m / denom) * step;
                usize::from(!p.is_finite())
            })
            .sum();
        self.non_finite.fetch_add(non_finite, Ordering::Relaxed);
        Ok(())
    }
}

/// `acc += g`, in place (gradient accumulation without a third parameter-sized tensor). `acc` is f32, or
/// f64 for an exact sum of f32 gradients (see `train::run`: the sum then does not depend on its order).
pub fn accumulate(acc: &Tensor, g: &Tensor) -> Result<()> {
    if !acc.device().is_cpu() {
        // On a GPU: the sum with candle's ops, copied back into `acc`'s storage.
        let sum = (acc + g.to_dtype(acc.dtype())?)?;
        return Ok(acc.slice_set(&sum, 0, 0)?);
    }
    Ok(acc.inplace_op2(&g.contiguous()?, &AddInPlace)?)
}

/// The numerics guard of the composite update: the first parameter with a gradient whose weights are
/// no longer all finite fails the step, named. One Σ|w| over the updated parameters, read back once (a
/// NaN or an infinity anywhere makes it non-finite); only then is each parameter looked at.
fn check_finite(params: &Params, grads: &BTreeMap<String, Tensor>) -> Result<()> {
    let abs_sum = |var: &candle_core::Var| -> Result<Tensor> {
        Ok(var.as_tensor().to_dtype(candle_core::DType::F32)?.abs()?.sum_all()?)
    };
    let updated: Vec<_> = params.iter().filter(|(name, _)| grads.contains_key(*name)).collect();
    let mut total: Option<Tensor> = None;
    for (_, var) in &updated {
        let s = abs_sum(var)?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    if total.map_or(Ok(0.0), |t| t.to_scalar::<f32>())?.is_finite() {
        return Ok(());
    }
    for (name, var) in updated {
        if !abs_sum(var)?.to_scalar::<f32>()?.is_finite() {
            return Err(Error::Numerics(format!("the AdamW update made weights of `{name}` non-finite")));
        }
    }
    Ok(())
}

struct AddInPlace;

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("add-in-place: tensors must be contiguous")
        };
        let g = &s2.as_slice::<f32>()?[b0..b1];
        match s1 {
            CpuStorage::F32(acc) => acc[a0..a1].par_iter_mut().zip(g.par_iter()).for_each(|(a, &g)| *a += g),
            CpuStorage::F64(acc) => acc[a0..a1].par_iter_mut().zip(g.par_iter()).for_each(|(a, &g)| *a += f64::from(g)),
            _ => candle_core::bail!("add-in-place: the accumulator must be f32 or f64"),
        }
        Ok(())
    }
}

pub fn global_grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.values() {
        sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (torch's rule: factor
/// `max_norm / (norm + 1e-6)`, applied only when below 1). `max_norm = 0` turns clipping off.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_groups_follow_transformers() {
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
    }

    #[test]
    fn two_steps_match_torch() {
        // python (torch 2.x):
        //   p = torch.nn.Parameter(torch.tensor([1.0, -2.0])); o = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
        //   for g in ([0.5, -1.0], [0.25, 2.0]): p.grad = torch.tensor(g); o.step()
        //   print(p.tolist())  ->  [0.8048830628395081, -1.932712435722351]
        // hand check of step 1: p ← p(1 − 0.001) − 0.1·sign(g) = [0.899, −1.898]
        let tensors: BTreeMap<String, Tensor> =
            [("w.weight".to_string(), Tensor::new(&[1f32, -2.], &Device::Cpu).unwrap())].into();
        let params = Params::from_tensors(&tensors).unwrap();
        let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 });
        let step = |opt: &mut AdamW, g: [f32; 2]| {
            let grads: BTreeMap<String, Tensor> =
                [("w.weight".to_string(), Tensor::new(&g, &Device::Cpu).unwrap())].into();
            opt.step(&params, &grads, 0.1).unwrap();
        };
        step(&mut opt, [0.5, -1.0]);
        let p: Vec<f32> = params.get("w.weight").unwrap().as_tensor().to_vec1().unwrap();
        assert!((p[0] - 0.899).abs() < 1e-6 && (p[1] + 1.898).abs() < 1e-6, "{p:?}");
        step(&mut opt, [0.25, 2.0]);
        let p: Vec<f32> = params.get("w.weight").unwrap().as_tensor().to_vec1().unwrap();
        assert!(
            (p[0] as f64 - 0.8048830628395081).abs() < 1e-6 && (p[1] as f64 + 1.932712435722351).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn fused_step_equals_composite_step() {
        // Odd sizes, weight decay on one tensor and not the other, three steps: bit-identical weights.
        let init = |seed: u32, n: usize| -> Tensor {
            let v: Vec<f32> =
                (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let tensors: BTreeMap<String, Tensor> =
            [("a.weight".to_string(), init(1, 1031)), ("a_norm.weight".to_string(), init(2, 7))].into();
        let (pa, pb) = (Params::from_tensors(&tensors).unwrap(), Params::from_tensors(&tensors).unwrap());
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let (mut fused, mut composite) = (AdamW::new(config), AdamW::new(config));
        for step in 0..3u32 {
            let grads: BTreeMap<String, Tensor> =
                [("a.weight".to_string(), init(10 + step, 1031)), ("a_norm.weight".to_string(), init(20 + step, 7))]
                    .into();
            fused.step(&pa, &grads, 1e-3).unwrap();
            composite.step_composite(&pb, &grads, 1e-3).unwrap();
        }
        for name in ["a.weight", "a_norm.weight"] {
            let a: Vec<f32> = pa.get(name).unwrap().as_tensor().to_vec1().unwrap();
            let b: Vec<f32> = pb.get(name).unwrap().as_tensor().to_vec1().unwrap();
            assert_eq!(a, b, "{name}");
        }
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        // norm of [3, 4] and [12] = 13; clip to 1 scales by 1/(13 + 1e-6).
        let mut grads: BTreeMap<String, Tensor> = [
            ("a".to_string(), Tensor::new(&[3f32, 4.], &Device::Cpu).unwrap()),
            ("b".to_string(), Tensor::new(&[12f32], &Device::Cpu).unwrap()),
        ]
        .into();
        let norm = global_grad_norm(&grads).unwrap();
        assert!((norm - 13.0).abs() < 1e-9);
        clip_grad_norm(&mut grads, norm, 1.0).unwrap();
        let after = global_grad_norm(&grads).unwrap();
        assert!((after - 13.0 / (13.0 + 1e-6)).abs() < 1e-6);
        // Below the threshold nothing changes.
        clip_grad_norm(&mut grads, after, 5.0).unwrap();
        assert!((global_grad_norm(&grads).unwrap() - after).abs() < 1e-12);
    }
}
