//! `prospect import gguf`: a llama.cpp GGUF file (Llama architecture, byte-level BPE tokenizer) becomes
//! a Hugging Face folder that [`crate::model::Policy::load`] and `transformers` both read:
//!
//! ```text
//! GGUF metadata  -> config.json            (llama.* keys -> ModelConfig fields)
//! GGUF tensors   -> model.safetensors      (dequantized, Q/K un-permuted, renamed, f32 or bf16)
//! tokenizer.ggml -> tokenizer.json         (bpe.rs)
//!                -> tokenizer_config.json  (bos, eos, pad, unk, chat template)
//! ```
//!
//! The reference for every byte of that folder is `scripts/gguf_to_hf_reference.py` (gguf-py); the
//! integration test `crates/prospect-cli/tests/gguf_import.rs` compares the two on SmolLM2-135M.
//!
//! Nothing is written unless the folder would load: every tensor has the shape the hyperparameters give
//! it (a wrong `llama.embedding_length` is an error, not a folder `Policy::load` rejects later), every
//! tensor a Llama needs is there, the tokenizer loads, and the chat template compiles.
//! Malformed files are `header.rs`'s business (`crates/prospect/tests/gguf_bad.rs` tests both).
//!
//! Not responsible for: other architectures (Qwen2, Gemma, ...), SentencePiece tokenizers, RoPE
//! scaling. Each is rejected with a message naming the GGUF key, never converted silently wrong.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use serde_json::json;

use super::bpe::{tokenizer_json, GgufBpe};
use super::dequant::{dequantize, type_name, unpermute_qk};
use super::header::{read_header, GgufHeader, TensorInfo};
use crate::error::{Error, Result};

/// The weight dtype written to `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportDtype {
    F32,
    Bf16,
}

impl ImportDtype {
    fn dtype(self) -> DType {
        match self {
            ImportDtype::F32 => DType::F32,
            ImportDtype::Bf16 => DType::BF16,
        }
    }

    /// `torch_dtype` in `config.json`.
    fn torch_name(self) -> &'static str {
        match self {
            ImportDtype::F32 => "float32",
            ImportDtype::Bf16 => "bfloat16",
        }
    }
}

/// What an import wrote, for the caller to print.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// `general.name`, when the file has one.
    pub model_name: Option<String>,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    /// Number of tensors written and of scalar parameters in them.
    pub tensors: usize,
    pub parameters: usize,
    /// How many GGUF tensors were stored in each ggml type (`Q4_1` → 210, ...).
    pub source_types: BTreeMap<String, usize>,
}

