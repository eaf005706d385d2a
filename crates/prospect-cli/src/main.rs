//! `prospect`: the command-line face of the Prospect library. It parses arguments, wires library
//! calls together and prints; all computation lives in the `prospect` crate.

mod eval;
mod flags;
mod import;
mod serve;
mod sweep;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use prospect::data::inspect::{convert, inspect, Inspection, Percentiles};
use prospect::data::{LabelFrom, ReadOptions};
use prospect::dist::Comm;
use prospect::model::HfTokenizer;
use prospect::train::{train_with, Event, RunOptions};
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
        /// resume even if the checkpoint's fingerprint differs from this run's
        #[arg(long, requires = "resume")]
        resume_force: bool,
        /// `cpu`, or `cuda:N` in a build with the `cuda` feature; overrides the config's `device`.
        #[arg(long, value_parser = crate::flags::device_spec)]
        device: Option<String>,
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
        /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
        #[arg(long, default_value = "cpu", value_parser = crate::flags::device_spec)]
        device: String,
    },
    /// The Archangel grid: methods × models × datasets, each cell trained (from a shared SFT run where
    /// the method says so), sampled and judged against its SFT model. Resumable; `--builtin` needs no download.
    Sweep(sweep::SweepArgs),
    /// Serve a model behind an OpenAI-compatible API and a chat page; every answer and 👍/👎 goes into
    /// the feedback database, which `prospect train` reads as `train_data = "sqlite://PATH"`.
    Serve(serve::ServeArgs),
    /// Sample completions for a file of prompts.
    Generate(eval::GenerateArgs),
    /// Judge candidates' generations against a baseline's: win rates with 95% intervals.
    Eval(eval::EvalArgs),
    /// Convert a model from another format into a Hugging Face folder.
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Fold a PEFT LoRA adapter into its base: a full Hugging Face model folder that `transformers` loads.
    Merge {
        /// The base model folder the adapter was trained on.
        #[arg(long)]
        base: PathBuf,
        /// The adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where the merged model goes (replaced atomically).
        #[arg(long)]
        output: PathBuf,
    },
    /// Look at a data file, or convert it to canonical JSONL.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

/// How to read a data file (the same keys as the config's data section).
#[derive(clap::Args)]
struct ReadArgs {
    /// The layout, instead of detecting it.
    #[arg(long = "format", value_name = "FORMAT", value_enum)]
    format: Option<flags::Format>,
    /// Labels from a score field: `FIELD:THRESHOLD`, THRESHOLD a number, `mean` or `median`.
    #[arg(long = "label-from", value_name = "FIELD:THRESHOLD", value_parser = flags::label_from)]
    label_from: Option<LabelFrom>,
    /// Skip invalid rows (and count them) instead of stopping at the first.
    #[arg(long)]
    skip_invalid: bool,
}

