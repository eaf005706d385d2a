//! Fresh random weights for a Llama-family config, for models trained from scratch (the demo's base
//! model). Initialisation follows `transformers`' `LlamaPreTrainedModel`: weights ~ N(0, std²), biases 0,
//! norm weights 1. The names come from building the model itself, so they always match the weight map.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use super::causal_lm::CausalLm;
use super::config::ModelConfig;
use crate::error::Result;

struct RandomInit {
    std: f64,
    rng: Mutex<rand::rngs::StdRng>,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl SimpleBackend for RandomInit {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let mut rng = self.rng.lock().map_err(|_| candle_core::Error::Msg("rng poisoned".into()))?;
            (0..n).map(|_| (normal(&mut *rng) * self.std) as f32).collect()
        };
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        if let Ok(mut made) = self.made.lock() {
            made.insert(name.to_string(), t.clone());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor { path: name.to_string() })
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A standard normal draw (Box-Muller), so the weights depend only on `seed`.
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Random weights for `config`, by Hugging Face tensor name.
pub fn random_weights(config: &ModelConfig, std: f64, seed: u64, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let made = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = RandomInit { std, rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)), made: made.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    CausalLm::new(config, vb)?;
    let out = made.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_shapes_and_statistics() {
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"model_type":"llama","vocab_size":50,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        let w = random_weights(&cfg, 0.02, 1, &Device::Cpu).unwrap();
        // embed + final norm + 2 layers × (4 attention + 3 MLP + 2 norms); tied head adds nothing.
        assert_eq!(w.len(), 2 + 2 * 9);
        assert_eq!(w["model.layers.1.self_attn.k_proj.weight"].dims(), &[8, 16]);
        let ones: Vec<f32> = w["model.norm.weight"].to_vec1().unwrap();
        assert!(ones.iter().all(|&x| x == 1.0));
        let e: Vec<f32> = w["model.embed_tokens.weight"].flatten_all().unwrap().to_vec1().unwrap();
        let std = (e.iter().map(|x| (x * x) as f64).sum::<f64>() / e.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.002, "std {std}"); // 800 draws: sampling error ≈ 0.02/sqrt(1600)
        assert_eq!(
            random_weights(&cfg, 0.02, 1, &Device::Cpu).unwrap()["model.embed_tokens.weight"].to_vec2::<f32>().unwrap(),
            w["model.embed_tokens.weight"].to_vec2::<f32>().unwrap()
        );
    }
}
