//! Models: the Llama family for training, its weights in Hugging Face layout, the tokenizer, and
//! `sequence_logps`, where logits become log-probs.

pub mod config;
pub mod embedding;
pub mod heads;
pub mod init;
pub mod kernels;
pub mod llama;
pub mod logps;
pub mod ops;
pub mod tokenizer;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::LlamaConfig;
pub use heads::{RewardModel, ValueHead};
pub use llama::Llama;
pub use logps::{completion_logps, sequence_logps, sequence_logps_composite, token_logps, SequenceLogps};
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
pub struct Policy {
    pub config: LlamaConfig,
    pub params: Params,
    pub source_dir: PathBuf,
    pub head: Head,
    /// Written to `config.json` when a reward model is saved (HF reads the score at the last token
    /// that is not `pad_token_id`).
    pub pad_token_id: Option<u32>,
}

impl Policy {
    /// Load a Hugging Face folder for training. Checkpoint tensors the model does not use (e.g. a
    /// redundant `lm_head.weight` when embeddings are tied) are left out and returned by name.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, Vec<String>)> {
        let (policy, unused, _) = Self::load_with_head(dir, device, Head::Lm, 0)?;
        Ok((policy, unused))
    }

    /// Load with a given head. A head the folder lacks (`score.weight`; `v_head.summary.*` in
    /// `value_head.safetensors`) is initialised from N(0, `initializer_range`²) with `seed` (bias 0).
    /// Returns the policy, the unused checkpoint tensors, and the names of initialised tensors.
    pub fn load_with_head(
        dir: &Path,
        device: &Device,
        head: Head,
        seed: u64,
    ) -> Result<(Self, Vec<String>, Vec<String>)> {
        let config = LlamaConfig::load(dir)?;
        let mut tensors = load_tensors(dir, TRAIN_DTYPE, device)?;
        check_embedding(dir, &config, &tensors)?;
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
        let mut params = Params::from_tensors(&tensors)?;
        drop(tensors);
        let (_, used) = weights::build_with(params.tensors(), TRAIN_DTYPE, device, |vb| {
            let built = match head {
                Head::Lm => Llama::new(&config, vb).map(|_| ()),
                Head::Score => RewardModel::new(&config, vb).map(|_| ()),
                Head::Value => Llama::new(&config, vb.clone()).and_then(|_| ValueHead::new(&config, vb)).map(|_| ()),
            };
            built.map_err(|e| annotate(dir, e))
        })?;
        let unused = params.retain(&used);
        Ok((Self { config, params, source_dir: dir.to_path_buf(), head, pad_token_id: None }, unused, initialised))
    }

    fn build_llama(&self, tensors: BTreeMap<String, Tensor>, device: &Device) -> Result<Llama> {
        let head = self.head;
        Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| match head {
            Head::Score => Llama::new_backbone(&self.config, vb),
            Head::Lm | Head::Value => Llama::new(&self.config, vb),
        })?
        .0)
    }

    /// The model on the trainable weights: gradients flow into `params`. (For a reward model, the
    /// backbone without an LM head.)
    pub fn model(&self, device: &Device) -> Result<Llama> {
        self.build_llama(self.params.tensors(), device)
    }

    /// The model on the current weights with gradient tracking off (shares storage, copies nothing).
    pub fn frozen_model(&self, device: &Device) -> Result<Llama> {
        self.build_llama(self.params.detached_tensors(), device)
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
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let Some(var) = self.params.get(name) else { continue };
            let w = var.as_tensor().detach(); // [v, d]
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
        Ok(weights::build_with(self.params.tensors(), TRAIN_DTYPE, device, |vb| RewardModel::new(&self.config, vb))?.0)
    }

    /// The trainable value head; only for [`Head::Value`].
    pub fn value_head(&self, device: &Device) -> Result<ValueHead> {
        Ok(weights::build_with(self.params.tensors(), TRAIN_DTYPE, device, |vb| ValueHead::new(&self.config, vb))?.0)
    }

    /// Save as a Hugging Face folder: `config.json` and tokenizer files from the source folder, the
    /// current weights as `model.safetensors`, plus `extra` files (e.g. the resolved `prospect.toml`).
    /// The folder appears atomically.
    pub fn save_hf(&self, dest: &Path, extra: &[(&str, &[u8])]) -> Result<()> {
        crate::fsio::replace_dir_atomic(dest, |tmp| {
            for name in HF_SIDE_FILES {
                let src = self.source_dir.join(name);
                if src.exists() {
                    let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                    let bytes = if *name == "config.json" { self.rewrite_config(&bytes, &src)? } else { bytes };
                    crate::fsio::write_atomic(&tmp.join(name), &bytes)?;
                }
            }
            let (value_head, tensors): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) =
                self.params.detached_tensors().into_iter().partition(|(k, _)| k.starts_with("v_head."));
            save_tensors(&tensors, &tmp.join("model.safetensors"))?;
            if !value_head.is_empty() {
                save_tensors(&value_head, &tmp.join(VALUE_HEAD_FILE))?;
            }
            for (name, bytes) in extra {
                crate::fsio::write_atomic(&tmp.join(name), bytes)?;
            }
            Ok(())
        })
    }
}

impl Policy {
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

/// A frozen reward model (to score completions, e.g. for PPO): the folder must hold `score.weight`.
pub fn load_frozen_reward(dir: &Path, device: &Device) -> Result<RewardModel> {
    let config = LlamaConfig::load(dir)?;
    let tensors = load_tensors(dir, TRAIN_DTYPE, device)?;
    check_embedding(dir, &config, &tensors)?;
    if !tensors.contains_key(heads::SCORE_WEIGHT) {
        return Err(Error::model(dir, "not a reward model: no `score.weight` (train one with `type = \"reward\"`)"));
    }
    Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| {
        RewardModel::new(&config, vb).map_err(|e| annotate(dir, e))
    })?
    .0)
}

/// A frozen model (the reference): plain tensors, no `Var`s, no gradient, no optimizer state.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<Llama> {
    let config = LlamaConfig::load(dir)?;
    let tensors = load_tensors(dir, TRAIN_DTYPE, device)?;
    check_embedding(dir, &config, &tensors)?;
    Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| Llama::new(&config, vb).map_err(|e| annotate(dir, e)))?.0)
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
fn check_embedding(dir: &Path, config: &LlamaConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    const EMBED: &str = "model.embed_tokens.weight";
    let Some(embed) = tensors.get(EMBED) else {
        return Err(Error::model(dir, format!("the weights have no `{EMBED}` (is this a Llama-family checkpoint?)")));
    };
    let expected = [config.vocab_size, config.hidden_size];
    if embed.dims() != expected {
        return Err(Error::model(
            dir,
            format!(
                "`{EMBED}` in the weights has shape {:?}, config.json says [vocab_size, hidden_size] = {expected:?}",
                embed.dims()
            ),
        ));
    }
    Ok(())
}
