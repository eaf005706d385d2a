//! `prospect generate` and `prospect eval`: arguments, progress and printing only; sampling and judging
//! are `prospect::eval`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prospect::eval::files::read_rows;
use prospect::eval::generate::generate_rows;
use prospect::eval::judge::JudgeSpec;
use prospect::eval::report::{evaluate, markdown, LlmOptions};
use prospect::eval::{GenerateConfig, SamplingConfig};

use crate::flags;

#[derive(Args)]
pub struct GenerateArgs {
    /// Hugging Face model folder, or a PEFT adapter folder (applied to the base it names).
    #[arg(long)]
    model: PathBuf,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu", value_parser = crate::flags::device_spec)]
    device: String,
    /// A PEFT adapter folder to sample through, unmerged, on `--model` as its base.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL of {"prompt": str | [messages], ...}; other fields are carried through.
    #[arg(long)]
    prompts: PathBuf,
    /// Output JSONL: the input rows plus completion, completion_ids, finish, model.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 128, value_parser = flags::max_new_tokens)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0, value_parser = flags::temperature)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0, value_parser = flags::top_p)]
    top_p: f64,
    /// 0 means no top-k limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1, value_parser = flags::num_samples)]
    num_samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop a completion at this string (repeatable); the text is cut before it.
    #[arg(long)]
    stop: Vec<String>,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8, value_parser = flags::batch_size)]
    batch_size: usize,
    /// Append this vocabulary token to every prompt (repeatable), e.g. `<|good|>` for a CSFT model.
    #[arg(long = "append-token", value_name = "TOKEN")]
    append_token: Vec<String>,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let rows = read_rows(&a.prompts, false)?;
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        stop: a.stop,
        seed: a.seed,
        batch_size: a.batch_size,
        append_tokens: a.append_token,
    };
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b
    });
    let mut tokens = 0usize;
    let source = prospect::model::ModelSource::resolve(&a.model, a.adapter.as_deref())?;
    let device = crate::flags::open_device(&a.device)?;
    let out = generate_rows(&source, &a.prompts, &rows, a.num_samples, &cfg, &device, &mut |n| {
        tokens += n;
        if let Some(b) = &bar {
            b.set_message(format!(
                "{tokens} tokens, {:.0} tokens/s",
                tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
            b.tick();
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut text = String::new();
    for row in &out {
        text.push_str(&serde_json::Value::Object(row.clone()).to_string());
        text.push('\n');
    }
    prospect::fsio::write_atomic(&a.output, text.as_bytes())?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} completions, {tokens} tokens in {secs:.1} s ({:.0} tokens/s) -> {}",
        out.len(),
        tokens as f64 / secs.max(1e-9),
        a.output.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// A generation file to judge (repeatable).
    #[arg(long, required = true)]
    candidate: Vec<PathBuf>,
    /// The generation file every candidate is compared with (e.g. the SFT model's).
    #[arg(long)]
    baseline: PathBuf,
    /// rule:NAME, llm:URL (OpenAI-compatible chat/completions; key from OPENAI_API_KEY) or reward:DIR.
    #[arg(long, value_name = "JUDGE", value_parser = flags::judge)]
    judge: JudgeSpec,
    /// Where results.json, results.md, win_rates.png and comparisons-*.jsonl go.
    #[arg(long)]
    output: PathBuf,
    /// Model name sent to an LLM judge.
    #[arg(long, default_value = "gpt-4")]
    judge_model: String,
    /// A file with the LLM judge's instruction; `{prompt}`, `{a}` and `{b}` are filled in.
    #[arg(long)]
    judge_prompt: Option<PathBuf>,
    /// Seeds the order in which an LLM judge sees the two responses.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let prompt_template = match &a.judge_prompt {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let llm = LlmOptions { model: a.judge_model, api_key: std::env::var("OPENAI_API_KEY").ok(), prompt_template };
    let report = evaluate(&a.candidate, &a.baseline, &a.judge, &llm, a.seed, &a.output)?;
    println!("{}", markdown(&report));
    eprintln!("results in {}", a.output.display());
    Ok(())
}