/// The files an import writes: a folder holding only these may be overwritten by a new import.
pub const IMPORT_FILES: &[&str] = &["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];

/// Import `src` (a `.gguf` file) into the folder `dest`, which appears atomically. `dest` must not
/// exist, be empty, or hold only a previous import's files.
pub fn import_gguf(src: &Path, dest: &Path, dtype: ImportDtype) -> Result<ImportReport> {
    check_destination(dest)?;
    let file = File::open(src).map_err(|e| Error::io(src, e))?;
    let converted = convert_gguf(&mut BufReader::new(file), src, dtype)?;
    converted.write(dest)?;
    Ok(converted.report)
}

/// A GGUF file converted in memory: the Hugging Face folder's files, checked, not yet written.
pub struct Converted {
    pub config: serde_json::Value,
    pub tokenizer: serde_json::Value,
    pub tokenizer_config: serde_json::Value,
    /// Hugging Face names → weights (`[r, c]` or `[d]`), in `dtype`.
    pub tensors: BTreeMap<String, Tensor>,
    pub report: ImportReport,
}

/// Convert the GGUF file read by `reader`; `src` names it in errors. Allocates at most what the file's
/// size allows (the header is checked first), and never panics on malformed input.
pub fn convert_gguf<R: Read + Seek>(reader: &mut R, src: &Path, dtype: ImportDtype) -> Result<Converted> {
    let header = read_header(reader).map_err(|e| Error::model(src, format!("not a readable GGUF file: {e}")))?;
    let meta = Meta { path: src, map: &header.metadata };
    check_supported(&meta)?;
    let hp = Hyperparameters::read(&meta)?;
    let tok = TokenizerFiles::build(&meta, &hp)?;
    let tied = header.tensor("output.weight").is_none();
    let planned = plan_tensors(&header, &hp, tok.vocab_size, tied, src)?;
    let (tensors, source_types) = read_tensors(reader, &header, &planned, src, dtype)?;
    let report = ImportReport {
        model_name: meta.opt_string("general.name")?,
        num_hidden_layers: hp.layers,
        vocab_size: tok.vocab_size,
        tensors: tensors.len(),
        parameters: tensors.values().map(|t| t.elem_count()).sum(),
        source_types,
    };
    Ok(Converted {
        config: config_json(&meta, &hp, tok.vocab_size, tied, dtype, src)?,
        tokenizer: tok.tokenizer,
        tokenizer_config: tok.tokenizer_config,
        tensors,
        report,
    })
}

impl Converted {
    /// Write the folder atomically; the tokenizer must load before it appears.
    pub fn write(&self, dest: &Path) -> Result<()> {
        let to_bytes = |v: &serde_json::Value, name: &str| {
            serde_json::to_vec_pretty(v).map_err(|e| Error::model(dest.join(name), e.to_string()))
        };
        let config_bytes = to_bytes(&self.config, "config.json")?;
        let tokenizer_config_bytes = to_bytes(&self.tokenizer_config, "tokenizer_config.json")?;
        let tokenizer_bytes = serde_json::to_vec(&self.tokenizer)
            .map_err(|e| Error::model(dest.join("tokenizer.json"), e.to_string()))?;
        crate::fsio::replace_dir_atomic(dest, |tmp| {
            crate::fsio::write_atomic(&tmp.join("config.json"), &config_bytes)?;
            crate::fsio::write_atomic(&tmp.join("tokenizer.json"), &tokenizer_bytes)?;
            crate::fsio::write_atomic(&tmp.join("tokenizer_config.json"), &tokenizer_config_bytes)?;
            crate::model::save_tensors(&self.tensors, &tmp.join("model.safetensors"))?;
            crate::model::HfTokenizer::load(tmp)?;
            Ok(())
        })
    }
}

/// Architecture and RoPE: what this import can convert faithfully.
fn check_supported(meta: &Meta) -> Result<()> {
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(meta.error(format!(
            "`general.architecture` is `{arch}`; only `llama` (Llama, SmolLM, Mistral-style) GGUF files can be imported"
        )));
    }
    if let Some(kind) = meta.opt_string("llama.rope.scaling.type")? {
        if kind != "none" {
            return Err(meta.error(format!("`llama.rope.scaling.type` is `{kind}`: RoPE scaling is not supported")));
        }
    }
    if meta.opt_bool("tokenizer.ggml.add_bos_token")? == Some(true) {
        return Err(meta.error(
            "`tokenizer.ggml.add_bos_token` is true: prepending BOS is not rebuilt yet, token ids would differ",
        ));
    }
    Ok(())
}

/// config.json: the fields of `model::ModelConfig`, named and ordered as transformers writes them.
fn config_json(
    meta: &Meta,
    hp: &Hyperparameters,
    vocab_size: usize,
    tied: bool,
    dtype: ImportDtype,
    src: &Path,
) -> Result<serde_json::Value> {
    let token_id = |key: &str| meta.opt_usize(key);
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_hidden_layers": hp.layers,
        "num_attention_heads": hp.heads,
        "num_key_value_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context_length,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id")?,
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id")?,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": dtype.torch_name(),
        "_source": format!("imported by prospect from {}", src.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()),
    }))
}

/// tokenizer.json and tokenizer_config.json, both checked the way the loader will read them.
struct TokenizerFiles {
    tokenizer: serde_json::Value,
    tokenizer_config: serde_json::Value,
    vocab_size: usize,
}

