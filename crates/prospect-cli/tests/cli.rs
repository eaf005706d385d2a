//! The real binary, end to end: a training run, and bad input that must fail with FILE:LINE and a
//! non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn write_config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let config = format!(
        "model = {:?}\ntrain_data = {:?}\noutput_dir = {:?}\nbatch_size = 4\nmicrobatch_size = 2\nmax_steps = 2\n\
         learning_rate = 1e-3\nmax_length = 32\nshuffle = false\n{extra}\n[loss]\ntype = \"kto\"\n",
        fixtures().join("tiny-llama"),
        data,
        dir.join("out"),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn train_runs_and_writes_metrics_and_a_model() {
    let dir = scratch("cli-train");
    let config = write_config(&dir, &fixtures().join("data/unpaired.jsonl"), "");
    let out = prospect(&["train", "--config", config.to_str().unwrap(), "--set", "loss.beta=0.2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("step 1 loss 0.500000") && log.contains("step 2 loss"), "{log}");
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    let saved = std::fs::read_to_string(dir.join("out/final/prospect.toml")).unwrap();
    assert!(saved.contains("beta = 0.2"), "the --set override must reach the saved config:\n{saved}");
}

#[test]
fn bad_label_names_file_line_and_field() {
    let dir = scratch("cli-bad-label");
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n{\"prompt\":\"a\",\"completion\":\"b\",\"label\":\"yes\"}\n").unwrap();
    let config = write_config(&dir, &data, "");
    let out = prospect(&["train", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("bad.jsonl:2: field `label` must be true or false, got the string \"yes\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn malformed_json_and_missing_files_are_clear_errors() {
    let dir = scratch("cli-bad-json");
    let data = dir.join("broken.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\n\n{\"prompt\": \"a\"\n")
        .unwrap();
    let config = write_config(&dir, &data, "");
    let out = prospect(&["train", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("broken.jsonl:3: malformed JSON"), "{}", stderr(&out));

    let missing = dir.join("nope.jsonl");
    let config = write_config(&dir, &missing, "");
    let out = prospect(&["train", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope.jsonl: No such file"), "{}", stderr(&out));
}

#[test]
fn unknown_config_key_is_an_error() {
    let dir = scratch("cli-bad-key");
    let config = write_config(&dir, &fixtures().join("data/unpaired.jsonl"), "learnng_rate = 1.0");
    let out = prospect(&["train", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("unknown field `learnng_rate`"), "{err}");
    let out = prospect(&["train", "--config", config.to_str().unwrap(), "--set", "microbatch_size=3"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let (mut seen, mut sweeps) = (0, 0);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // Sweep files are checked whole: every cell's training config is validated as `train` would.
            if path.file_name().unwrap().to_string_lossy().starts_with("sweep-") {
                prospect::sweep::SweepConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                sweeps += 1;
            } else {
                prospect::TrainConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
    }
    assert!(seen >= 4 && sweeps >= 1, "only {seen} configs ({sweeps} sweeps) found in {}", dir.display());
}

#[test]
fn sft_then_kto_chains_through_the_example_configs() {
    // The Archangel "SFT+X" pipeline as a user runs it: configs/sft-tiny.toml, then
    // configs/kto-after-sft.toml with `model` and `reference` at the SFT run's final/.
    let dir = scratch("cli-chain");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (sft_out, kto_out) = (dir.join("sft"), dir.join("kto"));
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_prospect")).args(args).current_dir(&root).output().unwrap()
    };
    let out = run(&[
        "train",
        "--config",
        "configs/sft-tiny.toml",
        "--set",
        "max_steps=1",
        "--set",
        &format!("output_dir={:?}", sft_out),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let final_dir = format!("{:?}", sft_out.join("final"));
    let out = run(&[
        "train",
        "--config",
        "configs/kto-after-sft.toml",
        "--set",
        "max_steps=1",
        "--set",
        &format!("model={final_dir}"),
        "--set",
        &format!("reference={final_dir}"),
        "--set",
        &format!("output_dir={:?}", kto_out),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Policy = reference at the first step: every log-ratio is 0 and KTO's loss is 1 − σ(0).
    assert!(stderr(&out).contains("step 1 loss 0.500000"), "{}", stderr(&out));
    let saved = std::fs::read_to_string(kto_out.join("final/prospect.toml")).unwrap();
    assert!(saved.contains("reference = ") && saved.contains("sft/final"), "{saved}");
}

#[test]
fn generate_appends_a_control_token_to_every_prompt() {
    // CSFT models are sampled with `--append-token "<|good|>"`; on tiny-llama, `<|im_start|>` (id 1)
    // stands in for it. Greedy decoding with the option equals greedy decoding of the prompt text with the
    // token written after it (the tokenizer never splits a special token).
    let dir = scratch("cli-append-token");
    let model = fixtures().join("tiny-llama");
    let (plain, suffixed) = (dir.join("plain.jsonl"), dir.join("suffixed.jsonl"));
    std::fs::write(&plain, "{\"prompt\": \"The sky is\"}\n").unwrap();
    std::fs::write(&suffixed, "{\"prompt\": \"The sky is<|im_start|>\"}\n").unwrap();
    let gen = |prompts: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()];
        args.extend_from_slice(&["--output", out.to_str().unwrap(), "--max-new-tokens", "6"]);
        args.extend_from_slice(extra);
        prospect(&args)
    };
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let o = gen(&plain, &a, &["--append-token", "<|im_start|>"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = gen(&suffixed, &b, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids = |p: &Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(std::fs::read_to_string(p).unwrap().lines().next().unwrap()).unwrap()
            ["completion_ids"]
            .clone()
    };
    assert_eq!(ids(&a), ids(&b));
    // A token the vocabulary lacks is an error, not a silent no-op.
    let o = gen(&plain, &a, &["--append-token", "<|good|>"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("<|good|>"), "{}", stderr(&o));
}

#[test]
fn lora_train_then_generate_through_the_adapter_then_merge() {
    // The README's LoRA walk-through: train an adapter, sample through it unmerged, merge it; the merged
    // model samples the same greedy tokens as the adapter on its base.
    let dir = scratch("cli-lora");
    let lora = "[lora]\nr = 4\nalpha = 8\ntarget_modules = \"all-linear\"\n";
    let config = write_config(&dir, &fixtures().join("data/unpaired.jsonl"), "");
    let text = std::fs::read_to_string(&config).unwrap() + lora;
    std::fs::write(&config, text).unwrap();
    let out = prospect(&["train", "--config", config.to_str().unwrap(), "--set", "learning_rate=5e-2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("LoRA r=4"), "{}", stderr(&out));
    let adapter = dir.join("out/final");
    assert!(adapter.join("adapter_config.json").exists() && adapter.join("adapter_model.safetensors").exists());
    let base = fixtures().join("tiny-llama");
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"The sky is\"}\n{\"prompt\": \"Once upon\"}\n").unwrap();
    let gen = |model: &Path, extra: &[&str], out: &Path| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()];
        args.extend_from_slice(&["--output", out.to_str().unwrap(), "--max-new-tokens", "8"]);
        args.extend_from_slice(extra);
        let o = prospect(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["completion_ids"].clone())
            .collect::<Vec<_>>()
    };
    let through_adapter = gen(&base, &["--adapter", adapter.to_str().unwrap()], &dir.join("a.jsonl"));
    let adapter_alone = gen(&adapter, &[], &dir.join("b.jsonl")); // its adapter_config.json names the base
    let plain_base = gen(&base, &[], &dir.join("c.jsonl"));
    assert_eq!(through_adapter, adapter_alone);
    assert_ne!(through_adapter, plain_base, "the adapter changed no greedy token");
    let merged = dir.join("merged");
    let m = prospect(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    assert!(merged.join("model.safetensors").exists() && merged.join("config.json").exists());
    assert_eq!(gen(&merged, &[], &dir.join("d.jsonl")), through_adapter);
    // An adapter folder that is not one: a clear error naming the file.
    std::fs::write(dir.join("bad_adapter_config.json"), "{\"peft_type\": \"IA3\"}").unwrap();
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(dir.join("bad_adapter_config.json"), bad.join("adapter_config.json")).unwrap();
    let m = prospect(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        bad.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(m.status.code(), Some(1));
    assert!(stderr(&m).contains("adapter_config.json"), "{}", stderr(&m));
}
