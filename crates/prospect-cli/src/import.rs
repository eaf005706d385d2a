//! `prospect import gguf FILE.gguf OUT_DIR [--dtype f32|bf16]`: arguments and printing only; the
//! conversion is `prospect::import::import_gguf`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use prospect::import::{import_gguf, ImportDtype};

#[derive(Subcommand)]
pub enum ImportCommand {
    /// Convert a llama.cpp GGUF file (Llama architecture, byte-level BPE tokenizer) into a Hugging Face
    /// folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    Gguf {
        /// The .gguf file (tensors in F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K).
        file: PathBuf,
        /// The folder to write; it must be new, empty, or a previous import.
        out_dir: PathBuf,
        /// Weight dtype in model.safetensors.
        #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
        dtype: DtypeArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

pub fn run(command: ImportCommand) -> Result<()> {
    match command {
        ImportCommand::Gguf { file, out_dir, dtype } => {
            let dtype = match dtype {
                DtypeArg::F32 => ImportDtype::F32,
                DtypeArg::Bf16 => ImportDtype::Bf16,
            };
            let start = Instant::now();
            let report = import_gguf(&file, &out_dir, dtype)
                .with_context(|| format!("cannot import {} into {}", file.display(), out_dir.display()))?;
            let types: Vec<String> = report.source_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
            eprintln!(
                "imported {}: {} layers, vocab {}, {} tensors ({}), {:.2}M parameters in {:.1}s",
                report.model_name.as_deref().unwrap_or("model"),
                report.num_hidden_layers,
                report.vocab_size,
                report.tensors,
                types.join(", "),
                report.parameters as f64 / 1e6,
                start.elapsed().as_secs_f64()
            );
            println!("{}", out_dir.display());
            Ok(())
        }
    }
}
