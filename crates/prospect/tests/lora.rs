//! LoRA: a frozen base with trainable adapters, saved as a PEFT adapter folder.
//!
//! - a fresh adapter starts as the base: KTO's first loss is 0.5 and DPO's ln 2 (policy = reference),
//!   and A does not move in the first step (B = 0 gives A no gradient);
//! - what trains, what the optimizer holds and what a checkpoint holds are the adapters only;
//! - a run killed after a checkpoint resumes bit for bit, dropout included;
//! - the saved adapter, applied unmerged or merged into the base, gives the same logits.
//!
//! TRL + PEFT trajectories are checked in `lora_trl.rs`; the PEFT round trip in `lora_peft.rs`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixtures, scratch, trl_config};
use prospect::config::LoraTable;
use prospect::loss::{DpoConfig, KtoConfig, LossConfig};
use prospect::model::lora::{TargetModules, ADAPTER_WEIGHTS};
use prospect::model::{load_frozen, load_frozen_source, merge_adapter, ModelSource};
use prospect::train::{train, RunOptions, StepMetrics};
use prospect::TrainConfig;

fn table(targets: &[&str], dropout: f64) -> LoraTable {
    LoraTable {
        r: Some(4),
        alpha: Some(8.0),
        dropout: Some(dropout),
        target_modules: Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect())),
        ..Default::default()
    }
}

fn config(data: &str, loss: LossConfig, out: &Path, lora: LoraTable) -> TrainConfig {
    TrainConfig { lora: Some(lora), ..trl_config(data, loss, out) }
}

fn run(config: &TrainConfig, options: RunOptions) -> Vec<StepMetrics> {
    train(config, &Device::Cpu, options, &mut |_| {}).unwrap()
}

fn adapter_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_fresh_adapter_starts_as_the_reference() {
    let attn = ["q_proj", "k_proj", "v_proj", "o_proj"];
    // KTO with policy = reference: rewards 0, z0 = 0, loss = λ·(1 − σ(0)) = 0.5 for every row.
    let out = scratch("lora-fresh-kto");
    let mut kto = config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out, table(&attn, 0.0));
    kto.max_steps = Some(1);
    let m = run(&kto, RunOptions::default()).remove(0);
    assert!((m.loss - 0.5).abs() < 1e-6, "KTO step-1 loss {}", m.loss);
    assert_eq!(m.objective.get("kl"), Some(0.0));
    // DPO: margin 0, loss = −ln σ(0) = ln 2 (python: math.log(2) = 0.6931471805599453).
    let out_dpo = scratch("lora-fresh-dpo");
    let mut dpo = config("paired.jsonl", LossConfig::Dpo(DpoConfig::default()), &out_dpo, table(&attn, 0.0));
    dpo.max_steps = Some(1);
    let m = run(&dpo, RunOptions::default()).remove(0);
    assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-6, "DPO step-1 loss {}", m.loss);
    // After one step: every B has moved off zero; A has not moved at all (its gradient B·… was zero, and
    // AdamW with a zero first gradient and no weight decay leaves a weight exactly where it is).
    let (policy, _, _) = prospect::model::Policy::load_for_training(
        &fixtures().join("tiny-llama"),
        &Device::Cpu,
        prospect::model::Head::Lm,
        dpo.seed,
        Some(prospect::model::LoraStart { table: dpo.lora.as_ref().unwrap(), seed: dpo.seed }),
    )
    .unwrap();
    let after = adapter_tensors(&out_dpo.join("final"));
    assert_eq!(after.len(), 16); // 2 layers × 4 projections × (A, B)
    for (name, var) in policy.params.iter() {
        let saved = &after[&format!("base_model.model.{name}")];
        if name.contains("lora_A") {
            assert_eq!(max_diff(saved, var.as_tensor()), 0.0, "{name} moved in step 1");
        } else {
            assert_eq!(var.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            assert!(saved.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3, "{name}");
        }
    }
}

