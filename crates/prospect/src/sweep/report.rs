//! A sweep's results: `results.json` (one record per finished cell of the whole grid), `results.md`
//! (the Archangel table: win rate vs SFT with 95% intervals, method × model, one table per dataset, then
//! method × model with a column per dataset) and `win_rates.png` (win rate against model size, one line
//! per method; `win_rates-DATASET.png` for each dataset when there are several).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cell::{CellResult, CellState};
use super::config::{SweepConfig, SFT};
use crate::error::Result;
use crate::eval::plot::SizePoint;
use crate::fsio::write_atomic;

/// One finished cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellRecord {
    pub dataset: String,
    pub model: String,
    pub method: String,
    /// Parameters of the grid's model (the base the cell started from).
    pub parameters: usize,
    /// The loss's TOML name (`sft` for the baseline).
    pub loss: String,
    pub after_sft: bool,
    /// `None` for the SFT baseline (0.5 against itself by definition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CellResult>,
    pub steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_loss: Option<f64>,
    pub train_seconds: f64,
    pub train_fingerprint: String,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepResults {
    pub judge: String,
    /// How `ci95` is computed.
    pub ci_method: String,
    pub datasets: Vec<String>,
    /// Grid order.
    pub models: Vec<String>,
    /// Grid order, `sft` first.
    pub methods: Vec<String>,
    pub cells: Vec<CellRecord>,
    /// Cells of the grid not finished yet.
    pub missing: usize,
}

impl SweepResults {
    pub fn get(&self, dataset: &str, model: &str, method: &str) -> Option<&CellRecord> {
        self.cells.iter().find(|c| c.dataset == dataset && c.model == model && c.method == method)
    }
}

/// Read every finished cell of the grid under `out`.
pub fn collect(config: &SweepConfig, out: &Path) -> Result<SweepResults> {
    let params = super::parameter_counts(config)?;
    let mut cells = Vec::new();
    let mut missing = 0;
    for super::GridCell { method, id, dir } in super::grid(config, out)? {
        let Some(state) = CellState::read(&dir).filter(|s| s.done) else {
            missing += 1;
            continue;
        };
        let method = method.map(|k| &config.methods[k]);
        let loss = match method {
            Some(m) => m.loss.get("type").and_then(|t| t.as_str()).unwrap_or("?").to_string(),
            None => config.sft.get("loss").and_then(|l| l.get("type")).and_then(|t| t.as_str()).unwrap_or(SFT).into(),
        };
        cells.push(CellRecord {
            parameters: params.get(&id.model).copied().unwrap_or(0),
            dataset: id.dataset,
            model: id.model,
            method: id.method,
            loss,
            after_sft: method.is_some_and(|m| m.after_sft),
            result: state.result,
            steps: state.steps,
            final_loss: state.final_loss,
            train_seconds: state.train_seconds,
            train_fingerprint: state.train_fingerprint,
            dir,
        });
    }
    Ok(SweepResults {
        judge: config.eval.judge.clone(),
        ci_method: "wilson".into(),
        datasets: config.datasets.iter().map(|d| d.name.clone()).collect(),
        models: config.models.iter().map(|m| m.name.clone()).collect(),
        methods: std::iter::once(SFT.to_string()).chain(config.methods.iter().map(|m| m.name.clone())).collect(),
        cells,
        missing,
    })
}