impl ReadArgs {
    fn options(&self) -> ReadOptions {
        ReadOptions {
            format: self.format.map(|f| f.0),
            label_from: self.label_from.clone(),
            skip_invalid: self.skip_invalid,
        }
    }
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print a data file's layout, rows, label balance, token lengths and the KTO weights it calls for.
    /// Exits non-zero when the file is invalid.
    Inspect {
        file: PathBuf,
        /// A model folder: measure token lengths with its tokenizer and chat template.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The max_length to check rows against.
        #[arg(long, default_value_t = 1024, value_parser = flags::max_length)]
        max_length: usize,
        /// A chat template (`.jinja` or tokenizer_config.json) instead of the model's.
        #[arg(long)]
        chat_template: Option<PathBuf>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Write the thumbs of a feedback database (`prospect serve`) as JSONL training rows, one per thumb:
    /// conversational prompt, assistant completion, label.
    Export {
        /// sqlite://PATH
        #[arg(long)]
        db: String,
        /// Only thumbs given at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z, or Unix seconds).
        #[arg(long)]
        since: Option<String>,
        output: PathBuf,
    },
    /// Write a data file in any supported layout as canonical JSONL (TRL's format).
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
}

fn run_merge(base: &std::path::Path, adapter: &std::path::Path, output: &std::path::Path) -> Result<()> {
    prospect::model::merge_adapter(base, adapter, output, &candle_core::Device::Cpu)?;
    println!("merged {} into {}: {}", adapter.display(), base.display(), output.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { config, mut set, resume, resume_force, device } => {
            set.extend(device.map(|d| format!("device=\"{d}\""))); // the flag wins over the file
            run_train(&config, &set, RunOptions { resume, resume_force })
        }
        Command::Demo { output, quick, seed, device } => run_demo(&output, quick, seed, &device),
        Command::Import(command) => import::run(command),
        Command::Merge { base, adapter, output } => run_merge(&base, &adapter, &output),
        Command::Sweep(args) => sweep::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => eval::run_generate(args),
        Command::Eval(args) => eval::run_eval(args),
        Command::Data { command: DataCommand::Inspect { file, model, max_length, chat_template, read } } => {
            run_inspect(&file, model.as_deref(), max_length, chat_template.as_deref(), &read)
        }
        Command::Data { command: DataCommand::Convert { input, output, read } } => run_convert(&input, &output, &read),
        Command::Data { command: DataCommand::Export { db, since, output } } => {
            run_export(&db, since.as_deref(), &output)
        }
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

fn run_demo(output: &std::path::Path, quick: bool, seed: u64, device: &str) -> Result<()> {
    let scale = if quick { prospect::demo::DemoScale::quick() } else { prospect::demo::DemoScale::full() };
    let started = std::time::Instant::now();
    let device = crate::flags::open_device(device)?;
    let results = prospect::demo::run_demo_on(output, scale, seed, device, &mut |e| {
        if let Event::Notice(msg) = e {
            eprintln!("[{:>5.1}s] {msg}", started.elapsed().as_secs_f64());
        }
    })?;
    println!("{}", prospect::demo::results_markdown(&results));
    eprintln!("results in {} ({:.0} s)", output.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The ranks this process belongs to: MPI's world when an MPI launcher started it (`mpirun`, `srun`) and
/// the binary has the `mpi` feature, else one process.
fn communicator() -> Comm {
    #[cfg(feature = "mpi")]
    if prospect::dist::mpi::Mpi::launched() {
        if let Some(mpi) = prospect::dist::mpi::Mpi::init() {
            return std::rc::Rc::new(mpi);
        }
    }
    prospect::dist::local()
}

/// Train on this process's ranks. A rank that fails prints its error with its rank and aborts the job,
/// so no other rank waits for it.
fn run_train(path: &std::path::Path, set: &[String], options: RunOptions) -> Result<()> {
    let comm = communicator();
    let result = train_ranks(path, set, options, comm.clone());
    if let Err(e) = &result {
        if comm.world_size() > 1 {
            eprintln!("rank {} of {}: error: {e:#}", comm.rank(), comm.world_size());
            comm.abort(1);
        }
    }
    result
}

fn train_ranks(path: &std::path::Path, set: &[String], options: RunOptions, comm: Comm) -> Result<()> {
    let config = TrainConfig::load(path, set).with_context(|| format!("cannot use config {}", path.display()))?;
    let device = prospect::device::open(config.device.as_deref().unwrap_or("cpu"), &path.display().to_string())?;
    let (rank, world) = (comm.rank(), comm.world_size());
    if rank == 0 && world > 1 {
        eprintln!(
            "data parallel: {world} ranks; batch {} = microbatch {} × accumulation {} × {world} ranks",
            config.batch_size,
            config.microbatch_size,
            config.batch_size / (config.microbatch_size * world).max(1)
        );
    }
    let mut printer = Printer { loss: config.loss.name(), interactive: std::io::stderr().is_terminal(), bar: None };
    // Rank 0 speaks for the job; the others stay quiet unless they fail.
    train_with(&config, &device, options, comm, &mut |event| {
        if rank == 0 {
            printer.show(event)
        }
    })?;
    Ok(())
}

/// How `prospect train` shows a run's events: a progress bar on a terminal, one line per step otherwise.
struct Printer {
    loss: &'static str,
    interactive: bool,
    bar: Option<ProgressBar>,
}

impl Printer {
    fn line(&self, msg: String) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn show(&mut self, event: Event) {
        match event {
            Event::Notice(msg) => self.line(format!("note: {msg}")),
            Event::Started { start_step, total_steps, examples, parameters } => {
                eprintln!(
                    "training {} on {examples} examples: {total_steps} steps, {:.2}M parameters",
                    self.loss,
                    parameters as f64 / 1e6
                );
                if self.interactive {
                    let b = ProgressBar::new(total_steps as u64);
                    b.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b.set_position(start_step as u64);
                    self.bar = Some(b);
                }
            }
            Event::Step(m) => {
                let kl = m.objective.get("kl").map(|k| format!(" kl {k:.4}")).unwrap_or_default();
                match &self.bar {
                    Some(b) => {
                        b.set_position(m.step as u64);
                        b.set_message(format!("loss {:.4}{kl} {:.0} tok/s", m.loss, m.tokens_per_s));
                    }
                    None => eprintln!(
                        "step {} loss {:.6} grad_norm {:.4} lr {:.3e}{kl} {:.0} tok/s",
                        m.step, m.loss, m.grad_norm, m.lr, m.tokens_per_s
                    ),
                }
            }
            Event::Eval { step, loss, metrics } => {
                let kl = metrics.get("kl").map(|k| format!(" kl {k:.4}")).unwrap_or_default();
                self.line(format!("eval after step {step}: loss {loss:.6}{kl}"));
            }
            Event::Checkpoint(dir) => self.line(format!("checkpoint: {}", dir.display())),
            Event::Finished(dir) => {
                if let Some(b) = &self.bar {
                    b.finish_and_clear();
                }
                eprintln!("saved {}", dir.display());
            }
        }
    }
}

fn run_inspect(
    file: &std::path::Path,
    model: Option<&std::path::Path>,
    max_length: usize,
    chat_template: Option<&std::path::Path>,
    read: &ReadArgs,
) -> Result<()> {
    let options = read.options();
    let tok = match model {
        Some(dir) => {
            Some(HfTokenizer::load(dir).with_context(|| format!("cannot load the tokenizer of {}", dir.display()))?)
        }
        None => None,
    };
    let report = inspect(file, &options, tok.as_ref(), chat_template, max_length)
        .with_context(|| format!("{} is not valid training data", file.display()))?;
    print_inspection(&report);
    Ok(())
}

fn print_inspection(r: &Inspection) {
    println!("file:         {}", r.path.display());
    println!("container:    {}", r.container);
    println!("format:       {} -> {}{}", r.format, r.shape, if r.conversational { ", conversational" } else { "" });
    println!("records:      {}", r.read.records);
    println!("rows:         {}", r.rows);
    if r.read.filtered > 0 {
        println!("left out:     {} ({})", r.read.filtered, r.read.filter_rule.unwrap_or("the layout's rule"));
    }
    if let Some(t) = r.read.label_threshold {
        println!("label from:   score >= {t}");
    }
    if !r.read.skipped.is_empty() {
        println!("skipped:      {} invalid rows; first: {}", r.read.skipped.len(), r.read.skipped[0]);
    }
    if let (Some(nd), Some(nu)) = (r.desirable, r.undesirable) {
        let total = (nd + nu).max(1) as f64;
        let what =
            if r.shape == prospect::data::Shape::Paired { " (each pair unpairs into one of each for KTO)" } else { "" };
        println!(
            "labels:       {nd} desirable ({:.1}%), {nu} undesirable ({:.1}%){what}",
            100.0 * nd as f64 / total,
            100.0 * nu as f64 / total
        );
    }
    if let Some((ld, lu)) = r.recommended_weights {
        let (nd, nu) = (r.desirable.unwrap_or(0).max(1) as f64, r.undesirable.unwrap_or(0).max(1) as f64);
        let ratio = nd / nu;
        let state = if (1.0..=4.0 / 3.0).contains(&ratio) { "inside" } else { "outside" };
        println!(
            "KTO weights:  with λ_D = λ_U = 1, λ_D·n_D/(λ_U·n_U) = {ratio:.3} is {state} the paper's [1, 4/3]; \
             auto_weights = true sets desirable_weight = {ld:.4}, undesirable_weight = {lu:.4} (ratio 7/6)"
        );
    }
    if let Some(warning) = &r.class_warning {
        println!("warning:      {warning}");
    }
    match &r.tokens {
        Some(t) => {
            let row = |name: &str, p: &Percentiles| {
                println!(
                    "{name}  min {} p50 {} p90 {} p99 {} max {} mean {:.1}",
                    p.min, p.p50, p.p90, p.p99, p.max, p.mean
                )
            };
            row("prompt tokens:    ", &t.prompt);
            row("completion tokens:", &t.completion);
            println!(
                "max_length {}: {} rows truncated, {} rows dropped (prompt alone fills it)",
                t.max_length, t.truncated, t.dropped
            );
            if t.prompt_not_prefix > 0 {
                println!(
                    "warning: in {} rows the tokenized prompt is not a prefix of prompt + completion",
                    t.prompt_not_prefix
                );
            }
        }
        None => println!("token lengths: pass --model DIR to measure them"),
    }
}

fn run_export(db: &str, since: Option<&str>, output: &std::path::Path) -> Result<()> {
    let mut url = prospect::feedback::DbUrl::parse(db)?;
    if let Some(t) = since {
        url.since_ms = Some(prospect::feedback::parse_time(t).map_err(anyhow::Error::msg)?);
    }
    let bytes = prospect::feedback::export_jsonl(&url)?;
    prospect::fsio::write_atomic(output, &bytes)?;
    eprintln!("wrote {} rows from {db} to {}", bytes.iter().filter(|&&b| b == b'\n').count(), output.display());
    Ok(())
}

fn run_convert(input: &std::path::Path, output: &std::path::Path, read: &ReadArgs) -> Result<()> {
    let (n, report) =
        convert(input, output, &read.options()).with_context(|| format!("cannot convert {}", input.display()))?;
    eprintln!(
        "{}: {} format {}; wrote {n} rows to {}",
        input.display(),
        report.container,
        report.format,
        output.display()
    );
    if report.filtered > 0 {
        eprintln!("left out {} records: {}", report.filtered, report.filter_rule.unwrap_or("the layout's rule"));
    }
    if !report.skipped.is_empty() {
        eprintln!("skipped {} invalid rows; first: {}", report.skipped.len(), report.skipped[0]);
    }
    Ok(())
}