#[test]
fn only_the_adapters_train_and_only_they_are_checkpointed() {
    let out = scratch("lora-frozen");
    let mut c =
        config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out, table(&["q_proj", "v_proj"], 0.0));
    c.max_steps = Some(2);
    c.save_every = 2;
    let mut parameters = 0;
    train(&c, &Device::Cpu, RunOptions::default(), &mut |e| {
        if let prospect::train::Event::Started { parameters: p, .. } = e {
            parameters = p;
        }
    })
    .unwrap();
    // r·(in + out) per adapter: q_proj 4·(32 + 32), v_proj 4·(32 + 16) (tiny-llama: d 32, 2 KV heads of 8),
    // in each of 2 layers. python: 2 * (4*(32+32) + 4*(32+16)) = 896
    assert_eq!(parameters, 896);
    let checkpoint = out.join("checkpoint");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            names.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_keys());
        }
    }
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| n.contains("lora_A") || n.contains("lora_B")), "{names:?}");
}

#[test]
fn a_killed_lora_run_with_dropout_resumes_bit_for_bit() {
    let attn = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"];
    let loss = LossConfig::Kto(KtoConfig::default());
    let full_dir = scratch("lora-resume-full");
    let mut full = config("unpaired.jsonl", loss, &full_dir, table(&attn, 0.1));
    full.max_steps = Some(4);
    full.shuffle = true;
    let full_history = run(&full, RunOptions::default());
    let dir = scratch("lora-resume-split");
    let mut first = TrainConfig { output_dir: dir.clone(), max_steps: Some(2), save_every: 2, ..full.clone() };
    run(&first, RunOptions::default());
    first.max_steps = Some(4);
    run(&first, RunOptions { resume: true, resume_force: true });
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<StepMetrics> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    for (a, b) in lines.iter().zip(&full_history) {
        assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm), "step {}", a.step);
    }
    let (a, b) = (adapter_tensors(&dir.join("final")), adapter_tensors(&full_dir.join("final")));
    for (name, t) in &a {
        assert_eq!(max_diff(t, &b[name]), 0.0, "{name}");
    }
    // Dropout is on: the same run without it gives other numbers.
    let plain_dir = scratch("lora-resume-nodrop");
    let mut plain = TrainConfig { output_dir: plain_dir, ..full.clone() };
    plain.lora.as_mut().unwrap().dropout = Some(0.0);
    let plain_history = run(&plain, RunOptions::default());
    assert_ne!(plain_history[1].loss, full_history[1].loss);
}

#[test]
fn an_adapter_gives_the_same_logits_unmerged_and_merged() {
    let out = scratch("lora-merge");
    let c = config("paired.jsonl", LossConfig::Dpo(DpoConfig::default()), &out, table(&["all-linear"], 0.0));
    run(&c, RunOptions::default());
    let dev = Device::Cpu;
    let adapter = out.join("final");
    let ids = Tensor::new(&[[1u32, 330, 28, 355, 319, 298, 263, 264]], &dev).unwrap();
    // The folder alone: its adapter_config.json names the base.
    let unmerged = load_frozen(&adapter, &dev).unwrap().forward(&ids).unwrap();
    let explicit =
        load_frozen_source(&ModelSource::resolve(&fixtures().join("tiny-llama"), Some(&adapter)).unwrap(), &dev)
            .unwrap()
            .forward(&ids)
            .unwrap();
    assert_eq!(max_diff(&unmerged, &explicit), 0.0);
    let merged_dir = scratch("lora-merged");
    merge_adapter(&fixtures().join("tiny-llama"), &adapter, &merged_dir.join("m"), &dev).unwrap();
    let merged = load_frozen(&merged_dir.join("m"), &dev).unwrap().forward(&ids).unwrap();
    let base = load_frozen(&fixtures().join("tiny-llama"), &dev).unwrap().forward(&ids).unwrap();
    let scale = base.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        max_diff(&merged, &unmerged) < 1e-5 * scale.max(1.0),
        "merged vs unmerged: {}",
        max_diff(&merged, &unmerged)
    );
    assert!(max_diff(&base, &unmerged) > 1e-3, "the adapter changed nothing");
}

