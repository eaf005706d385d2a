//! The Llama family (Llama, Mistral, Qwen2, SmolLM) as a causal LM written for training.
//!
//! It returns full-sequence logits, keeps no KV cache and is differentiable end to end: RMSNorm and the
//! causal attention softmax, RoPE and the SwiGLU gate are our fused kernels with hand-written backward
//! passes ([`super::kernels`], each tested against its composite form); candle's own fused kernels are
//! never used (they cut the gradient).
//! Module constructors take a `VarBuilder` whose `pp` paths spell the checkpoint's tensor names, so the
//! loading code is the weight map.
//!
//! Shapes: `b` batch, `t` time, `d` hidden, `h` query heads, `g` key/value heads, `e` head dim,
//! `f` MLP width, `v` vocab.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::LlamaConfig;
use super::embedding::TokenEmbedding;
use super::kernels::{self, causal_softmax, rms_norm, swiglu};
use super::lora::{frozen_matmul, Proj};
use super::ops::{self, repeat_kv, rope_tables, softmax_last_dim};
use crate::error::Result;

/// A linear layer, with the LoRA adapter the config enables when the tensors hold one.
fn linear(cfg: &LlamaConfig, in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Proj> {
    Proj::new(in_dim, out_dim, bias, cfg.adapter.as_ref(), vb)
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, e) = (cfg.hidden_size, cfg.head_dim());
        let (h, g) = (cfg.num_attention_heads, cfg.num_kv_heads());
        Ok(Self {
            q_proj: linear(cfg, d, h * e, cfg.qkv_bias(), vb.pp("q_proj"))?,
            k_proj: linear(cfg, d, g * e, cfg.qkv_bias(), vb.pp("k_proj"))?,
            v_proj: linear(cfg, d, g * e, cfg.qkv_bias(), vb.pp("v_proj"))?,
            o_proj: linear(cfg, h * e, d, cfg.o_bias(), vb.pp("o_proj"))?,
            num_heads: h,
            num_kv_heads: g,
            head_dim: e,
        })
    }

    /// `x` is `[b, t, d]`; `cos`/`sin` broadcast to `[b, h, t, e]`; `mask` is additive and broadcasts to
    /// `[b, h, t, k]`, or `None` for plain causal attention (the training path: fused softmax). With a
    /// cache, keys and values of earlier positions are prepended (`k` = past + t) and this call's are
    /// appended to it.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, g, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // Views: the fused RoPE reads q and k through their strides; v is made contiguous.
        let split = |y: Tensor, heads: usize| -> Result<Tensor> { Ok(y.reshape((b, t, heads, e))?.transpose(1, 2)?) };
        let q = split(self.q_proj.forward(x)?, h)?; // [b, h, t, e]
        let k = split(self.k_proj.forward(x)?, g)?; // [b, g, t, e]
        let v = split(self.v_proj.forward(x)?, g)?.contiguous()?; // [b, g, t, e]
                                                                  // Training (no mask, `cos`/`sin` `[t, e]`): fused RoPE; decoding (per-row positions): composite.
        let rope = |x: &Tensor| -> Result<Tensor> {
            Ok(match mask {
                None => kernels::apply_rope(x, cos, sin)?,
                Some(_) => ops::apply_rope(&x.contiguous()?, cos, sin)?,
            })
        };
        let q = rope(&q)?;
        let k = rope(&k)?;
        let scale = 1.0 / (e as f64).sqrt();
        let out = match mask {
            // Training: plain causal attention. Grouped-query attention without copying K and V per
            // query head: the `r = h/g` query heads that share a K/V head are stacked along time,
            // `[b, h, t, e]` = `[b, g, r*t, e]` (a view), and the fused softmax finds each row's query
            // position as `row mod t`. The decoding branch below, with `repeat_kv`, is the reference.
            None => {
                let r = h / g;
                let q = q.reshape((b, g, r * t, e))?; // [b, g, r*t, e]
                let scores = q.matmul(&k.t()?)?; // [b, g, r*t, t]
                let probs = causal_softmax(&scores.to_dtype(DType::F32)?, scale)?.to_dtype(v.dtype())?;
                probs.matmul(&v)?.reshape((b, h, t, e))? // [b, h, t, e]
            }
            Some(mask) => {
                let (k, v) = match cache {
                    Some(cache) => cache.append(k, v)?, // [b, g, k, e]
                    None => (k, v),
                };
                let k = repeat_kv(&k, h / g)?; // [b, h, k, e]
                let v = repeat_kv(&v, h / g)?; // [b, h, k, e]
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?; // [b, h, t, k]
                let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
                probs.matmul(&v)? // [b, h, t, e]
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, t, h * e))?; // [b, t, h*e]
        self.o_proj.forward(&out) // [b, t, d]
    }
}