impl TokenizerFiles {
    fn build(meta: &Meta, hp: &Hyperparameters) -> Result<Self> {
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let vocab_size = meta.opt_usize("llama.vocab_size")?.unwrap_or(tokens.len());
        if tokens.is_empty() || tokens.len() > vocab_size {
            return Err(meta.error(format!(
                "`tokenizer.ggml.tokens` has {} tokens for a vocabulary of {vocab_size} (`llama.vocab_size`); \
                 expected between 1 and {vocab_size}",
                tokens.len()
            )));
        }
        let bpe_model = meta.string("tokenizer.ggml.model")?;
        if bpe_model != "gpt2" {
            return Err(meta.error(format!(
                "`tokenizer.ggml.model` is `{bpe_model}`; only byte-level BPE (`gpt2`) tokenizers can be rebuilt"
            )));
        }
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let token_types = meta.ints("tokenizer.ggml.token_type")?;
        let pre = meta.opt_string("tokenizer.ggml.pre")?.unwrap_or_else(|| "gpt-2".to_string());
        let bpe = GgufBpe { tokens: &tokens, merges: &merges, token_types: &token_types, pre: &pre };
        let tokenizer = tokenizer_json(&bpe).map_err(|e| meta.error(e))?;
        // The loader parses it with the tokenizers library: a merge of unknown tokens fails there.
        tokenizer
            .to_string()
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| meta.error(format!("the rebuilt tokenizer does not load: {e}")))?;
        let tokenizer_config = tokenizer_config(meta, &tokens, hp)?;
        Ok(Self { tokenizer, tokenizer_config, vocab_size })
    }
}

/// tokenizer_config.json: the special tokens by text, as `model::HfTokenizer` and transformers read
/// them, and the chat template, compiled as `data::ChatTemplate` will compile it.
fn tokenizer_config(meta: &Meta, tokens: &[String], hp: &Hyperparameters) -> Result<serde_json::Value> {
    let token_text = |key: &str| -> Result<Option<String>> {
        match meta.opt_usize(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id)
                .cloned()
                .map(Some)
                .ok_or_else(|| meta.error(format!("`{key}` is {id}, past the {} tokens", tokens.len()))),
        }
    };
    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(text) = token_text(key)? {
            config.insert(field.into(), json!(text));
        }
    }
    config.insert("model_max_length".into(), json!(hp.context_length));
    if let Some(template) = meta.opt_string("tokenizer.chat_template")? {
        crate::data::ChatTemplate::new(&template, Vec::new(), "GGUF `tokenizer.chat_template`").map_err(|e| {
            meta.error(format!("{e}; fix or drop the template, the folder could not be used for chat data"))
        })?;
        config.insert("chat_template".into(), json!(template));
    }
    Ok(serde_json::Value::Object(config))
}

/// A GGUF tensor checked against the hyperparameters: its Hugging Face name, and the head count to
/// un-permute it with (Q and K only).
struct PlannedTensor<'h> {
    info: &'h TensorInfo,
    hf_name: String,
    heads: Option<usize>,
}

/// Name and shape of every tensor, checked before any data is read; every tensor the model needs
/// must be there.
fn plan_tensors<'h>(
    header: &'h GgufHeader,
    hp: &Hyperparameters,
    vocab_size: usize,
    tied: bool,
    src: &Path,
) -> Result<Vec<PlannedTensor<'h>>> {
    // Nine tensors per layer: a block count the file cannot hold is refused before it is iterated.
    let layer_tensors = hp.layers.saturating_mul(9);
    if layer_tensors > header.tensors.len() {
        return Err(Error::model(
            src,
            format!(
                "`llama.block_count` {} needs {} layer tensors, but the file holds {} tensors in all",
                hp.layers,
                if layer_tensors == usize::MAX { "more than 2^64".to_string() } else { layer_tensors.to_string() },
                header.tensors.len()
            ),
        ));
    }
    let mut planned = Vec::with_capacity(header.tensors.len());
    for info in &header.tensors {
        let fail = |msg: String| tensor_error(src, info, msg);
        let (hf_name, heads, want) = hf_tensor(&info.name, hp, vocab_size).map_err(fail)?;
        if info.dims != want {
            return Err(fail(format!(
                "expected shape {want:?} from the hyperparameters (`llama.embedding_length` {}, vocabulary {vocab_size}, \
                 `llama.feed_forward_length` {}, {} heads / {} KV heads of {}); the file is inconsistent",
                hp.hidden, hp.intermediate, hp.heads, hp.kv_heads, hp.head_dim
            )));
        }
        planned.push(PlannedTensor { info, hf_name, heads });
    }
    for name in required_tensors(hp.layers, tied) {
        if header.tensor(&name).is_none() {
            return Err(Error::model(
                src,
                format!("tensor `{name}` is missing; a Llama with {} layers needs it", hp.layers),
            ));
        }
    }
    // Deterministic output order: by GGUF name.
    planned.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    Ok(planned)
}

fn tensor_error(src: &Path, info: &TensorInfo, msg: String) -> Error {
    Error::model(src, format!("tensor `{}` ({}, shape {:?}): {msg}", info.name, type_name(info.dtype), info.dims))
}

