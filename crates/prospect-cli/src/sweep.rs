//! `prospect sweep`: arguments and progress only; the grid, its cells and its results are
//! `prospect::sweep`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prospect::sweep::builtin::{prepare, BuiltinScale};
use prospect::sweep::{run_sweep, CellId, SweepConfig, SweepEvent, SweepOptions};
use prospect::train::Event;

#[derive(Args)]
pub struct SweepArgs {
    /// The sweep file: models, datasets, methods, shared training keys and the judge (configs/sweep-*.toml).
    #[arg(long, required_unless_present = "builtin", conflicts_with = "builtin")]
    config: Option<PathBuf>,
    /// The built-in sweep: the demo's task at four model sizes, nine methods, judged by its rule. No download.
    #[arg(long)]
    builtin: bool,
    /// With --builtin: the small version the test suite runs (a few minutes).
    #[arg(long, requires = "builtin")]
    quick: bool,
    /// With --builtin: seeds the data, the models and the sampling.
    #[arg(long, default_value_t = 0, requires = "builtin")]
    seed: u64,
    /// Where cells and results go (default: the file's `output`, runs/sweep, or runs/sweep-builtin[-quick]).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run only this method (repeatable); SFT cells run as the methods need them.
    #[arg(long = "only", value_name = "METHOD")]
    only: Vec<String>,
    /// Run only this model (repeatable).
    #[arg(long = "only-model", value_name = "MODEL")]
    only_model: Vec<String>,
    /// Cells at once, each with its share of the threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
}

pub fn run(a: SweepArgs) -> Result<()> {
    let started = Instant::now();
    let mut progress = Progress::new(a.jobs as usize, started);
    let (config, out) = match &a.config {
        Some(path) => {
            let config = SweepConfig::load(path).with_context(|| format!("cannot use sweep {}", path.display()))?;
            let out = a.output.clone().or_else(|| config.output.clone()).unwrap_or_else(|| "runs/sweep".into());
            (config, out)
        }
        None => {
            let (scale, default) = if a.quick {
                (BuiltinScale::quick(), "runs/sweep-builtin-quick")
            } else {
                (BuiltinScale::full(), "runs/sweep-builtin")
            };
            let out = a.output.clone().unwrap_or_else(|| default.into());
            let config = prepare(&out, &scale, a.seed, &mut |e| progress.train_event(None, e))?;
            (config, out)
        }
    };
    let options = SweepOptions { only_methods: a.only, only_models: a.only_model, jobs: a.jobs as usize };
    let results = run_sweep(&config, &out, &options, &mut |e| progress.show(e));
    progress.finish();
    let results = results?;
    println!("{}", prospect::sweep::report::markdown(&results));
    eprintln!("results in {} ({:.0} s)", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Lines per cell and stage; on a terminal, a bar over the cells with the current step and the time left.
struct Progress {
    jobs: usize,
    started: Instant,
    bar: Option<ProgressBar>,
    cells: usize,
    finished: usize,
    /// Seconds of the cells this invocation worked on (for the estimate).
    worked: Vec<f64>,
    active: HashSet<CellId>,
}

impl Progress {
    fn new(jobs: usize, started: Instant) -> Self {
        Self { jobs, started, bar: None, cells: 0, finished: 0, worked: Vec::new(), active: HashSet::new() }
    }

    fn line(&self, msg: String) {
        let msg = format!("[{:>6.1}s] {msg}", self.started.elapsed().as_secs_f64());
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// The estimated time left: the mean time of the cells worked on so far, times those left, over jobs.
    fn eta(&self) -> String {
        if self.worked.is_empty() {
            return "?".into();
        }
        let mean = self.worked.iter().sum::<f64>() / self.worked.len() as f64;
        let left = (self.cells - self.finished) as f64 * mean / self.jobs as f64;
        format!("{}m{:02}s", (left / 60.0) as u64, left as u64 % 60)
    }

    fn show(&mut self, event: SweepEvent) {
        match event {
            SweepEvent::Planned { cells, done } => {
                self.cells = cells;
                self.line(format!("sweep: {cells} cells, {done} finished by an earlier run"));
                if std::io::stderr().is_terminal() {
                    let b = ProgressBar::new(cells as u64);
                    b.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} cells [{elapsed_precise}] {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    self.bar = Some(b);
                }
            }
            SweepEvent::Stage { cell, stage } => {
                self.active.insert(cell.clone());
                self.line(format!("{cell}: {stage}"));
            }
            SweepEvent::Train { cell, event } => self.train_event(Some(&cell), event),
            SweepEvent::Finished { cell, seconds, state } => {
                self.finished += 1;
                if self.active.remove(&cell) {
                    self.worked.push(seconds);
                }
                let verdict = match &state.result {
                    Some(r) => format!("win rate vs SFT {:.3} [{:.3}, {:.3}]", r.win_rate, r.ci95[0], r.ci95[1]),
                    None => "baseline".into(),
                };
                self.line(format!(
                    "cell {}/{} done: {cell}: {verdict} ({seconds:.1} s); about {} left",
                    self.finished,
                    self.cells,
                    self.eta()
                ));
                if let Some(b) = &self.bar {
                    b.set_position(self.finished as u64);
                }
            }
        }
    }

    fn train_event(&mut self, cell: Option<&CellId>, event: Event) {
        let who = cell.map(|c| format!("{c}: ")).unwrap_or_default();
        match event {
            Event::Notice(n) if !n.contains("rows read") => self.line(format!("{who}{n}")),
            Event::Step(m) => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("{who}step {} loss {:.4} · about {} left", m.step, m.loss, self.eta()));
                }
            }
            Event::Finished(dir) => self.line(format!("{who}saved {}", dir.display())),
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
