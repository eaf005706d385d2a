//! The supervisor: one worker process per target, all at once, each restarted after a hang or a crash
//! until the time is up; then the table of executions and findings. Findings whose signature matches a
//! line of the known-findings file (`tests/fixtures/bad/pending/KNOWN`, `TARGET | TEXT`) are listed as
//! known: bugs in code this harness does not own, saved under `tests/fixtures/bad/pending/` for their
//! owners. Any other finding is new, and makes the run fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::targets::Target;
use crate::worker::{component_of_input, HANG_EXIT};

pub struct Options {
    pub seconds: f64,
    pub targets: Vec<Target>,
    pub out: PathBuf,
    pub fixtures: PathBuf,
    pub seed: u64,
    pub known: PathBuf,
}

/// One distinct finding: its signature, how often it was hit, and one input.
#[derive(Debug, Clone)]
struct Finding {
    kind: String,
    file: String,
    hits: u64,
}

#[derive(Debug, Default)]
struct Summary {
    execs: u64,
    accepted: u64,
    panics: u64,
    slow: u64,
    hangs: u64,
    crashes: u64,
    workers: u64,
    seeds: String,
    /// Signature → finding.
    findings: BTreeMap<String, Finding>,
}

/// Run every target for `seconds`; returns whether there were new findings.
pub fn run(opts: &Options) -> Result<bool> {
    std::fs::create_dir_all(opts.out.join("findings"))?;
    let known = read_known(&opts.known)?;
    let started = Instant::now();
    let summaries: Vec<(Target, Result<Summary>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = opts.targets.iter().map(|&t| (t, scope.spawn(move || supervise(t, opts)))).collect();
        handles
            .into_iter()
            .map(|(t, h)| (t, h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("supervisor panicked")))))
            .collect()
    });
    let mut table = String::new();
    let mut new_findings = 0;
    table.push_str(&format!(
        "{:<12} {:>10} {:>10} {:>7} {:>5} {:>5} {:>7} {:>8}  seeds (accepted/total)\n",
        "target", "execs", "accepted", "panics", "slow", "hangs", "crashes", "workers"
    ));
    let mut listing = String::new();
    let mut total = 0;
    for (target, summary) in &summaries {
        let s = summary.as_ref().map_err(|e| anyhow::anyhow!("target {}: {e:#}", target.name()))?;
        total += s.execs;
        table.push_str(&format!(
            "{:<12} {:>10} {:>10} {:>7} {:>5} {:>5} {:>7} {:>8}  {}\n",
            target.name(),
            s.execs,
            s.accepted,
            s.panics,
            s.slow,
            s.hangs,
            s.crashes,
            s.workers,
            s.seeds
        ));
        for (signature, f) in &s.findings {
            let is_known = known.iter().any(|(t, text)| t == target.name() && signature.contains(text.as_str()));
            new_findings += usize::from(!is_known);
            let tag = if is_known { "known" } else { "NEW" };
            listing.push_str(&format!(
                "  [{tag}] {} {}: {signature} (x{}; {})\n",
                target.name(),
                f.kind,
                f.hits,
                f.file
            ));
        }
    }
    let distinct: usize = summaries.iter().filter_map(|(_, s)| s.as_ref().ok()).map(|s| s.findings.len()).sum();
    let report = format!(
        "{table}total: {total} executions in {:.0} s; {distinct} distinct findings, {new_findings} new\n{listing}",
        started.elapsed().as_secs_f64()
    );
    print!("{report}");
    std::fs::write(opts.out.join("summary.txt"), &report)?;
    Ok(new_findings > 0)
}

/// `TARGET | TEXT` lines; `#` starts a comment.
fn read_known(path: &Path) -> Result<Vec<(String, String)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut known = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (target, needle) = line
            .split_once('|')
            .with_context(|| format!("{}:{}: expected `TARGET | TEXT`, got {line:?}", path.display(), i + 1))?;
        known.push((target.trim().to_string(), needle.trim().to_string()));
    }
    Ok(known)
}

