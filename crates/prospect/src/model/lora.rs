//! LoRA (Hu et al. 2021) as PEFT 0.21 defines it, and its adapter folder.
//!
//! A targeted linear layer `y = x Wᵀ + b` becomes
//!
//! ```text
//! y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ        A: [r, in], B: [out, r]
//! s = alpha / r     (alpha / √r with rslora)
//! ```
//!
//! `W` and `b` are frozen: they go through [`frozen_matmul`], whose backward pass computes the input's
//! gradient and nothing for the weight (candle's matmul backward would also form `∂L/∂W`, a weight-sized
//! tensor per layer, and throw it away). A fresh adapter is initialised as PEFT does by default: A is
//! `kaiming_uniform_(a = √5)`, i.e. U(−1/√in, 1/√in), from a seeded generator; B is zero, so the
//! adapted model starts equal to the base.
//!
//! Names: inside Prospect an adapter tensor is named after its layer, `model.layers.0.self_attn.q_proj.
//! lora_A.weight`; PEFT's `adapter_model.safetensors` prefixes `base_model.model.` (see [`peft_name`]).
//! A reward model's `score` head is trained whole and saved as PEFT's `modules_to_save`
//! (`base_model.model.score.weight`).
//!
//! Not responsible for: which tensors train (`model::Policy`), or the reference (`train::run`).
//!
//! Shapes: `r` rank, `in`/`out` the layer's sizes, `m` rows of the input.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::{Arch, ModelConfig};
use crate::error::{Error, Result};

/// The linear layers of a Llama-family decoder layer, as PEFT's `target_modules` name them.
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/// GPT-NeoX's linear layers.
pub const NEOX_MODULES: [&str; 4] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"];
/// GPT-2's `Conv1D` layers (`c_proj` names both the attention's and the MLP's output layer, as in PEFT).
pub const GPT2_MODULES: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// A family's adaptable layers, in the order settings list them.
pub fn linear_modules(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama => &LINEAR_MODULES,
        Arch::GptNeoX => &NEOX_MODULES,
        Arch::Gpt2 => &GPT2_MODULES,
    }
}

/// PEFT's default `target_modules` for the family (its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub fn default_targets(arch: Arch) -> Vec<String> {
    let names: &[&str] = match arch {
        Arch::Llama => &["q_proj", "v_proj"],
        Arch::GptNeoX => &["query_key_value"],
        Arch::Gpt2 => &["c_attn"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// Tensors trained whole beside the adapters, saved as PEFT's `modules_to_save`: a reward model's head,
/// and the embedding (and untied LM head) when the run added tokens. (name, PEFT module name)
pub const MODULES_TO_SAVE: [(&str, &str); 6] = [
    ("score.weight", "score"),
    ("model.embed_tokens.weight", "embed_tokens"),
    ("lm_head.weight", "lm_head"),
    ("gpt_neox.embed_in.weight", "embed_in"),
    ("embed_out.weight", "embed_out"),
    ("transformer.wte.weight", "wte"),
];

/// Files of a PEFT adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// PEFT's prefix of every tensor in `adapter_model.safetensors` (the `PeftModel` → `LoraModel` path).
const PEFT_PREFIX: &str = "base_model.model.";

/// What the adapted model needs to know at run time: the scale and the dropout of every adapter.
#[derive(Debug, Clone)]
pub struct AdapterSpec {
    /// `alpha / r`, or `alpha / √r` with rslora.
    pub scale: f64,
    /// Dropout on the adapter's input, applied only in passes that carry a gradient.
    pub dropout: f32,
    pub rng: Arc<DropoutRng>,
}

impl PartialEq for AdapterSpec {
    fn eq(&self, other: &Self) -> bool {
        self.scale == other.scale && self.dropout == other.dropout
    }
}

/// The generator of dropout masks: reseeded from (seed, step) at the start of every optimizer step, then
/// drawn in the forward passes' fixed order. The masks of a step depend only on the seed and the step, so a
/// resumed run draws the masks an uninterrupted one drew.
#[derive(Debug)]
pub struct DropoutRng(Mutex<rand::rngs::StdRng>);

impl Default for DropoutRng {
    fn default() -> Self {
        Self(Mutex::new(rand::rngs::StdRng::seed_from_u64(0)))
    }
}

impl DropoutRng {
    /// Start the masks of optimizer step `step` of a run seeded with `seed`.
    pub fn start_step(&self, seed: u64, step: usize) {
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *rng = rand::rngs::StdRng::seed_from_u64(seed ^ (step as u64).rotate_left(32));
    }

    /// A keep-mask scaled by `1/(1−p)` (inverted dropout, as `nn.Dropout` in training): `n` values.
    fn mask(&self, n: usize, p: f32) -> Vec<f32> {
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let keep = 1.0 / (1.0 - p);
        (0..n).map(|_| if rng.gen::<f32>() < p { 0.0 } else { keep }).collect()
    }
}

/// The LoRA hyper-parameters of a run (the `[lora]` table once resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names from [`LINEAR_MODULES`], in that order.
    pub target_modules: Vec<String>,
    pub rslora: bool,
}

impl LoraSettings {
    /// PEFT's `scaling`: `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec { scale: self.scale(), dropout: self.dropout as f32, rng: Arc::new(DropoutRng::default()) }
    }
}

