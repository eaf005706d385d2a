//! The training configuration: one flat struct of defaults, read from TOML, plus the `[loss]` table.
//!
//! Unknown keys are errors, so a typo never silently falls back to a default. The resolved config
//! (defaults filled in, `--set` overrides applied) is saved next to every checkpoint as `prospect.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{DataFormat, LabelFrom};
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::model::ComputeDtype;

/// Everything `prospect train` needs. Field names follow TRL's `TrainingArguments` where one exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face folder of the starting policy (`config.json`, `model.safetensors`, tokenizer files).
    pub model: PathBuf,
    /// Hugging Face folder of the frozen reference model. Default: the starting policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PathBuf>,
    /// Training rows: JSONL, a JSON array or Parquet, in any layout of `docs/data.md`.
    pub train_data: PathBuf,
    /// Where `metrics.jsonl`, checkpoints and `final/` go.
    pub output_dir: PathBuf,

    /// Examples per optimizer step.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Examples per forward/backward pass; `batch_size / microbatch_size` is the accumulation count.
    #[serde(default = "defaults::microbatch_size")]
    pub microbatch_size: usize,
    /// Stop after this many optimizer steps (wins over `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Passes over the data when `max_steps` is not set.
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,

    /// Peak learning rate.
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    /// `constant`, `linear` (decay to 0) or `cosine` (decay to 0), after `warmup_steps` of linear warmup.
    #[serde(default)]
    pub lr_scheduler: LrScheduler,
    /// Steps of linear warmup from 0 to `learning_rate`.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decoupled (AdamW) weight decay; never applied to biases and norm weights.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "defaults::adam_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "defaults::adam_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "defaults::adam_epsilon")]
    pub adam_epsilon: f64,
    /// Global-norm gradient clipping threshold; 0 turns clipping off.
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,

    /// Sequences (prompt + completion) are cut at the end to this many tokens.
    #[serde(default = "defaults::max_length")]
    pub max_length: usize,
    /// Shuffle rows each epoch (by `seed`); `false` keeps file order.
    #[serde(default = "defaults::shuffle")]
    pub shuffle: bool,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Write a resumable checkpoint every this many steps (0: only the final model).
    #[serde(default)]
    pub save_every: usize,
    /// Compute the reference model's log-probs of every batch the run will use (KTO: target and KL
    /// pairs; DPO: chosen and rejected; the eval rows) in one no-grad pass before training, then free the
    /// reference model, so training holds one model and runs two forward passes per microbatch instead of
    /// four. The values are kept in `output_dir/reference_logps.bin` for the next run on the same
    /// reference. Same numbers as `false`, bit for bit: values are looked up by the exact batch the
    /// reference reads. Unset: on for every loss that compares sequence log-probs with a reference.
    /// TRL: `precompute_ref_log_probs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precompute_ref_logps: Option<bool>,
    /// Sum a step's microbatch gradients in f64 and round once: the step's gradient then does not depend on
    /// how its microbatches are split or dealt to ranks (N ranks give one process's numbers bit for bit).
    /// Costs 4 bytes per trainable parameter during the step; `false` sums in f32, as PyTorch does.
    #[serde(default = "defaults::yes")]
    pub exact_accumulation: bool,

    /// Where the run computes: `cpu`, or `cuda:N` in a build with the `cuda` feature (docs/CUDA.md).
    /// Unset: the CPU, or the command line's `--device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `f32` (default) or `bf16`: the dtype of the model's matrix products. `bf16` is mixed precision with
    /// f32 master weights: the weights, AdamW's state, norms, softmax, log-probs and losses stay f32.
    #[serde(default, skip_serializing_if = "ComputeDtype::is_f32")]
    pub dtype: ComputeDtype,

    // ---- Data (docs/data.md) ----
    /// The layout of the data files (`trl`, `sharegpt`, `hh_rlhf`, ...); detected from the fields if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_format: Option<DataFormat>,
    /// Turn a score field into labels: `{ field = "rating", threshold = 7.0 | "mean" | "median" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_from: Option<LabelFrom>,
    /// Skip malformed rows (each is counted and reported) instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
    /// A `.jinja` file (or tokenizer_config.json) whose chat template renders conversational rows,
    /// instead of the tokenizer's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
    /// KTO: keep this fraction of the desirable side (of the pairs, for paired data), chosen by `seed`.
    #[serde(default = "defaults::one")]
    pub desirable_fraction: f64,
    /// KTO: keep this fraction of the undesirable side.
    #[serde(default = "defaults::one")]
    pub undesirable_fraction: f64,
    /// KTO: set λ_D (fewer desirable rows) or λ_U (fewer undesirable) so that λ_D·n_D / (λ_U·n_U) = 7/6,
    /// the middle of the paper's recommended [1, 4/3]; the run logs the weights it chose.
    #[serde(default)]
    pub auto_weights: bool,
    /// Held-out rows, in any supported layout. Exclusive with `eval_fraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training rows (pairs stay whole), chosen by `seed`.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Evaluate every this many steps (and after the last); 0: only after the last step.
    #[serde(default)]
    pub eval_every: usize,

    /// The objective and its hyperparameters.
    pub loss: LossConfig,

    /// LoRA: train low-rank adapters on a frozen base instead of every weight (`[lora]`, PEFT's names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraTable>,
}

