//! Models: the Llama family, GPT-NeoX and GPT-2 for training, its weights in Hugging Face layout, the tokenizer, and
//! `sequence_logps`, where logits become log-probs.

pub mod causal_lm;
pub mod config;
pub mod embedding;
pub mod heads;
pub mod init;
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod kernels_cuda;
pub mod logps;
pub mod lora;
pub mod ops;
pub mod tokenizer;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use causal_lm::CausalLm;
pub use config::{ComputeDtype, ModelConfig};
pub use heads::{RewardModel, ValueHead};
pub use logps::{
    completion_logps, completion_logps_of, sequence_logps, sequence_logps_composite, token_logps, SequenceLogps,
};
pub use lora::LoraSettings;
pub use tokenizer::HfTokenizer;
pub use weights::{load_tensors, save_tensors, Params};

use crate::error::{Error, Result};

/// Training runs in f32: the reference numbers (TRL on CPU) are f32, and AdamW's small updates need it.
pub const TRAIN_DTYPE: DType = DType::F32;

/// What sits on top of the trained backbone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Head {
    /// The causal LM head (every loss that trains a policy).
    #[default]
    Lm,
    /// A scalar `score` head instead of the LM head: a reward model, saved as
    /// `*ForSequenceClassification` with `num_labels = 1`.
    Score,
    /// The LM head plus a value head (`v_head.summary.*`, PPO's critic), saved beside the model as
    /// `value_head.safetensors`.
    Value,
}

/// File a value head is read from and saved to, next to `model.safetensors`.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// A trainable policy: its config, its parameters as `Var`s, and the folder it came from.
///
/// Full fine-tuning: `params` holds every weight and `frozen` is empty. LoRA: `params` holds the
/// adapters (and a reward model's `score` or PPO's value head), `frozen` the base weights as plain
/// tensors: no gradient, no optimizer state.
pub struct Policy {
    pub config: ModelConfig,
    pub params: Params,
    pub frozen: BTreeMap<String, Tensor>,
    /// LoRA's settings, when the run trains adapters.
    pub lora: Option<lora::LoraSettings>,
    /// With `init_adapter`: the adapter as the run started, kept frozen (the reference applies it).
    initial_adapter: Option<BTreeMap<String, Tensor>>,
    pub source_dir: PathBuf,
    pub head: Head,
    /// Written to `config.json` when a reward model is saved (HF reads the score at the last token
    /// that is not `pad_token_id`).
    pub pad_token_id: Option<u32>,
}

/// How a LoRA run starts: its settings, and the adapter folder it continues (or `None`: a fresh one).
pub struct LoraStart<'a> {
    pub table: &'a crate::config::LoraTable,
    pub seed: u64,
}