/// `target_modules` as the user wrote it → the module names, in the family's order ([`linear_modules`]).
/// `"all-linear"` is every linear layer of the decoder (PEFT's meaning: all but the output layer). Anything
/// else must name one of them. Without a family (a config checked before its model is read), any family's
/// names pass, and `"all-linear"` is kept as it is.
pub fn resolve_targets(names: &[String], arch: Option<Arch>) -> std::result::Result<Vec<String>, String> {
    let modules: Vec<&str> = match arch {
        Some(arch) => linear_modules(arch).to_vec(),
        None => [&LINEAR_MODULES[..], &NEOX_MODULES[..], &GPT2_MODULES[..]].concat(),
    };
    if names.iter().any(|n| n == "all-linear") {
        if names.len() > 1 {
            return Err("\"all-linear\" stands alone: it already names every linear layer".into());
        }
        return Ok(match arch {
            Some(_) => modules.iter().map(|s| s.to_string()).collect(),
            None => vec!["all-linear".into()],
        });
    }
    if names.is_empty() {
        return Err(format!("is empty; expected some of the model's linear layers: {modules:?}"));
    }
    if let Some(bad) = names.iter().find(|n| !modules.contains(&n.as_str())) {
        return Err(format!(
            "`{bad}` is not a linear layer of this model; its linear layers are {modules:?} \
             (or \"all-linear\" for all of them; the LM head is not adapted)"
        ));
    }
    Ok(modules.iter().filter(|m| names.iter().any(|n| n == *m)).map(|s| s.to_string()).collect())
}

/// The Hugging Face name of each targeted layer's weight with its `[out, in]` shape, layer by layer.
pub fn targeted_layers(config: &ModelConfig, targets: &[String]) -> Vec<(String, usize, usize)> {
    let (d, f, e) = (config.hidden_size, config.intermediate_size, config.head_dim());
    let (h, g) = (config.num_attention_heads, config.num_kv_heads());
    let (prefix, blocks, _) = super::causal_lm::top_names(config.arch);
    let mut out = Vec::new();
    for i in 0..config.num_hidden_layers {
        for m in targets {
            // (module path, out, in)
            let layers: &[(&str, usize, usize)] = match (config.arch, m.as_str()) {
                (Arch::Llama, "q_proj") => &[("self_attn.q_proj", h * e, d)],
                (Arch::Llama, "k_proj") => &[("self_attn.k_proj", g * e, d)],
                (Arch::Llama, "v_proj") => &[("self_attn.v_proj", g * e, d)],
                (Arch::Llama, "o_proj") => &[("self_attn.o_proj", d, h * e)],
                (Arch::Llama, "gate_proj") => &[("mlp.gate_proj", f, d)],
                (Arch::Llama, "up_proj") => &[("mlp.up_proj", f, d)],
                (Arch::Llama, _) => &[("mlp.down_proj", d, f)],
                (Arch::GptNeoX, "query_key_value") => &[("attention.query_key_value", 3 * d, d)],
                (Arch::GptNeoX, "dense") => &[("attention.dense", d, d)],
                (Arch::GptNeoX, "dense_h_to_4h") => &[("mlp.dense_h_to_4h", f, d)],
                (Arch::GptNeoX, _) => &[("mlp.dense_4h_to_h", d, f)],
                (Arch::Gpt2, "c_attn") => &[("attn.c_attn", 3 * d, d)],
                (Arch::Gpt2, "c_proj") => &[("attn.c_proj", d, d), ("mlp.c_proj", d, f)],
                (Arch::Gpt2, _) => &[("mlp.c_fc", f, d)],
            };
            out.extend(layers.iter().map(|&(path, o, i_)| (format!("{prefix}.{blocks}.{i}.{path}"), o, i_)));
        }
    }
    out
}

/// A fresh adapter, as PEFT initialises it: for each targeted layer, `lora_A.weight` `[r, in]` from
/// U(−1/√in, 1/√in) (`kaiming_uniform_(a=√5)`: gain √(2/(1+5)), bound gain·√(3/in)) and `lora_B.weight`
/// `[out, r]` zero. Seeded: the same seed gives the same adapter (the draws differ from PyTorch's).
pub fn fresh_adapter(
    config: &ModelConfig,
    settings: &LoraSettings,
    seed: u64,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4C6F_5241); // "LoRA"
    let mut tensors = BTreeMap::new();
    for (layer, out_dim, in_dim) in targeted_layers(config, &settings.target_modules) {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..settings.r * in_dim).map(|_| rng.gen_range(-bound..bound) as f32).collect();
        tensors.insert(format!("{layer}.lora_A.weight"), Tensor::from_vec(a, (settings.r, in_dim), device)?);
        tensors.insert(
            format!("{layer}.lora_B.weight"),
            Tensor::zeros((out_dim, settings.r), super::TRAIN_DTYPE, device)?,
        );
    }
    Ok(tensors)
}

/// PEFT's name for a tensor Prospect trains with LoRA.
pub fn peft_name(name: &str) -> String {
    format!("{PEFT_PREFIX}{name}")
}

