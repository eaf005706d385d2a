//! The sweep's TOML file: models × datasets × methods, the training keys they share, the SFT run each
//! (model, dataset) starts from, and how samples are drawn and judged.
//!
//! ```toml
//! output = "runs/sweep"                # where cells and results go (`--output` wins)
//! [train]                              # TrainConfig keys every run shares (not model/data/output/loss)
//! max_length = 256
//! [sft]                                # the shared SFT run: TrainConfig keys over [train]; loss = sft
//! learning_rate = 1e-5
//! [eval]                               # sampling on held-out prompts and the judge
//! judge = "reward:runs/rm/final"
//! [[models]]
//! name = "smollm2-135m"
//! path = "target/smollm2/SmolLM2-135M-Instruct"
//! [[datasets]]
//! name = "kto-demo"
//! train_data = "feedback.jsonl"        # unpaired or paired rows for the methods
//! eval_prompts = "prompts.jsonl"       # {"prompt": ...} rows, never trained on
//! [[methods]]
//! name = "sft+kto"
//! after_sft = true                     # start from (and take as reference) the SFT model
//! loss = { type = "kto", beta = 0.1 }
//! set = { desirable_fraction = 0.1 }   # TrainConfig keys for this method only
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::eval::judge::JudgeSpec;
use crate::eval::{GenerateConfig, SamplingConfig};
use crate::loss::LossConfig;

/// The whole sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Where the cells, `results.json`, `results.md` and `win_rates.png` go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// TrainConfig keys shared by every run (SFT and methods).
    #[serde(default)]
    pub train: toml::Table,
    /// TrainConfig keys of the shared SFT runs, over `train`; `loss` defaults to `{ type = "sft" }`.
    #[serde(default)]
    pub sft: toml::Table,
    #[serde(default)]
    pub eval: EvalSettings,
    pub models: Vec<ModelEntry>,
    pub datasets: Vec<DatasetEntry>,
    pub methods: Vec<MethodEntry>,
}

/// One model of the grid: a Hugging Face folder (a base model, not an adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
}

/// One dataset of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    pub name: String,
    /// The feedback the methods train on (any layout of docs/data.md).
    pub train_data: PathBuf,
    /// Paired rows for methods with `data = "paired"` (DPO, SLiC, ... on data that has both forms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_data: Option<PathBuf>,
    /// Demonstrations for the shared SFT run; default `train_data` (SFT then learns its desirable rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft_data: Option<PathBuf>,
    /// Held-out `{"prompt": ...}` rows that every model of this dataset is sampled on and judged.
    pub eval_prompts: PathBuf,
}

/// Which of a dataset's files a method trains on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataChoice {
    #[default]
    Train,
    Paired,
}

/// One method of the grid: a loss, whether it starts from the SFT model, and its own TrainConfig keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodEntry {
    pub name: String,
    /// Start from the (model, dataset)'s SFT run and use it as the reference ("SFT+KTO"); otherwise
    /// start from the model itself, which is then the reference ("KTO").
    #[serde(default)]
    pub after_sft: bool,
    /// The `[loss]` table of the run.
    pub loss: toml::Table,
    #[serde(default)]
    pub data: DataChoice,
    /// TrainConfig keys over `[train]` for this method's runs.
    #[serde(default)]
    pub set: toml::Table,
}

/// How every model is sampled on the held-out prompts and judged against its SFT model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// `rule:NAME`, `llm:URL` (key from OPENAI_API_KEY) or `reward:DIR`.
    #[serde(default = "default_judge")]
    pub judge: String,
    /// Model name sent to an LLM judge.
    #[serde(default = "default_judge_model")]
    pub judge_model: String,
    #[serde(default = "default_samples")]
    pub samples_per_prompt: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seeds sampling (every model gets the same seed) and the LLM judge's A/B order.
    #[serde(default)]
    pub seed: u64,
}

fn default_judge() -> String {
    "rule:polite-reply".into()
}
fn default_judge_model() -> String {
    "gpt-4".into()
}
fn default_samples() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
    128
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_p() -> f64 {
    1.0
}
fn default_batch() -> usize {
    16
}

impl Default for EvalSettings {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

impl EvalSettings {
    pub fn judge_spec(&self) -> Result<JudgeSpec> {
        JudgeSpec::parse(&self.judge).map_err(|e| Error::config("eval.judge", e.to_string()))
    }