impl Policy {
    /// Load a Hugging Face folder for training. Checkpoint tensors the model does not use (e.g. a
    /// redundant `lm_head.weight` when embeddings are tied) are left out and returned by name.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, Vec<String>)> {
        let (policy, unused, _) = Self::load_with_head(dir, device, Head::Lm, 0)?;
        Ok((policy, unused))
    }

    /// Load with a given head, every weight trainable. See [`Policy::load_for_training`].
    pub fn load_with_head(
        dir: &Path,
        device: &Device,
        head: Head,
        seed: u64,
    ) -> Result<(Self, Vec<String>, Vec<String>)> {
        Self::load_for_training(dir, device, head, seed, None)
    }

    /// Load with a given head, for full fine-tuning or (with `lora`) adapters on a frozen base. A head
    /// the folder lacks (`score.weight`; `v_head.summary.*` in `value_head.safetensors`) is initialised
    /// from N(0, `initializer_range`²) with `seed` (bias 0); heads always train whole.
    /// Returns the policy, the unused checkpoint tensors, and the names of initialised tensors.
    pub fn load_for_training(
        dir: &Path,
        device: &Device,
        head: Head,
        seed: u64,
        lora: Option<LoraStart>,
    ) -> Result<(Self, Vec<String>, Vec<String>)> {
        let mut config = ModelConfig::load(dir)?;
        // A LoRA base kept in 16 bits or Q8_0 is converted as it is read, one tensor at a time.
        let base_dtype = lora.as_ref().map_or(TRAIN_DTYPE, |l| l.table.base_dtype.dtype());
        let mut tensors = if base_dtype == TRAIN_DTYPE {
            load_tensors(dir, TRAIN_DTYPE, device)?
        } else {
            weights::load_tensors_each(dir, device, |name, t| store_base(name, t, base_dtype, config.arch))?
        };
        canonical_names(&config, &mut tensors);
        check_embedding(dir, &config, &tensors)?;
        let initialised = add_head(dir, &config, &mut tensors, head, seed, device)?;
        let (_, used) = weights::build_with(tensors.clone(), TRAIN_DTYPE, device, |vb| {
            let built = match head {
                Head::Lm => CausalLm::new(&config, vb).map(|_| ()),
                Head::Score => RewardModel::new(&config, vb).map(|_| ()),
                Head::Value => CausalLm::new(&config, vb.clone()).and_then(|_| ValueHead::new(&config, vb)).map(|_| ()),
            };
            built.map_err(|e| annotate(dir, e))
        })?;
        let unused: Vec<String> = tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
        tensors.retain(|k, _| used.contains(k));
        let mut policy = Self {
            config: config.clone(),
            params: Params::from_tensors(&BTreeMap::new())?,
            frozen: BTreeMap::new(),
            lora: None,
            initial_adapter: None,
            source_dir: dir.to_path_buf(),
            head,
            pad_token_id: None,
        };
        let Some(start) = lora else {
            policy.params = Params::from_tensors(&tensors)?;
            return Ok((policy, unused, initialised));
        };
        let adapter = match &start.table.init_adapter {
            Some(path) => Some(lora::Adapter::read(path, &config, device)?),
            None => None,
        };
        let settings = start.table.settings(adapter.as_ref().map(|a| &a.settings), Some(config.arch))?;
        config.adapter = Some(settings.spec());
        // Heads train whole (PEFT's `modules_to_save`); an adapter's saved `score` replaces the base's.
        let mut trainable: BTreeMap<String, Tensor> =
            tensors.iter().filter(|(k, _)| is_head_tensor(k)).map(|(k, t)| (k.clone(), t.clone())).collect();
        tensors.retain(|k, _| !is_head_tensor(k));
        let adapter_tensors = match &adapter {
            Some(a) => a.tensors.clone(),
            None => lora::fresh_adapter(&config, &settings, start.seed, device)?,
        };
        for (name, _) in lora::MODULES_TO_SAVE {
            if adapter_tensors.contains_key(name) {
                tensors.remove(name); // the adapter's copy trains; the base's is not needed
            }
        }
        vocab_from_embedding(&mut config, &adapter_tensors)?;
        if head != Head::Score && adapter_tensors.contains_key(heads::SCORE_WEIGHT) {
            return Err(Error::model(
                dir,
                "init_adapter holds a reward model's `score` head; this loss trains a policy",
            ));
        }
        policy.initial_adapter = adapter.is_some().then(|| {
            adapter_tensors.iter().filter(|(k, _)| !is_head_tensor(k)).map(|(k, t)| (k.clone(), t.clone())).collect()
        });
        trainable.extend(adapter_tensors);
        policy.params = Params::from_tensors(&trainable)?;
        policy.frozen = tensors; // already in `base_dtype`: converted as it was read
        policy.config = config;
        policy.lora = Some(settings);
        Ok((policy, unused, initialised))
    }

    /// The model as training starts, frozen, without a second copy of the base: the base with the
    /// adapter off, or (with `init_adapter`) with a frozen copy of the initial adapter. `None` without
    /// LoRA (the reference is then a model folder of its own).
    pub fn lora_reference(&self, device: &Device) -> Result<Option<CausalLm>> {
        if self.lora.is_none() {
            return Ok(None);
        }
        let mut tensors = self.frozen.clone();
        if let Some(initial) = &self.initial_adapter {
            tensors.extend(initial.iter().map(|(k, t)| (k.clone(), t.detach())));
        }
        let (model, _) = weights::build_with(tensors, TRAIN_DTYPE, device, |vb| CausalLm::new(&self.config, vb))?;
        Ok(Some(model))
    }

    /// Weights in the frozen base (a LoRA run's), counted as parameters whatever `base_dtype` stores them in.
    pub fn frozen_parameters(&self) -> usize {
        self.frozen.values().map(lora::stored_weights).sum()
    }

    /// The frozen base and the trainable tensors, under one set of names.
    fn with_frozen(&self, trainable: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
        let mut all = self.frozen.clone();
        all.extend(trainable);
        all
    }

    fn build_llama(&self, tensors: BTreeMap<String, Tensor>, device: &Device) -> Result<CausalLm> {
        let head = self.head;
        Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| match head {
            Head::Score => CausalLm::new_backbone(&self.config, vb),
            Head::Lm | Head::Value => CausalLm::new(&self.config, vb),
        })?
        .0)
    }

    /// The model on the trainable weights: gradients flow into `params`. (For a reward model, the
    /// backbone without an LM head.)
    pub fn model(&self, device: &Device) -> Result<CausalLm> {
        self.build_llama(self.with_frozen(self.params.tensors()), device)
    }

    /// The model on the current weights with gradient tracking off (shares storage, copies nothing).
    pub fn frozen_model(&self, device: &Device) -> Result<CausalLm> {
        self.build_llama(self.with_frozen(self.params.detached_tensors()), device)
    }

    /// Grow the vocabulary to `vocab_size` rows (after tokens were added to the tokenizer): every new
    /// row of `embed_tokens` (and of an untied `lm_head`) is the mean of the existing rows, the
    /// deterministic part of `transformers`' `resize_token_embeddings(mean_resizing=True)`. Returns
    /// the number of rows added (0 when the matrix already had room, as many checkpoints pad it).
    pub fn grow_vocab(&mut self, vocab_size: usize, device: &Device) -> Result<usize> {
        let old = self.config.vocab_size;
        if vocab_size <= old {
            return Ok(0);
        }
        for name in [self.config.embed_name(), self.config.lm_head_name()] {
            // With LoRA the grown matrices train whole, as PEFT's `modules_to_save` (the new rows must learn).
            let w = match (self.params.get(name), self.frozen.remove(name)) {
                (Some(var), _) => var.as_tensor().detach(),  // [v, d]
                (None, Some(t)) => t.to_dtype(TRAIN_DTYPE)?, // a 16-bit base (`base_dtype`) trains in f32
                (None, None) => continue,
            };
            let mean = w.mean_keepdim(0)?; // [1, d]
            let rows = mean.broadcast_as((vocab_size - old, w.dim(1)?))?.contiguous()?; // [new, d]
            let grown = Tensor::cat(&[&w, &rows], 0)?.to_device(device)?; // [v', d]
            self.params.replace(name, &grown)?;
        }
        self.config.vocab_size = vocab_size;
        Ok(vocab_size - old)
    }

    /// The trainable reward model (backbone + `score`); only for [`Head::Score`].
    pub fn reward_model(&self, device: &Device) -> Result<RewardModel> {
        Ok(weights::build_with(self.with_frozen(self.params.tensors()), TRAIN_DTYPE, device, |vb| {
            RewardModel::new(&self.config, vb)
        })?
        .0)
    }

    /// The trainable value head; only for [`Head::Value`].
    pub fn value_head(&self, device: &Device) -> Result<ValueHead> {
        Ok(weights::build_with(self.with_frozen(self.params.tensors()), TRAIN_DTYPE, device, |vb| {
            ValueHead::new(&self.config, vb)
        })?
        .0)
    }

    /// Save as a Hugging Face folder: `config.json` and tokenizer files from the source folder, the
    /// current weights as `model.safetensors`, plus `extra` files (e.g. the resolved `prospect.toml`).
    /// The folder appears atomically.
    pub fn save_hf(&self, dest: &Path, extra: &[(&str, &[u8])]) -> Result<()> {
        crate::fsio::replace_dir_atomic(dest, |tmp| {
            let tensors = self.write_beside_weights(tmp, true, extra)?;
            save_tensors(&tensors, &tmp.join("model.safetensors"))
        })
    }
}