/// results.json, results.md and the charts.
pub fn write(out: &Path, r: &SweepResults) -> Result<()> {
    crate::fsio::write_json_atomic(&out.join("results.json"), r)?;
    write_atomic(&out.join("results.md"), markdown(r).as_bytes())?;
    for (i, dataset) in r.datasets.iter().enumerate() {
        let lines: Vec<(String, Vec<SizePoint>)> = r
            .methods
            .iter()
            .filter(|m| m.as_str() != SFT)
            .map(|method| {
                let points = r
                    .models
                    .iter()
                    .filter_map(|model| r.get(dataset, model, method))
                    .filter_map(|c| {
                        c.result.as_ref().map(|x| SizePoint {
                            parameters: c.parameters as f64,
                            win_rate: x.win_rate,
                            ci95: x.ci95,
                        })
                    })
                    .collect();
                (method.clone(), points)
            })
            .filter(|(_, p): &(String, Vec<_>)| !p.is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        let title = format!("win rate vs SFT on {dataset} ({}; 95% Wilson CI)", r.judge);
        if i == 0 {
            crate::eval::plot::win_rate_by_size(&out.join("win_rates.png"), &title, &lines)?;
        }
        if r.datasets.len() > 1 {
            crate::eval::plot::win_rate_by_size(&out.join(format!("win_rates-{dataset}.png")), &title, &lines)?;
        }
    }
    Ok(())
}

/// `0.62 [0.55, 0.69]`, `0.500 (baseline)` or `–` (not run yet).
fn entry(c: Option<&CellRecord>) -> String {
    match c {
        Some(CellRecord { result: Some(x), .. }) => format!("{:.3} [{:.3}, {:.3}]", x.win_rate, x.ci95[0], x.ci95[1]),
        Some(_) => "0.500 (baseline)".into(),
        None => "–".into(),
    }
}

/// Model names with their sizes, e.g. `w64 (0.10M)`.
fn model_label(r: &SweepResults, model: &str) -> String {
    match r.cells.iter().find(|c| c.model == model).map(|c| c.parameters) {
        Some(p) if p >= 1_000_000_000 => format!("{model} ({:.1}B)", p as f64 / 1e9),
        Some(p) => format!("{model} ({:.2}M)", p as f64 / 1e6),
        None => model.to_string(),
    }
}

/// The tables, as markdown.
pub fn markdown(r: &SweepResults) -> String {
    let mut s = String::new();
    for dataset in &r.datasets {
        s.push_str(&format!("### {dataset}: win rate vs SFT, 95% Wilson interval\n\n| method |"));
        for model in &r.models {
            s.push_str(&format!(" {} |", model_label(r, model)));
        }
        s.push_str(&format!("\n|---|{}\n", "---|".repeat(r.models.len())));
        for method in &r.methods {
            s.push_str(&format!("| {method} |"));
            for model in &r.models {
                s.push_str(&format!(" {} |", entry(r.get(dataset, model, method))));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s.push_str("### every cell\n\n| method | model | parameters |");
    for dataset in &r.datasets {
        s.push_str(&format!(" {dataset} | mean score |"));
    }
    s.push_str(&format!("\n|---|---|---|{}\n", "---|---|".repeat(r.datasets.len())));
    for method in &r.methods {
        for model in &r.models {
            let params = r.cells.iter().find(|c| &c.model == model).map_or(0, |c| c.parameters);
            s.push_str(&format!("| {method} | {model} | {params} |"));
            for dataset in &r.datasets {
                let c = r.get(dataset, model, method);
                let score = c.and_then(|c| match &c.result {
                    Some(x) => x.mean_candidate_score,
                    None => r
                        .cells
                        .iter()
                        .find(|o| o.dataset == c.dataset && o.model == c.model && o.result.is_some())
                        .and_then(|o| o.result.as_ref().and_then(|x| x.mean_baseline_score)),
                });
                let score = score.map_or("–".to_string(), |v| format!("{v:.3}"));
                s.push_str(&format!(" {} | {score} |", entry(c)));
            }
            s.push('\n');
        }
    }
    let n = r.cells.iter().find_map(|c| c.result.as_ref().map(|x| x.n)).unwrap_or(0);
    s.push_str(&format!(
        "\nJudge `{}`; each cell's samples are compared with its model's SFT samples prompt by prompt ({n} comparisons per cell); ties count half. {} cells of the grid are not finished.\n",
        r.judge, r.missing
    ));
    s
}
