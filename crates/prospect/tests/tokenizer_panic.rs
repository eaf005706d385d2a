//! `tests/fixtures/bad/tokenizer/`: inputs the fuzz harness (`scripts/fuzz.sh`) found on which the
//! tokenizers crate panics. Loading them must be an error, silently (no "panicked at" line). One test in
//! its own binary: it replaces the process-wide panic hook to count calls.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prospect::model::HfTokenizer;

/// Counts panic-hook calls made on this thread, then hands them to the default hook (which prints).
fn count_hook_calls() -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let me = std::thread::current().id();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == me {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        default(info);
    }));
    calls
}

/// tokenizers 0.23.2 panics (`.expect("Helper")`, src/decoders/mod.rs:90) on these: the load must
/// return an error naming tokenizer.json and the syntax error's position, print no "panicked at" line
/// (the hook is not called), and leave the hook as it was (a later panic reaches it).
#[test]
fn tokenizer_panics_in_the_crate_become_errors() {
    let calls = count_hook_calls();
    let mut inputs: Vec<PathBuf> =
        std::fs::read_dir(common::fixtures().join("bad/tokenizer")).unwrap().map(|e| e.unwrap().path()).collect();
    inputs.sort();
    assert_eq!(inputs.len(), 2, "{inputs:?}");
    for input in inputs {
        let dir = common::scratch(&format!("bad-tokenizer-{}", input.file_stem().unwrap().to_string_lossy()));
        std::fs::copy(&input, dir.join("tokenizer.json")).unwrap();
        let tiny = common::fixtures().join("tiny-llama");
        std::fs::copy(tiny.join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
        let message = match HfTokenizer::load(&dir) {
            Ok(_) => panic!("{} loaded", input.display()),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(&dir.join("tokenizer.json").display().to_string()), "{}: {message}", input.display());
        assert!(
            message.contains("invalid JSON") && message.contains("line 1 column"),
            "{}: {message}",
            input.display()
        );
        assert!(message.contains("tokenizers crate panicked"), "{}: {message}", input.display());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the panic hook ran inside the boundary");
    assert!(std::panic::catch_unwind(|| panic!("after the boundary")).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the previous panic hook was not restored");
    let _ = std::panic::take_hook();
}