impl Policy {
    /// Save as a PEFT adapter folder: `adapter_config.json`, `adapter_model.safetensors` (the adapters and
    /// a reward model's `score`, under PEFT's names), the tokenizer files, PPO's value head beside them,
    /// plus `extra` files. `base` is written as `base_model_name_or_path`. The folder appears atomically.
    pub fn save_adapter(&self, dest: &Path, base: &str, extra: &[(&str, &[u8])]) -> Result<()> {
        let settings = self.lora.as_ref().ok_or_else(|| Error::Compute("save_adapter: this run has no LoRA".into()))?;
        let saved: Vec<String> = lora::MODULES_TO_SAVE
            .iter()
            .filter(|(name, _)| self.params.get(name).is_some())
            .map(|(_, module)| module.to_string())
            .collect();
        let config = lora::AdapterConfig::new(settings, base, self.config.arch, self.head == Head::Score, saved);
        crate::fsio::replace_dir_atomic(dest, |tmp| {
            let tensors = self.write_beside_weights(tmp, false, extra)?;
            lora::write_adapter(tmp, &config, &tensors)
        })
    }

    /// What a saved folder holds beside its weights: the source folder's side files (`config.json`
    /// rewritten, or left out for an adapter folder), PPO's value head, and `extra`. Returns the other
    /// trainable tensors, for the caller to write as the folder's weights.
    fn write_beside_weights(
        &self,
        tmp: &Path,
        with_config: bool,
        extra: &[(&str, &[u8])],
    ) -> Result<BTreeMap<String, Tensor>> {
        for name in HF_SIDE_FILES.iter().filter(|n| with_config || **n != "config.json") {
            let src = self.source_dir.join(name);
            if src.exists() {
                let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                let bytes = if *name == "config.json" { self.rewrite_config(&bytes, &src)? } else { bytes };
                crate::fsio::write_atomic(&tmp.join(name), &bytes)?;
            }
        }
        let (value_head, tensors): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) =
            self.params.detached_tensors().into_iter().partition(|(k, _)| k.starts_with("v_head."));
        if !value_head.is_empty() {
            save_tensors(&value_head, &tmp.join(VALUE_HEAD_FILE))?;
        }
        for (name, bytes) in extra {
            crate::fsio::write_atomic(&tmp.join(name), bytes)?;
        }
        Ok(tensors)
    }

    /// `config.json` for the saved folder: f32 weights, and for a reward model the
    /// sequence-classification fields `AutoModelForSequenceClassification` needs.
    fn rewrite_config(&self, bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
        let bytes = mark_f32(bytes, path)?;
        let mut json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))?;
        if let Some(obj) = json.as_object_mut() {
            obj.insert("vocab_size".into(), serde_json::json!(self.config.vocab_size));
        }
        if self.head != Head::Score {
            return serde_json::to_vec_pretty(&json).map_err(|e| Error::model(path, e.to_string()));
        }
        let family = match self.config.model_type.as_str() {
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            "gpt_neox" => "GPTNeoX",
            "gpt2" => "GPT2",
            _ => "Llama",
        };
        if let Some(obj) = json.as_object_mut() {
            obj.insert("architectures".into(), serde_json::json!([format!("{family}ForSequenceClassification")]));
            // num_labels = 1 is spelled as a one-entry id2label/label2id, as transformers writes it.
            obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            if let Some(pad) = self.pad_token_id {
                obj.insert("pad_token_id".into(), serde_json::json!(pad));
            }
        }
        serde_json::to_vec_pretty(&json).map_err(|e| Error::model(path, e.to_string()))
    }
}

