//! Importing models stored in other formats as Hugging Face folders, so that training never needs a
//! model hub: `gguf` (llama.cpp's format) is the one format so far.
//!
//! - `header.rs`: the GGUF container, every size checked against the file before it is allocated;
//! - `gguf.rs`: the folder as a whole: metadata to `config.json`, tensors to `model.safetensors`;
//! - `dequant.rs`: ggml block formats to f32, and llama.cpp's Q/K row permutation undone;
//! - `bpe.rs`: the byte-level BPE tokenizer rebuilt as `tokenizer.json`.

pub mod bpe;
pub mod dequant;
pub mod gguf;
pub mod header;

pub use gguf::{convert_gguf, import_gguf, Converted, ImportDtype, ImportReport};
