//! `prospect demo`: a self-contained alignment experiment that needs no download.
//!
//! 1. Build a tiny Llama from scratch (word-level tokenizer, random weights) and pre-train it on the
//!    task's language: requests followed by replies of every quality ([`task`]).
//! 2. SFT it on demonstrations of which half are flawed, so SFT leaves room to improve.
//! 3. Sample replies from the SFT model on the training prompts and label each one with the rule judge:
//!    the "abundant binary feedback" KTO trains on. DPO pairs come from the same samples.
//! 4. Train SFT+KTO, SFT+DPO, KTO straight from the base model, and SFT+KTO with 90% of the desirable
//!    feedback dropped and λ_D set from the class counts (the paper's imbalance experiment).
//! 5. Sample on held-out prompts and judge every model against SFT: win rates with Wilson 95% intervals.
//!
//! Everything is seeded: the same seed gives the same table.

pub mod task;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{LrScheduler, TrainConfig};
use crate::error::{Error, Result};
use crate::eval::winrate::{Verdict, WinRate};
use crate::eval::{generate, plot, GenerateConfig, SamplingConfig};
use crate::fsio::write_atomic;
use crate::loss::{DpoConfig, KtoConfig, LossConfig, SftConfig};
use crate::model::{init::random_weights, save_tensors, HfTokenizer, ModelConfig, Policy};
use crate::train::{train, Event, RunOptions, StepMetrics};
use task::Request;

/// How big the experiment is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DemoScale {
    pub base_rows: usize,
    pub base_epochs: usize,
    pub sft_demos_per_prompt: usize,
    pub sft_epochs: usize,
    /// Samples per training prompt that become feedback.
    pub feedback_samples: usize,
    pub align_epochs: usize,
    /// Samples per held-out prompt, per model, for the win rates.
    pub eval_samples: usize,
}

impl DemoScale {
    pub fn full() -> Self {
        Self {
            base_rows: 16000,
            base_epochs: 1,
            sft_demos_per_prompt: 4,
            sft_epochs: 4,
            feedback_samples: 8,
            align_epochs: 3,
            eval_samples: 16,
        }
    }