/// Put the head `head` needs into `tensors` when the folder lacks it; returns the names initialised.
fn add_head(
    dir: &Path,
    config: &ModelConfig,
    tensors: &mut BTreeMap<String, Tensor>,
    head: Head,
    seed: u64,
    device: &Device,
) -> Result<Vec<String>> {
    let mut initialised = Vec::new();
    let std = config.initializer_range.unwrap_or(0.02);
    let d = config.hidden_size;
    match head {
        Head::Lm => {}
        Head::Score => {
            if !tensors.contains_key(heads::SCORE_WEIGHT) {
                tensors.insert(heads::SCORE_WEIGHT.into(), heads::normal_init(1, d, std, seed, device)?);
                initialised.push(heads::SCORE_WEIGHT.to_string());
            }
        }
        Head::Value => {
            let file = dir.join(VALUE_HEAD_FILE);
            if file.exists() {
                let loaded = candle_core::safetensors::load(&file, device)
                    .map_err(|e| Error::model(&file, format!("cannot read safetensors: {e}")))?;
                for (name, t) in loaded {
                    tensors.insert(name, t.to_dtype(TRAIN_DTYPE)?);
                }
            } else {
                tensors.insert(heads::VALUE_WEIGHT.into(), heads::normal_init(1, d, std, seed, device)?);
                tensors.insert(heads::VALUE_BIAS.into(), Tensor::zeros(1, TRAIN_DTYPE, device)?);
                initialised.extend([heads::VALUE_WEIGHT.to_string(), heads::VALUE_BIAS.to_string()]);
            }
        }
    }
    Ok(initialised)
}

