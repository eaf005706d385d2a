//! Corrupt Parquet files: each must be an error that names the file, promptly, with no panic message on
//! stderr. `tests/fixtures/bad/parquet/` holds inputs the fuzz harness (`scripts/fuzz.sh`) found against
//! parquet 57.3.2 (a hang with growing memory, `rle.rs:468` index out of bounds, `triplet.rs:253`), and
//! the one-byte corruption from issue 10 (offset 737 of `conv_unpaired.parquet`, 0x18 → 0xec).

use std::path::{Path, PathBuf};
use std::time::Instant;

use prospect::data::{read_rows, ReadOptions, Rows};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn bad_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join("bad/parquet"))
        .expect("tests/fixtures/bad/parquet")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "expected the 4 regression inputs, found {files:?}");
    files
}

/// Reads every bad file; returns (file, error, seconds).
fn read_all() -> Vec<(PathBuf, String, f64)> {
    let mut out = vec![];
    for path in bad_files() {
        let start = Instant::now();
        let result = read_rows(&path, &ReadOptions::default());
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok((rows, _)) => panic!("{}: read {} rows from a corrupt file", path.display(), rows.len()),
            Err(e) => out.push((path, e.to_string(), secs)),
        }
    }
    out
}

#[test]
fn corrupt_parquet_is_an_error_naming_the_file_within_seconds() {
    for (path, err, secs) in read_all() {
        eprintln!("{secs:.3} s  {err}");
        assert!(err.starts_with(&path.display().to_string()), "the error must name the file: {err}");
        assert!(secs < 3.0, "{}: took {secs:.1} s", path.display());
    }
}

#[test]
fn the_known_inputs_fail_at_the_checks_that_catch_them() {
    let errors: Vec<(String, String)> =
        read_all().into_iter().map(|(p, e, _)| (p.file_name().unwrap().to_string_lossy().into_owned(), e)).collect();
    let find = |name: &str| &errors.iter().find(|(n, _)| n.starts_with(name)).expect(name).1;
    // offset 737 is in the page header of `completion.list.element.role`'s data page (chunk at 679).
    let e = find("hang-offset737");
    assert!(e.ends_with("corrupt Parquet file: row group 0, column 2 (\"completion.list.element.role\"): page header at chunk byte 29: unknown Thrift type 15"), "{e}");
    let e = find("hang-3930");
    assert!(e.contains(".parquet:1: cannot decode this Parquet row: EOF: Not enough bytes to decode"), "{e}");
    for name in ["rle-panic", "triplet-panic"] {
        assert!(
            find(name).contains(": the Parquet decoder failed on this file (the parquet crate panicked: "),
            "{}",
            find(name)
        );
    }
}

/// The child half of `no_panic_message_reaches_stderr`: reads the bad files when asked to.
#[test]
fn child_reads_bad_files() {
    if std::env::var_os("PROSPECT_PARQUET_CHILD").is_some() {
        assert_eq!(read_all().len(), bad_files().len());
    }
}

#[test]
fn no_panic_message_reaches_stderr() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_reads_bad_files", "--nocapture", "--test-threads", "1"])
        .env("PROSPECT_PARQUET_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
}

#[test]
fn the_good_fixture_still_reads() {
    let path = fixtures().join("data/conv_unpaired.parquet");
    let (rows, report) = read_rows(&path, &ReadOptions::default()).unwrap();
    assert_eq!(report.records, 16);
    assert!(matches!(rows, Rows::Unpaired(ref v) if v.len() == 16));
}
