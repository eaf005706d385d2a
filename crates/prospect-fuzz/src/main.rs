//! `prospect-fuzz`: an in-process fuzz harness for every reader of untrusted bytes in Prospect, on
//! stable Rust. `scripts/fuzz.sh` builds it in release and runs it under `ulimit -v`.
//!
//! ```text
//! prospect-fuzz [--seconds S] [--out DIR] [--seed N] [--fixtures DIR] [--known FILE] [TARGET...]
//!     every target (or those named) for S seconds each, all at once, one process per target;
//!     prints executions, panics, slow runs, hangs and crashes per target, and the distinct findings
//!     (exit 1 when one is not in the known list)
//! prospect-fuzz replay TARGET FILE...
//!     run each file through the reader once and say what happened (accepted, error, panic)
//! prospect-fuzz worker TARGET --seconds S --out DIR --seed N --fixtures DIR
//!     one worker process (the supervisor starts these)
//! ```
//!
//! Targets: `data`, `gguf`, `safetensors`, `tokenizer`, `config` (see `targets.rs`). How the loop works
//! and what counts as a finding: `worker.rs`; the mutations: `mutate.rs`.

mod mutate;
mod supervisor;
mod targets;
mod worker;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use targets::Target;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `--name value` pairs and bare words, in order.
struct Args {
    flags: Vec<(String, String)>,
    words: Vec<String>,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Result<Self> {
        let (mut flags, mut words) = (Vec::new(), Vec::new());
        let mut raw = raw.peekable();
        while let Some(arg) = raw.next() {
            if let Some(name) = arg.strip_prefix("--") {
                if name == "help" {
                    bail!("usage: see the header of crates/prospect-fuzz/src/main.rs");
                }
                let value = raw.next().with_context(|| format!("--{name} needs a value"))?;
                flags.push((name.to_string(), value));
            } else {
                words.push(arg);
            }
        }
        Ok(Self { flags, words })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.flags.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| anyhow::anyhow!("--{name}: expected a number, got {v:?}")),
        }
    }

    fn path(&self, name: &str, default: PathBuf) -> PathBuf {
        self.get(name).map_or(default, PathBuf::from)
    }
}

fn main() -> Result<()> {
    let args = Args::parse(std::env::args().skip(1))?;
    let fixtures = args.path("fixtures", repo_root().join("tests/fixtures"));
    match args.words.first().map(String::as_str) {
        Some("worker") => {
            let target = Target::parse(args.words.get(1).context("worker: which target?")?)?;
            let worker_args = worker::WorkerArgs {
                target,
                seconds: args.number("seconds", 10.0)?,
                out: args.path("out", repo_root().join("target/fuzz")),
                fixtures,
                seed: args.number("seed", 0)?,
            };
            worker::run(&worker_args)
        }
        Some("replay") => {
            let target = Target::parse(args.words.get(1).context("replay: which target?")?)?;
            replay(target, &args.words[2..], &fixtures)
        }
        _ => {
            let targets = if args.words.is_empty() {
                targets::ALL.to_vec()
            } else {
                args.words.iter().map(|w| Target::parse(w)).collect::<Result<_>>()?
            };
            let opts = supervisor::Options {
                seconds: args.number("seconds", 60.0)?,
                targets,
                out: args.path("out", repo_root().join("target/fuzz")),
                fixtures: fixtures.clone(),
                seed: args.number("seed", 1)?,
                known: args.path("known", fixtures.join("bad/pending/KNOWN")),
            };
            if supervisor::run(&opts)? {
                bail!("new findings: see the list above; each input is in {}", opts.out.join("findings").display());
            }
            Ok(())
        }
    }
}

/// Run files through a target once each and print what happened.
fn replay(target: Target, files: &[String], fixtures: &Path) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("prospect-fuzz-replay-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    std::panic::set_hook(Box::new(|_| {}));
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {file}"))?;
        let slot = if file.ends_with("tokenizer_config.json") { "tokenizer_config.json" } else { target.slot() };
        let outcome = std::panic::catch_unwind(|| target.run(&bytes, slot, &scratch, fixtures, 0));
        match outcome {
            Ok(Ok(())) => println!("{file}: accepted"),
            Ok(Err(e)) => println!("{file}: error: {e:#}"),
            Err(p) => {
                let msg =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                println!("{file}: PANIC: {}", msg.unwrap_or_default());
            }
        }
    }
    std::fs::remove_dir_all(&scratch).ok();
    Ok(())
}