/// `adapter_config.json`: the fields PEFT 0.21 writes for a LoRA adapter that Prospect reads or writes.
/// Unknown fields are kept as they are when read (PEFT writes many, mostly defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

/// PEFT writes `target_modules` as a list, or as one string (a regex, or `"all-linear"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl AdapterConfig {
    /// `dir/adapter_config.json`; an error names the file when it is not a PEFT config.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        serde_json::from_slice(&super::read_bounded(&path, 16 << 20)?)
            .map_err(|e| Error::model(&path, format!("not a PEFT adapter config: {e}")))
    }

    /// The base folder the adapter in `dir` names (`base_model_name_or_path`): relative to the adapter
    /// folder when it is a relative path that exists there.
    pub fn base_dir(&self, dir: &Path) -> Result<std::path::PathBuf> {
        let base = self.base_model_name_or_path.as_deref().filter(|b| !b.is_empty()).ok_or_else(|| {
            let msg = "names no base model (`base_model_name_or_path`); give the base explicitly";
            Error::model(dir.join(ADAPTER_CONFIG), msg)
        })?;
        let local = dir.join(base);
        Ok(if Path::new(base).is_relative() && local.is_dir() { local } else { base.into() })
    }

    /// The settings it describes for a model of family `arch`; an adapter Prospect cannot apply exactly is
    /// an error naming the field.
    pub fn settings(&self, path: &Path, arch: Arch) -> Result<LoraSettings> {
        let bad = |field: &str, msg: String| Error::model(path, format!("field `{field}`: {msg}"));
        if self.peft_type != "LORA" {
            return Err(bad("peft_type", format!("is {:?}; expected \"LORA\"", self.peft_type)));
        }
        if self.bias != "none" {
            return Err(bad("bias", format!("is {:?}; only \"none\" is supported", self.bias)));
        }
        let conv1d = arch == Arch::Gpt2;
        if self.fan_in_fan_out != conv1d {
            let msg = match conv1d {
                true => "is false; expected true (GPT-2's layers are Conv1D, weights stored [in, out])",
                false => "is true; expected false (this model's layers are not Conv1D)",
            };
            return Err(bad("fan_in_fan_out", msg.into()));
        }
        for key in ["use_dora", "layer_replication", "rank_pattern", "alpha_pattern"] {
            let value = self.rest.get(key).filter(|v| !v.is_null() && *v != &serde_json::json!({}));
            if value.is_some_and(|v| v != &serde_json::json!(false)) {
                return Err(bad(
                    key,
                    format!("is {}; Prospect applies plain LoRA only", value.unwrap_or(&serde_json::Value::Null)),
                ));
            }
        }
        // PEFT writes short names (`q_proj`) or, for "all-linear", full module paths
        // (`model.layers.0.self_attn.q_proj`): the module is the last component. Which layers carry an
        // adapter is what the weights file holds (`Adapter::read` checks each tensor).
        let mut names: Vec<String> = match &self.target_modules {
            TargetModules::List(v) => v.iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_string()).collect(),
            TargetModules::One(s) => vec![s.clone()],
        };
        names.sort();
        names.dedup();
        let target_modules = resolve_targets(&names, Some(arch)).map_err(|m| bad("target_modules", m))?;
        Ok(LoraSettings {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules,
            rslora: self.use_rslora,
        })
    }

    /// The config Prospect writes for `settings` (PEFT's keys; `task_type` `CAUSAL_LM`, or `SEQ_CLS` for a
    /// reward model, whose `score` is in `modules_to_save`).
    pub fn new(
        settings: &LoraSettings,
        base: &str,
        arch: Arch,
        reward_model: bool,
        modules_to_save: Vec<String>,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some(if reward_model { "SEQ_CLS" } else { "CAUSAL_LM" }.into()),
            r: settings.r,
            lora_alpha: settings.alpha,
            lora_dropout: settings.dropout,
            target_modules: TargetModules::List(settings.target_modules.clone()),
            use_rslora: settings.rslora,
            base_model_name_or_path: Some(base.to_string()),
            bias: "none".into(),
            modules_to_save: (!modules_to_save.is_empty()).then_some(modules_to_save),
            fan_in_fan_out: arch == Arch::Gpt2,
            rest: [
                ("inference_mode".to_string(), serde_json::json!(true)),
                ("init_lora_weights".to_string(), serde_json::json!(true)),
                ("use_dora".to_string(), serde_json::json!(false)),
            ]
            .into_iter()
            .collect(),
        }
    }
}

/// A PEFT adapter folder as read: its config, settings and tensors under Prospect's names.
pub struct Adapter {
    pub config: AdapterConfig,
    pub settings: LoraSettings,
    /// `…lora_A.weight` / `…lora_B.weight` per layer, plus whole tensors from `modules_to_save`.
    pub tensors: BTreeMap<String, Tensor>,
}

/// Whether `dir` is a PEFT adapter folder (it has `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