    pub fn quick() -> Self {
        Self {
            base_rows: 8000,
            base_epochs: 1,
            sft_demos_per_prompt: 4,
            sft_epochs: 4,
            feedback_samples: 4,
            align_epochs: 3,
            eval_samples: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    pub win_rate_vs_sft: f64,
    pub ci95: [f64; 2],
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// Mean rule-judge score (0–3) of the method's samples on held-out prompts.
    pub mean_score: f64,
    /// Fraction of samples with full marks.
    pub desirable_rate: f64,
    /// Held-out prompts judged (each with `samples_per_prompt` samples).
    pub prompts: usize,
    pub samples_per_prompt: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoResults {
    pub methods: BTreeMap<String, MethodResult>,
    pub judge: String,
    pub seed: u64,
    pub feedback: FeedbackStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FeedbackStats {
    pub desirable: usize,
    pub undesirable: usize,
    pub pairs: usize,
    /// λ_D of the 10%-desirable run.
    pub imbalanced_desirable_weight: f64,
    pub imbalanced_desirable_kept: usize,
}

/// The methods in the table, in order.
pub const METHODS: [&str; 5] = ["sft", "sft+dpo", "sft+kto", "kto", "kto-10%-desirable"];

/// Run the whole experiment into `out`.
pub fn run_demo(out: &Path, scale: DemoScale, seed: u64, on_event: &mut dyn FnMut(Event)) -> Result<DemoResults> {
    run_demo_on(out, scale, seed, Device::Cpu, on_event)
}

/// [`run_demo`] on a given device (`prospect demo --device cuda:0`).
pub fn run_demo_on(
    out: &Path,
    scale: DemoScale,
    seed: u64,
    device: Device,
    on_event: &mut dyn FnMut(Event),
) -> Result<DemoResults> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // Prompts: a quarter of the request grid is held out for evaluation.
    let mut requests = task::all_requests();
    requests.shuffle(&mut rng);
    let held_out: Vec<Request> = requests.split_off(requests.len() * 3 / 4);
    let train_requests = requests;
    let mut demo = Demo { out, scale, seed, device, data_dir: out.join("data"), rng, on_event };

    let base = demo.pretrain(&train_requests)?;
    let sft = demo.sft(&base, &train_requests)?;
    let stats = demo.feedback(&sft, &train_requests)?;
    let models = demo.align(&base, &sft)?;
    let methods = demo.judge(&models, &sft, &held_out)?;
    let results = DemoResults { methods, judge: "rule:polite-reply".into(), seed, feedback: stats };
    write_results(out, &results)?;
    Ok(results)
}

/// One demo run's settings and state; each stage is a method, in the order the RNG is drawn.
struct Demo<'a> {
    out: &'a Path,
    scale: DemoScale,
    seed: u64,
    device: Device,
    data_dir: PathBuf,
    rng: rand::rngs::StdRng,
    on_event: &'a mut dyn FnMut(Event),
}

impl Demo<'_> {
    /// 1. A model from scratch, pre-trained on the task's language.
    fn pretrain(&mut self, train_requests: &[Request]) -> Result<PathBuf> {
        let (out, scale, seed, device, data_dir, rng) =
            (self.out, self.scale, self.seed, &self.device, &self.data_dir, &mut self.rng);
        let on_event = &mut *self.on_event;
        let init_dir = out.join("models/init");
        write_initial_model(&init_dir, seed, 64, device)?;
        let base_rows: Vec<serde_json::Value> = (0..scale.base_rows)
            .map(|_| {
                let r = *train_requests.choose(rng).unwrap_or(&train_requests[0]);
                let reply = random_quality_reply(&r, rng);
                json!({"prompt": "", "completion": format!("{}{}", r.prompt(), reply)})
            })
            .collect();
        write_jsonl(&data_dir.join("base.jsonl"), &base_rows)?;
        on_event(Event::Notice("stage 1/5: pre-training the base model on the task's language".into()));
        let base = run(
            out,
            "base",
            &init_dir,
            None,
            &data_dir.join("base.jsonl"),
            LossConfig::Sft(SftConfig::default()),
            3e-3,
            scale.base_epochs,
            32,
            32,
            seed,
            device,
            on_event,
            |_| {},
        )?;
        Ok(base)
    }

    /// 2. SFT on imperfect demonstrations: half good, half with one flaw.
    fn sft(&mut self, base: &Path, train_requests: &[Request]) -> Result<PathBuf> {
        let (out, scale, seed, data_dir, rng) = (self.out, self.scale, self.seed, &self.data_dir, &mut self.rng);
        let device = self.device.clone();
        let on_event = &mut *self.on_event;
        let mut demos = Vec::new();
        for r in train_requests {
            for _ in 0..scale.sft_demos_per_prompt {
                let reply = if rng.gen_bool(0.5) {
                    r.good_reply()
                } else {
                    let flaw = *task::FLAWS.choose(rng).unwrap_or(&task::Flaw::Rude);
                    task::flawed_reply(r, flaw, rng)
                };
                demos.push(json!({"prompt": r.prompt(), "completion": reply}));
            }
        }
        demos.shuffle(rng);
        write_jsonl(&data_dir.join("sft.jsonl"), &demos)?;
        on_event(Event::Notice("stage 2/5: SFT on imperfect demonstrations".into()));
        run(
            out,
            "sft",
            base,
            None,
            &data_dir.join("sft.jsonl"),
            LossConfig::Sft(SftConfig::default()),
            3e-3,
            scale.sft_epochs,
            16,
            16,
            seed,
            &device,
            on_event,
            |_| {},
        )
    }

    /// 3. Binary feedback on the SFT model's own samples.
    fn feedback(&mut self, sft: &Path, train_requests: &[Request]) -> Result<FeedbackStats> {
        let (seed, scale, device, data_dir, rng) = (self.seed, self.scale, &self.device, &self.data_dir, &mut self.rng);
        let on_event = &mut *self.on_event;
        on_event(Event::Notice(
            "stage 3/5: sampling the SFT model and labelling its replies with the rule judge".into(),
        ));
        let tok = HfTokenizer::load(sft)?;
        let prompts: Vec<String> = train_requests.iter().map(Request::prompt).collect();
        let samples = sample(sft, &tok, &prompts, scale.feedback_samples, seed, device)?;
        let mut feedback = Vec::new();
        let mut pairs = Vec::new();
        for (p, replies) in prompts.iter().zip(&samples) {
            let (good, bad): (Vec<&String>, Vec<&String>) = replies.iter().partition(|c| task::is_desirable(p, c));
            for c in replies {
                feedback.push(json!({"prompt": p, "completion": format!(" {c}"), "label": task::is_desirable(p, c)}));
            }
            for (g, b) in good.iter().zip(&bad) {
                pairs.push(json!({"prompt": p, "chosen": format!(" {g}"), "rejected": format!(" {b}")}));
            }
        }
        feedback.shuffle(rng);
        pairs.shuffle(rng);
        let n_desirable = feedback.iter().filter(|r| r["label"] == json!(true)).count();
        let n_undesirable = feedback.len() - n_desirable;
        // The imbalance experiment runs on the same feedback file with `desirable_fraction = 0.1` and
        // `auto_weights = true`; these are the counts and the λ_D the run will choose (and log).
        let kept = crate::data::balance::kept(n_desirable, 0.1);
        let lambda_d = crate::data::balance::auto_weights(kept, n_undesirable).0;
        write_jsonl(&data_dir.join("feedback.jsonl"), &feedback)?;
        write_jsonl(&data_dir.join("pairs.jsonl"), &pairs)?;
        let stats = FeedbackStats {
            desirable: n_desirable,
            undesirable: n_undesirable,
            pairs: pairs.len(),
            imbalanced_desirable_weight: lambda_d,
            imbalanced_desirable_kept: kept,
        };
        on_event(Event::Notice(format!(
            "feedback: {n_desirable} desirable, {n_undesirable} undesirable, {} DPO pairs; 10%-desirable run keeps {kept} desirable rows with λ_D = {lambda_d:.2}",
            pairs.len()
        )));
        Ok(stats)
    }

    /// 4. Alignment runs: SFT+DPO, SFT+KTO, KTO from base, KTO with 10% of the desirable rows.
    fn align(&mut self, base: &Path, sft: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
        let (out, scale, seed, data_dir) = (self.out, self.scale, self.seed, &self.data_dir);
        let device = self.device.clone();
        let on_event = &mut *self.on_event;
        on_event(Event::Notice("stage 4/5: SFT+KTO, SFT+DPO, KTO from base, KTO with 10% desirable".into()));
        let kto = |w: f64| LossConfig::Kto(KtoConfig { beta: 0.1, desirable_weight: w, undesirable_weight: 1.0 });
        let fb = data_dir.join("feedback.jsonl");
        let mut models: Vec<(&str, PathBuf)> = vec![("sft", sft.to_path_buf())];
        let pairs = data_dir.join("pairs.jsonl");
        // (label, run folder, starting model and reference, data, loss, keep 10% of the desirable rows)
        let runs: [(&'static str, &str, &Path, &Path, LossConfig, bool); 4] = [
            ("sft+dpo", "sft+dpo", sft, &pairs, LossConfig::Dpo(DpoConfig::default()), false),
            ("sft+kto", "sft+kto", sft, &fb, kto(1.0), false),
            ("kto", "kto", base, &fb, kto(1.0), false),
            ("kto-10%-desirable", "kto-10pct-desirable", sft, &fb, kto(1.0), true),
        ];
        for (label, name, start, data, loss, imbalanced) in runs {
            let epochs = scale.align_epochs;
            let dir =
                run(out, name, start, Some(start), data, loss, 1e-3, epochs, 16, 8, seed, &device, on_event, |c| {
                    if imbalanced {
                        c.desirable_fraction = 0.1;
                        c.auto_weights = true;
                    }
                })?;
            models.push((label, dir));
        }
        Ok(models)
    }

    /// 5. Held-out evaluation against SFT, with the rule judge.
    fn judge(
        &mut self,
        models: &[(&'static str, PathBuf)],
        sft: &Path,
        held_out: &[Request],
    ) -> Result<BTreeMap<String, MethodResult>> {
        let (scale, seed, device) = (self.scale, self.seed, &self.device);
        let tok = HfTokenizer::load(sft)?;
        (self.on_event)(Event::Notice("stage 5/5: judging every model against SFT on held-out prompts".into()));
        let eval_prompts: Vec<String> = held_out.iter().map(Request::prompt).collect();
        let eval_seed = seed.wrapping_add(1000);
        let mut scores: BTreeMap<&str, Vec<Vec<u32>>> = BTreeMap::new();
        for (name, dir) in models {
            let replies = sample(dir, &tok, &eval_prompts, scale.eval_samples, eval_seed, device)?;
            let s = eval_prompts
                .iter()
                .zip(&replies)
                .map(|(p, rs)| rs.iter().map(|c| task::score(p, c)).collect())
                .collect();
            scores.insert(name, s);
        }
        let baseline = scores["sft"].clone();
        let mut methods = BTreeMap::new();
        for (name, s) in &scores {
            let verdicts: Vec<Verdict> = s
                .iter()
                .flatten()
                .zip(baseline.iter().flatten())
                .map(|(c, b)| match c.cmp(b) {
                    std::cmp::Ordering::Greater => Verdict::Candidate,
                    std::cmp::Ordering::Less => Verdict::Baseline,
                    std::cmp::Ordering::Equal => Verdict::Tie,
                })
                .collect();
            let w = WinRate::from_verdicts(&verdicts);
            let all: Vec<u32> = s.iter().flatten().copied().collect();
            methods.insert(
                name.to_string(),
                MethodResult {
                    win_rate_vs_sft: w.win_rate,
                    ci95: w.ci95,
                    wins: w.wins,
                    ties: w.ties,
                    losses: w.losses,
                    mean_score: all.iter().sum::<u32>() as f64 / all.len().max(1) as f64,
                    desirable_rate: all.iter().filter(|&&x| x == 3).count() as f64 / all.len().max(1) as f64,
                    prompts: eval_prompts.len(),
                    samples_per_prompt: scale.eval_samples,
                },
            );
        }
        Ok(methods)
    }
}

/// results.json, results.md and the two charts.
fn write_results(out: &Path, results: &DemoResults) -> Result<()> {
    crate::fsio::write_json_atomic(&out.join("results.json"), results)?;
    write_atomic(&out.join("results.md"), results_markdown(results).as_bytes())?;
    let bars: Vec<(String, f64, [f64; 2])> = METHODS
        .iter()
        .filter_map(|m| results.methods.get(*m).map(|r| (m.to_string(), r.win_rate_vs_sft, r.ci95)))
        .collect();
    plot::win_rate_chart(&out.join("win_rates.png"), "prospect demo: win rate vs SFT (95% Wilson CI)", &bars)?;
    let mut curves = Vec::new();
    for name in ["base", "sft", "sft+dpo", "sft+kto", "kto", "kto-10pct-desirable"] {
        let path = out.join("runs").join(name).join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let points = text
            .lines()
            .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
            .map(|m| (m.step as f64, m.loss))
            .collect();
        curves.push((name.to_string(), points));
    }
    plot::training_curves(&out.join("training_curves.png"), "prospect demo: training loss", &curves)?;
    Ok(())
}

/// The table, as markdown.
pub fn results_markdown(r: &DemoResults) -> String {
    let mut s = String::from("| method | win rate vs SFT | 95% CI (Wilson) | wins / ties / losses | mean judge score (0-3) | full marks |\n|---|---|---|---|---|---|\n");
    for name in METHODS {
        if let Some(m) = r.methods.get(name) {
            s.push_str(&format!(
                "| {name} | {:.3} | [{:.3}, {:.3}] | {} / {} / {} | {:.2} | {:.1}% |\n",
                m.win_rate_vs_sft,
                m.ci95[0],
                m.ci95[1],
                m.wins,
                m.ties,
                m.losses,
                m.mean_score,
                100.0 * m.desirable_rate
            ));
        }
    }
    let n = r.methods.get("sft").map(|m| (m.prompts, m.samples_per_prompt)).unwrap_or((0, 0));
    s.push_str(&format!(
        "\n{} held-out prompts × {} samples per model, judged by `{}`; ties count half. Feedback: {} desirable / {} undesirable SFT samples, {} DPO pairs.\n",
        n.0, n.1, r.judge, r.feedback.desirable, r.feedback.undesirable, r.feedback.pairs
    ));
    s
}

pub(crate) fn random_quality_reply(r: &Request, rng: &mut impl Rng) -> String {
    if rng.gen_bool(0.2) {
        r.good_reply()
    } else {
        let flaw = *task::FLAWS.choose(rng).unwrap_or(&task::Flaw::Rude);
        task::flawed_reply(r, flaw, rng)
    }
}

/// `samples` completions per prompt at temperature 1.
fn sample(
    model_dir: &Path,
    tok: &HfTokenizer,
    prompts: &[String],
    samples: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<Vec<String>>> {
    let (policy, _) = Policy::load(model_dir, device)?;
    let model = policy.frozen_model(device)?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p)).collect::<Result<_>>()?;
    let repeated: Vec<Vec<u32>> = ids.iter().flat_map(|i| std::iter::repeat_n(i.clone(), samples)).collect();
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        sampling: SamplingConfig { temperature: 1.0, top_k: 0, top_p: 1.0 },
        stop: vec![],
        seed,
        batch_size: 64,
        append_tokens: vec![],
    };
    let gens = generate(&model, tok, &repeated, &cfg, device, &mut |_| {})?;
    Ok(gens.chunks(samples).map(|c| c.iter().map(|g| g.completion.clone()).collect()).collect())
}

/// Train one stage of the demo; `adjust` has the last say over its config (e.g. the imbalance keys).
#[allow(clippy::too_many_arguments)]
fn run(
    out: &Path,
    name: &str,
    model: &Path,
    reference: Option<&Path>,
    data: &Path,
    loss: LossConfig,
    lr: f64,
    epochs: usize,
    batch: usize,
    microbatch: usize,
    seed: u64,
    device: &Device,
    on_event: &mut dyn FnMut(Event),
    adjust: impl FnOnce(&mut TrainConfig),
) -> Result<PathBuf> {
    let run_dir = out.join("runs").join(name);
    let mut config = TrainConfig {
        reference: reference.map(Path::to_path_buf),
        batch_size: batch,
        microbatch_size: microbatch,
        epochs,
        learning_rate: lr,
        lr_scheduler: LrScheduler::Cosine,
        max_length: 32,
        seed,
        ..TrainConfig::with_defaults(model.to_path_buf(), data.to_path_buf(), run_dir.clone(), loss)
    };
    adjust(&mut config);
    let mut last: Option<StepMetrics> = None;
    train(&config, device, RunOptions::default(), &mut |e| match e {
        Event::Step(m) => last = Some(m),
        Event::Notice(n) if !n.contains("rows read") => on_event(Event::Notice(format!("{name}: {n}"))),
        _ => {}
    })?;
    if let Some(m) = last {
        on_event(Event::Notice(format!("{name}: {} steps, final loss {:.4}", m.step, m.loss)));
    }
    Ok(run_dir.join("final"))
}

pub(crate) fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// The demo's tokenizer (word level, `<|endoftext|>` = eos = pad) and a random tiny Llama of hidden size
/// `width` (2 layers, MLP 2 × width, heads of 16 dimensions, or 2 heads below width 32, half as many
/// key/value heads).
pub(crate) fn write_initial_model(dir: &Path, seed: u64, width: usize, device: &Device) -> Result<()> {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    vocab.insert("<unk>".into(), json!(1));
    for (i, w) in task::vocabulary().iter().enumerate() {
        vocab.insert(w.to_string(), json!(i + 2));
    }
    let vocab_size = vocab.len();
    let heads = (width / 16).max(2);
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let tokenizer_config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                                  "pad_token": "<|endoftext|>", "unk_token": "<unk>", "model_max_length": 64});
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": heads / 2, "head_dim": width / heads, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "max_position_embeddings": 64, "hidden_act": "silu",
        "eos_token_id": 0, "pad_token_id": 0, "bos_token_id": null, "torch_dtype": "float32"
    });
    crate::fsio::write_json_atomic(&dir.join("tokenizer.json"), &tokenizer)?;
    crate::fsio::write_json_atomic(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    crate::fsio::write_json_atomic(&dir.join("config.json"), &config)?;
    let cfg = ModelConfig::load(dir)?;
    save_tensors(&random_weights(&cfg, 0.02, seed, device)?, &dir.join("model.safetensors"))
}
