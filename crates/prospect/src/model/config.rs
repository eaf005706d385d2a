//! `config.json` of the supported families, as Hugging Face writes it.
//!
//! One struct covers every family. The Llama family (Llama, Mistral, Qwen2, SmolLM) is read field for
//! field: its members differ only in defaults (Qwen2 always has q/k/v biases) and in fields this training
//! path checks and rejects when it cannot honour them. GPT-2 and GPT-NeoX (Pythia) name their fields
//! differently (`n_embd`, `rotary_pct`, ...); [`ModelConfig::load`] reads them in their own spelling
//! ([`Gpt2Json`], [`GptNeoXJson`]) and fills the same struct, with [`Arch`] telling the model which blocks
//! to build.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The dtype of the model's matrix products (`dtype` in the training config). `bf16` is mixed precision
/// as `torch.autocast` does it: each matmul's operands are rounded to bf16 and its product comes back in
/// f32; weights (the f32 master copy), the optimizer, norms, softmax, log-softmax, log-prob sums and
/// losses stay f32. docs/CUDA.md has the list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == ComputeDtype::F32
    }
}

/// The architecture a config describes: which blocks the model is built from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Arch {
    /// RMSNorm, RoPE on every head dimension, separate q/k/v/o projections, SwiGLU, sequential residual.
    #[default]
    Llama,
    /// GPT-NeoX (Pythia): LayerNorm with bias, partial RoPE, a fused per-head `query_key_value`, a GELU MLP,
    /// and (with `use_parallel_residual`) attention and MLP side by side on the same input.
    GptNeoX,
    /// GPT-2: LayerNorm with bias, learned positions, `Conv1D` layers (weights stored `[in, out]`), a GELU
    /// MLP, a tied head.
    Gpt2,
}

/// The fields of a Hugging Face `config.json` this training path reads (Llama-family names).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelConfig {
    /// `llama`, `mistral`, `qwen2` (SmolLM is `llama`), `gpt_neox` (Pythia), `gpt2`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: K/V heads, each shared by `num_attention_heads / num_key_value_heads`
    /// query heads. Missing means plain multi-head attention.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Missing means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// transformers < 5 writes `rope_theta` at the top level ...
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// ... transformers 5 writes it under `rope_parameters` (with `rope_type`).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// The norm's epsilon: RMSNorm's for the Llama family, LayerNorm's (`layer_norm_eps`,
    /// `layer_norm_epsilon`) for GPT-NeoX and GPT-2.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama/Mistral: biases on q/k/v/o. Qwen2 has q/k/v biases whatever this says.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Mistral: attention window; Qwen2 uses it only with `use_sliding_window`.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Standard deviation of HF's normal initialisation (new heads are initialised with it).
    #[serde(default)]
    pub initializer_range: Option<f64>,
    /// The input embedding's `padding_idx`: `transformers` builds `embed_tokens` as
    /// `nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)`, whose row gets no gradient
    /// through the lookup. Missing or `null`: no such row. Negative counts from the end, as in PyTorch.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Not in `config.json`: the LoRA adapters' scale and dropout when the model is built with adapters
    /// (`model::lora`). `None`: the plain model.
    #[serde(skip)]
    pub adapter: Option<super::lora::AdapterSpec>,
    /// Not in `config.json`: the dtype of the matrix products ([`ComputeDtype`]), set by the run.
    #[serde(skip)]
    pub compute: ComputeDtype,
    /// Not a Llama-family field: set by [`ModelConfig::load`] from `model_type`.
    #[serde(skip)]
    pub arch: Arch,
    /// GPT-NeoX: head dimensions RoPE rotates (`head_dim * partial_rotary_factor`); `None` rotates all.
    #[serde(skip)]
    pub rotary_dims: Option<usize>,
    /// GPT-NeoX's `use_parallel_residual`: `x + attn(ln1(x)) + mlp(ln2(x))`.
    #[serde(skip)]
    pub parallel_residual: bool,
}