/// Workers for one target, one after the other, until the time is up.
fn supervise(target: Target, opts: &Options) -> Result<Summary> {
    let deadline = Instant::now() + Duration::from_secs_f64(opts.seconds);
    let mut summary = Summary::default();
    while summary.workers < 100 {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
        if left < 0.5 && summary.workers > 0 {
            break;
        }
        let ended = run_worker(target, opts, left.max(0.5), summary.workers, &mut summary)?;
        summary.workers += 1;
        if ended {
            break;
        }
    }
    Ok(summary)
}

/// One worker process; returns true when it ran to its deadline (false: it hung or crashed).
fn run_worker(target: Target, opts: &Options, seconds: f64, restart: u64, summary: &mut Summary) -> Result<bool> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "worker",
            target.name(),
            "--seconds",
            &seconds.to_string(),
            "--seed",
            &(opts.seed + restart).to_string(),
        ])
        .arg("--out")
        .arg(&opts.out)
        .arg("--fixtures")
        .arg(&opts.fixtures)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a worker")?;
    let pid = child.id();
    let mut stderr = child.stderr.take().context("worker stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).ok();
        text
    });
    let mut last_stats = [0u64; 4];
    for line in BufReader::new(child.stdout.take().context("worker stdout")?).lines() {
        let line = line?;
        let mut words = line.splitn(4, ' ');
        match words.next() {
            Some("stats") => {
                let nums: Vec<u64> = words.flat_map(|w| w.split(' ')).filter_map(|w| w.parse().ok()).collect();
                if nums.len() == 4 {
                    last_stats.copy_from_slice(&nums);
                }
            }
            Some("seeds") => {
                if restart == 0 {
                    let nums: Vec<&str> = words.collect();
                    summary.seeds = format!("{}/{}", nums.get(1).unwrap_or(&"?"), nums.first().unwrap_or(&"?"));
                }
            }
            Some("finding") => {
                let (kind, file, signature) = (words.next(), words.next(), words.next());
                if let (Some(kind), Some(file), Some(signature)) = (kind, file, signature) {
                    add_finding(summary, kind, file, signature);
                }
            }
            _ => eprintln!("[{} worker] {line}", target.name()),
        }
    }
    let status = child.wait()?;
    let err_text = stderr_reader.join().unwrap_or_default();
    let [execs, accepted, panics, slow] = last_stats;
    summary.execs += execs;
    summary.accepted += accepted;
    summary.panics += panics;
    summary.slow += slow;
    let current = opts.out.join(format!(".current-{}-{pid}", target.name()));
    if status.success() {
        return Ok(true);
    }
    if status.code() == Some(HANG_EXIT) {
        summary.hangs += 1;
    } else {
        summary.crashes += 1;
        summary.execs += 1;
        save_crash(target, &current, &opts.out, &status.to_string(), &err_text, summary)?;
    }
    std::fs::remove_file(&current).ok();
    std::fs::remove_dir_all(opts.out.join("scratch").join(format!("{}-{pid}", target.name()))).ok();
    Ok(false)
}

fn add_finding(summary: &mut Summary, kind: &str, file: &str, signature: &str) {
    summary.findings.entry(signature.to_string()).and_modify(|f| f.hits += 1).or_insert(Finding {
        kind: kind.to_string(),
        file: file.to_string(),
        hits: 1,
    });
}

/// A worker died without reporting (abort, signal): its last input is in the `.current` file.
fn save_crash(
    target: Target,
    current: &Path,
    out: &Path,
    status: &str,
    stderr: &str,
    summary: &mut Summary,
) -> Result<()> {
    let input = std::fs::read(current).unwrap_or_default();
    let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
    let stem = format!("{}-crash-{}", target.name(), summary.crashes);
    let bin = out.join("findings").join(format!("{stem}.bin"));
    std::fs::write(&bin, &input)?;
    std::fs::write(out.join("findings").join(format!("{stem}.txt")), format!("{status}\n\nstderr:\n{stderr}\n"))?;
    let first = tail.split(" | ").next().unwrap_or("").chars().take(100).collect::<String>();
    let signature = format!("crash ({status}) in {}: {first}", component_of_input(target, &input));
    println!("finding crash {} {signature}", bin.display());
    add_finding(summary, "crash", &bin.display().to_string(), &signature);
    Ok(())
}
