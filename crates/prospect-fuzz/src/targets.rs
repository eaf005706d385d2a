//! The readers under test, one per kind of untrusted file, with the seeds each starts from.
//!
//! | target        | reader                                             | seeds                               |
//! |---------------|----------------------------------------------------|-------------------------------------|
//! | `data`        | `data::read::parse_rows` (JSONL, JSON array)       | `tests/fixtures/data/*.json*`       |
//! | `parquet`     | `data::read::parse_rows` (Parquet)                 | `tests/fixtures/data/*.parquet`     |
//! | `gguf`        | `import::convert_gguf` (header, tensors, tokenizer)| toy Llamas written with candle      |
//! | `safetensors` | `model::load_tensors` (header + tensors)           | `tests/fixtures/tiny-*/*.safetensors` |
//! | `tokenizer`   | `model::HfTokenizer::load` + chat template compile + one encode | `tokenizer.json`, `tokenizer_config.json` |
//! | `config`      | `model::ModelConfig::load`                         | `tests/fixtures/tiny-*/config.json` |
//!
//! Regression inputs under `tests/fixtures/bad/<target>/` are seeds too, so fixed bugs stay fixed.
//! Each run gets the mutated bytes; files it needs on disk go to a scratch folder of the worker's own.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Data,
    Parquet,
    Gguf,
    Safetensors,
    Tokenizer,
    Config,
}

pub const ALL: [Target; 6] =
    [Target::Data, Target::Parquet, Target::Gguf, Target::Safetensors, Target::Tokenizer, Target::Config];

/// One starting input. `slot` is the file name the bytes stand for, where a reader reads a folder.
pub struct Seed {
    pub name: String,
    pub slot: &'static str,
    pub bytes: Vec<u8>,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Data => "data",
            Target::Parquet => "parquet",
            Target::Gguf => "gguf",
            Target::Safetensors => "safetensors",
            Target::Tokenizer => "tokenizer",
            Target::Config => "config",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        ALL.into_iter()
            .find(|t| t.name() == name)
            .with_context(|| format!("unknown target `{name}`; targets: {}", ALL.map(Target::name).join(", ")))
    }

    /// The largest input a mutation may produce: twice the largest seed, at least 64 KiB.
    pub fn max_len(seeds: &[Seed]) -> usize {
        seeds.iter().map(|s| 2 * s.bytes.len()).max().unwrap_or(0).max(64 << 10)
    }

    /// The seeds: fixtures (`fixtures` is `tests/fixtures`), then regression inputs.
    pub fn seeds(self, fixtures: &Path) -> Result<Vec<Seed>> {
        let mut seeds = Vec::new();
        let mut add = |path: PathBuf, slot: &'static str| -> Result<()> {
            let bytes = std::fs::read(&path).with_context(|| format!("seed {}", path.display()))?;
            seeds.push(Seed { name: path.display().to_string(), slot, bytes });
            Ok(())
        };
        match self {
            Target::Data | Target::Parquet => {
                for path in files_in(&fixtures.join("data"))? {
                    let parquet = path.extension().is_some_and(|e| e == "parquet");
                    if parquet == (self == Target::Parquet) {
                        add(path, "data")?;
                    }
                }
            }
            Target::Gguf => {}
            Target::Safetensors => {
                add(fixtures.join("tiny-llama/model.safetensors"), "model.safetensors")?;
                add(fixtures.join("tiny-qwen2/model-00003-of-00003.safetensors"), "model.safetensors")?;
                add(fixtures.join("ppo_value_head.safetensors"), "model.safetensors")?;
            }
            Target::Tokenizer => {
                add(fixtures.join("tiny-llama/tokenizer.json"), "tokenizer.json")?;
                add(fixtures.join("tiny-llama/tokenizer_config.json"), "tokenizer_config.json")?;
            }
            Target::Config => {
                for model in ["tiny-llama", "tiny-qwen2", "tiny-llama-rm"] {
                    add(fixtures.join(model).join("config.json"), "config.json")?;
                }
            }
        }
        for path in files_in(&fixtures.join("bad").join(self.name()))? {
            add(path, self.slot())?;
        }
        if self == Target::Gguf {
            seeds.extend(toy_gguf_seeds()?);
        }
        if seeds.is_empty() {
            bail!("no seeds for target `{}` under {}", self.name(), fixtures.display());
        }
        Ok(seeds)
    }

    pub fn slot(self) -> &'static str {
        match self {
            Target::Data | Target::Parquet => "data",
            Target::Gguf => "model.gguf",
            Target::Safetensors => "model.safetensors",
            Target::Tokenizer => "tokenizer.json",
            Target::Config => "config.json",
        }
    }

    /// Run the reader on `input` (standing for the file `slot`). `Ok` when the reader accepted it;
    /// an error is the expected outcome for most mutants and is not a finding.
    pub fn run(self, input: &[u8], slot: &str, scratch: &Path, fixtures: &Path, variant: u64) -> Result<()> {
        match self {
            Target::Data | Target::Parquet => {
                let options = prospect::data::ReadOptions { skip_invalid: variant % 2 == 1, ..Default::default() };
                prospect::data::read::parse_rows(input, Path::new("fuzz.jsonl"), &options)?;
            }
            Target::Gguf => {
                let dtype = if variant % 2 == 1 {
                    prospect::import::ImportDtype::Bf16
                } else {
                    prospect::import::ImportDtype::F32
                };
                prospect::import::convert_gguf(&mut std::io::Cursor::new(input), Path::new("fuzz.gguf"), dtype)?;
            }
            Target::Safetensors => {
                std::fs::write(scratch.join(slot), input)?;
                prospect::model::load_tensors(scratch, candle_core::DType::F32, &Device::Cpu)?;
            }
            Target::Tokenizer => run_tokenizer(input, slot, scratch, fixtures)?,
            Target::Config => {
                std::fs::write(scratch.join(slot), input)?;
                prospect::model::ModelConfig::load(scratch)?;
            }
        }
        Ok(())
    }
}

