//! Models: the Llama family for training, its weights in Hugging Face layout, the tokenizer, and
//! `sequence_logps`, where logits become log-probs.

pub mod config;
pub mod init;
pub mod kernels;
pub mod llama;
pub mod logps;
pub mod ops;
pub mod tokenizer;
pub mod weights;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::LlamaConfig;
pub use llama::Llama;
pub use logps::{completion_logps, sequence_logps, sequence_logps_composite, SequenceLogps};
pub use tokenizer::HfTokenizer;
pub use weights::{load_tensors, save_tensors, Params};

use crate::error::{Error, Result};

/// Training runs in f32: the reference numbers (TRL on CPU) are f32, and AdamW's small updates need it.
pub const TRAIN_DTYPE: DType = DType::F32;

/// A trainable policy: its config, its parameters as `Var`s, and the folder it came from.
pub struct Policy {
    pub config: LlamaConfig,
    pub params: Params,
    pub source_dir: PathBuf,
}

impl Policy {
    /// Load a Hugging Face folder for training. Checkpoint tensors the model does not use (e.g. a
    /// redundant `lm_head.weight` when embeddings are tied) are left out and returned by name.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, Vec<String>)> {
        let config = LlamaConfig::load(dir)?;
        let tensors = load_tensors(dir, TRAIN_DTYPE, device)?;
        let mut params = Params::from_tensors(&tensors)?;
        drop(tensors);
        let (_, used) = weights::build_with(params.tensors(), TRAIN_DTYPE, device, |vb| {
            Llama::new(&config, vb).map_err(|e| annotate(dir, e))
        })?;
        let unused = params.retain(&used);
        Ok((Self { config, params, source_dir: dir.to_path_buf() }, unused))
    }

    /// The model on the trainable weights: gradients flow into `params`.
    pub fn model(&self, device: &Device) -> Result<Llama> {
        Ok(weights::build_with(self.params.tensors(), TRAIN_DTYPE, device, |vb| Llama::new(&self.config, vb))?.0)
    }

    /// The model on the current weights with gradient tracking off (shares storage, copies nothing).
    pub fn frozen_model(&self, device: &Device) -> Result<Llama> {
        Ok(weights::build_with(self.params.detached_tensors(), TRAIN_DTYPE, device, |vb| Llama::new(&self.config, vb))?.0)
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
                    let bytes = if *name == "config.json" { mark_f32(&bytes, &src)? } else { bytes };
                    crate::fsio::write_atomic(&tmp.join(name), &bytes)?;
                }
            }
            let tensors: BTreeMap<String, Tensor> = self.params.detached_tensors();
            save_tensors(&tensors, &tmp.join("model.safetensors"))?;
            for (name, bytes) in extra {
                crate::fsio::write_atomic(&tmp.join(name), bytes)?;
            }
            Ok(())
        })
    }
}

/// A frozen model (the reference): plain tensors, no `Var`s, no gradient, no optimizer state.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<Llama> {
    let config = LlamaConfig::load(dir)?;
    let tensors = load_tensors(dir, TRAIN_DTYPE, device)?;
    Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| Llama::new(&config, vb).map_err(|e| annotate(dir, e)))?.0)
}

/// Names of the tensors a Llama with this config reads (to check a checkpoint before training).
pub fn used_names(config: &LlamaConfig, tensors: BTreeMap<String, Tensor>, device: &Device) -> Result<BTreeSet<String>> {
    Ok(weights::build_with(tensors, TRAIN_DTYPE, device, |vb| Llama::new(config, vb))?.1)
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
