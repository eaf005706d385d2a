//! One fuzzing process for one target: mutate a seed, run the reader inside `catch_unwind`, time it,
//! repeat until the deadline. Findings go to `OUT/findings/` as the input (`.bin`) and what happened
//! (`.txt`), and to stdout as `finding KIND FILE SIGNATURE` lines that the supervisor collects.
//!
//! - a panic: caught; its signature is the panic location and message (plus, for panics raised in the
//!   standard library such as "capacity overflow", the first frame outside it), so repeats of one bug
//!   count once;
//! - an execution over [`SLOW`]: run again alone; over the limit twice, it is a finding;
//! - an execution over [`HANG`]: a watchdog thread saves the input and ends the process (a thread cannot
//!   be stopped); the supervisor restarts the worker;
//! - an abort (stack overflow, allocation failure under `ulimit -v`): the process dies; the input was
//!   written to `OUT/.current-TARGET-PID` before the run, and the supervisor saves it.
//!
//! Progress leaves as `stats EXECS ACCEPTED PANICS SLOW` lines, once a second and at the end.

use std::backtrace::Backtrace;
use std::collections::HashSet;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::mutate::{mutate, Rng};
use crate::targets::{Seed, Target};

/// An execution slower than this (twice) is a finding.
pub const SLOW: Duration = Duration::from_secs(1);
/// An execution still running after this is a hang: the watchdog ends the process.
pub const HANG: Duration = Duration::from_secs(3);
/// Exit code of a worker the watchdog ended.
pub const HANG_EXIT: i32 = 3;

pub struct WorkerArgs {
    pub target: Target,
    pub seconds: f64,
    pub out: PathBuf,
    pub fixtures: PathBuf,
    pub seed: u64,
}

/// The last panic's details, written by the panic hook (which runs before unwinding starts).
struct PanicRecord {
    location: String,
    message: String,
    backtrace: Backtrace,
}

static LAST_PANIC: Mutex<Option<PanicRecord>> = Mutex::new(None);

/// What the watchdog and the loop share.
struct Shared {
    target: Target,
    findings: PathBuf,
    execs: AtomicU64,
    accepted: AtomicU64,
    panics: AtomicU64,
    slow: AtomicU64,
    /// Milliseconds since `epoch` when the running execution started; 0 when none runs.
    started_ms: AtomicU64,
    epoch: Instant,
    current: Mutex<Vec<u8>>,
}

impl Shared {
    fn print_stats(&self) {
        let [e, a, p, s] = [&self.execs, &self.accepted, &self.panics, &self.slow].map(|c| c.load(Ordering::Relaxed));
        println!("stats {e} {a} {p} {s}");
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    let seeds = args.target.seeds(&args.fixtures)?;
    let pid = std::process::id();
    let scratch = args.out.join("scratch").join(format!("{}-{pid}", args.target.name()));
    let findings = args.out.join("findings");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    std::fs::create_dir_all(&findings)?;
    let current_file = File::create(args.out.join(format!(".current-{}-{pid}", args.target.name())))?;
    std::panic::set_hook(Box::new(record_panic));
    let shared = Arc::new(Shared {
        target: args.target,
        findings,
        execs: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        panics: AtomicU64::new(0),
        slow: AtomicU64::new(0),
        started_ms: AtomicU64::new(0),
        epoch: Instant::now(),
        current: Mutex::new(Vec::new()),
    });
    let watchdog = Arc::clone(&shared);
    std::thread::spawn(move || watch(&watchdog));
    let mut fuzz = Fuzz { args, seeds: &seeds, scratch: &scratch, current_file, shared: &shared, seen: HashSet::new() };
    fuzz.run_seeds()?;
    fuzz.run_mutants()?;
    shared.print_stats();
    std::fs::remove_dir_all(&scratch).ok();
    std::fs::remove_file(args.out.join(format!(".current-{}-{pid}", args.target.name()))).ok();
    Ok(())
}

fn record_panic(info: &std::panic::PanicHookInfo) {
    let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_string());
    let record = PanicRecord { location, message, backtrace: Backtrace::force_capture() };
    *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
}

/// Every 100 ms: end the process on a hang; every second: print progress.
fn watch(shared: &Shared) {
    let mut ticks = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        ticks += 1;
        let started = shared.started_ms.load(Ordering::Relaxed);
        if started != 0 && shared.now_ms().saturating_sub(started) > HANG.as_millis() as u64 {
            let input = shared.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let signature =
                format!("hang (over {} s) in {}", HANG.as_secs(), component_of_input(shared.target, &input));
            report(shared, "hang", &input, &signature, "the watchdog ended the worker");
            shared.print_stats();
            std::process::exit(HANG_EXIT);
        }
        if ticks.is_multiple_of(10) {
            shared.print_stats();
        }
    }
}