/// The GGUF names of the tensors a Llama of `layers` layers cannot do without.
fn required_tensors(layers: usize, tied: bool) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    if !tied {
        names.push("output.weight".to_string());
    }
    const LAYER: [&str; 9] =
        ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    for layer in 0..layers {
        names.extend(LAYER.iter().map(|kind| format!("blk.{layer}.{kind}.weight")));
    }
    names
}

/// Read, dequantize, un-permute and convert every planned tensor. Each read is `info.byte_len` bytes,
/// which `header.rs` has checked against the file's size.
fn read_tensors<R: Read + Seek>(
    reader: &mut R,
    header: &GgufHeader,
    planned: &[PlannedTensor],
    src: &Path,
    dtype: ImportDtype,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, usize>)> {
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut source_types: BTreeMap<String, usize> = BTreeMap::new();
    for PlannedTensor { info, hf_name, heads } in planned {
        let fail = |msg: String| tensor_error(src, info, msg);
        let mut raw = vec![0u8; info.byte_len];
        let start = header.data_offset + info.offset; // checked in header.rs: start + byte_len <= file size
        reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| reader.read_exact(&mut raw))
            .map_err(|e| fail(format!("cannot read {} bytes at offset {}: {e}", info.byte_len, info.offset)))?;
        let mut w = dequantize(info.dtype, &raw, &info.dims).map_err(|e| fail(e.to_string()))?; // [r, c] or [d]
        if let Some(heads) = heads {
            w = unpermute_qk(&w, *heads).map_err(|e| fail(e.to_string()))?;
        }
        let w = w.to_dtype(dtype.dtype()).map_err(|e| fail(e.to_string()))?;
        *source_types.entry(type_name(info.dtype).to_string()).or_default() += 1;
        tensors.insert(hf_name.clone(), w);
    }
    Ok((tensors, source_types))
}

/// Refuse to replace a folder that holds anything but a previous import.
fn check_destination(dest: &Path) -> Result<()> {
    if !dest.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dest).map_err(|e| Error::io(dest, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dest, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !IMPORT_FILES.contains(&name.as_str()) {
            return Err(Error::model(
                dest,
                format!(
                    "output folder already holds `{name}`, which an import would delete; choose a new or empty folder"
                ),
            ));
        }
    }
    Ok(())
}

/// The `llama.*` hyperparameters.
struct Hyperparameters {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
}

impl Hyperparameters {
    fn read(meta: &Meta) -> Result<Self> {
        let hidden = meta.usize("llama.embedding_length")?;
        let heads = meta.usize("llama.attention.head_count")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(meta.error(format!("`llama.embedding_length` {hidden} does not split into {heads} heads")));
        }
        let kv_heads = meta.opt_usize("llama.attention.head_count_kv")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(meta.error(format!(
                "`llama.attention.head_count_kv` {kv_heads} does not divide `llama.attention.head_count` {heads}"
            )));
        }
        let head_dim = meta.opt_usize("llama.attention.key_length")?.unwrap_or(hidden / heads);
        if let Some(rope_dims) = meta.opt_usize("llama.rope.dimension_count")? {
            if rope_dims != head_dim {
                return Err(meta.error(format!(
                    "`llama.rope.dimension_count` {rope_dims} differs from the head size {head_dim}: partial RoPE is not supported"
                )));
            }
        }
        let hp = Self {
            layers: meta.usize("llama.block_count")?,
            hidden,
            intermediate: meta.usize("llama.feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            context_length: meta.usize("llama.context_length")?,
            rms_norm_eps: meta.float("llama.attention.layer_norm_rms_epsilon")?,
            // llama.cpp's default when the key is absent.
            rope_theta: meta.opt_float("llama.rope.freq_base")?.unwrap_or(10_000.0),
        };
        hp.check(meta)?;
        Ok(hp)
    }

    /// Sizes a model can have: no zero, no product that overflows, positive finite floats.
    fn check(&self, meta: &Meta) -> Result<()> {
        for (key, value) in [
            ("llama.block_count", self.layers),
            ("llama.embedding_length", self.hidden),
            ("llama.feed_forward_length", self.intermediate),
            ("llama.context_length", self.context_length),
            ("llama.attention.key_length", self.head_dim),
        ] {
            if value == 0 {
                return Err(meta.error(format!("`{key}` is 0; a model needs at least 1")));
            }
        }
        if self.heads.checked_mul(self.head_dim).is_none() {
            return Err(meta.error(format!("{} heads of {} values overflow", self.heads, self.head_dim)));
        }
        for (key, value) in
            [("llama.attention.layer_norm_rms_epsilon", self.rms_norm_eps), ("llama.rope.freq_base", self.rope_theta)]
        {
            if !(value.is_finite() && value > 0.0) {
                return Err(meta.error(format!("`{key}` is {value}; expected a positive finite number")));
            }
        }
        Ok(())
    }
}

