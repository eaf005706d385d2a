//! Weights in Hugging Face layout: loading `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), holding the trainable copy as candle `Var`s, and saving.
//!
//! Not responsible for: the model's structure (that is `causal_lm.rs`) or the optimizer state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Read every tensor of a model folder, converted to `dtype` on `device`.
pub fn load_tensors(dir: &Path, dtype: DType, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let mut tensors = BTreeMap::new();
    for file in weight_files(dir)? {
        let loaded = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::model(&file, format!("cannot read safetensors: {e}")))?;
        for (name, t) in loaded {
            tensors.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(tensors)
}

/// Read a model folder one tensor at a time, each as f32 handed to `keep`, which returns what to hold
/// (e.g. the tensor in a LoRA run's 16-bit or Q8_0 base). Peak memory is what is kept plus one tensor,
/// where [`load_tensors`] holds the whole file and every tensor at once.
pub fn load_tensors_each(
    dir: &Path,
    device: &Device,
    mut keep: impl FnMut(String, Tensor) -> Result<(String, Tensor)>,
) -> Result<BTreeMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    use std::io::{Read, Seek, SeekFrom};
    let mut tensors = BTreeMap::new();
    for path in weight_files(dir)? {
        let bad = |msg: String| Error::model(&path, format!("cannot read safetensors: {msg}"));
        let (mut file, size, data_start, entries) = read_header(&path)?;
        for (name, entry) in entries.into_iter().filter(|(name, _)| name != "__metadata__") {
            let info: safetensors::tensor::TensorInfo =
                serde_json::from_value(entry).map_err(|e| bad(format!("`{name}`: {e}")))?;
            let (start, end) = info.data_offsets;
            if start > end || data_start + end as u64 > size {
                return Err(bad(format!("`{name}`: bytes {start}..{end} lie outside the file")));
            }
            let mut bytes = vec![0u8; end - start];
            file.seek(SeekFrom::Start(data_start + start as u64)).map_err(|e| Error::io(&path, e))?;
            file.read_exact(&mut bytes).map_err(|e| Error::io(&path, e))?;
            let view = safetensors::tensor::TensorView::new(info.dtype, info.shape, &bytes)
                .map_err(|e| bad(format!("`{name}`: {e}")))?;
            let t = view.load(device).map_err(|e| bad(format!("`{name}`: {e}")))?.to_dtype(DType::F32)?;
            let (name, kept) = keep(name, t)?;
            tensors.insert(name, kept);
        }
    }
    Ok(tensors)
}

/// Open a safetensors file and read its header: the file, its size, where the data starts, and the
/// header's entries by name (`__metadata__` included).
fn read_header(path: &Path) -> Result<(std::fs::File, u64, u64, BTreeMap<String, serde_json::Value>)> {
    use std::io::Read;
    let bad = |msg: String| Error::model(path, format!("cannot read safetensors: {msg}"));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > size.saturating_sub(8) || header_len > 100 << 20 {
        return Err(bad(format!("header of {header_len} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let entries = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    Ok((file, size, 8 + header_len, entries))
}

/// The number of weights in a model folder, from its safetensors headers (no tensor is read).
pub fn parameter_count(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for path in weight_files(dir)? {
        for (name, entry) in read_header(&path)?.3.into_iter().filter(|(name, _)| name != "__metadata__") {
            let info: safetensors::tensor::TensorInfo = serde_json::from_value(entry)
                .map_err(|e| Error::model(&path, format!("cannot read safetensors: `{name}`: {e}")))?;
            n += info.shape.iter().product::<usize>();
        }
    }
    Ok(n)
}

/// The safetensors files of a model folder: `model.safetensors`, or the shards its index names.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    super::check_model_dir(dir)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::model(&index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::model(&index, "missing object `weight_map`"))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        return Err(Error::model(dir, "no model.safetensors or model.safetensors.index.json in this folder"));
    };
    Ok(files)
}

/// Write tensors as a safetensors file that `transformers` accepts (metadata `format = pt`),
/// atomically: a temporary file in the same folder, then a rename.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let contiguous: Vec<(String, Tensor)> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.contiguous()?))).collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| Error::model(path, format!("cannot serialize safetensors: {e}")))?;
    crate::fsio::write_atomic(path, &bytes)
}

/// A name → tensor map served to a `VarBuilder`, which records which names the model asked for, so
/// that tensors the model never uses (e.g. a redundant `lm_head.weight` with tied embeddings) can be
/// left out of training instead of sitting there with no gradient.
struct TrackedTensors {
    tensors: BTreeMap<String, Tensor>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for TrackedTensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("tensor `{name}`: config.json implies one shape, the weights hold another"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t =
            self.tensors.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        // Handed out in the dtype they are held in: a LoRA base kept in 16 bits must not be copied back
        // to f32 here (the layers cast per product). Every other caller holds f32 already.
        let _ = dtype;
        t.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Build a module from named tensors and report which names it used.
///
/// The tensors are handed out as they are (same storage, same id), so a model built from `Var`
/// tensors is trainable and one built from plain tensors is frozen.
pub fn build_with<M>(
    tensors: BTreeMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<(M, BTreeSet<String>)> {
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let backend = TrackedTensors { tensors, used: used.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let module = build(vb)?;
    let used = used.lock().map(|u| u.clone()).unwrap_or_default();
    Ok((module, used))
}

/// The trainable parameters: one `Var` per checkpoint tensor, keyed by its Hugging Face name.
///
/// `Var::set` updates storage in place, so a model built from [`Params::tensors`] sees every
/// optimizer step without being rebuilt.
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Copy tensors into fresh `Var`s (the copy keeps a reference model loaded from the same
    /// tensors frozen at the starting weights).
    pub fn from_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<Self> {
        let vars = tensors.iter().map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
        Ok(Self { vars })
    }

    /// The tensors behind the vars: gradients flow into them.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    /// The same storage with gradient tracking off: a no-grad view of the current weights.
    pub fn detached_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }

    /// Keep only the named parameters (those the model uses).
    pub fn retain(&mut self, keep: &BTreeSet<String>) -> Vec<String> {
        let dropped: Vec<String> = self.vars.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        self.vars.retain(|k, _| keep.contains(k));
        dropped
    }

    /// Replace a parameter by a new `Var` holding `tensor` (e.g. a grown embedding matrix).
    pub fn replace(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        self.vars.insert(name.to_string(), Var::from_tensor(tensor)?);
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}
