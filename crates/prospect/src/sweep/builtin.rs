//! `prospect sweep --builtin`: the Archangel comparison in miniature, on the demo's task (`demo::task`),
//! at four model sizes, with no download.
//!
//! 1. The data, drawn once from `seed`:
//!    - `sft.jsonl`: demonstrations of which half are flawed (as in the demo), for the shared SFT runs;
//!    - `feedback.jsonl`: replies of every quality to the training prompts, each labelled desirable when
//!      the rule judge gives it full marks: fixed, off-policy binary feedback, as Archangel's human
//!      feedback is the same for every model size;
//!    - `pairs.jsonl`: a desirable and an undesirable reply to the same prompt, for the paired methods;
//!    - `prompts.jsonl`: the held-out quarter of the request grid, never trained on.
//! 2. For each width, a tiny Llama from random weights, pre-trained on the task's language
//!    (`models/wN/pretrain/final`, resumable like every run).
//! 3. The sweep ([`super::run_sweep`]): SFT, then SFT+DPO, SFT+KTO, KTO without SFT, SFT+KTO with 90%
//!    of the desirable rows dropped, CSFT, SFT+SLiC, SFT+offline PPO and SFT+BCO, each judged against
//!    its size's SFT model by `rule:polite-reply`. The KTO runs set λ_D from the class counts
//!    (`auto_weights`, the paper's advice: λ_D·n_D / (λ_U·n_U) in [1, 4/3]); about a fifth of the
//!    feedback is desirable, and a fiftieth in the 10% run.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use super::config::{DataChoice, DatasetEntry, EvalSettings, MethodEntry, ModelEntry, SweepConfig};
use crate::config::{LrScheduler, TrainConfig};
use crate::demo::task::{self, Request};
use crate::demo::{random_quality_reply, write_initial_model, write_jsonl};
use crate::error::{Error, Result};
use crate::loss::{LossConfig, SftConfig};
use crate::train::checkpoint::checkpoint_dir;
use crate::train::fingerprint::Fingerprint;
use crate::train::{train, Event, RunOptions};

/// How big the built-in sweep is.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinScale {
    /// Hidden sizes of the four models.
    pub widths: Vec<usize>,
    /// Pre-training rows (requests with replies of every quality) and epochs.
    pub base_rows: usize,
    pub base_epochs: usize,
    pub sft_demos_per_prompt: usize,
    pub sft_epochs: usize,
    /// Labelled replies per training prompt in `feedback.jsonl`.
    pub feedback_per_prompt: usize,
    pub align_epochs: usize,
    /// Samples per held-out prompt, per model.
    pub eval_samples: usize,
}

impl BuiltinScale {
    /// The default: widths 32, 64, 128 and 256.
    pub fn full() -> Self {
        Self {
            widths: vec![32, 64, 128, 256],
            base_rows: 16000,
            base_epochs: 1,
            sft_demos_per_prompt: 4,
            sft_epochs: 4,
            feedback_per_prompt: 8,
            align_epochs: 2,
            eval_samples: 16,
        }
    }

    /// The test suite's: smaller models, less data, fewer samples.
    pub fn quick() -> Self {
        Self {
            widths: vec![16, 24, 32, 48],
            base_rows: 3000,
            base_epochs: 1,
            sft_demos_per_prompt: 2,
            sft_epochs: 3,
            feedback_per_prompt: 3,
            align_epochs: 1,
            eval_samples: 4,
        }
    }
}

/// Write the data and pre-train the models (each only if not done already), and return the sweep over
/// them, with its output in `out`.
pub fn prepare(out: &Path, scale: &BuiltinScale, seed: u64, on_event: &mut dyn FnMut(Event)) -> Result<SweepConfig> {
    let data = out.join("data");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut requests = task::all_requests();
    requests.shuffle(&mut rng);
    let held_out: Vec<Request> = requests.split_off(requests.len() * 3 / 4);
    write_data(&data, &requests, &held_out, scale, &mut rng)?;
    let mut models = Vec::new();
    for &width in &scale.widths {
        let name = format!("w{width}");
        let path = pretrain(&out.join("models").join(&name), width, &data.join("base.jsonl"), scale, seed, on_event)?;
        models.push(ModelEntry { name, path });
    }
    Ok(sweep_config(out, &data, models, scale, seed))
}

fn write_data(
    data: &Path,
    train_requests: &[Request],
    held_out: &[Request],
    scale: &BuiltinScale,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    use rand::Rng;
    let base: Vec<serde_json::Value> = (0..scale.base_rows)
        .map(|_| {
            let r = train_requests.choose(rng).unwrap_or(&train_requests[0]);
            json!({"prompt": "", "completion": format!("{}{}", r.prompt(), random_quality_reply(r, rng))})
        })
        .collect();
    let mut sft = Vec::new();
    let mut feedback = Vec::new();
    let mut pairs = Vec::new();
    for r in train_requests {
        let p = r.prompt();
        for _ in 0..scale.sft_demos_per_prompt {
            let reply = if rng.gen_bool(0.5) {
                r.good_reply()
            } else {
                task::flawed_reply(r, *task::FLAWS.choose(rng).unwrap_or(&task::Flaw::Rude), rng)
            };
            sft.push(json!({"prompt": p, "completion": reply}));
        }
        let replies: Vec<String> = (0..scale.feedback_per_prompt).map(|_| random_quality_reply(r, rng)).collect();
        let (good, bad): (Vec<&String>, Vec<&String>) = replies.iter().partition(|c| task::is_desirable(&p, c));
        for c in &replies {
            feedback.push(json!({"prompt": p, "completion": c, "label": task::is_desirable(&p, c)}));
        }
        for (g, b) in good.iter().zip(&bad) {
            pairs.push(json!({"prompt": p, "chosen": g, "rejected": b}));
        }
    }
    for rows in [&mut sft, &mut feedback, &mut pairs] {
        rows.shuffle(rng);
    }
    let prompts: Vec<serde_json::Value> = held_out.iter().map(|r| json!({"prompt": r.prompt()})).collect();
    write_jsonl(&data.join("base.jsonl"), &base)?;
    write_jsonl(&data.join("sft.jsonl"), &sft)?;
    write_jsonl(&data.join("feedback.jsonl"), &feedback)?;
    write_jsonl(&data.join("pairs.jsonl"), &pairs)?;
    write_jsonl(&data.join("prompts.jsonl"), &prompts)
}