impl Adapter {
    /// Read `dir` and check every tensor against the model it will adapt (`config`).
    pub fn read(dir: &Path, config: &ModelConfig, device: &Device) -> Result<Self> {
        super::check_model_dir(dir)?;
        let adapter_config = AdapterConfig::read(dir)?;
        let settings = adapter_config.settings(&dir.join(ADAPTER_CONFIG), config.arch)?;
        let file = dir.join(ADAPTER_WEIGHTS);
        if !file.is_file() {
            return Err(Error::model(dir, format!("no {ADAPTER_WEIGHTS} in this adapter folder")));
        }
        let loaded = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::model(&file, format!("cannot read safetensors: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, t) in loaded {
            // PEFT drops the adapter name when saving; older files may still carry `.default`.
            let name = name.replace(".default.", ".");
            let Some(inner) = name.strip_prefix(PEFT_PREFIX) else {
                return Err(Error::model(&file, format!("tensor `{name}` does not start with `{PEFT_PREFIX}`")));
            };
            tensors.insert(inner.to_string(), t.to_dtype(super::TRAIN_DTYPE)?);
        }
        check_tensors(&file, config, &settings, &tensors)?;
        Ok(Self { config: adapter_config, settings, tensors })
    }
}

/// Every tensor of an adapter file must be a LoRA matrix of one of the model's linear layers, with the
/// shape the model and `r` imply and its A/B partner present, or a whole `modules_to_save` tensor.
fn check_tensors(
    file: &Path,
    config: &ModelConfig,
    settings: &LoraSettings,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let mut shapes = BTreeMap::new();
    let every: Vec<String> = linear_modules(config.arch).iter().map(|s| s.to_string()).collect();
    for (layer, o, i) in targeted_layers(config, &every) {
        shapes.insert(format!("{layer}.lora_A.weight"), vec![settings.r, i]);
        shapes.insert(format!("{layer}.lora_B.weight"), vec![o, settings.r]);
    }
    for (name, t) in tensors {
        if MODULES_TO_SAVE.iter().any(|(whole, _)| whole == name) {
            continue;
        }
        let Some(shape) = shapes.get(name) else {
            let msg = format!("tensor `{}` is not a LoRA matrix of this model's linear layers", peft_name(name));
            return Err(Error::model(file, msg));
        };
        if t.dims() != shape.as_slice() {
            let msg = format!(
                "tensor `{}` has shape {:?}; the base model and r = {} imply {shape:?}",
                peft_name(name),
                t.dims(),
                settings.r
            );
            return Err(Error::model(file, msg));
        }
        let partner = match name.strip_suffix("lora_A.weight") {
            Some(layer) => format!("{layer}lora_B.weight"),
            None => name.replace("lora_B.weight", "lora_A.weight"),
        };
        if !tensors.contains_key(&partner) {
            let msg = format!("tensor `{}` has no partner `{}`", peft_name(name), peft_name(&partner));
            return Err(Error::model(file, msg));
        }
    }
    if !tensors.keys().any(|k| k.ends_with("lora_A.weight")) {
        return Err(Error::model(file, "holds no LoRA matrices"));
    }
    Ok(())
}

/// Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's names) into `dir`.
pub fn write_adapter(dir: &Path, config: &AdapterConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let json = serde_json::to_vec_pretty(config).map_err(|e| Error::output(dir, e))?;
    crate::fsio::write_atomic(&dir.join(ADAPTER_CONFIG), &json)?;
    let named: BTreeMap<String, Tensor> = tensors.iter().map(|(k, t)| (peft_name(k), t.clone())).collect();
    super::save_tensors(&named, &dir.join(ADAPTER_WEIGHTS))
}

/// The base weights with the adapter folded in: `W ← W + s·B·A` for every adapted layer (PEFT's
/// `merge_and_unload`), and the `modules_to_save` tensors the adapter carries replacing the base's.
pub fn merge(base: &mut BTreeMap<String, Tensor>, adapter: &Adapter) -> Result<()> {
    let scale = adapter.settings.scale();
    for (name, a) in &adapter.tensors {
        let Some(layer) = name.strip_suffix(".lora_A.weight") else { continue };
        let b = &adapter.tensors[&format!("{layer}.lora_B.weight")]; // [out, r]; present: checked by `read`
        let key = format!("{layer}.weight");
        let w = base.get(&key).ok_or_else(|| Error::Compute(format!("the base has no `{key}` to merge into")))?;
        let delta = (b.matmul(a)? * scale)?; // [out, in]
                                             // GPT-2's Conv1D stores `[in, out]` (`fan_in_fan_out`).
        let delta = if adapter.config.fan_in_fan_out { delta.t()?.contiguous()? } else { delta };
        base.insert(key, (w + delta.to_dtype(w.dtype())?)?);
    }
    for (name, _) in MODULES_TO_SAVE {
        if let Some(t) = adapter.tensors.get(name) {
            base.insert(name.to_string(), t.clone());
        }
    }
    Ok(())
}

/// A linear layer `y = x Wᵀ + b`, with an optional LoRA adapter. Built from a `VarBuilder`: when the
/// tensors hold `<layer>.lora_A.weight` the adapter is on, when they do not it is off (the base model).
pub struct Proj {
    inner: candle_nn::Linear,
    lora: Option<LoraLayer>,
    /// Whether the stored weight is a `Var` (read before any view: a transposed view of a `Var` is not
    /// itself one, and would take the frozen path and silently get no gradient).
    trainable: bool,
    /// The dtype of the product ([`super::ComputeDtype`]); the result is in the input's dtype.
    compute: DType,
}

struct LoraLayer {
    a: Tensor, // [r, in]
    b: Tensor, // [out, r]
    spec: AdapterSpec,
}

impl Proj {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        adapter: Option<&AdapterSpec>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = if vb.contains_tensor("weight_q8_0") {
            // A frozen LoRA base kept in Q8_0 (`base_dtype = "q8_0"`): dequantized per product.
            let q = vb.get_unchecked("weight_q8_0")?;
            if q.dims() != [out_dim, in_dim / Q8_BLOCK * Q8_BYTES] {
                let msg = format!("a Q8_0 weight of shape {:?} for a {out_dim}×{in_dim} layer", q.dims());
                return Err(Error::Compute(msg));
            }
            q
        } else {
            vb.get((out_dim, in_dim), "weight")?
        };
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        let lora = Self::adapter(in_dim, out_dim, adapter, &vb)?;
        let trainable = weight.is_variable();
        Ok(Self { inner: candle_nn::Linear::new(weight, bias), lora, trainable, compute: DType::F32 })
    }