/// Keys and values of the positions a layer has already seen, for incremental decoding.
#[derive(Default, Clone)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>, // [b, g, past, e] each
}

impl LayerCache {
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// One [`LayerCache`] per decoder layer.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.kv.as_ref()).map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(cfg, d, f, bias, vb.pp("gate_proj"))?,
            up_proj: linear(cfg, d, f, bias, vb.pp("up_proj"))?,
            down_proj: linear(cfg, f, d, bias, vb.pp("down_proj"))?,
        })
    }

    /// SwiGLU: `down(silu(gate(x)) * up(x))`, the gate fused ([`kernels::swiglu`]; composite: `gate.silu()? * up`).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?; // [b, t, f]
        let up = self.up_proj.forward(x)?; // [b, t, f]
        if let Some(w) = self.down_proj.frozen_weight() {
            return Ok(kernels::swiglu_down_frozen(&gate, &up, w)?); // [b, t, d], keeps no [b, t, f] product
        }
        self.down_proj.forward(&swiglu(&gate, &up)?) // [b, t, d]
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
    /// `nn.Embedding(v, d, padding_idx=pad_token_id)` as `transformers` builds it for Llama, Mistral and
    /// Qwen2: the pad row gets no gradient through the lookup (see [`TokenEmbedding`]).
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `[v, d]`; the embedding matrix itself when embeddings are tied. `None` for a backbone built
    /// under a scalar head (a reward model has no LM head).
    lm_head: Option<Tensor>,
}

