//! The Llama family (Llama, Mistral, Qwen2, SmolLM) as a causal LM written for training.
//!
//! It returns full-sequence logits, keeps no KV cache and is differentiable end to end: norms, RoPE and
//! softmax come from [`super::ops`], never from candle's fused kernels (which cut the gradient).
//! Module constructors take a `VarBuilder` whose `pp` paths spell the checkpoint's tensor names, so the
//! loading code is the weight map.
//!
//! Shapes: `b` batch, `t` time, `d` hidden, `h` query heads, `g` key/value heads, `e` head dim,
//! `f` MLP width, `v` vocab.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::LlamaConfig;
use super::ops::{apply_rope, causal_mask, repeat_kv, rms_norm, rope_tables, softmax_last_dim};
use crate::error::Result;

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::new(weight, bias))
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, e) = (cfg.hidden_size, cfg.head_dim());
        let (h, g) = (cfg.num_attention_heads, cfg.num_kv_heads());
        Ok(Self {
            q_proj: linear(d, h * e, cfg.qkv_bias(), vb.pp("q_proj"))?,
            k_proj: linear(d, g * e, cfg.qkv_bias(), vb.pp("k_proj"))?,
            v_proj: linear(d, g * e, cfg.qkv_bias(), vb.pp("v_proj"))?,
            o_proj: linear(h * e, d, cfg.o_bias(), vb.pp("o_proj"))?,
            num_heads: h,
            num_kv_heads: g,
            head_dim: e,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, g, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, e))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.q_proj.forward(x)?, h)?; // [b, h, t, e]
        let k = split(self.k_proj.forward(x)?, g)?; // [b, g, t, e]
        let v = split(self.v_proj.forward(x)?, g)?; // [b, g, t, e]
        let q = apply_rope(&q, cos, sin)?;
        let k = repeat_kv(&apply_rope(&k, cos, sin)?, h / g)?; // [b, h, t, e]
        let v = repeat_kv(&v, h / g)?; // [b, h, t, e]

        let scale = 1.0 / (e as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?; // [b, h, t, t]
        let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?; // [b, h, t, e]
        let out = out.transpose(1, 2)?.reshape((b, t, h * e))?; // [b, t, h*e]
        Ok(self.o_proj.forward(&out)?) // [b, t, d]
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(d, f, bias, vb.pp("gate_proj"))?,
            up_proj: linear(d, f, bias, vb.pp("up_proj"))?,
            down_proj: linear(f, d, bias, vb.pp("down_proj"))?,
        })
    }

    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?; // [b, t, f]
        let up = self.up_proj.forward(x)?; // [b, t, f]
        Ok(self.down_proj.forward(&(gate * up)?)?) // [b, t, d]
    }
}

struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: vb.pp("input_layernorm").get(cfg.hidden_size, "weight")?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").get(cfg.hidden_size, "weight")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// A Llama-family causal LM. Cheap to build: it holds handles to the weights, not copies.
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `[v, d]`; the embedding matrix itself when embeddings are tied.
    lm_head: Tensor,
}

impl Llama {
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let cfg = config;
        let model = vb.pp("model");
        let embeddings = model.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = model.pp("norm").get(cfg.hidden_size, "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embeddings.clone()
        } else {
            vb.pp("lm_head").get((cfg.vocab_size, cfg.hidden_size), "weight")?
        };
        Ok(Self {
            config: cfg.clone(),
            embed_tokens: Embedding::new(embeddings, cfg.hidden_size),
            layers,
            norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits for every position. `input_ids` is `[b, t]` (u32), right-padded: with a causal mask,
    /// padding after a sequence's end cannot change the logits of its real tokens.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let cfg = &self.config;
        if let Some(window) = cfg.attention_window().filter(|&w| t > w) {
            return Err(crate::error::Error::Train(format!(
                "sequence of {t} tokens is longer than the model's sliding attention window ({window}); \
                 lower max_length (sliding-window attention is not implemented)"
            )));
        }
        let device = input_ids.device();
        let mut x = self.embed_tokens.forward(input_ids)?; // [b, t, d]
        let (cos, sin) = rope_tables(t, cfg.head_dim(), cfg.rope_theta(), device)?; // [t, e]
        let mask = causal_mask(t, x.dtype(), device)?; // [t, t]
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.input_layernorm, cfg.rms_norm_eps)?;
            x = (x + layer.self_attn.forward(&h, &cos, &sin, &mask)?)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, cfg.rms_norm_eps)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        let x = rms_norm(&x, &self.norm, cfg.rms_norm_eps)?; // [b, t, d]
        Ok(x.broadcast_matmul(&self.lm_head.t()?)?) // [b, t, v]
    }
}