/// The Hugging Face name of a GGUF tensor, the head count to un-permute it with (Q and K only), and the
/// shape (Hugging Face order) the hyperparameters give it.
fn hf_tensor(
    name: &str,
    hp: &Hyperparameters,
    vocab: usize,
) -> std::result::Result<(String, Option<usize>, Vec<usize>), String> {
    let (d, q, kv, ff) = (hp.hidden, hp.heads * hp.head_dim, hp.kv_heads * hp.head_dim, hp.intermediate);
    let top = match name {
        "token_embd.weight" => Some(("model.embed_tokens.weight", vec![vocab, d])),
        "output_norm.weight" => Some(("model.norm.weight", vec![d])),
        "output.weight" => Some(("lm_head.weight", vec![vocab, d])),
        _ => None,
    };
    if let Some((hf, shape)) = top {
        return Ok((hf.to_string(), None, shape));
    }
    let parts: Vec<&str> = name.split('.').collect();
    let (layer, kind) = match parts.as_slice() {
        ["blk", i, kind, "weight"] => (i.parse::<usize>().map_err(|_| format!("bad layer number `{i}`"))?, *kind),
        _ => return Err("not a Llama tensor name this import knows".to_string()),
    };
    if layer >= hp.layers {
        return Err(format!("layer {layer} is past `llama.block_count` {}", hp.layers));
    }
    let (sub, heads, shape) = match kind {
        "attn_norm" => ("input_layernorm", None, vec![d]),
        "ffn_norm" => ("post_attention_layernorm", None, vec![d]),
        "attn_q" => ("self_attn.q_proj", Some(hp.heads), vec![q, d]),
        "attn_k" => ("self_attn.k_proj", Some(hp.kv_heads), vec![kv, d]),
        "attn_v" => ("self_attn.v_proj", None, vec![kv, d]),
        "attn_output" => ("self_attn.o_proj", None, vec![d, q]),
        "ffn_gate" => ("mlp.gate_proj", None, vec![ff, d]),
        "ffn_up" => ("mlp.up_proj", None, vec![ff, d]),
        "ffn_down" => ("mlp.down_proj", None, vec![d, ff]),
        other => return Err(format!("`{other}` is not a Llama layer tensor this import knows")),
    };
    Ok((format!("model.layers.{layer}.{sub}.weight"), heads, shape))
}

/// Typed access to GGUF metadata, with errors that name the file and the key.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::model(self.path, message)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.map.get(key).ok_or_else(|| self.error(format!("GGUF metadata has no `{key}`")))
    }

    fn wrong(&self, key: &str, want: &str, got: &Value) -> Error {
        self.error(format!("GGUF metadata `{key}` should be {want}, got {:?}", got.value_type()))
    }

    fn int(&self, key: &str, v: &Value) -> Result<i64> {
        let n = match v {
            Value::U8(x) => *x as i64,
            Value::I8(x) => *x as i64,
            Value::U16(x) => *x as i64,
            Value::I16(x) => *x as i64,
            Value::U32(x) => *x as i64,
            Value::I32(x) => *x as i64,
            Value::U64(x) => i64::try_from(*x).map_err(|_| self.wrong(key, "an integer below 2^63", v))?,
            Value::I64(x) => *x,
            other => return Err(self.wrong(key, "an integer", other)),
        };
        Ok(n)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let n = self.int(key, v)?;
        usize::try_from(n).map(Some).map_err(|_| self.error(format!("GGUF metadata `{key}` is negative: {n}")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.error(format!("GGUF metadata has no `{key}`")))
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.wrong(key, "a float", other)),
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        self.opt_float(key)?.ok_or_else(|| self.error(format!("GGUF metadata has no `{key}`")))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(key, "a bool", other)),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?.ok_or_else(|| self.error(format!("GGUF metadata has no `{key}`")))
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            other => Err(self.wrong(key, "an array", other)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.wrong(key, "an array of strings", other)),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?.iter().map(|v| self.int(key, v)).collect()
    }
}

