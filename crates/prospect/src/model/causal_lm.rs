//! The decoder-only causal LMs Prospect trains, written for training: the Llama family (Llama, Mistral,
//! Qwen2, SmolLM), GPT-NeoX (Pythia) and GPT-2. They share one skeleton (embedding, layers of norm →
//! attention → norm → MLP with residuals, final norm, LM head) and differ in a few blocks, each an enum
//! here chosen by [`Arch`]: the norm ([`Norm`]), how q/k/v are projected ([`Qkv`]), positions (RoPE on all,
//! part or none of each head; GPT-2's learned table), the MLP ([`Mlp`]) and whether attention and MLP sit
//! side by side (GPT-NeoX's parallel residual).
//!
//! It returns full-sequence logits, keeps no KV cache in training and is differentiable end to end:
//! RMSNorm and the causal attention softmax, RoPE and the SwiGLU gate are our fused kernels with
//! hand-written backward passes ([`super::kernels`], each tested against its composite form); LayerNorm
//! and GELU are composed from candle ops that have a backward pass; candle's own fused kernels are
//! never used (they cut the gradient).
//! Module constructors take a `VarBuilder` whose `pp` paths spell the checkpoint's tensor names, so the
//! loading code is the weight map.
//!
//! Shapes: `b` batch, `t` time, `d` hidden, `h` query heads, `g` key/value heads, `e` head dim,
//! `r` rotated head dims, `f` MLP width, `v` vocab.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{Arch, ModelConfig};
use super::embedding::TokenEmbedding;
use super::kernels::{self, causal_softmax, rms_norm, swiglu};
use super::lora::{weight_matmul, Proj};
use super::ops::{self, layer_norm, matmul_in, rope_tables, softmax_last_dim};
use crate::error::{Error, Result};