/// The tokenizer as training uses it: load (tokenizer.json + tokenizer_config.json), compile the chat
/// template, encode a text with special tokens, digits and non-ASCII.
fn run_tokenizer(input: &[u8], slot: &str, scratch: &Path, fixtures: &Path) -> Result<()> {
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        if file == slot {
            std::fs::write(scratch.join(file), input)?;
        } else {
            std::fs::copy(fixtures.join("tiny-llama").join(file), scratch.join(file))?;
        }
    }
    let tok = prospect::model::HfTokenizer::load(scratch)?;
    if tok.chat_template.is_some() {
        prospect::data::ChatTemplate::for_tokenizer(&tok, None)?;
    }
    tok.encode("<|im_start|>user\nHello, wörld 12345 ✓<|im_end|>")?;
    Ok(())
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.is_file() && p.extension().is_none_or(|e| e != "txt" && e != "md"));
    files.sort();
    Ok(files)
}

/// Toy Llamas (1 layer, 2 heads / 1 KV head, vocabulary 8) in four storage types, written by candle's
/// GGUF writer: the same layout llama.cpp writes, small enough for thousands of imports a second.
fn toy_gguf_seeds() -> Result<Vec<Seed>> {
    let mut seeds = Vec::new();
    for (dtype, hidden, name) in [
        (GgmlDType::F32, 8, "f32"),
        (GgmlDType::F16, 8, "f16"),
        (GgmlDType::Q8_0, 32, "q8_0"),
        (GgmlDType::Q4_1, 32, "q4_1"),
    ] {
        seeds.push(Seed { name: format!("toy-{name}.gguf"), slot: "model.gguf", bytes: toy_gguf(dtype, hidden)? });
    }
    Ok(seeds)
}

fn toy_gguf(dtype: GgmlDType, hidden: usize) -> Result<Vec<u8>> {
    let (vocab, ff, kv) = (8, 2 * hidden, hidden / 2);
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![vocab, hidden]),
        ("output_norm.weight", vec![hidden]),
        ("blk.0.attn_norm.weight", vec![hidden]),
        ("blk.0.ffn_norm.weight", vec![hidden]),
        ("blk.0.attn_q.weight", vec![hidden, hidden]),
        ("blk.0.attn_k.weight", vec![kv, hidden]),
        ("blk.0.attn_v.weight", vec![kv, hidden]),
        ("blk.0.attn_output.weight", vec![hidden, hidden]),
        ("blk.0.ffn_gate.weight", vec![ff, hidden]),
        ("blk.0.ffn_up.weight", vec![ff, hidden]),
        ("blk.0.ffn_down.weight", vec![hidden, ff]),
    ];
    let mut tensors = Vec::new();
    for (i, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = (Tensor::arange(0f32, n as f32, &Device::Cpu)? * 0.01)?.affine(1.0, i as f64 * 0.1)?.reshape(shape)?;
        // Norms are 1-D: ggml quantizes rows, so they stay f32 as llama.cpp stores them.
        let stored = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((name.to_string(), QTensor::quantize(&t, stored)?));
    }
    let meta = toy_metadata(hidden);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
    Ok(out.into_inner())
}

fn toy_metadata(hidden: usize) -> Vec<(String, Value)> {
    let strings = |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect());
    let u32 = |n: usize| Value::U32(n as u32);
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("toy".into())),
        ("general.alignment".into(), Value::U32(32)),
        ("llama.block_count".into(), u32(1)),
        ("llama.context_length".into(), u32(64)),
        ("llama.embedding_length".into(), u32(hidden)),
        ("llama.feed_forward_length".into(), u32(2 * hidden)),
        ("llama.attention.head_count".into(), u32(2)),
        ("llama.attention.head_count_kv".into(), u32(1)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(&["<|endoftext|>", "a", "b", "Ġ", "1", "2", "Ġb", "<|im_end|>"])),
        ("tokenizer.ggml.token_type".into(), Value::Array([3, 1, 1, 1, 1, 1, 1, 3].map(Value::I32).to_vec())),
        ("tokenizer.ggml.merges".into(), strings(&["Ġ b"])),
        ("tokenizer.ggml.bos_token_id".into(), u32(0)),
        ("tokenizer.ggml.eos_token_id".into(), u32(7)),
        ("tokenizer.ggml.padding_token_id".into(), u32(0)),
        (
            "tokenizer.chat_template".into(),
            Value::String(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into(),
            ),
        ),
    ]
}