/// One tensor of a LoRA run's frozen base, as it is kept in `dtype`: every matrix (linear layers,
/// embedding, LM head) in `dtype`; norm weights in f32 (a few kilobytes, and the fused RMSNorm kernel reads
/// f32); heads in f32 (they train). With `DType::U8` (`base_dtype = "q8_0"`) a linear layer is quantized
/// to Q8_0 and kept as `<layer>.weight_q8_0`, and the embedding goes to bf16.
fn store_base(name: String, t: Tensor, dtype: DType, arch: config::Arch) -> Result<(String, Tensor)> {
    // A linear layer's weight: `<...>.<module>.weight` with one of the family's adaptable modules. GPT-2's
    // Conv1D layers stay 16-bit: Q8_0 blocks run along a linear layer's input rows, Conv1D stores `[in, out]`.
    let module = name.strip_suffix(".weight").and_then(|m| m.rsplit('.').next());
    let linear = arch != config::Arch::Gpt2 && module.is_some_and(|m| lora::linear_modules(arch).contains(&m));
    Ok(match (t.rank(), dtype) {
        _ if is_head_tensor(&name) => (name, t),
        (2, DType::U8) if linear => {
            let q = lora::quantize_q8_0(&t)?;
            (name.replace(".weight", ".weight_q8_0"), q)
        }
        (2, DType::U8) => (name, t.to_dtype(DType::BF16)?),
        (2, _) => (name, t.to_dtype(dtype)?),
        _ => (name, t),
    })
}

/// Checkpoints of one family spell some names two ways; training uses one. GPT-2 checkpoints saved from
/// `GPT2Model` (the original `gpt2` on the Hub) have no `transformer.` prefix; GPT-NeoX's head is
/// `embed_out` in Pythia's checkpoints and in what transformers saves, `lm_head` in some others. Buffers
/// older checkpoints carry (`attn.bias`, `attention.masked_bias`, `rotary_emb.inv_freq`) are left alone
/// and reported unused.
fn canonical_names(config: &ModelConfig, tensors: &mut BTreeMap<String, Tensor>) {
    use config::Arch;
    match config.arch {
        Arch::Gpt2 if !tensors.contains_key("transformer.wte.weight") && tensors.contains_key("wte.weight") => {
            let all = std::mem::take(tensors);
            for (name, t) in all {
                let renamed = if name.starts_with("lm_head.") { name } else { format!("transformer.{name}") };
                tensors.insert(renamed, t);
            }
        }
        Arch::GptNeoX if !tensors.contains_key("embed_out.weight") => {
            if let Some(head) = tensors.remove("lm_head.weight") {
                tensors.insert("embed_out.weight".into(), head);
            }
        }
        _ => {}
    }
}