#[test]
fn bad_lora_settings_are_config_errors() {
    let out = scratch("lora-bad");
    let c = config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out, table(&["q_proj", "qkv"], 0.0));
    let err = train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("lora.target_modules") && err.contains("`qkv`") && err.contains("gate_proj"), "{err}");
    let mut c = config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out, table(&["q_proj"], 1.0));
    let err = train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("lora.dropout") && err.contains("[0, 1)"), "{err}");
    c.lora = Some(LoraTable { init_adapter: Some(out.join("nowhere")), ..table(&["q_proj"], 0.0) });
    let err = train(&c, &Device::Cpu, RunOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("nowhere") && err.contains("does not exist"), "{err}");
}

#[test]
fn lora_table_parses_with_peft_names() {
    let text = r#"
        model = "m"
        train_data = "d.jsonl"
        output_dir = "out"
        [loss]
        type = "kto"
        [lora]
        r = 16
        alpha = 32
        dropout = 0.05
        target_modules = "all-linear"
        rslora = true
        init_adapter = "adapters/a"
        base_dtype = "bf16"
    "#;
    let c = TrainConfig::from_toml(text, &[], Path::new("/base")).unwrap();
    let lora = c.lora.as_ref().unwrap();
    assert_eq!(lora.init_adapter.as_deref(), Some(Path::new("/base/adapters/a")));
    let s = lora.settings(None, Some(prospect::model::config::Arch::Llama)).unwrap();
    assert_eq!((s.r, s.alpha, s.dropout, s.rslora, s.target_modules.len()), (16, 32.0, 0.05, true, 7));
    assert_eq!(s.scale(), 8.0); // 32 / √16
    assert_eq!(lora.base_dtype, prospect::config::BaseDtype::Bf16);
    let err = TrainConfig::from_toml(&text.replace("r = 16", "rank = 16"), &[], Path::new("/base")).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
}

#[test]
fn precomputed_reference_logps_give_the_live_lora_run() {
    // From a trained adapter, whose frozen copy is the reference: both ways give the same numbers.
    for (data, loss) in [
        ("unpaired.jsonl", LossConfig::Kto(KtoConfig::default())),
        ("paired.jsonl", LossConfig::Dpo(DpoConfig::default())),
    ] {
        let history = |precompute: bool| {
            let out = scratch(&format!("lora-precompute-{}-{precompute}", loss.name()));
            let lora = LoraTable { init_adapter: Some(fixtures().join("tiny-llama-lora")), ..Default::default() };
            let mut c = config(data, loss.clone(), &out, lora);
            c.batch_size = 4;
            c.precompute_ref_logps = Some(precompute);
            run(&c, RunOptions::default())
        };
        let (live, cached) = (history(false), history(true));
        assert!(live.iter().any(|m| m.objective.get("rewards/chosen").is_some_and(|r| r != 0.0)));
        for (a, b) in live.iter().zip(&cached) {
            assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm), "{} step {}", loss.name(), a.step);
            assert_eq!(a.objective, b.objective, "{} step {}", loss.name(), a.step);
        }
    }
}

