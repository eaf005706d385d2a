//! `prospect data inspect` and `prospect data convert`, driving the real binary.
//!
//! The two LLaMA-Factory demo files are fetched from the PyPI sdist of llamafactory 0.9.5 by
//! `scripts/fetch_llamafactory_data.sh` (sha256-checked, cached under target/llamafactory/), which
//! `scripts/test.sh` runs first. Only the two tests that read them need it, so they build only with
//! `--features live-reference` (which `scripts/test.sh` turns on); with the feature on and the files
//! missing they fail. The project itself never reads them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::prospect;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[cfg(feature = "live-reference")]
fn shared_data(name: &str) -> String {
    let path = repo().join("target/llamafactory/data").join(name);
    assert!(path.exists(), "{} is missing; run `scripts/fetch_llamafactory_data.sh` first", path.display());
    path.to_string_lossy().into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
#[cfg(feature = "live-reference")]
fn inspect_llamafactory_kto_demo() {
    let out = prospect(&["data", "inspect", &shared_data("kto_en_demo.json")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.contains("format:       sharegpt -> unpaired (prompt, completion, label), conversational"), "{text}");
    assert!(text.contains("rows:         300\n"), "{text}");
    assert!(text.contains("labels:       150 desirable (50.0%), 150 undesirable (50.0%)"), "{text}");
}

#[test]
#[cfg(feature = "live-reference")]
fn inspect_llamafactory_dpo_demo_with_a_model() {
    let model = repo().join("tests/fixtures/tiny-llama");
    let out = prospect(&[
        "data",
        "inspect",
        &shared_data("dpo_en_demo.json"),
        "--model",
        model.to_str().unwrap(),
        "--max-length",
        "1024",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.contains("format:       sharegpt_dpo -> paired (prompt, chosen, rejected), conversational"), "{text}");
    assert!(text.contains("rows:         300\n"), "{text}");
    assert!(
        text.contains("prompt tokens:") && text.contains("completion tokens:") && text.contains("max_length 1024: "),
        "{text}"
    );
}

#[test]
fn inspect_invalid_data_exits_non_zero_with_file_and_line() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-invalid");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\n{\"prompt\": \"a\", \"completion\": \"b\", \"label\": \"no\"}\n").unwrap();
    let out = prospect(&["data", "inspect", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a clean failure, not a panic (101)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: field `label` must be true or false, got the string \"no\"", bad.display())),
        "{err}"
    );
    // With --skip-invalid the file is usable and the skip is reported.
    let out = prospect(&["data", "inspect", bad.to_str().unwrap(), "--skip-invalid"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("skipped:      1 invalid rows"), "{}", stdout(&out));
    let empty = dir.join("empty.json");
    std::fs::write(&empty, "").unwrap();
    let out = prospect(&["data", "inspect", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the file has no rows"));
}

#[test]
fn convert_sharegpt_to_canonical_jsonl() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-convert");
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("out.jsonl");
    let input = repo().join("tests/fixtures/data/sharegpt_kto.json");
    let out = prospect(&["data", "convert", input.to_str().unwrap(), output.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The canonical rows are TRL's conversational rows, the ones the ShareGPT file was written from.
    let parse =
        |text: &str| text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>();
    let got = parse(&std::fs::read_to_string(&output).unwrap());
    let want = parse(&std::fs::read_to_string(repo().join("tests/fixtures/data/conv_unpaired.jsonl")).unwrap());
    assert_eq!(got, want);
    // And byte for byte: TRL's key order, Python's `json.dumps` separators.
    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(bytes, std::fs::read(repo().join("tests/fixtures/data/conv_unpaired.jsonl")).unwrap());
}