/// The `[lora]` table. Keys left out take PEFT's defaults (r 8, alpha 8, dropout 0, `q_proj` and
/// `v_proj`), or, with `init_adapter`, that adapter's values; a key that contradicts the adapter is an
/// error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// Scale = alpha / r (alpha / √r with `rslora`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Module names (`q_proj`, ..., `down_proj`) or `"all-linear"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<crate::model::lora::TargetModules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rslora: Option<bool>,
    /// A PEFT adapter folder to start from and keep training; the reference is a frozen copy of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
    /// The frozen base's storage: f32 (default), bf16 / f16 to halve it, or q8_0 (linear layers in 8-bit
    /// blocks) to quarter it. Each product casts or dequantizes its weight to f32 for the moment it runs;
    /// activations, adapters, optimizer and losses stay f32.
    #[serde(default, skip_serializing_if = "BaseDtype::is_f32")]
    pub base_dtype: BaseDtype,
}

/// How a LoRA run stores its frozen base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    #[default]
    F32,
    Bf16,
    F16,
    /// The linear layers in GGML's Q8_0 (8-bit blocks of 32 with an f16 scale, 1.06 bytes per weight),
    /// the embedding in bf16: QLoRA's idea on the CPU.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl BaseDtype {
    fn is_f32(&self) -> bool {
        *self == BaseDtype::F32
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            BaseDtype::F32 => candle_core::DType::F32,
            BaseDtype::Bf16 => candle_core::DType::BF16,
            BaseDtype::F16 => candle_core::DType::F16,
            BaseDtype::Q8_0 => candle_core::DType::U8,
        }
    }
}