/// A linear layer, with the LoRA adapter the config enables when the tensors hold one.
fn linear(cfg: &ModelConfig, in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Proj> {
    Ok(Proj::new(in_dim, out_dim, bias, cfg.adapter.as_ref(), vb)?.computing_in(cfg.compute.dtype()))
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`, with a bias.
fn conv1d(cfg: &ModelConfig, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Proj> {
    Ok(Proj::conv1d(in_dim, out_dim, cfg.adapter.as_ref(), vb)?.computing_in(cfg.compute.dtype()))
}

/// A layer's normalisation: RMSNorm (Llama family) or LayerNorm with a bias (GPT-NeoX, GPT-2).
enum Norm {
    Rms(Tensor),
    Layer { weight: Tensor, bias: Tensor },
}

impl Norm {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(match cfg.arch {
            Arch::Llama => Norm::Rms(vb.get(d, "weight")?),
            Arch::GptNeoX | Arch::Gpt2 => Norm::Layer { weight: vb.get(d, "weight")?, bias: vb.get(d, "bias")? },
        })
    }

    /// `[..., d]` → `[..., d]`.
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            Norm::Rms(w) => Ok(rms_norm(x, w, eps)?),
            Norm::Layer { weight, bias } => layer_norm(x, weight, bias, eps),
        }
    }
}

/// How a layer projects its input to queries, keys and values.
enum Qkv {
    /// Llama family: `q_proj`, `k_proj`, `v_proj`.
    Separate { q: Proj, k: Proj, v: Proj },
    /// GPT-NeoX's `query_key_value`: `[b, t, 3d]` viewed as `[b, t, h, 3e]`, each head's q, k, v side by side.
    PerHead(Proj),
    /// GPT-2's `c_attn`: `[b, t, 3d]` = all heads' q, then all k, then all v.
    Stacked(Proj),
}

struct Attention {
    qkv: Qkv,
    out: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Head dimensions RoPE rotates (all, part, or none).
    rotary: usize,
    /// The dtype of the score and value products ([`super::ComputeDtype`]).
    compute: DType,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (d, e) = (cfg.hidden_size, cfg.head_dim());
        let (h, g) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let (qkv, out) = match cfg.arch {
            Arch::Llama => (
                Qkv::Separate {
                    q: linear(cfg, d, h * e, cfg.qkv_bias(), vb.pp("q_proj"))?,
                    k: linear(cfg, d, g * e, cfg.qkv_bias(), vb.pp("k_proj"))?,
                    v: linear(cfg, d, g * e, cfg.qkv_bias(), vb.pp("v_proj"))?,
                },
                linear(cfg, h * e, d, cfg.o_bias(), vb.pp("o_proj"))?,
            ),
            Arch::GptNeoX => (
                Qkv::PerHead(linear(cfg, d, 3 * d, cfg.attention_bias, vb.pp("query_key_value"))?),
                linear(cfg, d, d, cfg.attention_bias, vb.pp("dense"))?,
            ),
            Arch::Gpt2 => (Qkv::Stacked(conv1d(cfg, d, 3 * d, vb.pp("c_attn"))?), conv1d(cfg, d, d, vb.pp("c_proj"))?),
        };
        Ok(Self {
            qkv,
            out,
            num_heads: h,
            num_kv_heads: g,
            head_dim: e,
            rotary: cfg.rotated_dims(),
            compute: cfg.compute.dtype(),
        })
    }

    /// Queries `[b, h, t, e]`, keys `[b, g, t, e]` (views: the fused RoPE reads through strides) and
    /// values `[b, g, t, e]` (contiguous).
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, g, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, e))?.transpose(1, 2)?) };
        Ok(match &self.qkv {
            Qkv::Separate { q, k, v } => {
                (heads(q.forward(x)?, h)?, heads(k.forward(x)?, g)?, heads(v.forward(x)?, g)?.contiguous()?)
            }
            Qkv::PerHead(qkv) => {
                let y = qkv.forward(x)?.reshape((b, t, h, 3 * e))?; // [b, t, h, 3e]
                let part = |i: usize| -> Result<Tensor> { Ok(y.narrow(3, i * e, e)?.transpose(1, 2)?) };
                (part(0)?, part(1)?, part(2)?.contiguous()?)
            }
            Qkv::Stacked(qkv) => {
                let y = qkv.forward(x)?; // [b, t, 3d]
                let d = h * e;
                let part = |i: usize| -> Result<Tensor> { heads(y.narrow(2, i * d, d)?.contiguous()?, h) };
                (part(0)?, part(1)?, part(2)?.contiguous()?)
            }
        })
    }

    /// RoPE on the first `rotary` dimensions of each head (`cos`/`sin` are `rotary` wide); the rest pass
    /// through. Training (`fused`): our kernel on `[t, r]` tables; decoding: the composite on per-row tables.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Tensor> {
        let (e, r) = (self.head_dim, self.rotary);
        if r == 0 {
            return Ok(x.contiguous()?); // the products below read contiguous heads
        }
        let rotate = |x: &Tensor| -> Result<Tensor> {
            Ok(match fused {
                true => kernels::apply_rope(x, cos, sin)?,
                false => ops::apply_rope(&x.contiguous()?, cos, sin)?,
            })
        };
        if r == e {
            return rotate(x);
        }
        let rotated = rotate(&x.narrow(3, 0, r)?)?; // [b, h, t, r]
        Ok(Tensor::cat(&[&rotated, &x.narrow(3, r, e - r)?.contiguous()?], 3)?) // [b, h, t, e]
    }

    /// `x` is `[b, t, d]`; `cos`/`sin` broadcast to `[b, h, t, r]`; `mask` is additive and broadcasts to
    /// `[b, h, t, k]`, or `None` for plain causal attention (the training path: fused softmax). With a
    /// mask and a cache, keys and values of earlier positions are prepended (`k` = past + t) and this
    /// call's are appended to it. Without a mask, a cache receives this call's keys and values (a training
    /// pass lending its prompts to a pass that scores other completions after them).
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
        let (q, k, v) = self.project(x)?;
        let q = self.rope(&q, cos, sin, mask.is_none())?;
        let k = self.rope(&k, cos, sin, mask.is_none())?;
        let scale = 1.0 / (e as f64).sqrt();
        let out = match mask {
            // Training: plain causal attention. Grouped-query attention without copying K and V per
            // query head: the `r = h/g` query heads that share a K/V head are stacked along time,
            // `[b, h, t, e]` = `[b, g, r*t, e]` (a view), and the fused softmax finds each row's query
            // position as `row mod t`. The decoding branch below does the same with an explicit mask.
            None => {
                let r = h / g;
                let q = q.reshape((b, g, r * t, e))?; // [b, g, r*t, e]
                let scores = matmul_in(&q, &k.t()?, self.compute)?; // [b, g, r*t, t]
                let probs = causal_softmax(&scores.to_dtype(DType::F32)?, scale)?.to_dtype(v.dtype())?;
                let out = matmul_in(&probs, &v, self.compute)?.reshape((b, h, t, e))?; // [b, h, t, e]
                if let Some(cache) = cache {
                    cache.kv = Some((k.clone(), v.clone())); // [b, g, t, e] each
                }
                out
            }
            Some(mask) => {
                let (k, v) = match cache {
                    Some(cache) => cache.append(k, v)?, // [b, g, k, e]
                    None => (k, v),
                };
                // Grouped-query attention as in training, without copying K and V per query head: the
                // `r = h/g` query heads of a K/V head stacked along time, and the mask repeated to match.
                // (`repeat_kv` would copy the whole cache twice per layer and step.)
                let r = h / g;
                let q = q.reshape((b, g, r * t, e))?; // [b, g, r*t, e]
                let mask = mask.repeat((1, 1, r, 1))?; // [b, 1, r*t, k]
                let scores = (matmul_in(&q, &k.t()?, self.compute)? * scale)?.broadcast_add(&mask)?; // [b, g, r*t, k]
                let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
                matmul_in(&probs, &v, self.compute)?.reshape((b, h, t, e))? // [b, h, t, e]
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, t, h * e))?; // [b, t, h*e]
        self.out.forward(&out) // [b, t, d]
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
    /// The same keys and values with gradient tracking off: a pass that reads them adds nothing to the
    /// gradient of the pass that computed them.
    pub fn detach(&self) -> KvCache {
        let layers =
            self.layers.iter().map(|l| LayerCache { kv: l.kv.as_ref().map(|(k, v)| (k.detach(), v.detach())) });
        KvCache { layers: layers.collect() }
    }

    /// The keys and values of the first `n` positions only (views; `n` at most [`KvCache::len`]).
    pub fn first(&self, n: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let kv = match &l.kv {
                    Some((k, v)) => Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)), // [b, g, n, e] each
                    None => None,
                };
                Ok(LayerCache { kv })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.kv.as_ref()).map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The feed-forward block.
enum Mlp {
    /// Llama family: `down(silu(gate(x)) * up(x))`.
    SwiGlu { gate: Proj, up: Proj, down: Proj },
    /// GPT-NeoX, GPT-2: `out(gelu(fc(x)))`; `exact` is the erf GELU (`gelu`), otherwise its tanh form
    /// (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    Gelu { fc: Proj, out: Proj, exact: bool },
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let exact = cfg.hidden_act == "gelu";
        Ok(match cfg.arch {
            Arch::Llama => Mlp::SwiGlu {
                gate: linear(cfg, d, f, cfg.mlp_bias, vb.pp("gate_proj"))?,
                up: linear(cfg, d, f, cfg.mlp_bias, vb.pp("up_proj"))?,
                down: linear(cfg, f, d, cfg.mlp_bias, vb.pp("down_proj"))?,
            },
            Arch::GptNeoX => Mlp::Gelu {
                fc: linear(cfg, d, f, true, vb.pp("dense_h_to_4h"))?,
                out: linear(cfg, f, d, true, vb.pp("dense_4h_to_h"))?,
                exact,
            },
            Arch::Gpt2 => {
                Mlp::Gelu { fc: conv1d(cfg, d, f, vb.pp("c_fc"))?, out: conv1d(cfg, f, d, vb.pp("c_proj"))?, exact }
            }
        })
    }

    /// `[b, t, d]` → `[b, t, d]`. SwiGLU's gate is fused ([`kernels::swiglu`]; composite:
    /// `gate.silu()? * up`).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::SwiGlu { gate, up, down } => {
                let g = gate.forward(x)?; // [b, t, f]
                let u = up.forward(x)?; // [b, t, f]
                if let Some(w) = down.frozen_weight() {
                    return Ok(kernels::swiglu_down_frozen(&g, &u, w)?); // [b, t, d], keeps no [b, t, f] product
                }
                down.forward(&swiglu(&g, &u)?) // [b, t, d]
            }
            Mlp::Gelu { fc, out, exact } => {
                let y = fc.forward(x)?; // [b, t, f]
                let y = if *exact { y.gelu_erf()? } else { y.gelu()? };
                out.forward(&y) // [b, t, d]
            }
        }
    }
}

struct DecoderLayer {
    norm_attn: Norm,
    attention: Attention,
    norm_mlp: Norm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (norm_attn, attention, norm_mlp) = match cfg.arch {
            Arch::Llama => ("input_layernorm", "self_attn", "post_attention_layernorm"),
            Arch::GptNeoX => ("input_layernorm", "attention", "post_attention_layernorm"),
            Arch::Gpt2 => ("ln_1", "attn", "ln_2"),
        };
        Ok(Self {
            norm_attn: Norm::new(cfg, vb.pp(norm_attn))?,
            attention: Attention::new(cfg, vb.pp(attention))?,
            norm_mlp: Norm::new(cfg, vb.pp(norm_mlp))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// Top-level tensor names of each family: (backbone prefix, layers, final norm).
pub(crate) fn top_names(arch: Arch) -> (&'static str, &'static str, &'static str) {
    match arch {
        Arch::Llama => ("model", "layers", "norm"),
        Arch::GptNeoX => ("gpt_neox", "layers", "final_layer_norm"),
        Arch::Gpt2 => ("transformer", "h", "ln_f"),
    }
}

/// A causal LM of any supported family. Cheap to build: it holds handles to the weights, not copies.
pub struct CausalLm {
    config: ModelConfig,
    /// `nn.Embedding(v, d, padding_idx=pad_token_id)` as `transformers` builds it for Llama, Mistral and
    /// Qwen2: the pad row gets no gradient through the lookup (see [`TokenEmbedding`]). GPT-NeoX and GPT-2
    /// have no padding row.
    embed_tokens: TokenEmbedding,
    /// GPT-2's learned positions `[n_positions, d]`.
    positions: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    /// `[v, d]`; the embedding matrix itself when embeddings are tied. `None` for a backbone built
    /// under a scalar head (a reward model has no LM head).
    lm_head: Option<Tensor>,
}

impl CausalLm {
    /// The causal LM: backbone plus LM head.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, true)
    }

    /// The backbone alone (embeddings, layers, final norm), for a model whose head is a scalar
    /// (`*ForSequenceClassification`); it reads no LM head.
    pub fn new_backbone(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, false)
    }

    fn build(config: &ModelConfig, vb: VarBuilder, with_lm_head: bool) -> Result<Self> {
        let cfg = config;
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let (prefix, layers, norm) = top_names(cfg.arch);
        let model = vb.pp(prefix);
        let embed = cfg.embed_name().rsplit_once('.').map_or("", |(module, _)| module);
        let embeddings = vb.pp(embed).get((v, d), "weight")?;
        let positions = match cfg.arch {
            Arch::Gpt2 => Some(model.pp("wpe").get((cfg.max_position_embeddings.unwrap_or(0), d), "weight")?),
            Arch::Llama | Arch::GptNeoX => None,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp(format!("{layers}.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::new(cfg, model.pp(norm))?;
        let lm_head = if !with_lm_head {
            None
        } else if cfg.tie_word_embeddings {
            Some(embeddings.clone())
        } else {
            let head = cfg.lm_head_name().trim_end_matches(".weight");
            Some(vb.pp(head).get((v, d), "weight")?)
        };
        Ok(Self {
            config: cfg.clone(),
            embed_tokens: TokenEmbedding::new(embeddings, cfg.padding_idx()?),
            positions,
            layers,
            norm,
            lm_head,
        })
    }

    /// The longest sequence the model can read (GPT-2's position table), for a clear error.
    fn check_length(&self, total: usize) -> Result<()> {
        if let Some(window) = self.config.attention_window().filter(|&w| total > w) {
            return Err(Error::Compute(format!(
                "sequence of {total} tokens is longer than the model's sliding attention window ({window}); \
                 lower max_length (sliding-window attention is not implemented)"
            )));
        }
        match &self.positions {
            Some(p) if total > p.dim(0)? => Err(Error::Compute(format!(
                "sequence of {total} tokens is longer than the model's {} learned positions (n_positions); \
                 lower max_length",
                p.dim(0)?
            ))),
            _ => Ok(()),
        }
    }

    pub fn config(&self) -> &ModelConfig {
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
        // A head that does not train forms no `[v, d]` gradient.
        weight_matmul(hidden, lm_head, lm_head.is_variable(), self.config.compute.dtype())
        // [b, t, v]
    }

    /// Final hidden states `[b, t, d]`, after the last RMSNorm: what HF's heads read.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.training_pass(input_ids, None)
    }

    /// [`CausalLm::hidden_states`], which also leaves every layer's keys and values of the `t` positions in
    /// `cache` (an empty one from [`CausalLm::new_cache`]): [`CausalLm::hidden_states_cached`] can then score
    /// other tokens after a prefix of these rows without computing that prefix again. The keys and values
    /// stay in this pass's graph, so a later pass that reads them sends its gradient back through them
    /// (DPO's rejected rows after the chosen rows' prompts); [`KvCache::detach`] cuts that link.
    pub fn hidden_states_keeping_kv(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.training_pass(input_ids, Some(&mut cache.layers))
    }

    /// The training path: causal attention over right-padded rows, fused kernels.
    fn training_pass(&self, input_ids: &Tensor, keep: Option<&mut Vec<LayerCache>>) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let cfg = &self.config;
        self.check_length(t)?;
        let (cos, sin) = rope_tables(t, cfg.rotated_dims(), cfg.rope_theta(), input_ids.device())?; // [t, r]
        let learned = match &self.positions {
            Some(wpe) => Some(wpe.narrow(0, 0, t)?), // [t, d]: positions 0..t
            None => None,
        };
        self.run_layers(input_ids, &cos, &sin, learned.as_ref(), None, keep)
    }

    /// An empty cache for [`CausalLm::forward_cached`].
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
        let hidden = self.hidden_states_cached(input_ids, attention_mask, cache)?; // [b, t, d]
        self.logits(&hidden) // [b, t, v]
    }

    /// [`CausalLm::forward_cached`] without the LM head: final hidden states `[b, t, d]`. Any pattern of
    /// padding works, not only left padding: a row's cached prefix may end in padding before its new
    /// tokens (each token's position counts the real tokens before it).
    pub fn hidden_states_cached(
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
        self.check_length(total)?;
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
        let r = cfg.rotated_dims();
        let (cos, sin) = rope_tables(max_pos, r, cfg.rope_theta(), device)?; // [p, r]
        let idx = Tensor::from_vec(positions, b * t, device)?;
        let cos = cos.index_select(&idx, 0)?.reshape((b, 1, t, r))?; // [b, 1, t, r]
        let sin = sin.index_select(&idx, 0)?.reshape((b, 1, t, r))?; // [b, 1, t, r]
        let learned = match &self.positions {
            Some(wpe) => Some(wpe.index_select(&idx, 0)?.reshape((b, t, cfg.hidden_size))?), // [b, t, d]
            None => None,
        };
        // A query whose row is all padding so far sees nothing; give it itself to avoid NaN.
        for (i, chunk) in mask.chunks_mut(total).enumerate() {
            if chunk.iter().all(|v| v.is_infinite()) {
                chunk[past + i % t] = 0.0;
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, total), device)?; // [b, 1, t, total]
        let hidden = self.run_layers(input_ids, &cos, &sin, learned.as_ref(), Some(&mask), Some(&mut cache.layers))?;
        Ok(hidden) // [b, t, d]
    }

    /// `learned`: GPT-2's position embeddings for these tokens (`[t, d]` or `[b, t, d]`); `mask`: additive
    /// `[b, 1, t, k]`, or `None` for causal attention over the `t` positions. `caches`: with a mask, each
    /// layer's earlier positions (extended by this call); without, filled with this call's keys and values.
    fn run_layers(
        &self,
        input_ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        learned: Option<&Tensor>,
        mask: Option<&Tensor>,
        mut caches: Option<&mut Vec<LayerCache>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps;
        // A LoRA base kept in 16 bits (`base_dtype`) is looked up in 16 bits; activations are f32.
        let mut x = self.embed_tokens.forward(input_ids)?.to_dtype(super::TRAIN_DTYPE)?; // [b, t, d]
        if let Some(p) = learned {
            x = x.broadcast_add(&p.to_dtype(x.dtype())?)?;
        }
        let mask = mask.map(|m| m.to_dtype(x.dtype())).transpose()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let h = layer.norm_attn.forward(&x, eps)?;
            let attn = layer.attention.forward(&h, cos, sin, mask.as_ref(), cache)?;
            x = if cfg.parallel_residual {
                // GPT-NeoX: both blocks read the layer's input.
                let mlp = layer.mlp.forward(&layer.norm_mlp.forward(&x, eps)?)?;
                ((mlp + attn)? + x)?
            } else {
                let x = (x + attn)?;
                let mlp = layer.mlp.forward(&layer.norm_mlp.forward(&x, eps)?)?;
                (x + mlp)?
            };
        }
        self.norm.forward(&x, eps) // [b, t, d]
    }
}