/// A vocabulary grown by an adapter (`modules_to_save` `embed_tokens`) sets the config's size.
fn vocab_from_embedding(config: &mut ModelConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    if let Some(embed) = tensors.get(config.embed_name()) {
        config.vocab_size = embed.dim(0)?;
    }
    Ok(())
}

/// Tensors of a scalar head (`score.*`, `v_head.*`): trained whole, with or without LoRA.
fn is_head_tensor(name: &str) -> bool {
    name.starts_with("score.") || name.starts_with("v_head.")
}

/// Where a frozen model comes from: a Hugging Face folder, or a PEFT adapter on a base.
///
/// `resolve(dir, None)` accepts either kind of folder: an adapter folder (it has `adapter_config.json`)
/// is applied to the base its `base_model_name_or_path` names. `resolve(base, Some(adapter))` is an
/// explicit pair (`--model BASE --adapter DIR`).
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub base: PathBuf,
    pub adapter: Option<PathBuf>,
}

impl ModelSource {
    pub fn resolve(dir: &Path, adapter: Option<&Path>) -> Result<Self> {
        if let Some(adapter) = adapter {
            return Ok(Self { base: dir.to_path_buf(), adapter: Some(adapter.to_path_buf()) });
        }
        if !lora::is_adapter_dir(dir) {
            return Ok(Self { base: dir.to_path_buf(), adapter: None });
        }
        let base = lora::AdapterConfig::read(dir)?.base_dir(dir)?;
        Ok(Self { base, adapter: Some(dir.to_path_buf()) })
    }

    /// The folder to read the tokenizer from: the adapter's when it carries `tokenizer.json`, else the base's.
    pub fn tokenizer_dir(&self) -> &Path {
        match &self.adapter {
            Some(a) if a.join("tokenizer.json").is_file() => a,
            _ => &self.base,
        }
    }

    /// The base's config and tensors with the adapter's tensors added (unmerged) and `config.adapter`
    /// set, so that the model applies the adapter in its forward pass.
    fn load(&self, device: &Device) -> Result<(ModelConfig, BTreeMap<String, Tensor>)> {
        let mut config = ModelConfig::load(&self.base)?;
        let mut tensors = load_tensors(&self.base, TRAIN_DTYPE, device)?;
        canonical_names(&config, &mut tensors);
        check_embedding(&self.base, &config, &tensors)?;
        if let Some(dir) = &self.adapter {
            let adapter = lora::Adapter::read(dir, &config, device)?;
            config.adapter = Some(adapter.settings.spec());
            tensors.extend(adapter.tensors);
            vocab_from_embedding(&mut config, &tensors)?;
        }
        Ok((config, tensors))
    }

    fn blame(&self) -> &Path {
        self.adapter.as_deref().unwrap_or(&self.base)
    }
}

/// A frozen reward model (to score completions, e.g. for PPO): the folder (or the adapter) must hold
/// `score.weight`.
pub fn load_frozen_reward(dir: &Path, device: &Device) -> Result<RewardModel> {
    let source = ModelSource::resolve(dir, None)?;
    let (config, tensors) = source.load(device)?;
    if !tensors.contains_key(heads::SCORE_WEIGHT) {
        return Err(Error::model(dir, "not a reward model: no `score.weight` (train one with `type = \"reward\"`)"));
    }
    Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| {
        RewardModel::new(&config, vb).map_err(|e| annotate(source.blame(), e))
    })?
    .0)
}

/// A frozen model (the reference): plain tensors, no `Var`s, no gradient, no optimizer state. `dir` may
/// be a PEFT adapter folder (see [`ModelSource`]).
pub fn load_frozen(dir: &Path, device: &Device) -> Result<CausalLm> {
    load_frozen_source(&ModelSource::resolve(dir, None)?, device)
}

/// A frozen causal LM from a [`ModelSource`]: an adapter is applied in the forward pass, not merged.
pub fn load_frozen_source(source: &ModelSource, device: &Device) -> Result<CausalLm> {
    load_frozen_computing_in(source, device, ComputeDtype::F32)
}