#[cfg(test)]
mod tests {
    //! A toy Llama written as GGUF with candle's writer (1 layer, hidden 8, 2 heads / 1 KV head), so the
    //! whole import runs without the SmolLM2 download: names, Q/K un-permutation, config, tokenizer, and
    //! that `Policy::load` accepts the result. The real file is compared in `tests/gguf_import.rs`.

    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::Device;

    const HIDDEN: usize = 8;

    /// llama.cpp's `permute` (convert_hf_to_gguf.py): the layout GGUF stores Q and K in.
    fn permute(w: &Tensor, heads: usize) -> Tensor {
        let (r, c) = w.dims2().unwrap();
        w.reshape((heads, 2, r / heads / 2, c))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((r, c))
            .unwrap()
    }

    /// Distinct values per tensor, so that a swapped or mis-permuted tensor cannot pass.
    fn filled(rows: usize, cols: usize, seed: f32) -> Tensor {
        let t = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu).unwrap();
        ((t * 0.01).unwrap() + seed as f64).unwrap().reshape((rows, cols)).unwrap()
    }

    fn hf_tensors() -> Vec<(&'static str, Tensor)> {
        vec![
            ("model.embed_tokens.weight", filled(8, HIDDEN, 0.1)),
            ("model.norm.weight", filled(1, HIDDEN, 1.0).squeeze(0).unwrap()),
            ("model.layers.0.input_layernorm.weight", filled(1, HIDDEN, 0.9).squeeze(0).unwrap()),
            ("model.layers.0.post_attention_layernorm.weight", filled(1, HIDDEN, 0.8).squeeze(0).unwrap()),
            ("model.layers.0.self_attn.q_proj.weight", filled(8, HIDDEN, -0.2)),
            ("model.layers.0.self_attn.k_proj.weight", filled(4, HIDDEN, -0.3)),
            ("model.layers.0.self_attn.v_proj.weight", filled(4, HIDDEN, -0.4)),
            ("model.layers.0.self_attn.o_proj.weight", filled(8, HIDDEN, -0.5)),
            ("model.layers.0.mlp.gate_proj.weight", filled(16, HIDDEN, 0.2)),
            ("model.layers.0.mlp.up_proj.weight", filled(16, HIDDEN, 0.3)),
            ("model.layers.0.mlp.down_proj.weight", filled(8, 16, 0.4)),
        ]
    }

    fn gguf_name(hf: &str) -> String {
        hf.replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
    }

    fn metadata() -> Vec<(String, Value)> {
        let strings = |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect());
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.name".into(), Value::String("toy".into())),
            ("llama.block_count".into(), Value::U32(1)),
            ("llama.context_length".into(), Value::U32(64)),
            ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
            ("llama.feed_forward_length".into(), Value::U32(16)),
            ("llama.attention.head_count".into(), Value::U32(2)),
            ("llama.attention.head_count_kv".into(), Value::U32(1)),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
            ("tokenizer.ggml.tokens".into(), strings(&["<|endoftext|>", "a", "b", "Ġ", "1", "2", "Ġb", "<|im_end|>"])),
            ("tokenizer.ggml.token_type".into(), Value::Array([3, 1, 1, 1, 1, 1, 1, 3].map(Value::I32).to_vec())),
            ("tokenizer.ggml.merges".into(), strings(&["Ġ b"])),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(7)),
            ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
            ("tokenizer.chat_template".into(), Value::String("{{ messages }}".into())),
        ]
    }

    /// A change to a toy file's metadata and tensors.
    type Edit = Box<dyn FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, Tensor)>)>;

    /// Write a toy GGUF with `edit` applied to its metadata and (GGUF-named) tensors.
    fn write_gguf(path: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, Tensor)>)) {
        let mut meta = metadata();
        let mut tensors: Vec<(String, Tensor)> = hf_tensors()
            .into_iter()
            .map(|(hf, t)| {
                let stored = match hf {
                    n if n.ends_with("q_proj.weight") => permute(&t, 2),
                    n if n.ends_with("k_proj.weight") => permute(&t, 1),
                    _ => t,
                };
                (gguf_name(hf), stored)
            })
            .collect();
        edit(&mut meta, &mut tensors);
        let q: Vec<(String, QTensor)> =
            tensors.iter().map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap())).collect();
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = File::create(path).unwrap();
        gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("prospect-gguf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn toy_llama_round_trips_into_a_loadable_hf_folder() {
        let dir = scratch("toy");
        let (src, dest) = (dir.join("toy.gguf"), dir.join("hf"));
        write_gguf(&src, |_, _| {});
        let report = import_gguf(&src, &dest, ImportDtype::F32).unwrap();
        assert_eq!((report.tensors, report.num_hidden_layers, report.vocab_size), (11, 1, 8));
        assert_eq!(report.source_types.get("F32"), Some(&11));

        // Every tensor under its Hugging Face name, Q and K back in Hugging Face's row order.
        let got = crate::model::load_tensors(&dest, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.len(), 11);
        for (hf, want) in hf_tensors() {
            let diff = (&got[hf] - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{hf}");
        }

        let config = crate::model::ModelConfig::load(&dest).unwrap();
        assert_eq!((config.num_attention_heads, config.num_kv_heads(), config.head_dim()), (2, 1, 4));
        assert!(config.tie_word_embeddings, "no output.weight: tied");
        assert_eq!((config.rope_theta(), config.rms_norm_eps), (10_000.0, 1e-5f32 as f64));
        let (policy, unused) = crate::model::Policy::load(&dest, &Device::Cpu).unwrap();
        assert!(unused.is_empty() && policy.params.len() == 11);

        let tok = crate::model::HfTokenizer::load(&dest).unwrap();
        assert_eq!(tok.encode("a b12<|im_end|>").unwrap(), [1, 6, 4, 5, 7]);
        assert_eq!((tok.eos_token.as_str(), tok.pad_token_id), ("<|im_end|>", 0));
        assert_eq!(tok.chat_template.as_deref(), Some("{{ messages }}"));

        // A second import may replace the first.
        import_gguf(&src, &dest, ImportDtype::Bf16).unwrap();
        let got = crate::model::load_tensors(&dest, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.len(), 11);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unsupported_files_are_rejected_with_the_key_or_tensor_named() {
        let dir = scratch("errors");
        let cases: Vec<(&str, Edit, &str)> = vec![
            ("arch", Box::new(|m, _| m[0].1 = Value::String("qwen2".into())), "`general.architecture` is `qwen2`"),
            (
                "missing",
                Box::new(|m, _| m.retain(|(k, _)| k != "llama.block_count")),
                "GGUF metadata has no `llama.block_count`",
            ),
            (
                "bias",
                Box::new(|_, t| t.push(("blk.0.attn_q.bias".into(), filled(1, HIDDEN, 0.0).squeeze(0).unwrap()))),
                "tensor `blk.0.attn_q.bias` (F32, shape [8]): not a Llama tensor name",
            ),
            (
                "layer",
                Box::new(|_, t| t.push(("blk.3.attn_norm.weight".into(), filled(1, HIDDEN, 0.0).squeeze(0).unwrap()))),
                "layer 3 is past `llama.block_count` 1",
            ),
            (
                "spm",
                Box::new(|m, _| {
                    m.iter_mut()
                        .filter(|(k, _)| k == "tokenizer.ggml.model")
                        .for_each(|kv| kv.1 = Value::String("llama".into()))
                }),
                "only byte-level BPE (`gpt2`)",
            ),
            (
                "pre",
                Box::new(|m, _| {
                    m.iter_mut()
                        .filter(|(k, _)| k == "tokenizer.ggml.pre")
                        .for_each(|kv| kv.1 = Value::String("qwen2".into()))
                }),
                "pre-tokenizer `qwen2` (tokenizer.ggml.pre) is not supported",
            ),
            (
                "type",
                Box::new(|m, _| {
                    m.iter_mut()
                        .filter(|(k, _)| k == "llama.block_count")
                        .for_each(|kv| kv.1 = Value::String("1".into()))
                }),
                "`llama.block_count` should be an integer, got String",
            ),
        ];
        for (name, edit, want) in cases {
            let src = dir.join(format!("{name}.gguf"));
            let dest = dir.join(format!("{name}-hf"));
            write_gguf(&src, edit);
            let err = import_gguf(&src, &dest, ImportDtype::F32).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(&format!("{name}.gguf")), "{name}: {err}");
            assert!(!dest.exists(), "{name}: no folder after a failed import");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