impl Llama {
    /// The causal LM: backbone plus LM head.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, true)
    }

    /// The backbone alone (embeddings, layers, final norm), for a model whose head is a scalar
    /// (`LlamaForSequenceClassification`); it reads no `lm_head.weight`.
    pub fn new_backbone(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, false)
    }

    fn build(config: &LlamaConfig, vb: VarBuilder, with_lm_head: bool) -> Result<Self> {
        let cfg = config;
        let model = vb.pp("model");
        let embeddings = model.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = model.pp("norm").get(cfg.hidden_size, "weight")?;
        let lm_head = if !with_lm_head {
            None
        } else if cfg.tie_word_embeddings {
            Some(embeddings.clone())
        } else {
            Some(vb.pp("lm_head").get((cfg.vocab_size, cfg.hidden_size), "weight")?)
        };
        Ok(Self {
            config: cfg.clone(),
            embed_tokens: TokenEmbedding::new(embeddings, cfg.padding_idx()?),
            layers,
            norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits for every position. `input_ids` is `[b, t]` (u32), right-padded: with a causal mask,
    /// padding after a sequence's end cannot change the logits of its real tokens. This is the training
    /// path: no cache, differentiable end to end.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_hidden(input_ids)?.1)
    }

    /// Final hidden states `[b, t, d]` (after the last norm) and logits `[b, t, v]`, from one pass.
    pub fn forward_with_hidden(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let hidden = self.hidden_states(input_ids)?; // [b, t, d]
        let logits = self.logits(&hidden)?; // [b, t, v]
        Ok((hidden, logits))
    }

    /// The LM head on hidden states: `[..., d]` → `[..., v]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let lm_head = self.lm_head.as_ref().ok_or_else(|| {
            crate::error::Error::Compute(
                "this model was built without an LM head (a reward model); it has no logits".into(),
            )
        })?;
        if lm_head.is_variable() {
            Ok(hidden.broadcast_matmul(&lm_head.t()?)?) // [b, t, v]
        } else {
            frozen_matmul(hidden, lm_head) // [b, t, v]: no `[v, d]` gradient for a head that does not train
        }
    }

    /// Final hidden states `[b, t, d]`, after the last RMSNorm: what HF's heads read.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let cfg = &self.config;
        let device = input_ids.device();
        if let Some(window) = cfg.attention_window().filter(|&w| t > w) {
            return Err(crate::error::Error::Compute(format!(
                "sequence of {t} tokens is longer than the model's sliding attention window ({window}); \
                 lower max_length (sliding-window attention is not implemented)"
            )));
        }
        let (cos, sin) = rope_tables(t, cfg.head_dim(), cfg.rope_theta(), device)?; // [t, e]
        self.run_layers(input_ids, &cos, &sin, None, None)
    }

    /// An empty cache for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![LayerCache::default(); self.layers.len()] }
    }

    /// Incremental decoding: logits for `input_ids` `[b, t]` given the keys and values already in
    /// `cache`, which this call extends. Rows may be left-padded: `attention_mask` `[b, past + t]` has 0
    /// on padding, and each token's position is the number of real tokens before it in its row (as in
    /// `transformers`' `generate`). The math is the training path's: same modules, same weights.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &[Vec<u8>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.len();
        let total = past + t;
        let cfg = &self.config;
        let device = input_ids.device();
        if attention_mask.len() != b || attention_mask.iter().any(|r| r.len() != total) {
            return Err(crate::error::Error::Shape {
                name: "attention_mask".into(),
                expected: vec![b, total],
                got: vec![attention_mask.len(), attention_mask.first().map_or(0, |r| r.len())],
            });
        }
        if let Some(window) = cfg.attention_window().filter(|&w| total > w) {
            return Err(crate::error::Error::Compute(format!(
                "generation reached {total} tokens, beyond the sliding attention window ({window})"
            )));
        }
        // Per-row positions of the new tokens, and the additive mask [b, 1, t, total].
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t * total);
        for row in attention_mask {
            // transformers: position_ids = cumsum(mask) - 1, i.e. real tokens before this one.
            let mut before = 0usize;
            let pos_of: Vec<usize> = row
                .iter()
                .map(|&m| {
                    let p = if m != 0 { before } else { 1 };
                    before += usize::from(m != 0);
                    p
                })
                .collect();
            for (q, &pos) in pos_of.iter().enumerate().skip(past) {
                positions.push(pos as u32);
                for (k, &m) in row.iter().enumerate() {
                    let visible = k <= q && m != 0;
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let max_pos = positions.iter().copied().max().unwrap_or(0) as usize + 1;
        let (cos, sin) = rope_tables(max_pos, cfg.head_dim(), cfg.rope_theta(), device)?; // [p, e]
        let idx = Tensor::from_vec(positions, b * t, device)?;
        let e = cfg.head_dim();
        let cos = cos.index_select(&idx, 0)?.reshape((b, 1, t, e))?; // [b, 1, t, e]
        let sin = sin.index_select(&idx, 0)?.reshape((b, 1, t, e))?; // [b, 1, t, e]
                                                                     // A query whose row is all padding so far sees nothing; give it itself to avoid NaN.
        for (i, chunk) in mask.chunks_mut(total).enumerate() {
            if chunk.iter().all(|v| v.is_infinite()) {
                chunk[past + i % t] = 0.0;
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, total), device)?; // [b, 1, t, total]
        let hidden = self.run_layers(input_ids, &cos, &sin, Some(&mask), Some(&mut cache.layers))?; // [b, t, d]
        self.logits(&hidden) // [b, t, v]
    }

    /// `mask`: additive `[b, 1, t, k]`, or `None` for causal attention over the `t` positions.
    fn run_layers(
        &self,
        input_ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        mut caches: Option<&mut Vec<LayerCache>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        // A LoRA base kept in 16 bits (`base_dtype`) is looked up in 16 bits; activations are f32.
        let mut x = self.embed_tokens.forward(input_ids)?.to_dtype(super::TRAIN_DTYPE)?; // [b, t, d]
        let mask = mask.map(|m| m.to_dtype(x.dtype())).transpose()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let h = rms_norm(&x, &layer.input_layernorm, cfg.rms_norm_eps)?;
            x = (x + layer.self_attn.forward(&h, cos, sin, mask.as_ref(), cache)?)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, cfg.rms_norm_eps)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        Ok(rms_norm(&x, &self.norm, cfg.rms_norm_eps)?) // [b, t, d]
    }
}
