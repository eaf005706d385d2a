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

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

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

    /// Apply one update with learning rate `lr`. Parameters without a gradient are left untouched.
    pub fn step(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
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
                let v = tensors.get(&format!("v.{name}")).ok_or_else(|| {
                    Error::model(dir, format!("optimizer state has m.{name} but no v.{name}"))
                })?;
                moments.insert(name.to_string(), (m.clone(), v.clone()));
            }
        }
        Ok(Self { config, step: steps, moments })
    }
}

/// The global L2 norm of all gradients, as `torch.nn.utils.clip_grad_norm_` computes it.
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
        assert!((p[0] - 0.8048830628395081).abs() < 1e-6 && (p[1] + 1.932712435722351).abs() < 1e-6, "{p:?}");
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