impl LoraTable {
    /// The run's LoRA settings: the table over PEFT's defaults, or over `adapter`'s config when the
    /// run starts from one (where the two disagree, an error names the key).
    /// `arch`: the model's family once known (`None` while the config alone is checked).
    pub fn settings(
        &self,
        adapter: Option<&crate::model::lora::LoraSettings>,
        arch: Option<crate::model::config::Arch>,
    ) -> Result<crate::model::lora::LoraSettings> {
        use crate::model::lora::{default_targets, resolve_targets, LoraSettings, TargetModules};
        let targets = match &self.target_modules {
            None => None,
            Some(TargetModules::List(v)) => Some(v.clone()),
            Some(TargetModules::One(s)) => Some(vec![s.clone()]),
        };
        let targets = targets
            .map(|t| resolve_targets(&t, arch))
            .transpose()
            .map_err(|m| Error::config("lora.target_modules", m))?;
        let defaults = LoraSettings {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: default_targets(arch.unwrap_or_default()),
            rslora: false,
        };
        let base = adapter.cloned().unwrap_or(defaults);
        let conflict = |key: &str, ours: String, theirs: String| {
            Error::config(
                format!("lora.{key}"),
                format!("is {ours}, but init_adapter's adapter_config.json says {theirs}; leave it out to keep the adapter's"),
            )
        };
        if let Some(a) = adapter {
            if let Some(r) = self.r.filter(|&r| r != a.r) {
                return Err(conflict("r", r.to_string(), a.r.to_string()));
            }
            if let Some(x) = self.alpha.filter(|&x| x != a.alpha) {
                return Err(conflict("alpha", x.to_string(), a.alpha.to_string()));
            }
            if let Some(t) = targets.as_ref().filter(|t| **t != a.target_modules) {
                return Err(conflict("target_modules", format!("{t:?}"), format!("{:?}", a.target_modules)));
            }
            if let Some(x) = self.rslora.filter(|&x| x != a.rslora) {
                return Err(conflict("rslora", x.to_string(), a.rslora.to_string()));
            }
        }
        let settings = LoraSettings {
            r: self.r.unwrap_or(base.r),
            alpha: self.alpha.unwrap_or(base.alpha),
            dropout: self.dropout.unwrap_or(base.dropout),
            target_modules: targets.unwrap_or(base.target_modules),
            rslora: self.rslora.unwrap_or(base.rslora),
        };
        if !(1..=65_536).contains(&settings.r) {
            return Err(Error::config("lora.r", format!("must be in [1, 65536], got {}", settings.r)));
        }
        if !(settings.alpha.is_finite() && settings.alpha > 0.0) {
            return Err(Error::config("lora.alpha", format!("must be a positive number, got {}", settings.alpha)));
        }
        if !(0.0..1.0).contains(&settings.dropout) {
            return Err(Error::config("lora.dropout", format!("must be in [0, 1), got {}", settings.dropout)));
        }
        Ok(settings)
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Constant,
    #[default]
    Linear,
    Cosine,
}

mod defaults {
    pub fn batch_size() -> usize {
        8
    }
    pub fn microbatch_size() -> usize {
        4
    }
    pub fn epochs() -> usize {
        1
    }
    pub fn learning_rate() -> f64 {
        1e-6
    } // TRL's KTOConfig/DPOConfig default
    pub fn adam_beta1() -> f64 {
        0.9
    }
    pub fn adam_beta2() -> f64 {
        0.999
    }
    pub fn adam_epsilon() -> f64 {
        1e-8
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn max_length() -> usize {
        1024
    } // TRL's default
    pub fn shuffle() -> bool {
        true
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
}

impl TrainConfig {
    /// A config with every default filled in, for code that builds runs (the demo, tests).
    pub fn with_defaults(model: PathBuf, train_data: PathBuf, output_dir: PathBuf, loss: LossConfig) -> Self {
        Self {
            model,
            reference: None,
            train_data,
            output_dir,
            batch_size: defaults::batch_size(),
            microbatch_size: defaults::microbatch_size(),
            max_steps: None,
            epochs: defaults::epochs(),
            learning_rate: defaults::learning_rate(),
            lr_scheduler: LrScheduler::default(),
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: defaults::adam_beta1(),
            adam_beta2: defaults::adam_beta2(),
            adam_epsilon: defaults::adam_epsilon(),
            max_grad_norm: defaults::max_grad_norm(),
            max_length: defaults::max_length(),
            shuffle: defaults::shuffle(),
            seed: defaults::seed(),
            save_every: 0,
            data_format: None,
            label_from: None,
            skip_invalid: false,
            chat_template: None,
            desirable_fraction: defaults::one(),
            undesirable_fraction: defaults::one(),
            auto_weights: false,
            eval_data: None,
            eval_fraction: 0.0,
            eval_every: 0,
            precompute_ref_logps: None,
            exact_accumulation: true,
            device: None,
            dtype: ComputeDtype::F32,
            loss,
            lora: None,
        }
    }

    /// Parse a TOML document, apply `key=value` overrides (dotted keys reach into tables, e.g.
    /// `loss.beta=0.2`), and validate. Relative paths are resolved against `base_dir`. Errors name where
    /// the offending key was written: `line N` of `text`, or the `--set` override.
    pub fn from_toml(text: &str, overrides: &[String], base_dir: &Path) -> Result<Self> {
        let origin = Origin { file: None, text, overrides };
        Self::parse(&origin, base_dir).map_err(|e| origin.blame(e))
    }

    /// Read and parse a config file; relative paths in it are relative to the current directory,
    /// as a user typing them at a shell expects. Errors name `FILE:LINE` or the `--set` override.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let origin = Origin { file: Some(path), text: &text, overrides };
        Self::parse(&origin, Path::new("")).map_err(|e| origin.blame(e))
    }

    fn parse(source: &Origin, base_dir: &Path) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(source.text).map_err(|e| {
            let origin = source.at_line(e.span().map(|s| line_of(source.text, s.start)));
            Error::Config { origin, key: "(syntax)".into(), message: e.message().trim_end().into() }
        })?;
        for item in source.overrides {
            apply_override(&mut table, item)?;
        }
        // Deserialized from the canonical text of the merged table, so that an error's span names its key.
        let canonical = toml::to_string(&table).map_err(|e| Error::config("(overrides)", e.to_string()))?;
        let mut config: TrainConfig = toml::from_str(&canonical).map_err(|e| {
            let mut key = e.span().map(|span| key_at(&canonical, span.start)).unwrap_or_default();
            // An unknown key inside a tagged table (`[loss]`) is reported at the table: name the key.
            if let Some(field) = e.message().strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                if !key.ends_with(field) {
                    key = if key.is_empty() { field.to_string() } else { format!("{key}.{field}") };
                }
            }
            Error::config(key, e.message().trim_end())
        })?;
        for path in [&mut config.model, &mut config.train_data, &mut config.output_dir] {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
        let init_adapter = config.lora.as_mut().and_then(|l| l.init_adapter.as_mut());
        for path in [config.reference.as_mut(), config.chat_template.as_mut(), config.eval_data.as_mut(), init_adapter]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The resolved config as TOML, as saved next to checkpoints.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::config("<serialize>", e.to_string()))
    }

