//! `config.json` of the Llama family, field for field as Hugging Face writes it.
//!
//! One struct covers Llama, Mistral, Qwen2 and SmolLM: they differ only in defaults (Qwen2 always has
//! q/k/v biases) and in fields this training path checks and rejects when it cannot honour them.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The Llama-family fields of a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2` (SmolLM is `llama`).
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

impl LlamaConfig {
    /// Read and check `config.json` from a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        super::check_model_dir(dir)?;
        let path = dir.join("config.json");
        let bytes = super::read_bounded(&path, MAX_CONFIG_BYTES)?;
        let config: LlamaConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::model(&path, format!("not a Llama-family config.json: {e}")))?;
        config.check(&path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<()> {
        const FAMILIES: [&str; 3] = ["llama", "mistral", "qwen2"];
        if !FAMILIES.contains(&self.model_type.as_str()) {
            return Err(Error::model(
                path,
                format!("model_type `{}` is not supported; expected one of {FAMILIES:?}", self.model_type),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(Error::model(path, format!("hidden_act `{}`: only silu is supported", self.hidden_act)));
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
        if !e.is_multiple_of(2) {
            return Err(format!("head dimension {e} must be even: RoPE rotates pairs of dimensions"));
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

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether the output projection carries a bias (Qwen2: never).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }
}