#[test]
fn a_16_or_8_bit_base_trains_like_the_f32_base_to_its_rounding() {
    // bf16 keeps 8 bits of mantissa: a weight moves by up to 2^-9 relative when stored, so the logits of
    // tiny-llama move by ~1e-2 and the first steps' losses by well under 1e-2. f16 (11 bits) is 8× closer.
    use prospect::config::BaseDtype;
    let run_with = |dtype: BaseDtype| {
        let out = scratch(&format!("lora-base-{dtype:?}"));
        let mut c = config(
            "unpaired.jsonl",
            LossConfig::Kto(KtoConfig::default()),
            &out,
            LoraTable { base_dtype: dtype, ..table(&["all-linear"], 0.0) },
        );
        c.max_steps = Some(3);
        (run(&c, RunOptions::default()), out.join("final"))
    };
    let (f32_run, f32_dir) = run_with(BaseDtype::F32);
    // Q8_0 keeps ~8 bits per block of 32 (step max|x|/127), between the two.
    for (dtype, tol) in [(BaseDtype::Bf16, 2e-2), (BaseDtype::F16, 3e-3), (BaseDtype::Q8_0, 2e-2)] {
        let (run16, dir16) = run_with(dtype);
        for (a, b) in run16.iter().zip(&f32_run) {
            assert!(a.loss.is_finite() && a.grad_norm.is_finite());
            assert!((a.loss - b.loss).abs() < tol, "{dtype:?} step {}: loss {} vs f32 {}", a.step, a.loss, b.loss);
            assert!((a.grad_norm / b.grad_norm - 1.0).abs() < 10.0 * tol, "{dtype:?} step {}: grad_norm", a.step);
        }
        // The adapter is saved in f32 either way, and from a 16-bit base it differs from the f32 one only a little.
        let (a, b) = (adapter_tensors(&dir16), adapter_tensors(&f32_dir));
        for (name, t) in &a {
            assert_eq!(t.dtype(), candle_core::DType::F32);
            assert_ne!(max_diff(t, &b[name]), 0.0, "{dtype:?}: {name} identical, the base was not 16-bit");
        }
    }
}

#[test]
fn a_reward_adapter_judges_as_its_merged_model_does() {
    use prospect::eval::judge::RewardJudge;
    use prospect::loss::RewardConfig;
    let out = scratch("lora-reward-judge");
    let c = config("paired.jsonl", LossConfig::Reward(RewardConfig::default()), &out, table(&["all-linear"], 0.0));
    run(&c, RunOptions::default());
    let adapter = out.join("final");
    let merged = scratch("lora-reward-merged").join("m");
    merge_adapter(&fixtures().join("tiny-llama"), &adapter, &merged, &Device::Cpu).unwrap();
    let (a, m) =
        (RewardJudge::load(&adapter, 64, &Device::Cpu).unwrap(), RewardJudge::load(&merged, 64, &Device::Cpu).unwrap());
    let prompt = serde_json::json!("How do I sort a list?");
    for completion in ["Use sorted(list).", "No."] {
        let (sa, sm) = (a.score(&prompt, completion).unwrap(), m.score(&prompt, completion).unwrap());
        assert!((sa - sm).abs() < 1e-4 * sm.abs().max(1.0), "{completion}: adapter {sa} vs merged {sm}");
    }
    assert_ne!(a.score(&prompt, "Use sorted(list).").unwrap(), a.score(&prompt, "No.").unwrap());
}

#[test]
fn reading_tensor_by_tensor_gives_what_reading_whole_files_gives() {
    // `base_dtype` reads the base one tensor at a time (weights::load_tensors_each); tiny-qwen2 is sharded.
    for model in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixtures().join(model);
        let whole = prospect::model::load_tensors(&dir, candle_core::DType::F32, &Device::Cpu).unwrap();
        let each = prospect::model::weights::load_tensors_each(&dir, &Device::Cpu, |n, t| Ok((n, t))).unwrap();
        assert_eq!(whole.keys().collect::<Vec<_>>(), each.keys().collect::<Vec<_>>(), "{model}");
        for (name, t) in &whole {
            assert_eq!(max_diff(t, &each[name]), 0.0, "{model}: {name}");
        }
    }
    // A truncated file is an error naming it, not a panic.
    let dir = scratch("lora-truncated");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let err = prospect::model::weights::load_tensors_each(&dir, &Device::Cpu, |n, t| Ok((n, t))).unwrap_err();
    assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("outside the file"), "{err}");
}