    /// Whether the run computes the reference log-probs before training (see `precompute_ref_logps`).
    pub fn precomputes_reference(&self) -> bool {
        self.precompute_ref_logps.unwrap_or_else(|| self.loss.can_precompute_reference())
    }

    /// Microbatches per optimizer step.
    pub fn accumulation_steps(&self) -> usize {
        self.batch_size / self.microbatch_size
    }

    /// Check values that serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<()> {
        self.validate_schedule()?;
        if let Some(device) = &self.device {
            crate::device::parse_spec(device).map_err(|m| Error::config("device", m))?;
        }
        self.validate_optimizer()?;
        self.validate_data()?;
        if let Some(lora) = &self.lora {
            lora.settings(None, None)?; // ranges; agreement with init_adapter is checked when it is read
        }
        self.validate_loss()
    }

    fn validate_schedule(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.microbatch_size == 0 || !self.batch_size.is_multiple_of(self.microbatch_size) {
            return Err(Error::config(
                "microbatch_size",
                format!("must divide batch_size ({}), got {}", self.batch_size, self.microbatch_size),
            ));
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return Err(Error::config("max_steps", "the run must take at least one step"));
        }
        if self.max_length < 2 {
            return Err(Error::config("max_length", "must be at least 2 tokens"));
        }
        Ok(())
    }

    fn validate_optimizer(&self) -> Result<()> {
        // The weights are f32: a value that overflows f32 would make every weight infinite at step 1.
        let f32_max = f32::MAX as f64;
        if !(self.learning_rate > 0.0 && self.learning_rate <= f32_max) {
            return Err(Error::config(
                "learning_rate",
                format!("must be > 0 and at most {f32_max:e} (f32), got {}", self.learning_rate),
            ));
        }
        for (key, value) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(Error::config(key, format!("must be in [0, 1), got {value}")));
            }
        }
        let f32_min = f32::MIN_POSITIVE as f64;
        if !(self.adam_epsilon >= f32_min && self.adam_epsilon <= f32_max) {
            return Err(Error::config(
                "adam_epsilon",
                format!("must be in [{f32_min:e}, {f32_max:e}] (a positive f32), got {}", self.adam_epsilon),
            ));
        }
        for (key, value) in [("weight_decay", self.weight_decay), ("max_grad_norm", self.max_grad_norm)] {
            if !(value >= 0.0 && value <= f32_max) {
                return Err(Error::config(key, format!("must be a number in [0, {f32_max:e}], got {value}")));
            }
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<()> {
        for (key, value) in
            [("desirable_fraction", self.desirable_fraction), ("undesirable_fraction", self.undesirable_fraction)]
        {
            if !(value > 0.0 && value <= 1.0) {
                return Err(Error::config(key, format!("must be in (0, 1], got {value}")));
            }
        }
        let unpaired = self.loss.shape() == crate::data::Shape::Unpaired;
        if !unpaired && (self.desirable_fraction != 1.0 || self.undesirable_fraction != 1.0) {
            return Err(Error::config(
                "desirable_fraction",
                format!(
                    "desirable_fraction and undesirable_fraction apply to losses that train on unpaired feedback \
                     (e.g. kto); `{}` does not",
                    self.loss.name()
                ),
            ));
        }
        if self.auto_weights && self.loss.class_weights().is_none() {
            return Err(Error::config(
                "auto_weights",
                format!(
                    "sets λ_D and λ_U, which `{}` does not have (kto, kto_zero, apo_zero_unpaired do)",
                    self.loss.name()
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::config("eval_fraction", format!("must be in [0, 1), got {}", self.eval_fraction)));
        }
        if self.eval_fraction > 0.0 && self.eval_data.is_some() {
            return Err(Error::config("eval_fraction", "set eval_data or eval_fraction, not both"));
        }
        if let Some(lf) = &self.label_from {
            if let crate::data::Threshold::Value(t) = lf.threshold {
                if !t.is_finite() {
                    return Err(Error::config(
                        "label_from.threshold",
                        format!("must be a finite number, \"mean\" or \"median\", got {t}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_loss(&self) -> Result<()> {
        if self.precompute_ref_logps == Some(true) && !self.loss.can_precompute_reference() {
            return Err(Error::config(
                "precompute_ref_logps",
                format!(
                    "covers losses that compare sequence log-probs with a reference; `{}` has {}",
                    self.loss.name(),
                    if self.loss.needs_reference() { "per-token reference log-probs" } else { "no reference" }
                ),
            ));
        }
        self.loss.validate(self.microbatch_size)
    }

    /// How the data files are read, from `data_format`, `label_from` and `skip_invalid`.
    pub fn read_options(&self) -> crate::data::ReadOptions {
        crate::data::ReadOptions {
            format: self.data_format,
            label_from: self.label_from.clone(),
            skip_invalid: self.skip_invalid,
        }
    }

    /// Whether the run holds out rows for evaluation.
    pub fn has_eval(&self) -> bool {
        self.eval_data.is_some() || self.eval_fraction > 0.0
    }
}

/// Where a config's keys were written, so that an error can name the place: the override that set the
/// key last, else the key's line in the file.
struct Origin<'a> {
    file: Option<&'a Path>,
    text: &'a str,
    overrides: &'a [String],
}

impl Origin<'_> {
    /// Give a config error raised without a place (`Error::config`) the place its key was written.
    fn blame(&self, error: Error) -> Error {
        match error {
            Error::Config { origin, key, message } if origin == "config" => {
                Error::Config { origin: self.describe(&key), key, message }
            }
            other => other,
        }
    }

    fn describe(&self, key: &str) -> String {
        let overridden = |item: &&String| item.split_once('=').is_some_and(|(k, _)| k.trim() == key);
        match self.overrides.iter().rev().find(overridden) {
            Some(item) => format!("--set {item}"),
            None => self.at_line(key_line(self.text, key)),
        }
    }

    /// `FILE:LINE`, `FILE`, `line LINE` or `config`, as far as the place is known.
    fn at_line(&self, line: Option<usize>) -> String {
        match (self.file, line) {
            (Some(file), Some(line)) => format!("{}:{line}", file.display()),
            (Some(file), None) => file.display().to_string(),
            (None, Some(line)) => format!("line {line}"),
            (None, None) => "config".into(),
        }
    }
}

/// The 1-based line on which the dotted `key` (`loss.beta`) is written in the TOML `text`, if it is:
/// `beta = ..` under `[loss]`, or `loss.beta = ..` at the top.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = header.trim().to_string();
            if table == key {
                return Some(i + 1);
            }
        } else if let Some((k, _)) = line.split_once('=') {
            let k: String = k.split('.').map(|p| p.trim().trim_matches('"')).collect::<Vec<_>>().join(".");
            let full = if table.is_empty() { k } else { format!("{table}.{k}") };
            if full == key {
                return Some(i + 1);
            }
        }
    }
    None
}

/// The dotted key written on the line of `byte` in canonical TOML (as `toml::to_string` writes it).
fn key_at(text: &str, byte: usize) -> String {
    let start = text[..byte.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let table = text[..start].lines().rev().find_map(|l| l.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
    let key = line.split('=').next().unwrap_or("").trim().trim_matches('"');
    match table {
        Some(t) if !line.starts_with('[') => format!("{t}.{key}"),
        _ => key.trim_start_matches('[').trim_end_matches(']').to_string(),
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

/// Apply one `key=value` override to a parsed TOML table. The value is parsed as a TOML value
/// (`0.2`, `true`, `"text"`, `[1, 2]`) and falls back to a bare string (`lr_scheduler=cosine`).
pub fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let blame =
        |key: &str, message: String| Error::Config { origin: format!("--set {item}"), key: key.into(), message };
    let (key, raw) = item.split_once('=').ok_or_else(|| blame(item, "an override must look like KEY=VALUE".into()))?;
    let key = key.trim();
    let value = parse_override_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|s| !s.is_empty()).ok_or_else(|| blame(key, "empty key".into()))?;
    let mut current = table;
    for part in parts {
        let entry = current.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| blame(key, format!("`{part}` is not a table")))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

fn parse_override_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        model = "m"
        train_data = "d.jsonl"
        output_dir = "out"
        [loss]
        type = "kto"
    "#;

    #[test]
    fn defaults_fill_in() {
        let c = TrainConfig::from_toml(MINIMAL, &[], Path::new("")).unwrap();
        assert_eq!(c.batch_size, 8);
        assert_eq!(c.microbatch_size, 4);
        assert_eq!(c.accumulation_steps(), 2);
        assert_eq!(c.lr_scheduler, LrScheduler::Linear);
        assert_eq!(c.max_length, 1024);
        match &c.loss {
            LossConfig::Kto(k) => {
                assert_eq!(k.beta, 0.1);
                assert_eq!(k.desirable_weight, 1.0);
                assert_eq!(k.undesirable_weight, 1.0);
            }
            other => panic!("expected kto, got {other:?}"),
        }
    }

    #[test]
    fn overrides_reach_nested_tables_and_parse_types() {
        let sets = vec![
            "loss.beta=0.25".to_string(),
            "shuffle=false".to_string(),
            "lr_scheduler=cosine".to_string(),
            "max_steps=3".to_string(),
        ];
        let c = TrainConfig::from_toml(MINIMAL, &sets, Path::new("")).unwrap();
        assert_eq!(c.max_steps, Some(3));
        assert!(!c.shuffle);
        assert_eq!(c.lr_scheduler, LrScheduler::Cosine);
        match c.loss {
            LossConfig::Kto(k) => assert_eq!(k.beta, 0.25),
            other => panic!("expected kto, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let top = format!("{MINIMAL}\n");
        let err = TrainConfig::from_toml(&top, &["learnin_rate=1".into()], Path::new("")).unwrap_err().to_string();
        assert!(err.contains("learnin_rate"), "{err}");
        let err = TrainConfig::from_toml(MINIMAL, &["loss.betta=1".into()], Path::new("")).unwrap_err().to_string();
        assert!(err.contains("betta"), "{err}");
    }

    #[test]
    fn errors_name_the_line_or_the_override_that_wrote_the_key() {
        // Line numbers below count the lines of `text` (1-based).
        let text = "model = \"m\"\ntrain_data = \"d.jsonl\"\noutput_dir = \"out\"\nlearning_rate = 0.0\n\n[loss]\ntype = \"kto\"\nbeta = -1.0\n";
        let err = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::from_toml(text, &sets, Path::new("")).unwrap_err().to_string()
        };
        assert_eq!(err(&[]), "line 4: `learning_rate`: must be > 0 and at most 3.4028234663852886e38 (f32), got 0");
        assert_eq!(err(&["learning_rate=1e-3"]), "line 8: `loss.beta`: must be a finite number > 0, got -1");
        assert_eq!(
            err(&["learning_rate=1e-3", "loss.beta=0"]),
            "--set loss.beta=0: `loss.beta`: must be a finite number > 0, got 0"
        );
        assert!(
            err(&["loss.bta=1"]).starts_with("--set loss.bta=1: `loss.bta`: unknown field `bta`"),
            "{}",
            err(&["loss.bta=1"])
        );
        assert_eq!(
            err(&["learning_rate"]),
            "--set learning_rate: `learning_rate`: an override must look like KEY=VALUE"
        );
        let bad_type = text.replace("learning_rate = 0.0", "learning_rate = \"fast\"");
        let e = TrainConfig::from_toml(&bad_type, &[], Path::new("")).unwrap_err().to_string();
        assert!(e.starts_with("line 4: `learning_rate`: invalid type: string \"fast\""), "{e}");
        let e = TrainConfig::from_toml("model = \nx", &[], Path::new("")).unwrap_err().to_string();
        assert!(e.starts_with("line 1: `(syntax)`: "), "{e}");

        // From a file, the origin is FILE:LINE.
        let dir = std::env::temp_dir().join(format!("prospect-config-origin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, text).unwrap();
        let e = TrainConfig::load(&file, &[]).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:4: `learning_rate`", file.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kto_needs_two_rows_per_microbatch() {
        let sets = vec!["microbatch_size=1".to_string()];
        let err = TrainConfig::from_toml(MINIMAL, &sets, Path::new("")).unwrap_err().to_string();
        assert!(err.contains("microbatch_size"), "{err}");
    }

    #[test]
    fn precompute_is_for_losses_with_a_sequence_reference() {
        for ok in ["kto", "dpo", "ipo", "cdpo", "kto_zero", "apo_zero_unpaired"] {
            let sets = vec!["precompute_ref_logps=true".to_string(), format!("loss={{ type = \"{ok}\" }}")];
            assert!(TrainConfig::from_toml(MINIMAL, &sets, Path::new("")).is_ok(), "{ok}");
        }
        for (bad, why) in [("simpo", "no reference"), ("ppo_offline", "per-token")] {
            let sets = vec!["precompute_ref_logps=true".to_string(), format!("loss={{ type = \"{bad}\" }}")];
            let err = TrainConfig::from_toml(MINIMAL, &sets, Path::new("")).unwrap_err().to_string();
            assert!(
                err.contains("precompute_ref_logps") && err.contains(&format!("`{bad}`")) && err.contains(why),
                "{err}"
            );
        }
    }

    #[test]
    fn microbatch_must_divide_batch() {
        let sets = vec!["microbatch_size=3".to_string()];
        let err = TrainConfig::from_toml(MINIMAL, &sets, Path::new("")).unwrap_err().to_string();
        assert!(err.contains("must divide batch_size (8), got 3"), "{err}");
    }

    #[test]
    fn code_defaults_equal_file_defaults() {
        let c = TrainConfig::from_toml(MINIMAL, &[], Path::new("")).unwrap();
        let d = TrainConfig::with_defaults("m".into(), "d.jsonl".into(), "out".into(), c.loss.clone());
        assert_eq!(c, d);
    }

    #[test]
    fn data_keys_parse() {
        let sets = vec![
            "data_format=sharegpt".to_string(),
            "label_from={ field = \"rating\", threshold = \"median\" }".to_string(),
            "desirable_fraction=0.1".to_string(),
            "auto_weights=true".to_string(),
            "eval_fraction=0.2".to_string(),
            "eval_every=5".to_string(),
            "skip_invalid=true".to_string(),
        ];
        let c = TrainConfig::from_toml(MINIMAL, &sets, Path::new("base")).unwrap();
        assert_eq!(c.data_format, Some(DataFormat::Sharegpt));
        assert_eq!(
            c.label_from,
            Some(LabelFrom {
                field: "rating".into(),
                threshold: crate::data::Threshold::Statistic(crate::data::Statistic::Median)
            })
        );
        assert_eq!((c.desirable_fraction, c.undesirable_fraction, c.auto_weights), (0.1, 1.0, true));
        assert_eq!((c.eval_fraction, c.eval_every, c.skip_invalid), (0.2, 5, true));
        let err = TrainConfig::from_toml(MINIMAL, &["data_format=csv".into()], Path::new("")).unwrap_err().to_string();
        assert!(err.contains("unknown variant `csv`"), "{err}");
        let err = TrainConfig::from_toml(
            MINIMAL,
            &["eval_fraction=0.1".into(), "eval_data=\"e.jsonl\"".into()],
            Path::new(""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = TrainConfig::from_toml(MINIMAL, &["max_steps=7".into()], Path::new("")).unwrap();
        let text = c.to_toml().unwrap();
        let back = TrainConfig::from_toml(&text, &[], Path::new("")).unwrap();
        assert_eq!(c, back);
    }
}