/// GPT-2's `config.json`, in its own spelling.
#[derive(Debug, Deserialize)]
struct Gpt2Json {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    /// `null`: 4 × n_embd.
    #[serde(default)]
    n_inner: Option<usize>,
    n_positions: usize,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_gelu_new")]
    activation_function: String,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default)]
    initializer_range: Option<f64>,
    #[serde(default = "default_true")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    add_cross_attention: bool,
}

/// GPT-NeoX's `config.json`: transformers 5 writes the rotary settings under `rope_parameters`, older
/// versions as `rotary_pct` and `rotary_emb_base`.
#[derive(Debug, Deserialize)]
struct GptNeoXJson {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_gelu")]
    hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_true")]
    use_parallel_residual: bool,
    #[serde(default = "default_true")]
    attention_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    initializer_range: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<NeoXRope>,
    #[serde(default)]
    rotary_pct: Option<f64>,
    #[serde(default)]
    rotary_emb_base: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct NeoXRope {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    rope_type: Option<String>,
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_gelu_new() -> String {
    "gelu_new".to_string()
}
fn default_gelu() -> String {
    "gelu".to_string()
}
fn default_true() -> bool {
    true
}

impl ModelConfig {
    /// A config with the Llama-family fields at their defaults, for the other families to fill in.
    fn blank(model_type: &str, arch: Arch) -> Self {
        Self {
            model_type: model_type.to_string(),
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_hidden_layers: 0,
            num_attention_heads: 0,
            num_key_value_heads: None,
            head_dim: None,
            rope_theta: None,
            rope_parameters: None,
            rms_norm_eps: default_layer_norm_eps(),
            tie_word_embeddings: false,
            attention_bias: true,
            mlp_bias: true,
            hidden_act: default_gelu(),
            rope_scaling: None,
            max_position_embeddings: None,
            sliding_window: None,
            use_sliding_window: None,
            initializer_range: None,
            pad_token_id: None,
            adapter: None,
            compute: ComputeDtype::F32,
            arch,
            rotary_dims: None,
            parallel_residual: false,
        }
    }

    fn from_gpt2(j: Gpt2Json) -> std::result::Result<Self, String> {
        if j.scale_attn_by_inverse_layer_idx {
            return Err("`scale_attn_by_inverse_layer_idx` is true: not supported (results would differ)".into());
        }
        if !j.scale_attn_weights {
            return Err("`scale_attn_weights` is false: not supported (results would differ)".into());
        }
        if j.add_cross_attention {
            return Err("`add_cross_attention` is true: a decoder with cross-attention is not a causal LM".into());
        }
        Ok(Self {
            vocab_size: j.vocab_size,
            hidden_size: j.n_embd,
            num_hidden_layers: j.n_layer,
            num_attention_heads: j.n_head,
            intermediate_size: j.n_inner.unwrap_or(j.n_embd.saturating_mul(4)), // absurd sizes: check_sizes
            max_position_embeddings: Some(j.n_positions),
            rms_norm_eps: j.layer_norm_epsilon,
            hidden_act: j.activation_function,
            tie_word_embeddings: j.tie_word_embeddings,
            initializer_range: j.initializer_range,
            ..Self::blank("gpt2", Arch::Gpt2)
        })
    }

    fn from_gpt_neox(j: GptNeoXJson) -> std::result::Result<Self, String> {
        let rope = j.rope_parameters.as_ref();
        if let Some(kind) = rope.and_then(|r| r.rope_type.as_deref()).filter(|k| *k != "default") {
            return Err(format!("RoPE type `{kind}` is not supported yet (only plain RoPE)"));
        }
        if j.rope_scaling.as_ref().is_some_and(|s| !s.is_null()) {
            return Err("`rope_scaling` is set: only plain RoPE is supported".into());
        }
        let factor = rope.and_then(|r| r.partial_rotary_factor).or(j.rotary_pct).unwrap_or(0.25);
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(format!("`partial_rotary_factor` is {factor}: expected 0 < factor <= 1"));
        }
        // transformers: rotary_ndims = int(head_size * partial_rotary_factor).
        let head = j.hidden_size / j.num_attention_heads.max(1);
        Ok(Self {
            vocab_size: j.vocab_size,
            hidden_size: j.hidden_size,
            num_hidden_layers: j.num_hidden_layers,
            num_attention_heads: j.num_attention_heads,
            intermediate_size: j.intermediate_size,
            hidden_act: j.hidden_act,
            rms_norm_eps: j.layer_norm_eps,
            parallel_residual: j.use_parallel_residual,
            attention_bias: j.attention_bias,
            tie_word_embeddings: j.tie_word_embeddings,
            max_position_embeddings: j.max_position_embeddings,
            initializer_range: j.initializer_range,
            rope_theta: rope.and_then(|r| r.rope_theta).or(j.rotary_emb_base).or(Some(10_000.0)),
            rotary_dims: Some((head as f64 * factor) as usize),
            ..Self::blank("gpt_neox", Arch::GptNeoX)
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// Largest `config.json` read (real ones are a few KiB).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Most parameters a config may describe (2^40, about 1.1 trillion): far above any model this trains,
/// far below the sizes whose products overflow.
pub const MAX_PARAMETERS: usize = 1 << 40;

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

impl ModelConfig {
    /// Read and check `config.json` from a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        super::check_model_dir(dir)?;
        let path = dir.join("config.json");
        let bytes = super::read_bounded(&path, MAX_CONFIG_BYTES)?;
        let config = Self::parse(&bytes).map_err(|msg| Error::model(&path, msg))?;
        config.check(&path)?;
        Ok(config)
    }

    /// `config.json`'s bytes in the spelling its `model_type` uses.
    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        #[derive(Deserialize)]
        struct Kind {
            model_type: String,
        }
        let kind: Kind = serde_json::from_slice(bytes).map_err(|e| format!("not a model config.json: {e}"))?;
        let bad = |family: &str, e: serde_json::Error| format!("not a {family} config.json: {e}");
        match kind.model_type.as_str() {
            "gpt2" => Self::from_gpt2(serde_json::from_slice(bytes).map_err(|e| bad("GPT-2", e))?),
            "gpt_neox" => Self::from_gpt_neox(serde_json::from_slice(bytes).map_err(|e| bad("GPT-NeoX", e))?),
            _ => serde_json::from_slice(bytes).map_err(|e| bad("Llama-family", e)),
        }
    }

    fn check(&self, path: &Path) -> Result<()> {
        const FAMILIES: [&str; 5] = ["llama", "mistral", "qwen2", "gpt_neox", "gpt2"];
        if !FAMILIES.contains(&self.model_type.as_str()) {
            return Err(Error::model(
                path,
                format!("model_type `{}` is not supported; expected one of {FAMILIES:?}", self.model_type),
            ));
        }
        let acts: &[&str] = match self.arch {
            Arch::Llama => &["silu"],
            Arch::GptNeoX | Arch::Gpt2 => &["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"],
        };
        if !acts.contains(&self.hidden_act.as_str()) {
            return Err(Error::model(
                path,
                format!(
                    "activation `{}` is not supported for {}; expected one of {acts:?}",
                    self.hidden_act, self.model_type
                ),
            ));
        }
        let scaling_type = self
            .rope_scaling
            .as_ref()
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(|t| t.as_str().map(str::to_string))
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_type.clone()));
        if let Some(kind) = scaling_type.filter(|k| k != "default") {
            return Err(Error::model(
                path,
                format!("RoPE type `{kind}` is not supported yet (only plain RoPE); results would silently differ"),
            ));
        }
        self.check_sizes().map_err(|msg| Error::model(path, msg))?;
        self.check_floats().map_err(|msg| Error::model(path, msg))?;
        self.padding_idx_checked().map_err(|msg| Error::model(path, msg))?;
        Ok(())
    }

    /// The sizes, before anything divides by them or allocates with them: every size positive, the
    /// heads and the head width consistent, and the parameter count finite and below [`MAX_PARAMETERS`].
    fn check_sizes(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ];
        if let Some((field, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{field}` is 0: expected a positive size"));
        }
        let h = self.num_attention_heads;
        match self.num_key_value_heads {
            Some(0) => {
                return Err(format!(
                    "`num_key_value_heads` is 0: expected a divisor of num_attention_heads ({h}), or no \
                     `num_key_value_heads` for plain multi-head attention"
                ))
            }
            Some(g) if !h.is_multiple_of(g) => {
                return Err(format!(
                    "`num_key_value_heads` ({g}) must divide num_attention_heads ({h}): each K/V head serves \
                     the same number of query heads"
                ))
            }
            _ => {}
        }
        let e = match self.head_dim {
            Some(0) => return Err("`head_dim` is 0: expected a positive size".into()),
            Some(e) => e,
            None if !self.hidden_size.is_multiple_of(h) => {
                return Err(format!(
                    "`hidden_size` ({}) must be a multiple of num_attention_heads ({h}) when `head_dim` is not \
                     given (head_dim = hidden_size / num_attention_heads)",
                    self.hidden_size
                ))
            }
            None => self.hidden_size / h,
        };
        let rotated = match self.arch {
            Arch::Llama => Some(e),
            Arch::GptNeoX => self.rotary_dims,
            Arch::Gpt2 => None,
        };
        if let Some(r) = rotated.filter(|r| !r.is_multiple_of(2)) {
            return Err(format!("RoPE rotates {r} head dimensions: expected an even number (it rotates pairs)"));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(()),
            count => Err(format!(
                "the sizes describe {} parameters; expected at most {MAX_PARAMETERS} (2^40): is a size corrupted?",
                count.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
            )),
        }
    }

    /// Number of scalar parameters the sizes describe (embedding, untied LM head, layers, biases),
    /// `None` when the count overflows `usize`. Checked arithmetic: the sizes are untrusted.
    fn parameter_count(&self) -> Option<usize> {
        let (v, d, f) = (self.vocab_size, self.hidden_size, self.intermediate_size);
        let (h, g) = (self.num_attention_heads, self.num_key_value_heads.unwrap_or(self.num_attention_heads));
        let e = self.head_dim.unwrap_or(d / h.max(1));
        let q = h.checked_mul(e)?; // rows of q_proj, columns of o_proj
        let kv = g.checked_mul(e)?; // rows of k_proj and v_proj
        let attention = q.checked_mul(d)?.checked_mul(2)?.checked_add(kv.checked_mul(d)?.checked_mul(2)?)?;
        let biases = q.checked_add(kv.checked_mul(2)?)?.checked_add(d)?.checked_add(f.checked_mul(2)?)?;
        let mlp = d.checked_mul(f)?.checked_mul(3)?;
        let layer = attention.checked_add(mlp)?.checked_add(biases)?.checked_add(d.checked_mul(2)?)?;
        let embeddings = v.checked_mul(d)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        layer.checked_mul(self.num_hidden_layers)?.checked_add(embeddings)?.checked_add(d)
    }

    /// The floating-point fields: finite, and positive where a logarithm or a division needs it.
    fn check_floats(&self) -> std::result::Result<(), String> {
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!("`rms_norm_eps` is {}: expected a finite number >= 0", self.rms_norm_eps));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("`rope_theta` is {theta}: expected a finite number > 0"));
        }
        match self.initializer_range {
            Some(std) if !(std.is_finite() && std >= 0.0) => {
                Err(format!("`initializer_range` is {std}: expected a finite number >= 0"))
            }
            _ => Ok(()),
        }
    }

    /// `pad_token_id` as a row of the embedding (PyTorch's `nn.Embedding` rule: `-v <= id < v`, a
    /// negative id counting from the end), or a message naming the field.
    fn padding_idx_checked(&self) -> std::result::Result<Option<u32>, String> {
        let Some(id) = self.pad_token_id else { return Ok(None) };
        let v = self.vocab_size as i64;
        let row = if id < 0 { id + v } else { id };
        if !(0..v).contains(&row) {
            return Err(format!(
                "pad_token_id {id} is not a row of the embedding: expected -{v} <= pad_token_id < {v} (vocab_size)"
            ));
        }
        u32::try_from(row).map(Some).map_err(|_| format!("pad_token_id {id} does not fit a token id"))
    }

    /// The embedding row that gets no gradient through the lookup (`padding_idx`), `None` without one.
    pub fn padding_idx(&self) -> Result<Option<u32>> {
        self.padding_idx_checked().map_err(|message| Error::Config {
            origin: "config.json".into(),
            key: "pad_token_id".into(),
            message,
        })
    }

    /// RoPE base frequency, wherever `config.json` put it (default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0)
    }

    /// The attention window, when the model uses one (Mistral; Qwen2 with `use_sliding_window`).
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Head dimensions RoPE rotates: all of them in the Llama family, `rotary_dims` in GPT-NeoX, none in
    /// GPT-2 (learned positions).
    pub fn rotated_dims(&self) -> usize {
        match self.arch {
            Arch::Llama => self.head_dim(),
            Arch::GptNeoX => self.rotary_dims.unwrap_or(self.head_dim()),
            Arch::Gpt2 => 0,
        }
    }

    /// The input embedding's tensor name.
    pub fn embed_name(&self) -> &'static str {
        match self.arch {
            Arch::Llama => "model.embed_tokens.weight",
            Arch::GptNeoX => "gpt_neox.embed_in.weight",
            Arch::Gpt2 => "transformer.wte.weight",
        }
    }

    /// The untied LM head's tensor name (GPT-NeoX checkpoints call it `embed_out`; a checkpoint that says
    /// `lm_head` is read under that name, see `model::canonical_names`).
    pub fn lm_head_name(&self) -> &'static str {
        match self.arch {
            Arch::GptNeoX => "embed_out.weight",
            Arch::Llama | Arch::Gpt2 => "lm_head.weight",
        }
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether the output projection carries a bias (Qwen2: never).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_fields_are_read_in_their_own_spelling() {
        let json = br#"{"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "n_inner": null, "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}"#;
        let c = ModelConfig::parse(json).unwrap();
        assert_eq!(c.arch, Arch::Gpt2);
        // n_inner null = 4 * n_embd; GPT-2 ties its head by default and rotates nothing.
        let sizes = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.max_position_embeddings);
        assert_eq!(sizes, (768, 3072, 12, Some(1024)));
        assert!(c.tie_word_embeddings);
        assert_eq!((c.rotated_dims(), c.head_dim()), (0, 64));
        let bad = br#"{"model_type": "gpt2", "vocab_size": 8, "n_embd": 8, "n_layer": 1, "n_head": 2,
            "n_positions": 8, "scale_attn_by_inverse_layer_idx": true}"#;
        let err = ModelConfig::parse(bad).unwrap_err();
        assert!(err.contains("scale_attn_by_inverse_layer_idx"), "{err}");
    }

    #[test]
    fn gpt_neox_rotary_settings_come_from_either_spelling() {
        // Pythia-160m as transformers 4 wrote it: rotary_pct 0.25 of head_dim 64 = 16 rotated dims.
        let old = br#"{"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "use_parallel_residual": true, "hidden_act": "gelu", "layer_norm_eps": 1e-5}"#;
        let c = ModelConfig::parse(old).unwrap();
        assert_eq!((c.arch, c.rotated_dims(), c.rope_theta(), c.parallel_residual), (Arch::GptNeoX, 16, 10000.0, true));
        assert!(!c.tie_word_embeddings && c.attention_bias);
        // transformers 5: under rope_parameters.
        let new = br#"{"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 64,
            "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 500, "rope_type": "default"}}"#;
        let c = ModelConfig::parse(new).unwrap();
        assert_eq!((c.rotated_dims(), c.rope_theta()), (4, 500.0)); // 8 * 0.5
        let scaled = br#"{"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 64, "rope_scaling": {"type": "linear", "factor": 2}}"#;
        assert!(ModelConfig::parse(scaled).unwrap_err().contains("rope_scaling"));
    }
}