    /// GPT-2's `Conv1D`: `y = x W + b` with the weight stored `[in, out]` (PEFT's `fan_in_fan_out`). The
    /// layer holds a transposed view, `[out, in]`, so the product and the adapter are those of a linear
    /// layer; gradients reach the stored `[in, out]` tensor.
    pub fn conv1d(in_dim: usize, out_dim: usize, adapter: Option<&AdapterSpec>, vb: VarBuilder) -> Result<Self> {
        if vb.contains_tensor("weight_q8_0") {
            return Err(Error::Compute("a Q8_0 base is not supported for GPT-2's Conv1D layers".into()));
        }
        let stored = vb.get((in_dim, out_dim), "weight")?; // [in, out]
        let trainable = stored.is_variable();
        let bias = Some(vb.get(out_dim, "bias")?);
        let lora = Self::adapter(in_dim, out_dim, adapter, &vb)?;
        Ok(Self { inner: candle_nn::Linear::new(stored.t()?, bias), lora, trainable, compute: DType::F32 })
    }

    fn adapter(
        in_dim: usize,
        out_dim: usize,
        adapter: Option<&AdapterSpec>,
        vb: &VarBuilder,
    ) -> Result<Option<LoraLayer>> {
        Ok(match adapter {
            Some(spec) if vb.contains_tensor("lora_A.weight") => {
                let a = vb.get_unchecked("lora_A.weight")?;
                let r = a.dim(0)?;
                Some(LoraLayer {
                    a: vb.get((r, in_dim), "lora_A.weight")?,
                    b: vb.get((out_dim, r), "lora_B.weight")?,
                    spec: spec.clone(),
                })
            }
            _ => None,
        })
    }

    /// The weight when this layer is a plain frozen product (not a `Var`, no adapter): the layers around it
    /// may then fuse it (`kernels::swiglu_down_frozen`).
    pub fn frozen_weight(&self) -> Option<&Tensor> {
        let w = self.inner.weight();
        (!self.trainable && self.lora.is_none() && self.inner.bias().is_none()).then_some(w)
    }

    /// The same layer with its product computed in `compute` (bf16 mixed precision).
    pub fn computing_in(mut self, compute: DType) -> Self {
        self.compute = compute;
        self
    }

    /// `x` `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        let y = weight_matmul(x, w, self.trainable, self.compute)?; // [..., out]
        let y = match self.inner.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let Some(lora) = &self.lora else { return Ok(y) };
        // Dropout only in a pass that trains the adapter (its tensors are `Var`s).
        let h = match lora.spec.dropout {
            p if p > 0.0 && lora.a.is_variable() => {
                let mask = lora.spec.rng.mask(x.elem_count(), p);
                (x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?
            }
            _ => x.clone(),
        };
        let down = h.broadcast_matmul(&lora.a.t()?)?; // [..., r]
        let up = down.broadcast_matmul(&lora.b.t()?)?; // [..., out]
        Ok((y + (up * lora.spec.scale)?)?)
    }
}

/// `x Wᵀ` for a weight that does not train: the backward pass gives `x` its gradient `∂L/∂y · W` and
/// forms nothing for `W`. `x` is `[m, in]` or `[b, t, in]`, `w` `[out, in]`. Same product, same kernel and
/// same operand layout as candle's `Linear`, so the values are bit for bit those of the trainable path.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // On a GPU: candle's matmul on the detached weight (which then tracks no gradient).
        return Ok(x.broadcast_matmul(&dense_weight(&w.detach(), x.dtype())?.t()?)?);
    }
    Ok(x.apply_op1(FrozenMatmul { w: w.detach() })?)
}

