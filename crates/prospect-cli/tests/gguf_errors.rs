//! `prospect import gguf` error paths that need no model file: they run in plain `cargo test`. The
//! imports of a real GGUF (SmolLM2) are in `gguf_import.rs`, behind `--features live-reference`.

mod common;

use std::path::Path;

use common::{prospect, stderr};

#[test]
fn not_a_gguf_file_is_a_clear_error() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gguf-bad");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("notes.gguf");
    std::fs::write(&bad, b"this is not a gguf file at all").unwrap();
    let run = prospect(&["import", "gguf", bad.to_str().unwrap(), dir.join("out").to_str().unwrap()]);
    let err = stderr(&run);
    assert!(!run.status.success());
    assert!(err.contains("notes.gguf") && err.contains("not a readable GGUF file"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn import_refuses_to_overwrite_a_folder_with_other_files() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gguf-occupied");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"keep me").unwrap();
    let run = prospect(&["import", "gguf", "whatever.gguf", dir.to_str().unwrap()]);
    let err = stderr(&run);
    assert!(!run.status.success());
    assert!(err.contains("notes.txt") && err.contains("choose a new or empty folder"), "{err}");
    assert!(dir.join("notes.txt").exists());
}
