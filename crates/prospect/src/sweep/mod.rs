//! `prospect sweep`: the Archangel suite as one resumable command.
//!
//! ```text
//! SweepConfig (config.rs)         models × datasets × methods, [train], [sft], [eval]
//! plan                            per dataset, per model: the SFT cell, then one cell per method
//! run_cell (cell.rs), per cell    train (resuming) → sample held-out prompts → judge vs the SFT samples
//! results (report.rs)             results.json, results.md, win_rates.png
//! ```
//!
//! Cells run one after another, or `jobs` at once, each on its own share of the threads; a method cell
//! waits for its SFT cell. A finished cell (its fingerprints unchanged) is never redone. The built-in
//! sweep on the demo's task is [`builtin`].

pub mod builtin;
pub mod cell;
pub mod config;
pub mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;

pub use cell::{CellId, CellResult, CellState};
pub use config::{SweepConfig, SFT};
pub use report::{CellRecord, SweepResults};

use crate::error::{Error, Result};
use crate::train::Event;
use cell::{model_dir, run_cell, CellJob};
use config::{generation_suffix, DatasetEntry, MethodEntry, ModelEntry};

/// Which part of the grid to run, and how many cells at once.
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    /// Run only these methods (their SFT cells run as needed); empty: all.
    pub only_methods: Vec<String>,
    /// Run only these models; empty: all.
    pub only_models: Vec<String>,
    /// Cells at once (at least 1), each with its share of the threads.
    pub jobs: usize,
}

/// Progress of a sweep, for the caller to display.
#[derive(Debug, Clone)]
pub enum SweepEvent {
    /// `cells` are in this run's part of the grid, of which `done` were finished by an earlier run.
    Planned { cells: usize, done: usize },
    /// A cell began a stage: "training", "sampling" or "judging".
    Stage { cell: CellId, stage: &'static str },
    /// An event of a cell's training run.
    Train { cell: CellId, event: Event },
    /// A cell finished (`seconds`: this attempt's wall time).
    Finished { cell: CellId, seconds: f64, state: Box<CellState> },
}

/// One cell of the plan.
struct Planned<'a> {
    id: CellId,
    model: &'a ModelEntry,
    dataset: &'a DatasetEntry,
    /// `None`: the SFT cell.
    method: Option<&'a MethodEntry>,
    /// Index of the SFT cell it starts from or is judged against.
    sft: Option<usize>,
}

/// The cells of the grid in order (per dataset, per model: SFT first), restricted by `options`.
fn plan<'a>(config: &'a SweepConfig, options: &SweepOptions) -> Result<Vec<Planned<'a>>> {
    for (what, names, known) in [
        ("--only", &options.only_methods, config.methods.iter().map(|m| m.name.as_str()).collect::<Vec<_>>()),
        ("--only-model", &options.only_models, config.models.iter().map(|m| m.name.as_str()).collect()),
    ] {
        if let Some(bad) = names.iter().find(|n| n.as_str() != SFT && !known.contains(&n.as_str())) {
            return Err(Error::config(what, format!("`{bad}` is not in the sweep (known: {})", known.join(", "))));
        }
    }
    let wanted = |list: &[String], name: &str| list.is_empty() || list.iter().any(|n| n == name);
    let mut cells = Vec::new();
    for dataset in &config.datasets {
        for model in config.models.iter().filter(|m| wanted(&options.only_models, &m.name)) {
            let sft = cells.len();
            let id = |method: &str| CellId {
                dataset: dataset.name.clone(),
                model: model.name.clone(),
                method: method.to_string(),
            };
            cells.push(Planned { id: id(SFT), model, dataset, method: None, sft: None });
            for method in config.methods.iter().filter(|m| wanted(&options.only_methods, &m.name)) {
                cells.push(Planned { id: id(&method.name), model, dataset, method: Some(method), sft: Some(sft) });
            }
        }
    }
    Ok(cells)
}

