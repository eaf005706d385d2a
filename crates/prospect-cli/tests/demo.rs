//! `prospect demo --quick`: the built-in experiment runs end to end with no download, SFT+KTO beats SFT
//! with its 95% interval above 0.5, every row and artefact is there, and the same seed gives the same
//! table.

use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn demo(out: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_prospect"))
        .args(["demo", "--quick", "--seed", "0", "--output"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| sft+kto |"), "the table is printed at the end:\n{table}");
    serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap()
}

#[test]
fn quick_demo_shows_kto_beating_sft_reproducibly() {
    let a_dir = scratch("demo-a");
    let a = demo(&a_dir);
    for method in ["sft", "sft+dpo", "sft+kto", "kto", "kto-10%-desirable"] {
        let m = &a["methods"][method];
        for key in ["win_rate_vs_sft", "ci95", "mean_score", "prompts"] {
            assert!(!m[key].is_null(), "results.json lacks {method}.{key}: {a}");
        }
        let run = if method == "kto-10%-desirable" { "kto-10pct-desirable" } else { method };
        assert!(a_dir.join("runs").join(run).join("metrics.jsonl").exists(), "no metrics for {run}");
    }
    // SFT against itself is an exact tie.
    assert_eq!(a["methods"]["sft"]["win_rate_vs_sft"].as_f64(), Some(0.5));
    let kto = &a["methods"]["sft+kto"];
    let lo = kto["ci95"][0].as_f64().unwrap();
    assert!(lo > 0.5, "SFT+KTO must beat SFT with the 95% CI above 0.5: {kto}");
    for png in ["win_rates.png", "training_curves.png"] {
        let bytes = std::fs::read(a_dir.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png} is not a PNG");
    }
    let b = demo(&scratch("demo-b"));
    assert_eq!(a, b, "the same seed must give the same table");
}