/// [`load_frozen_source`] with its matrix products in `compute` (a bf16 run's reference model).
pub fn load_frozen_computing_in(source: &ModelSource, device: &Device, compute: ComputeDtype) -> Result<CausalLm> {
    let (mut config, tensors) = source.load(device)?;
    config.compute = compute;
    Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| {
        CausalLm::new(&config, vb).map_err(|e| annotate(source.blame(), e))
    })?
    .0)
}

/// A full Hugging Face folder from a base and a PEFT adapter: every adapted weight becomes
/// `W + s·B·A` (PEFT's `merge_and_unload`), a reward adapter's `score` replaces the base's. The folder
/// holds the base's `config.json` and tokenizer files and f32 `model.safetensors`; it appears atomically.
pub fn merge_adapter(base: &Path, adapter_dir: &Path, dest: &Path, device: &Device) -> Result<()> {
    let mut config = ModelConfig::load(base)?;
    let mut tensors = load_tensors(base, TRAIN_DTYPE, device)?;
    canonical_names(&config, &mut tensors);
    check_embedding(base, &config, &tensors)?;
    let adapter = lora::Adapter::read(adapter_dir, &config, device)?;
    lora::merge(&mut tensors, &adapter)?;
    vocab_from_embedding(&mut config, &tensors)?;
    let reward = adapter.config.task_type.as_deref() == Some("SEQ_CLS");
    let policy = Policy {
        config,
        params: Params::from_tensors(&tensors)?,
        frozen: BTreeMap::new(),
        lora: None,
        initial_adapter: None,
        source_dir: base.to_path_buf(),
        head: if reward { Head::Score } else { Head::Lm },
        pad_token_id: None,
    };
    drop(tensors);
    policy.save_hf(dest, &[])
}

/// Files copied from the source folder into a saved model.
const HF_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The saved weights are f32: say so in `config.json` so `transformers` does not cast them.
fn mark_f32(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let mut json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))?;
    if let Some(obj) = json.as_object_mut() {
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.to_string(), serde_json::Value::String("float32".into()));
            }
        }
    }
    serde_json::to_vec_pretty(&json).map_err(|e| Error::model(path, e.to_string()))
}

/// Missing or misshapen tensors come out of candle as bare messages; name the folder.
fn annotate(dir: &Path, e: Error) -> Error {
    match e {
        Error::Candle(c) => Error::model(dir, format!("checkpoint does not fit config.json: {c}")),
        other => other,
    }
}

/// A model folder must exist before anything is read from it: otherwise the first missing file
/// (`tokenizer.json`, `config.json`) would be blamed.
pub(crate) fn check_model_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::model(dir, "is a file, not a model folder (expected a Hugging Face model folder)")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::model(
            dir,
            "folder does not exist (expected a Hugging Face model folder: config.json, tokenizer.json, model.safetensors)",
        )),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Read a small file whole, refusing one over `max` bytes before allocating for it.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(Error::model(
            path,
            format!("file is {len} bytes; expected at most {max}: not a file of this kind"),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The checkpoint's embedding against `config.json`, before anything is allocated from the config's
/// sizes (a new head is `[1, d]`) or built: `model.embed_tokens.weight` must be `[vocab_size, hidden_size]`.
/// (Every other tensor's shape is checked as the model is built, naming the tensor and both shapes.)
fn check_embedding(dir: &Path, config: &ModelConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let embed_name = config.embed_name();
    let Some(embed) = tensors.get(embed_name) else {
        return Err(Error::model(
            dir,
            format!(
                "the weights have no `{embed_name}` (does the checkpoint match config.json's model_type `{}`?)",
                config.model_type
            ),
        ));
    };
    let expected = [config.vocab_size, config.hidden_size];
    if embed.dims() != expected {
        return Err(Error::model(
            dir,
            format!(
                "`{embed_name}` in the weights has shape {:?}, config.json says [vocab_size, hidden_size] = {expected:?}",
                embed.dims()
            ),
        ));
    }
    Ok(())
}