/// The job of a planned cell; its SFT cell must be finished.
fn job<'a>(config: &'a SweepConfig, out: &Path, cells: &[Planned<'a>], i: usize) -> Result<CellJob<'a>> {
    let c = &cells[i];
    let dir = c.id.dir(out);
    let run_dir = dir.join("run");
    let sft_dir = c.sft.map(|s| cells[s].id.dir(out));
    let (train, append_tokens) = match (c.method, &sft_dir) {
        (Some(method), Some(sft_dir)) => {
            let t = config.method_config(method, c.model, c.dataset, &model_dir(sft_dir), &run_dir)?;
            let suffix = generation_suffix(&t.loss);
            (t, suffix)
        }
        _ => (config.sft_config(c.model, c.dataset, &run_dir)?, vec![]),
    };
    let baseline = match sft_dir {
        Some(d) => {
            let state = CellState::read(&d)
                .filter(|s| s.done)
                .ok_or_else(|| Error::Compute(format!("{}: its SFT cell has not finished", c.id)))?;
            Some((d, state.eval_fingerprint))
        }
        None => None,
    };
    Ok(CellJob {
        id: c.id.clone(),
        dir,
        train,
        eval: &config.eval,
        prompts: &c.dataset.eval_prompts,
        append_tokens,
        baseline,
    })
}

/// Which cells are finished, waiting or running; shared by the workers.
struct Queue {
    /// Not yet started, in plan order.
    pending: Vec<usize>,
    finished: Vec<bool>,
    running: usize,
    failed: bool,
}

/// Run the part of the grid `options` selects into `out`, then write the results of every finished cell
/// of the whole grid.
pub fn run_sweep(
    config: &SweepConfig,
    out: &Path,
    options: &SweepOptions,
    on_event: &mut dyn FnMut(SweepEvent),
) -> Result<SweepResults> {
    config.check()?;
    let cells = plan(config, options)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::fsio::write_atomic(
        &out.join("sweep.toml"),
        toml::to_string(config).map_err(|e| Error::output(out, e))?.as_bytes(),
    )?;
    let done = cells.iter().filter(|c| CellState::read(&c.id.dir(out)).is_some_and(|s| s.done)).count();
    on_event(SweepEvent::Planned { cells: cells.len(), done });
    let jobs = options.jobs.clamp(1, cells.len().max(1));
    let threads = (rayon::current_num_threads() / jobs).max(1);
    let queue = Mutex::new(Queue {
        pending: (0..cells.len()).collect(),
        finished: vec![false; cells.len()],
        running: 0,
        failed: false,
    });
    let wake = Condvar::new();
    let (tx, rx) = mpsc::channel::<SweepEvent>();
    let errors: Mutex<Vec<Error>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let tx = tx.clone();
            let (queue, wake, errors, cells) = (&queue, &wake, &errors, &cells);
            scope.spawn(move || {
                let work = || worker(config, out, cells, queue, wake, &tx);
                let result = if jobs == 1 {
                    work()
                } else {
                    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                        Ok(pool) => pool.install(work),
                        Err(e) => Err(Error::Compute(format!("cannot start a thread pool: {e}"))),
                    }
                };
                if let Err(e) = result {
                    lock(queue).failed = true;
                    wake.notify_all();
                    lock(errors).push(e);
                }
            });
        }
        drop(tx);
        for event in rx {
            on_event(event);
        }
    });
    let results = report::collect(config, out)?;
    report::write(out, &results)?;
    match errors.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Take the first pending cell whose SFT cell is finished, run it, repeat; stop when nothing is left
/// or another worker failed.
fn worker(
    config: &SweepConfig,
    out: &Path,
    cells: &[Planned],
    queue: &Mutex<Queue>,
    wake: &Condvar,
    tx: &mpsc::Sender<SweepEvent>,
) -> Result<()> {
    loop {
        let next = {
            let mut q = lock(queue);
            loop {
                if q.failed || q.pending.is_empty() {
                    return Ok(());
                }
                let ready = q.pending.iter().position(|&i| cells[i].sft.is_none_or(|s| q.finished[s]));
                if let Some(k) = ready {
                    q.running += 1;
                    break q.pending.remove(k);
                }
                if q.running == 0 {
                    return Err(Error::Compute("sweep: no cell can start (an SFT cell is missing)".into()));
                }
                q = wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = Instant::now();
        let id = cells[next].id.clone();
        let result = job(config, out, cells, next).and_then(|job| {
            run_cell(&job, &mut |stage| _ = tx.send(SweepEvent::Stage { cell: id.clone(), stage }), &mut |event| {
                _ = tx.send(SweepEvent::Train { cell: id.clone(), event })
            })
        });
        let mut q = lock(queue);
        q.running -= 1;
        match result {
            Ok(state) => {
                q.finished[next] = true;
                let seconds = started.elapsed().as_secs_f64();
                let _ = tx.send(SweepEvent::Finished { cell: id, seconds, state: Box::new(state) });
                wake.notify_all();
            }
            Err(e) => return Err(Error::Compute(format!("sweep cell {id}: {e}"))),
        }
    }
}

/// Parameters of each model of the grid, from its safetensors headers.
fn parameter_counts(config: &SweepConfig) -> Result<HashMap<String, usize>> {
    config.models.iter().map(|m| Ok((m.name.clone(), crate::model::weights::parameter_count(&m.path)?))).collect()
}

/// A cell of the whole grid: its method's index in the file (`None`: the SFT cell), id and folder.
struct GridCell {
    method: Option<usize>,
    id: CellId,
    dir: PathBuf,
}

/// The cells of the whole grid, in plan order (for results).
fn grid(config: &SweepConfig, out: &Path) -> Result<Vec<GridCell>> {
    Ok(plan(config, &SweepOptions::default())?
        .into_iter()
        .map(|c| GridCell {
            method: c.method.and_then(|m| config.methods.iter().position(|x| x.name == m.name)),
            dir: c.id.dir(out),
            id: c.id,
        })
        .collect())
}
