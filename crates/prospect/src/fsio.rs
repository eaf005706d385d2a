//! Crash-safe file writes: everything Prospect writes goes to a temporary name first and is renamed
//! into place, so a killed run never leaves a half-written file where a complete one is expected.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `.NAME.KIND-PID` beside `path`: the names this module writes before renaming into place. `KIND` is
/// `tmp` (being written), `ready` (a complete folder waiting for its swap) or `old` (the folder it
/// replaces). The prefix `.NAME.KIND-` lets a later run recognise and clean up what a killed one left.
fn sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// Leftovers of earlier writes of `path`: `(kind, path)` for every `.NAME.{tmp,ready,old}-*` sibling.
fn leftovers(path: &Path) -> Vec<(String, PathBuf)> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let rest = file.strip_prefix(&format!(".{name}."))?;
            let (kind, pid) = rest.split_once('-')?;
            let known = matches!(kind, "tmp" | "ready" | "old") && pid.chars().all(|c| c.is_ascii_digit());
            known.then(|| (kind.to_string(), e.path()))
        })
        .collect();
    found.sort();
    found
}

fn remove_any(path: &Path) -> Result<()> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Bring `path` back to a clean state after a killed write: finish a folder swap that was interrupted
/// between its two renames (the complete `ready` folder, or else the `old` one, takes the place of a
/// missing `path`), then remove every leftover temporary. Returns what it did, for the caller to report.
pub fn recover(path: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let found = leftovers(path);
    if !path.exists() {
        let pick = |kind: &str| found.iter().rev().find(|(k, _)| k == kind).map(|(_, p)| p.clone());
        if let Some(src) = pick("ready").or_else(|| pick("old")) {
            std::fs::rename(&src, path).map_err(|e| Error::io(&src, e))?;
            done.push(format!("completed an interrupted swap: {} → {}", src.display(), path.display()));
        }
    }
    for (_, leftover) in leftovers(path) {
        remove_any(&leftover)?;
        done.push(format!("removed {}", leftover.display()));
    }
    Ok(done)
}

/// Write `bytes` to `path` atomically (same-folder temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    recover(path)?;
    let tmp = sibling(path, "tmp");
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Replace the folder `dest` with a folder filled by `fill`, atomically: `fill` writes into a
/// temporary sibling (`tmp`), which becomes `ready` once complete, and is then swapped in (`dest` → `old`,
/// `ready` → `dest`, `old` removed). A kill at any point leaves either the previous or the new folder in
/// place, or a swap that [`recover`] completes at the next start.
pub fn replace_dir_atomic(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover(dest)?;
    let (tmp, ready, old) = (sibling(dest, "tmp"), sibling(dest, "ready"), sibling(dest, "old"));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp); // e.g. a full disk: do not leave the partial copy behind
        return Err(e);
    }
    pause_point(dest, "filled");
    std::fs::rename(&tmp, &ready).map_err(|e| Error::io(&tmp, e))?;
    // A rename cannot replace a non-empty folder: move the old one aside first.
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
    }
    pause_point(dest, "swapping");
    std::fs::rename(&ready, dest).map_err(|e| Error::io(dest, e))?;
    remove_any(&old)
}

/// Fault injection for the kill test (`crates/prospect-cli/tests/kill.rs`): when the environment variable
/// `PROSPECT_PAUSE_AT` is `NAME:STAGE@N` and this is the N-th visit of that point (`NAME` is the file name
/// of the folder being replaced, e.g. `checkpoint:swapping@2`), print `paused at ...` to stderr and wait
/// to be killed. Unset, it costs one environment lookup per folder write.
pub fn pause_point(dest: &Path, stage: &str) {
    static VISITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(spec) = std::env::var("PROSPECT_PAUSE_AT") else { return };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (point, nth) = spec.split_once('@').unwrap_or((spec.as_str(), "1"));
    if point != format!("{name}:{stage}") {
        return;
    }
    let visit = VISITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if nth.parse() == Ok(visit) {
        eprintln!("paused at {point}@{visit}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}

/// Write `value` as pretty JSON, atomically.
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::output(path, e))?;
    write_atomic(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_dir_replace() {
        let dir = std::env::temp_dir().join(format!("prospect-fsio-{}", std::process::id()));
        let file = dir.join("a.txt");
        write_atomic(&file, b"one").unwrap();
        write_atomic(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let sub = dir.join("final");
        replace_dir_atomic(&sub, |d| write_atomic(&d.join("x"), b"1")).unwrap();
        replace_dir_atomic(&sub, |d| write_atomic(&d.join("y"), b"2")).unwrap();
        assert!(!sub.join("x").exists() && sub.join("y").exists());
        // No temporary names are left behind.
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The states a kill can leave `replace_dir_atomic` in, and what [`recover`] makes of each.
    #[test]
    fn recovery_completes_interrupted_swaps_and_removes_leftovers() {
        let dir = std::env::temp_dir().join(format!("prospect-fsio-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dest = dir.join("checkpoint");
        let folder = |name: &str, content: &[u8]| {
            let p = dir.join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("state"), content).unwrap();
        };
        let state = || std::fs::read(dest.join("state")).unwrap();
        // Killed between the renames: `checkpoint` is gone, the new one is `ready`, the previous `old`.
        folder(".checkpoint.old-11", b"step 1");
        folder(".checkpoint.ready-11", b"step 2");
        let done = recover(&dest).unwrap();
        assert_eq!(state(), b"step 2", "{done:?}");
        assert!(leftovers(&dest).is_empty());
        // Killed while filling: the partial `tmp` goes, the checkpoint stays.
        folder(".checkpoint.tmp-12", b"half");
        recover(&dest).unwrap();
        assert_eq!((state(), leftovers(&dest).len()), (b"step 2".to_vec(), 0));
        // Killed after the swap, before removing `old`: the new checkpoint stays, `old` goes.
        folder(".checkpoint.old-13", b"step 2");
        replace_dir_atomic(&dest, |d| write_atomic(&d.join("state"), b"step 3")).unwrap();
        assert_eq!((state(), leftovers(&dest).len()), (b"step 3".to_vec(), 0));
        // Only `old` survived (the ready folder was never made): the previous checkpoint comes back.
        std::fs::rename(&dest, dir.join(".checkpoint.old-14")).unwrap();
        recover(&dest).unwrap();
        assert_eq!(state(), b"step 3");
        // A failing fill (e.g. a full disk) leaves nothing behind and the old folder untouched.
        let err = replace_dir_atomic(&dest, |d| {
            write_atomic(&d.join("state"), b"partial")?;
            Err(Error::Compute("disk full".into()))
        });
        assert!(err.is_err());
        assert_eq!((state(), leftovers(&dest).len()), (b"step 3".to_vec(), 0));
        // Files: a stale temporary from a killed write is removed by the next write.
        std::fs::write(dir.join(".a.txt.tmp-99"), b"x").unwrap();
        write_atomic(&dir.join("a.txt"), b"y").unwrap();
        assert!(!dir.join(".a.txt.tmp-99").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