/// For hangs and slow runs there is no location: name the part of the reader the input goes to.
pub fn component_of_input(target: Target, input: &[u8]) -> String {
    match target {
        Target::Data | Target::Parquet if input.starts_with(b"PAR1") => "Parquet (the parquet crate)".to_string(),
        Target::Data => "data: JSON/JSONL".to_string(),
        other => other.name().to_string(),
    }
}

/// Write the input and its story to the findings folder and announce it on stdout.
fn report(shared: &Shared, kind: &str, input: &[u8], signature: &str, details: &str) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut hasher);
    let stem = format!("{}-{kind}-{:016x}", shared.target.name(), hasher.finish());
    let bin = shared.findings.join(format!("{stem}.bin"));
    let written = std::fs::write(&bin, input).and_then(|_| {
        std::fs::write(shared.findings.join(format!("{stem}.txt")), format!("{signature}\n\n{details}\n"))
    });
    if let Err(e) = written {
        eprintln!("cannot write finding {}: {e}", bin.display());
    }
    println!("finding {kind} {} {signature}", bin.display());
    std::io::stdout().flush().ok();
}

struct Fuzz<'a> {
    args: &'a WorkerArgs,
    seeds: &'a [Seed],
    scratch: &'a Path,
    current_file: File,
    shared: &'a Shared,
    /// Signatures already reported by this worker.
    seen: HashSet<String>,
}

impl Fuzz<'_> {
    /// The seeds as they are: the reader should accept most (a target that rejects every seed
    /// fuzzes nothing but its first check).
    fn run_seeds(&mut self) -> Result<()> {
        let mut accepted = 0;
        for seed in self.seeds {
            let before = self.shared.accepted.load(Ordering::Relaxed);
            self.exec(&seed.bytes, seed.slot, 0)?;
            let ok = self.shared.accepted.load(Ordering::Relaxed) - before;
            if ok == 0 {
                println!("note: the reader rejects the seed {}", seed.name);
            }
            accepted += ok;
        }
        println!("seeds {} {accepted}", self.seeds.len());
        Ok(())
    }

    fn run_mutants(&mut self) -> Result<()> {
        let mut rng = Rng::new(self.args.seed ^ (self.args.target as u64).wrapping_mul(0x9E37_79B9));
        let max_len = Target::max_len(self.seeds);
        let others: Vec<&[u8]> = self.seeds.iter().map(|s| s.bytes.as_slice()).collect();
        let deadline = Instant::now() + Duration::from_secs_f64(self.args.seconds);
        let mut input = Vec::with_capacity(max_len);
        while Instant::now() < deadline {
            let seed = &self.seeds[rng.below(self.seeds.len())];
            input.clear();
            input.extend_from_slice(&seed.bytes);
            mutate(&mut rng, &mut input, &others, max_len);
            self.exec(&input, seed.slot, rng.next())?;
        }
        Ok(())
    }

    /// One execution, timed, inside `catch_unwind`.
    fn exec(&mut self, input: &[u8], slot: &str, variant: u64) -> Result<()> {
        self.current_file.set_len(input.len() as u64)?;
        self.current_file.write_all_at(input, 0)?;
        {
            let mut current = self.shared.current.lock().unwrap_or_else(|e| e.into_inner());
            current.clear();
            current.extend_from_slice(input);
        }
        let start = Instant::now();
        let outcome = self.call(input, slot, variant);
        let elapsed = start.elapsed();
        self.shared.execs.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(true) => {
                self.shared.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(record) => self.on_panic(input, record),
        }
        if elapsed > SLOW && self.confirm_slow(input, slot, variant) {
            self.shared.slow.fetch_add(1, Ordering::Relaxed);
            let signature =
                format!("slow (over {} s) in {}", SLOW.as_secs(), component_of_input(self.args.target, input));
            report(self.shared, "slow", input, &signature, &format!("first run {elapsed:?}"));
        }
        Ok(())
    }

    /// Run the reader; `Ok(accepted)` or the panic it raised.
    fn call(&self, input: &[u8], slot: &str, variant: u64) -> std::result::Result<bool, PanicRecord> {
        let (target, scratch, fixtures) = (self.args.target, self.scratch, &self.args.fixtures);
        self.shared.started_ms.store(self.shared.now_ms(), Ordering::Relaxed);
        let result = std::panic::catch_unwind(|| target.run(input, slot, scratch, fixtures, variant).is_ok());
        self.shared.started_ms.store(0, Ordering::Relaxed);
        result.map_err(|_| {
            LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or(PanicRecord {
                location: "?".into(),
                message: "panic without a record".into(),
                backtrace: Backtrace::disabled(),
            })
        })
    }

    /// A slow run counts only if a second run alone is slow too (the machine may have been busy).
    fn confirm_slow(&self, input: &[u8], slot: &str, variant: u64) -> bool {
        let start = Instant::now();
        let _ = self.call(input, slot, variant);
        start.elapsed() > SLOW
    }

    fn on_panic(&mut self, input: &[u8], record: PanicRecord) {
        self.shared.panics.fetch_add(1, Ordering::Relaxed);
        let in_std = ["/rustc/", "library/", "/lib/rustlib/"].iter().any(|p| record.location.contains(p));
        let text = record.backtrace.to_string();
        let culprit = first_frame_outside_std(&text);
        let message = normalize(&record.message);
        // One bug is one place: a panic raised in the code at fault is known by its location alone; one
        // raised in the standard library ("capacity overflow", slice indexing) by message and caller.
        let signature = if in_std {
            format!("panic '{message}' at {} in {culprit}", short_path(&record.location))
        } else {
            format!("panic at {} (in {culprit})", short_path(&record.location))
        };
        if self.seen.insert(signature.clone()) {
            let details = format!("message: {}\nlocation: {}\nbacktrace:\n{text}", record.message, record.location);
            report(self.shared, "panic", input, &signature, &details);
        }
    }
}