    /// The generation settings; `append_tokens` is the method's (CSFT's good token).
    pub fn generate_config(&self, append_tokens: Vec<String>) -> GenerateConfig {
        GenerateConfig {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingConfig { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p },
            stop: self.stop.clone(),
            seed: self.seed,
            batch_size: self.batch_size,
            append_tokens,
        }
    }
}

/// The name of the SFT baseline in results and cell folders.
pub const SFT: &str = "sft";

impl SweepConfig {
    /// Read a sweep file. Relative paths in it are relative to the current directory, as for
    /// `prospect train`; errors name the file and line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: SweepConfig = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let origin = match line {
                Some(l) => format!("{}:{l}", path.display()),
                None => path.display().to_string(),
            };
            Error::Config { origin, key: "(sweep)".into(), message: e.message().trim_end().into() }
        })?;
        config.check().map_err(|e| match e {
            Error::Config { key, message, .. } => Error::Config { origin: path.display().to_string(), key, message },
            other => other,
        })?;
        Ok(config)
    }

    /// Names are unique and usable as folder names, the grid is not empty, the judge parses, and every
    /// run's TrainConfig (SFT and each method) is valid.
    pub fn check(&self) -> Result<()> {
        let groups: [(&str, Vec<&str>); 3] = [
            ("models", self.models.iter().map(|m| m.name.as_str()).collect()),
            ("datasets", self.datasets.iter().map(|d| d.name.as_str()).collect()),
            ("methods", self.methods.iter().map(|m| m.name.as_str()).collect()),
        ];
        for (key, names) in &groups {
            if names.is_empty() {
                return Err(Error::config(*key, "the grid needs at least one entry"));
            }
            for (i, name) in names.iter().enumerate() {
                check_name(key, name)?;
                if names[..i].contains(name) {
                    return Err(Error::config(format!("{key}.name"), format!("`{name}` appears twice")));
                }
            }
        }
        if self.methods.iter().any(|m| m.name == SFT) {
            return Err(Error::config(
                "methods.name",
                "`sft` is the baseline every cell is judged against; it runs from [sft] and needs no entry",
            ));
        }
        self.eval.judge_spec()?;
        if self.eval.samples_per_prompt == 0 || self.eval.batch_size == 0 || self.eval.max_new_tokens == 0 {
            return Err(Error::config("eval", "samples_per_prompt, batch_size and max_new_tokens must be at least 1"));
        }
        let (model, dataset) = (&self.models[0], &self.datasets[0]);
        let sft_dir = Path::new("sft");
        self.sft_config(model, dataset, Path::new("out"))?;
        for method in &self.methods {
            self.method_config(method, model, dataset, sft_dir, Path::new("out"))?;
            if let Some(d) = self.datasets.iter().find(|d| method.data == DataChoice::Paired && d.paired_data.is_none())
            {
                return Err(Error::config(
                    format!("methods.{}.data", method.name),
                    format!("is \"paired\", but dataset `{}` has no paired_data", d.name),
                ));
            }
        }
        Ok(())
    }

    /// The shared SFT run of `model` on `dataset`, writing to `output_dir`.
    pub fn sft_config(&self, model: &ModelEntry, dataset: &DatasetEntry, output_dir: &Path) -> Result<TrainConfig> {
        let mut table = self.train.clone();
        table.extend(self.sft.clone());
        if !table.contains_key("loss") {
            table.insert("loss".into(), toml::Value::Table(toml::toml! { type = "sft" }));
        }
        let data = dataset.sft_data.as_ref().unwrap_or(&dataset.train_data);
        let config = run_config(table, &model.path, None, data, output_dir).map_err(|e| within("sft", e))?;
        Ok(config)
    }

    /// `method`'s run on `model` and `dataset`; `sft_model` is the SFT run's model folder.
    pub fn method_config(
        &self,
        method: &MethodEntry,
        model: &ModelEntry,
        dataset: &DatasetEntry,
        sft_model: &Path,
        output_dir: &Path,
    ) -> Result<TrainConfig> {
        let mut table = self.train.clone();
        table.extend(method.set.clone());
        table.insert("loss".into(), toml::Value::Table(method.loss.clone()));
        let data = match method.data {
            DataChoice::Paired => dataset.paired_data.as_ref().unwrap_or(&dataset.train_data),
            DataChoice::Train => &dataset.train_data,
        };
        let (start, reference) =
            if method.after_sft { (sft_model, Some(sft_model)) } else { (model.path.as_path(), None) };
        run_config(table, start, reference, data, output_dir)
            .map_err(|e| within(&format!("methods.{}", method.name), e))
    }
}

/// A TrainConfig from shared keys plus the run's paths; the reference is set only for losses that use one.
fn run_config(
    mut table: toml::Table,
    model: &Path,
    reference: Option<&Path>,
    data: &Path,
    output_dir: &Path,
) -> Result<TrainConfig> {
    for key in ["model", "reference", "train_data", "output_dir"] {
        if table.contains_key(key) {
            return Err(Error::config(key, "is set by the sweep for each cell; leave it out"));
        }
    }
    let path = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned());
    table.insert("model".into(), path(model));
    table.insert("train_data".into(), path(data));
    table.insert("output_dir".into(), path(output_dir));
    let text = toml::to_string(&table).map_err(|e| Error::config("(sweep)", e.to_string()))?;
    let mut config = TrainConfig::from_toml(&text, &[], Path::new(""))?;
    if config.loss.needs_reference() {
        config.reference = reference.map(Path::to_path_buf);
    }
    Ok(config)
}