/// `x Wᵀ` with the weight `[out, in]` (or a transposed view of `[in, out]`), products in `compute`: the one
/// choice of product shared by linear layers and the LM head. A weight that trains goes through
/// [`trained_matmul`] (or, in bf16, [`super::ops::matmul_in`], whose casts pass the gradient to the f32
/// master weight); a frozen one through [`frozen_matmul_in`], which forms no weight gradient.
pub fn weight_matmul(x: &Tensor, w: &Tensor, trainable: bool, compute: DType) -> Result<Tensor> {
    match (trainable, compute == x.dtype()) {
        (true, true) => trained_matmul(x, w),
        (true, false) => super::ops::matmul_in(x, &w.t()?, compute),
        (false, _) => frozen_matmul_in(x, w, compute),
    }
}

/// `x Wᵀ` for a weight that trains, as candle's `Linear` computes it (same kernel, same operand layout: bit
/// for bit its forward value), with a backward pass that forms `∂L/∂W = (∂L/∂y)ᵀ x` directly as `[out, in]`.
/// Through candle's matmul on the transposed view `Wᵀ`, the weight's gradient is formed `[in, out]`, summed
/// into a zeroed `[in, out]` buffer for the view, then transposed and summed, element by element through
/// strides, into a second zeroed `[out, in]` buffer: two weight-sized allocations and additions per layer
/// and backward pass instead of one. `x` is `[m, in]` or `[b, t, in]`; on a GPU it is candle's matmul.
pub fn trained_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || w.dtype() != x.dtype() || !w.is_contiguous() {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    Ok(x.apply_op2(w, TrainedMatmul)?)
}

struct TrainedMatmul;

impl CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "trained-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        matmul_wt_cpu(s, l, ws, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let rows = dy.elem_count() / out;
        let dy = dy.detach().contiguous()?.reshape((rows, out))?; // [m, out]
        let dx = matmul_2d(&dy, false, &w.detach(), false)?.reshape(x.shape())?; // [m, out] x [out, in]
        let x = x.detach().contiguous()?.reshape((rows, k))?; // [m, in]
        let dw = matmul_2d(&dy, true, &x, false)?; // [out, m] x [m, in] -> [out, in]
        Ok((Some(dx), Some(dw)))
    }
}

/// `op(a) · op(b)` of 2-D tensors, `a` stored transposed when `a_t` (and `b` when `b_t`), as one product
/// (a 3-D gradient through `broadcast_matmul` would be one product per batch row).
fn matmul_2d(a: &Tensor, a_t: bool, b: &Tensor, b_t: bool) -> candle_core::Result<Tensor> {
    let a = if a_t { a.t()? } else { a.clone() };
    let b = if b_t { b.t()? } else { b.clone() };
    a.matmul(&b)
}

/// [`frozen_matmul`] with `x` rounded to `compute` for the product, which comes back in `x`'s dtype (bf16
/// mixed precision; the plain product when `compute` is `x`'s dtype).
pub fn frozen_matmul_in(x: &Tensor, w: &Tensor, compute: DType) -> Result<Tensor> {
    if x.dtype() == compute {
        return frozen_matmul(x, w);
    }
    Ok(frozen_matmul(&x.to_dtype(compute)?, w)?.to_dtype(x.dtype())?)
}

/// `x Wᵀ` on storage: `x` `[m, in]` or `[b, t, in]` (contiguous rows), `w` `[out, in]` contiguous, in any
/// dtype (a 16-bit frozen weight is cast for this product only). The kernel and operand layouts are those of
/// candle's `Linear`, so the result is bit for bit its result.
pub(crate) fn matmul_wt(s: &CpuStorage, l: &Layout, w: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let w = dense_weight(w, s.dtype())?;
    let (storage, wl) = w.storage_and_layout();
    let Storage::Cpu(w) = &*storage else { candle_core::bail!("frozen-matmul: the weight is not on the CPU") };
    matmul_wt_cpu(s, l, w, wl)
}

/// [`matmul_wt`] on the weight's storage and layout (`[out, in]` in `s`'s dtype).
fn matmul_wt_cpu(s: &CpuStorage, l: &Layout, w: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    let dims = l.dims();
    let (batch, m) = match *dims {
        [m, kk] if kk == k => (1, m),
        [b, m, kk] if kk == k => (b, m),
        _ => candle_core::bail!("frozen-matmul: input {dims:?} does not end in the weight's {k} columns"),
    };
    // Wᵀ as candle's Linear presents it: `[in, out]`, or `[batch, in, out]` with a zero batch stride
    // (candle's CPU matmul reads both operands' strides at the lhs's rank). A weight stored `[in, out]`
    // (GPT-2's Conv1D, held as a transposed view) is Wᵀ already, row-major.
    let strides = if wl.is_contiguous() {
        [1, k]
    } else if wl.stride() == [1, n] {
        [n, 1]
    } else {
        candle_core::bail!("frozen-matmul: the weight must be contiguous, or the transpose of a contiguous matrix");
    };
    let wt = match dims.len() {
        2 => Layout::new(Shape::from((k, n)), strides.to_vec(), wl.start_offset()),
        _ => Layout::new(Shape::from((batch, k, n)), vec![0, strides[0], strides[1]], wl.start_offset()),
    };
    let out = s.matmul(w, (batch, m, n, k), l, &wt)?;
    let shape = if dims.len() == 2 { Shape::from((m, n)) } else { Shape::from((batch, m, n)) };
    Ok((out, shape))
}

