//! Crash-safe file writes: everything Prospect writes goes to a temporary name first and is renamed
//! into place, so a killed run never leaves a half-written file where a complete one is expected.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (same-folder temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = temp_path(path);
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
/// temporary sibling folder, which is renamed over `dest` only when it is complete.
pub fn replace_dir_atomic(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(dest);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    // A rename cannot replace a non-empty folder: move the old one aside first.
    let old = dest.with_file_name(format!(
        ".{}.old-{}",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
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
}
