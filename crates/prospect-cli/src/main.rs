//! `prospect`: the command-line face of the Prospect library. It parses arguments, wires library
//! calls together and prints; all computation lives in the `prospect` crate.

mod eval;
mod import;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use prospect::train::{train, Event, RunOptions};
use prospect::TrainConfig;

#[derive(Parser)]
#[command(name = "prospect", version, about = "Align language models with human feedback: KTO, DPO, SFT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model as a TOML config describes.
    Train {
        /// The run's config (see configs/ for commented examples).
        #[arg(long)]
        config: PathBuf,
        /// Override a config key, e.g. `--set loss.beta=0.2 --set max_steps=10`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from `output_dir/checkpoint/` when it exists.
        #[arg(long)]
        resume: bool,
    },
    /// The built-in experiment: base model → SFT → feedback → KTO/DPO → win rates vs SFT. No download.
    Demo {
        /// Where models, data, metrics and results go.
        #[arg(long, default_value = "runs/demo")]
        output: PathBuf,
        /// A smaller run (about a minute), as the test suite uses.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Sample completions for a file of prompts.
    Generate(eval::GenerateArgs),
    /// Judge candidates' generations against a baseline's: win rates with 95% intervals.
    Eval(eval::EvalArgs),
    /// Convert a model from another format into a Hugging Face folder.
    #[command(subcommand)]
    Import(import::ImportCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { config, set, resume } => run_train(&config, &set, resume),
        Command::Demo { output, quick, seed } => run_demo(&output, quick, seed),
        Command::Import(command) => import::run(command),
        Command::Generate(args) => eval::run_generate(args),
        Command::Eval(args) => eval::run_eval(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run_demo(output: &PathBuf, quick: bool, seed: u64) -> Result<()> {
    let scale = if quick { prospect::demo::DemoScale::quick() } else { prospect::demo::DemoScale::full() };
    let started = std::time::Instant::now();
    let results = prospect::demo::run_demo(output, scale, seed, &mut |e| {
        if let Event::Notice(msg) = e {
            eprintln!("[{:>5.1}s] {msg}", started.elapsed().as_secs_f64());
        }
    })?;
    println!("{}", prospect::demo::results_markdown(&results));
    eprintln!("results in {} ({:.0} s)", output.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn run_train(path: &PathBuf, set: &[String], resume: bool) -> Result<()> {
    let config = TrainConfig::load(path, set).with_context(|| format!("cannot use config {}", path.display()))?;
    let device = candle_core::Device::Cpu;
    let interactive = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut on_event = |event: Event| match event {
        Event::Notice(msg) => match &bar {
            Some(b) => b.println(format!("note: {msg}")),
            None => eprintln!("note: {msg}"),
        },
        Event::Started { start_step, total_steps, examples, parameters } => {
            eprintln!(
                "training {} on {examples} examples: {total_steps} steps, {:.2}M parameters",
                config.loss.name(),
                parameters as f64 / 1e6
            );
            if interactive {
                let b = ProgressBar::new(total_steps as u64);
                b.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b.set_position(start_step as u64);
                bar = Some(b);
            }
        }
        Event::Step(m) => {
            let kl = m.objective.kl.map(|k| format!(" kl {k:.4}")).unwrap_or_default();
            let line = format!(
                "step {} loss {:.6} grad_norm {:.4} lr {:.3e}{kl} {:.0} tok/s",
                m.step, m.loss, m.grad_norm, m.lr, m.tokens_per_s
            );
            match &bar {
                Some(b) => {
                    b.set_position(m.step as u64);
                    b.set_message(format!("loss {:.4}{kl} {:.0} tok/s", m.loss, m.tokens_per_s));
                }
                None => eprintln!("{line}"),
            }
        }
        Event::Checkpoint(dir) => {
            let msg = format!("checkpoint: {}", dir.display());
            match &bar {
                Some(b) => b.println(msg),
                None => eprintln!("{msg}"),
            }
        }
        Event::Finished(dir) => {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            eprintln!("saved {}", dir.display());
        }
    };
    train(&config, &device, RunOptions { resume }, &mut on_event)?;
    Ok(())
}