/// A frozen weight as the product needs it: `[out, in]` in `dtype`. A 16-bit weight is cast; a Q8_0 one
/// (a u8 tensor of blocks, see [`quantize_q8_0`]) is dequantized. The copy lives for one product.
pub(crate) fn dense_weight(w: &Tensor, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
    match w.dtype() {
        candle_core::DType::U8 => dequantize_q8_0(w)?.to_dtype(dtype),
        d if d == dtype => Ok(w.clone()),
        _ => w.to_dtype(dtype),
    }
}

/// Values per Q8_0 block, and bytes per block (an f16 scale, then 32 signed bytes), as in GGML.
const Q8_BLOCK: usize = 32;
const Q8_BYTES: usize = 34;

/// GGML's Q8_0 of a `[rows, cols]` matrix (`cols` a multiple of 32): per block of 32 values,
/// `d = max|x| / 127` (stored as f16) and `q = round(x / d)` (i8). Returned as a `[rows, cols/32·34]` u8
/// tensor: 1.0625 bytes per weight instead of 4.
pub fn quantize_q8_0(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if !cols.is_multiple_of(Q8_BLOCK) {
        return Err(Error::Compute(format!("Q8_0 needs a multiple of 32 columns, got {cols}")));
    }
    let values: Vec<f32> = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(values.len() / Q8_BLOCK * Q8_BYTES);
    for block in values.chunks_exact(Q8_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = half::f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend(d.to_le_bytes());
        out.extend(block.iter().map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    Ok(Tensor::from_vec(out, (rows, cols / Q8_BLOCK * Q8_BYTES), w.device())?)
}

/// How many weights a frozen tensor stores: its elements, or for Q8_0 blocks (u8) 32 per 34 bytes.
pub fn stored_weights(t: &Tensor) -> usize {
    match t.dtype() {
        candle_core::DType::U8 => t.elem_count() / Q8_BYTES * Q8_BLOCK,
        _ => t.elem_count(),
    }
}

/// The inverse of [`quantize_q8_0`]: `x = d · q`, as f32 `[rows, cols]`.
pub fn dequantize_q8_0(q: &Tensor) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let (rows, packed) = q.dims2()?;
    let bytes: Vec<u8> = q.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; bytes.len() / Q8_BYTES * Q8_BLOCK];
    out.par_chunks_mut(Q8_BLOCK).zip(bytes.par_chunks_exact(Q8_BYTES)).for_each(|(x, b)| {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (x, &q) in x.iter_mut().zip(&b[2..]) {
            *x = d * f32::from(q as i8);
        }
    });
    Tensor::from_vec(out, (rows, packed / Q8_BYTES * Q8_BLOCK), q.device())
}

struct FrozenMatmul {
    /// `[out, in]`, contiguous.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        matmul_wt(s, l, &self.w)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = dense_weight(&self.w, dy.dtype())?; // a no-op unless the base is kept in 16 or 8 bits
        let out = w.dim(0)?;
        let dy = dy.contiguous()?.reshape((dy.elem_count() / out, out))?; // [m, out]
        Ok(Some(matmul_2d(&dy, false, &w, false)?.reshape(x.shape())?)) // [m, out] x [out, in] -> [m, in]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_core::{DType, Var};

    fn uniform(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn trained_matmul_equals_linear_forward_and_backward() {
        // Shapes of a microbatch: 2-D and 3-D inputs, rows a multiple of no kernel tile (13 = 8 + 5).
        for (seed, shape) in [vec![13, 7], vec![2, 9, 7]].into_iter().enumerate() {
            let w = Var::from_tensor(&uniform(&[5, 7], 10 + seed as u64)).unwrap();
            let x = Var::from_tensor(&uniform(&shape, 20 + seed as u64)).unwrap();
            let ours = trained_matmul(x.as_tensor(), w.as_tensor()).unwrap();
            let linear = candle_nn::Linear::new(w.as_tensor().clone(), None).forward(x.as_tensor()).unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            assert_eq!(flat(&ours), flat(&linear), "{shape:?}: forward, bit for bit");
            // ∂ Σ (y ⊙ c) / ∂W = cᵀ x and / ∂x = c W, with c a fixed random upstream gradient.
            let c = uniform(ours.dims(), 30 + seed as u64);
            let g1 = (&ours * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&linear * &c).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (flat(g1.get(v.as_tensor()).unwrap()), flat(g2.get(v.as_tensor()).unwrap()));
                let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
                let worst = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(worst <= 1e-6 * scale, "{shape:?}: gradient off by {worst} (scale {scale})");
            }
        }
    }

