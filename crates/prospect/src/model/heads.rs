//! Scalar heads on the Llama backbone: the reward model's `score` head (Hugging Face's
//! `LlamaForSequenceClassification` with `num_labels = 1`) and PPO's value head.
//!
//! Not responsible for: the losses that train them (`loss::reward`, `loss::ppo_offline`), or saving
//! (`model::Policy::save_hf`).
//!
//! Shapes: `b` batch, `t` time, `d` hidden.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use super::causal_lm::CausalLm;
use super::config::ModelConfig;
use crate::error::Result;

/// Checkpoint name of the reward model's head, as `LlamaForSequenceClassification` names it.
pub const SCORE_WEIGHT: &str = "score.weight";
/// Checkpoint names of the value head, as TRL's/HALOs' `AutoModelForCausalLMWithValueHead` name them.
pub const VALUE_WEIGHT: &str = "v_head.summary.weight";
pub const VALUE_BIAS: &str = "v_head.summary.bias";

/// A reward model: backbone + `score` (`[1, d]`, no bias), read at each row's last non-pad token.
pub struct RewardModel {
    backbone: CausalLm,
    /// `[1, d]`
    score: Tensor,
}

impl RewardModel {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let backbone = CausalLm::new_backbone(config, vb.clone())?;
        let score = vb.pp("score").get((1, config.hidden_size), "weight")?;
        Ok(Self { backbone, score })
    }

    /// One score per row: `[b]`.
    ///
    /// Hugging Face's rule (`GenericForSequenceClassification`): the score is read at the rightmost
    /// token whose id is not `pad_token_id`. With right padding and pad = eos, that is the token
    /// *before* the final eos, since the eos itself has the pad id.
    pub fn scores(&self, input_ids: &Tensor, pad_token_id: u32) -> Result<Tensor> {
        let hidden = self.backbone.hidden_states(input_ids)?; // [b, t, d]
        let per_token = hidden.broadcast_matmul(&self.score.t()?)?.squeeze(D::Minus1)?; // [b, t]
        let index = last_non_pad(input_ids, pad_token_id)?; // [b, 1]
        Ok(per_token.gather(&index, 1)?.squeeze(1)?) // [b]
    }
}

/// `[b, 1]` u32: per row, the position of the rightmost token that is not `pad_token_id` (0 when every
/// token is padding, as `argmax` of all zeros gives in PyTorch).
pub fn last_non_pad(input_ids: &Tensor, pad_token_id: u32) -> Result<Tensor> {
    let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
    let last: Vec<u32> =
        ids.iter().map(|row| row.iter().rposition(|&id| id != pad_token_id).unwrap_or(0) as u32).collect();
    let b = last.len();
    Ok(Tensor::from_vec(last, (b, 1), input_ids.device())?)
}

/// PPO's critic: `V_t = w · h_t + c` on every position's final hidden state.
pub struct ValueHead {
    /// `[1, d]`
    weight: Tensor,
    /// `[1]`
    bias: Tensor,
}

impl ValueHead {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("v_head").pp("summary");
        Ok(Self { weight: vb.get((1, config.hidden_size), "weight")?, bias: vb.get(1, "bias")? })
    }

    /// `hidden` `[b, t, d]` → values `[b, t]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let v = hidden.broadcast_matmul(&self.weight.t()?)?.squeeze(D::Minus1)?; // [b, t]
        Ok(v.broadcast_add(&self.bias)?)
    }
}

/// A `[rows, cols]` f32 tensor of N(0, std²) draws from a seeded generator (Box–Muller), for heads the
/// checkpoint does not have. HF initialises them with `normal_(0, initializer_range)` too; the draws
/// differ from PyTorch's, so a run that must match PyTorch starts from a saved head.
pub fn normal_init(rows: usize, cols: usize, std: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen::<f64>());
            (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, (rows, cols), device)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_non_pad_is_the_token_before_the_final_eos_when_pad_is_eos() {
        // pad = eos = 0. Row 1: [5, 6, 0(eos), 0(pad)] -> 1. Row 2 has no padding: [5, 6, 7, 8] -> 3.
        // python: ((torch.arange(4)*(ids!=0)).argmax(-1)) -> tensor([1, 3])
        let ids = Tensor::new(&[[5u32, 6, 0, 0], [5, 6, 7, 8]], &Device::Cpu).unwrap();
        let idx: Vec<Vec<u32>> = last_non_pad(&ids, 0).unwrap().to_vec2().unwrap();
        assert_eq!(idx, vec![vec![1], vec![3]]);
        // All padding: 0, like PyTorch's argmax of zeros.
        let ids = Tensor::new(&[[0u32, 0]], &Device::Cpu).unwrap();
        assert_eq!(last_non_pad(&ids, 0).unwrap().to_vec2::<u32>().unwrap(), vec![vec![0]]);
    }

    #[test]
    fn normal_init_is_seeded_and_has_the_right_scale() {
        let a: Vec<Vec<f32>> = normal_init(4, 1000, 0.02, 7, &Device::Cpu).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = normal_init(4, 1000, 0.02, 7, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(a, b);
        let v: Vec<f64> = a.iter().flatten().map(|&x| x as f64).collect();
        let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
    }
}