/// Pre-train the width's model from random weights, unless `done.json` records this very run.
fn pretrain(
    dir: &Path,
    width: usize,
    data: &Path,
    scale: &BuiltinScale,
    seed: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    let init = dir.join("init");
    if !init.join("model.safetensors").is_file() {
        write_initial_model(&init, seed, width, &Device::Cpu)?;
    }
    let run_dir = dir.join("pretrain");
    let config = TrainConfig {
        batch_size: 32,
        microbatch_size: 32,
        epochs: scale.base_epochs,
        learning_rate: 3e-3,
        lr_scheduler: LrScheduler::Cosine,
        max_length: 32,
        seed,
        save_every: 50,
        ..TrainConfig::with_defaults(init, data.to_path_buf(), run_dir.clone(), LossConfig::Sft(SftConfig::default()))
    };
    let fingerprint = serde_json::to_string(&Fingerprint::of(&config)?.entries).map_err(|e| Error::output(dir, e))?;
    let marker = dir.join("done.json");
    let final_dir = run_dir.join("final");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == fingerprint) && final_dir.is_dir() {
        return Ok(final_dir);
    }
    on_event(Event::Notice(format!("pre-training the width-{width} model on the task's language")));
    let resume = super::cell::has_checkpoint(&run_dir, on_event)?;
    train(&config, &Device::Cpu, RunOptions { resume, resume_force: false }, &mut |e| {
        if let Event::Notice(n) = e {
            on_event(Event::Notice(format!("w{width} pre-training: {n}")))
        }
    })?;
    let checkpoint = checkpoint_dir(&run_dir);
    if checkpoint.is_dir() {
        std::fs::remove_dir_all(&checkpoint).map_err(|e| Error::io(&checkpoint, e))?;
    }
    crate::fsio::write_atomic(&marker, fingerprint.as_bytes())?;
    Ok(final_dir)
}

fn table(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_else(|e| unreachable!("built-in TOML is valid: {e}"))
}

/// The methods of the built-in sweep, as a sweep file would list them.
fn methods(scale: &BuiltinScale) -> Vec<MethodEntry> {
    let method = |name: &str, after_sft: bool, loss: &str, data: DataChoice, set: &str| MethodEntry {
        name: name.into(),
        after_sft,
        loss: table(loss),
        data,
        set: table(set),
    };
    let csft = format!("learning_rate = 3e-3\nepochs = {}\nmicrobatch_size = 16", scale.sft_epochs);
    vec![
        method("sft+dpo", true, "type = \"dpo\"\nbeta = 0.1", DataChoice::Paired, ""),
        method("sft+kto", true, "type = \"kto\"\nbeta = 0.1", DataChoice::Train, "auto_weights = true"),
        method("kto", false, "type = \"kto\"\nbeta = 0.1", DataChoice::Train, "auto_weights = true"),
        method(
            "sft+kto-10%-desirable",
            true,
            "type = \"kto\"\nbeta = 0.1",
            DataChoice::Train,
            "desirable_fraction = 0.1\nauto_weights = true",
        ),
        method("csft", false, "type = \"csft\"", DataChoice::Train, &csft),
        method("sft+slic", true, "type = \"slic\"", DataChoice::Paired, ""),
        method("sft+ppo", true, "type = \"ppo_offline\"", DataChoice::Train, ""),
        method("sft+bco", true, "type = \"bco\"\nbeta = 0.1", DataChoice::Train, ""),
    ]
}

fn sweep_config(out: &Path, data: &Path, models: Vec<ModelEntry>, scale: &BuiltinScale, seed: u64) -> SweepConfig {
    let train = format!(
        "batch_size = 16\nmicrobatch_size = 8\nepochs = {}\nlearning_rate = 1e-3\nlr_scheduler = \"cosine\"\n\
         max_length = 32\nseed = {seed}\nsave_every = 25",
        scale.align_epochs
    );
    let sft = format!("learning_rate = 3e-3\nepochs = {}\nmicrobatch_size = 16", scale.sft_epochs);
    SweepConfig {
        output: Some(out.to_path_buf()),
        train: table(&train),
        sft: table(&sft),
        eval: EvalSettings {
            judge: "rule:polite-reply".into(),
            samples_per_prompt: scale.eval_samples,
            max_new_tokens: 16,
            temperature: 1.0,
            batch_size: 64,
            seed: seed.wrapping_add(1000),
            ..EvalSettings::default()
        },
        models,
        datasets: vec![DatasetEntry {
            name: "polite-reply".into(),
            train_data: data.join("feedback.jsonl"),
            paired_data: Some(data.join("pairs.jsonl")),
            sft_data: Some(data.join("sft.jsonl")),
            eval_prompts: data.join("prompts.jsonl"),
        }],
        methods: methods(scale),
    }
}