/// Prefix a config error's key with the sweep table it came from.
fn within(table: &str, e: Error) -> Error {
    match e {
        Error::Config { origin, key, message } => Error::Config { origin, key: format!("{table}: {key}"), message },
        other => other,
    }
}

fn check_name(key: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+%".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            format!("{key}.name"),
            format!("`{name}` must be non-empty and use only letters, digits and - _ . + % (it names folders)"),
        ))
    }
}

/// Tokens appended to every prompt when sampling a model trained with `loss`: CSFT's good control token.
pub fn generation_suffix(loss: &LossConfig) -> Vec<String> {
    match loss {
        LossConfig::Csft(c) => c.generation_suffix(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
        [train]
        max_length = 64
        [sft]
        learning_rate = 1e-4
        [[models]]
        name = "m"
        path = "models/m"
        [[datasets]]
        name = "d"
        train_data = "feedback.jsonl"
        paired_data = "pairs.jsonl"
        sft_data = "demos.jsonl"
        eval_prompts = "prompts.jsonl"
        [[methods]]
        name = "sft+kto"
        after_sft = true
        loss = { type = "kto", beta = 0.2 }
        set = { desirable_fraction = 0.1 }
        [[methods]]
        name = "orpo"
        data = "paired"
        loss = { type = "orpo" }
    "#;

    fn parse(text: &str) -> Result<SweepConfig> {
        let c: SweepConfig = toml::from_str(text).map_err(|e| Error::config("(sweep)", e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn cells_get_the_shared_keys_their_own_and_the_right_start_data_and_reference() {
        let c = parse(SWEEP).unwrap();
        let (m, d) = (&c.models[0], &c.datasets[0]);
        let sft = c.sft_config(m, d, Path::new("o/sft")).unwrap();
        assert_eq!(sft.loss.name(), "sft");
        assert_eq!((sft.max_length, sft.learning_rate), (64, 1e-4));
        assert_eq!((sft.model.as_path(), sft.train_data.as_path()), (Path::new("models/m"), Path::new("demos.jsonl")));
        assert_eq!(sft.reference, None);

        let kto = c.method_config(&c.methods[0], m, d, Path::new("o/sft/final"), Path::new("o/kto")).unwrap();
        assert_eq!(
            (kto.model.as_path(), kto.reference.as_deref()),
            (Path::new("o/sft/final"), Some(Path::new("o/sft/final")))
        );
        assert_eq!(
            (kto.train_data.as_path(), kto.output_dir.as_path()),
            (Path::new("feedback.jsonl"), Path::new("o/kto"))
        );
        assert_eq!((kto.max_length, kto.learning_rate, kto.desirable_fraction), (64, 1e-6, 0.1));
        assert!(matches!(kto.loss, LossConfig::Kto(k) if k.beta == 0.2));

        // Not after SFT: the model itself, paired data; ORPO has no reference.
        let orpo = c.method_config(&c.methods[1], m, d, Path::new("o/sft/final"), Path::new("o/orpo")).unwrap();
        assert_eq!((orpo.model.as_path(), orpo.reference.as_deref()), (Path::new("models/m"), None));
        assert_eq!(orpo.train_data.as_path(), Path::new("pairs.jsonl"));
    }

    #[test]
    fn the_grid_is_checked_before_anything_runs() {
        let err = |text: String| parse(&text).unwrap_err().to_string();
        let e = err(SWEEP.replace("name = \"orpo\"", "name = \"sft+kto\""));
        assert!(e.contains("`sft+kto` appears twice"), "{e}");
        let e = err(SWEEP.replace("name = \"orpo\"", "name = \"sft\""));
        assert!(e.contains("`sft` is the baseline"), "{e}");
        let e = err(SWEEP.replace("name = \"m\"", "name = \"a/b\""));
        assert!(e.contains("`models.name`") && e.contains("names folders"), "{e}");
        let e = err(SWEEP.replace("max_length = 64", "max_length = 64\nmodel = \"x\""));
        assert!(e.contains("`sft: model`: is set by the sweep"), "{e}");
        let e = err(SWEEP.replace("desirable_fraction = 0.1", "desirable_fraction = 2.0"));
        assert!(e.contains("methods.sft+kto: desirable_fraction"), "{e}");
        let e = err(SWEEP.replace("paired_data = \"pairs.jsonl\"\n", ""));
        assert!(e.contains("`methods.orpo.data`: is \"paired\", but dataset `d` has no paired_data"), "{e}");
        let e = err(format!("{SWEEP}\n[eval]\njudge = \"gpt4\""));
        assert!(e.contains("`eval.judge`"), "{e}");
        let mut empty = parse(SWEEP).unwrap();
        empty.models.clear();
        let e = empty.check().unwrap_err().to_string();
        assert!(e.contains("`models`: the grid needs at least one entry"), "{e}");
    }
}
