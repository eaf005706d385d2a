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
    // The one row left is desirable: no class weight can balance a single class, and the CLI says so.
    let text = stdout(&out);
    assert!(
        text.contains("warning:      KTO class balance: all 1 examples are desirable and none undesirable"),
        "{text}"
    );
    assert!(!text.contains("auto_weights = true sets"), "{text}");
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

#[test]
fn read_flags_are_typed_and_rejected_with_the_librarys_words() {
    let file = repo().join("tests/fixtures/data/conv_unpaired.jsonl");
    let file = file.to_str().unwrap();
    // --format is a closed set: clap lists the layouts and exits 2 (usage error).
    let out = prospect(&["data", "inspect", file, "--format", "alpaca"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'alpaca' for '--format <FORMAT>'"), "{err}");
    assert!(
        err.contains("trl, halos_binary, halos_pairwise, sharegpt, sharegpt_dpo, hh_rlhf, shp, oasst1, ultrafeedback"),
        "{err}"
    );
    let out = prospect(&["data", "inspect", file, "--format", "trl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("format:       trl -> unpaired"), "{}", stdout(&out));
    // --label-from is parsed by the library's LabelFrom::parse.
    let out = prospect(&["data", "inspect", file, "--label-from", "rating"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'rating' for '--label-from <FIELD:THRESHOLD>': must look like FIELD:THRESHOLD, got \"rating\""),
        "{err}"
    );
    let out = prospect(&["data", "inspect", file, "--label-from", "rating:high"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be a number, mean or median, got \"high\""), "{err}");
}

#[test]
fn numeric_flags_are_checked_by_the_librarys_ranges() {
    let file = repo().join("tests/fixtures/data/conv_unpaired.jsonl");
    let file = file.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--label-from", "rating:nan"], "must be a finite number, \"mean\" or \"median\", got NaN"),
        (&["--label-from", "rating:inf"], "must be a finite number, \"mean\" or \"median\", got inf"),
        (&["--max-length", "0"], "invalid value '0' for '--max-length <MAX_LENGTH>': must be at least 2, got 0"),
        (&["--max-length=-3"], "invalid value '-3' for '--max-length <MAX_LENGTH>': invalid digit"),
    ];
    for (flags, want) in cases {
        let args: Vec<&str> = ["data", "inspect", file].iter().chain(flags).copied().collect();
        let out = prospect(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    let cases: [(&[&str], &str); 5] = [
        (&["--temperature=-1"], "must be a finite number >= 0 (0 is greedy), got -1"),
        (&["--temperature", "nan"], "got NaN"),
        (&["--top-p=-0.5"], "must be in (0, 1] (1 keeps every token), got -0.5"),
        (&["--batch-size", "0"], "'--batch-size <BATCH_SIZE>': must be at least 1, got 0"),
        (&["--max-new-tokens", "0"], "'--max-new-tokens <MAX_NEW_TOKENS>': must be at least 1, got 0"),
    ];
    for (flags, want) in cases {
        let base = ["generate", "--model", "m", "--prompts", "p.jsonl", "--output", "o.jsonl"];
        let args: Vec<&str> = base.iter().chain(flags).copied().collect();
        let out = prospect(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}