/// Digits replaced by `N` and cut at 80 characters, so that one bug with different sizes is one
/// signature.
fn normalize(message: &str) -> String {
    let mut out = String::new();
    let mut last_digit = false;
    for c in message.chars().take(200) {
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
        } else {
            out.push(if c == '\n' { ' ' } else { c });
            last_digit = false;
        }
    }
    out.chars().take(80).collect()
}

/// `…/registry/src/index.crates.io-xxxx/parquet-57.0.0/src/a.rs:1` → `parquet-57.0.0/src/a.rs:1`.
fn short_path(location: &str) -> String {
    for marker in ["/index.crates.io-", "/crates/"] {
        if let Some(i) = location.find(marker) {
            let rest = &location[i + marker.len()..];
            let rest = if marker == "/crates/" { rest } else { rest.split_once('/').map_or(rest, |(_, r)| r) };
            return rest.to_string();
        }
    }
    location.to_string()
}

/// The first backtrace frame that is not the standard library, the panic machinery or this harness:
/// the code that made the bad request (`parquet::encodings::rle::RleDecoder::reload`).
pub fn first_frame_outside_std(backtrace: &str) -> String {
    const SKIP: [&str; 9] = [
        "std::",
        "core::",
        "alloc::",
        "backtrace::",
        "rust_begin_unwind",
        "__rust",
        "prospect_fuzz::",
        "_start",
        "__libc",
    ];
    for line in backtrace.lines() {
        let Some((index, symbol)) = line.trim_start().split_once(": ") else { continue };
        if index.parse::<usize>().is_err() {
            continue;
        }
        let symbol = symbol.trim_start_matches('<').trim();
        if SKIP.iter().any(|s| symbol.starts_with(s)) || symbol.starts_with("<unknown>") {
            continue;
        }
        // Drop the hash suffix (`::h0123456789abcdef`) of unmangled legacy symbols.
        let symbol = match symbol.rsplit_once("::h") {
            Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => head,
            _ => symbol,
        };
        return symbol.chars().take(120).collect();
    }
    "an unknown frame (no symbols)".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_ignore_sizes_and_name_the_culprit() {
        assert_eq!(
            normalize("index 17 out of range for slice of length 3"),
            "index N out of range for slice of length N"
        );
        let bt = "   0: std::backtrace::Backtrace::force_capture\n   1: prospect_fuzz::worker::record_panic\n   \
                  2: core::panicking::panic_fmt\n   3: alloc::raw_vec::capacity_overflow\n   \
                  4: <parquet::schema::types::Type as Foo>::from_thrift::h0123456789abcdef\n   5: main\n";
        assert_eq!(first_frame_outside_std(bt), "parquet::schema::types::Type as Foo>::from_thrift");
        assert_eq!(
            short_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/parquet-57.1.0/src/util/bit_util.rs:60"
            ),
            "parquet-57.1.0/src/util/bit_util.rs:60"
        );
        assert_eq!(short_path("/work/x/crates/prospect/src/data/read.rs:10"), "prospect/src/data/read.rs:10");
    }
}