    #[test]
    fn frozen_matmul_equals_linear_bit_for_bit_and_gives_only_the_input_a_gradient() {
        let w = uniform(&[5, 7], 1);
        for shape in [vec![3, 7], vec![2, 4, 7]] {
            let x = Var::from_tensor(&uniform(&shape, 2)).unwrap();
            let frozen = frozen_matmul(x.as_tensor(), &w).unwrap();
            let plain = candle_nn::Linear::new(w.clone(), None).forward(x.as_tensor()).unwrap();
            let diff = (&frozen - &plain).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{shape:?}");
            // ∂ Σ y² / ∂x = 2 y W on both paths.
            let g1 = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let (d1, d2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            let diff = (d1 - d2).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
            // candle's matmul also forms a weight-sized gradient (for its `Wᵀ` view, then thrown away); the
            // frozen one forms none.
            let sizes = |g: &candle_core::backprop::GradStore| -> usize {
                g.get_ids().map(|id| g.get_id(*id).map_or(0, |t| t.elem_count())).sum()
            };
            assert!(sizes(&g1) <= x.elem_count() + frozen.elem_count(), "{}", sizes(&g1));
            assert!(sizes(&g2) >= sizes(&g1) + w.elem_count(), "{} vs {}", sizes(&g2), sizes(&g1));
        }
    }

    #[test]
    fn fresh_adapter_is_kaiming_uniform_a_and_zero_b() {
        let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 16, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2
        }))
        .unwrap();
        let settings = LoraSettings {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: resolve_targets(&["all-linear".into()], Some(Arch::Llama)).unwrap(),
            rslora: false,
        };
        let a = fresh_adapter(&cfg, &settings, 3, &Device::Cpu).unwrap();
        assert_eq!(a.len(), 2 * 7 * 2);
        assert_eq!(a["model.layers.1.self_attn.k_proj.lora_B.weight"].dims(), [32, 8]); // g·e = 2·16
        let down: Vec<f32> = a["model.layers.0.mlp.down_proj.lora_A.weight"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(down.len(), 8 * 96);
        // U(−b, b) with b = 1/√96: max |x| < b, variance b²/3.
        let bound = 1.0 / 96f32.sqrt();
        assert!(down.iter().all(|x| x.abs() < bound));
        let var = down.iter().map(|x| x * x).sum::<f32>() / down.len() as f32;
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.15, "{var}");
        let b = a["model.layers.0.mlp.down_proj.lora_B.weight"].abs().unwrap().sum_all().unwrap();
        assert_eq!(b.to_scalar::<f32>().unwrap(), 0.0);
        let again = fresh_adapter(&cfg, &settings, 3, &Device::Cpu).unwrap();
        assert_eq!(
            again["model.layers.0.mlp.down_proj.lora_A.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            down
        );
        assert_eq!(a["model.layers.0.mlp.down_proj.lora_A.weight"].dtype(), DType::F32);
    }

    #[test]
    fn q8_0_round_trips_within_half_a_step_of_each_block() {
        let w = uniform(&[3, 64], 5);
        let q = quantize_q8_0(&w).unwrap();
        assert_eq!(q.dims(), [3, 68]); // 2 blocks of 34 bytes per row
        let back = dequantize_q8_0(&q).unwrap();
        let (w, back): (Vec<f32>, Vec<f32>) =
            (w.flatten_all().unwrap().to_vec1().unwrap(), back.flatten_all().unwrap().to_vec1().unwrap());
        for (block, got) in w.chunks(32).zip(back.chunks(32)) {
            let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (a, b) in block.iter().zip(got) {
                assert!((a - b).abs() <= 0.5 * step * 1.01, "{a} vs {b} (step {step})");
            }
        }
        // GGML's layout: block 0 of row 0 starts with its f16 scale, max|x|/127.
        let bytes: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        let d = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        let amax = w[..32].iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((d - amax / 127.0).abs() < 1e-3 * d);
    }

    #[test]
    fn scale_is_alpha_over_r_or_over_root_r() {
        let mut s = LoraSettings { r: 16, alpha: 32.0, dropout: 0.0, target_modules: vec![], rslora: false };
        assert_eq!(s.scale(), 2.0);
        s.rslora = true;
        assert_eq!(s.scale(), 8.0); // 32 / √16
    }

    #[test]
    fn unknown_target_names_list_the_linear_layers() {
        let err = resolve_targets(&["q_proj".into(), "qkv".into()], Some(Arch::Llama)).unwrap_err();
        assert!(err.contains("`qkv`") && err.contains("down_proj"), "{err}");
        assert_eq!(
            resolve_targets(&["v_proj".into(), "q_proj".into()], Some(Arch::Llama)).unwrap(),
            ["q_proj", "v_proj"]
        );
        assert_eq!(resolve_targets(&["all-linear".into()], Some(Arch::Gpt2)).unwrap(), ["c_attn", "c_proj", "c_fc"]);
        let err = resolve_targets(&["q_proj".into()], Some(Arch::GptNeoX)).unwrap_err();
        assert!(err.contains("query_key_value"), "{err}");
    }

    #[test]
    fn dropout_masks_are_a_function_of_seed_step_and_call() {
        let rng = DropoutRng::default();
        rng.start_step(7, 3);
        let (m1, m2) = (rng.mask(10_000, 0.25), rng.mask(10_000, 0.25));
        assert_ne!(m1, m2);
        let kept = m1.iter().filter(|&&x| x > 0.0).count() as f64 / 1e4;
        assert!((kept - 0.75).abs() < 0.02, "{kept}");
        assert!(m1.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        rng.start_step(7, 3);
        assert_eq!(rng.mask(10_000, 0.25), m1);
    }
}
