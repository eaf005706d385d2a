//! `prospect eval`: judge candidates' generations against a baseline's, prompt by prompt, and report
//! win rates with Wilson 95% intervals as `results.json`, a markdown table, a PNG chart and one
//! `comparisons-NAME.jsonl` per candidate for auditing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::files::{pair_by_prompt, read_rows, Row};
use super::judge::{by_score, rule_score, JudgeSpec, LlmJudge, RewardJudge};
use super::winrate::WinRate;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;

/// How to run an LLM judge (ignored by other judges).
#[derive(Debug, Clone, Default)]
pub struct LlmOptions {
    pub model: String,
    pub api_key: Option<String>,
    pub prompt_template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateResult {
    pub name: String,
    pub file: PathBuf,
    pub win_rate: f64,
    pub ci95: [f64; 2],
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// Comparisons made (prompt pairs matched with the baseline).
    pub n: usize,
    /// Candidate rows whose prompt has no (remaining) baseline row.
    pub unmatched: usize,
    /// LLM judge answers that were not exactly A, B or TIE (counted as ties).
    pub unparseable: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_candidate_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_baseline_score: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub judge: String,
    pub baseline: PathBuf,
    /// How `ci95` is computed.
    pub ci_method: String,
    pub candidates: Vec<CandidateResult>,
}

/// Compare every candidate file with the baseline file.
pub fn evaluate(
    candidates: &[PathBuf],
    baseline: &Path,
    judge_spec: &str,
    llm: &LlmOptions,
    seed: u64,
    output: &Path,
) -> Result<EvalReport> {
    let spec = JudgeSpec::parse(judge_spec)?;
    let base_rows = read_rows(baseline, true)?;
    let reward = match &spec {
        JudgeSpec::Reward(dir) => Some(RewardJudge::load(dir, 1024, &candle_core::Device::Cpu)?),
        _ => None,
    };
    let mut results = Vec::new();
    for (ci, path) in candidates.iter().enumerate() {
        let rows = read_rows(path, true)?;
        let (pairs, unmatched) = pair_by_prompt(&rows, &base_rows);
        if pairs.is_empty() {
            return Err(Error::DataFile {
                path: path.clone(),
                message: format!("no prompt of this file appears in the baseline {}", baseline.display()),
            });
        }
        let name =
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("candidate{ci}"));
        let mut verdicts = Vec::with_capacity(pairs.len());
        let mut log = String::new();
        let (mut c_scores, mut b_scores) = (Vec::new(), Vec::new());
        let mut unparseable = 0;
        let mut llm_judge = match &spec {
            JudgeSpec::Llm { url } => Some(LlmJudge::new(
                url,
                &llm.model,
                llm.api_key.clone(),
                llm.prompt_template.clone(),
                seed.wrapping_add(ci as u64),
            )),
            _ => None,
        };
        for &(i, j) in &pairs {
            let (c, b): (&Row, &Row) = (&rows[i], &base_rows[j]);
            let prompt = c.prompt_text();
            let mut entry = json!({"prompt": prompt, "candidate": c.completion(), "baseline": b.completion(),
                                   "candidate_line": c.line, "baseline_line": b.line});
            let verdict = match &spec {
                JudgeSpec::Rule(rule) => {
                    let cs = rule_score(rule, &prompt, c.completion()).unwrap_or(0.0);
                    let bs = rule_score(rule, &prompt, b.completion()).unwrap_or(0.0);
                    c_scores.push(cs);
                    b_scores.push(bs);
                    entry["candidate_score"] = json!(cs);
                    entry["baseline_score"] = json!(bs);
                    by_score(cs, bs)
                }
                JudgeSpec::Reward(_) => {
                    let judge = reward.as_ref().ok_or_else(|| Error::config("judge", "reward model not loaded"))?;
                    let raw_prompt = c.fields.get("prompt").cloned().unwrap_or_default();
                    let cs = judge.score(&raw_prompt, c.completion())?;
                    let bs = judge.score(&raw_prompt, b.completion())?;
                    c_scores.push(cs);
                    b_scores.push(bs);
                    entry["candidate_score"] = json!(cs);
                    entry["baseline_score"] = json!(bs);
                    by_score(cs, bs)
                }
                JudgeSpec::Llm { .. } => {
                    let judge = llm_judge.as_mut().ok_or_else(|| Error::config("judge", "LLM judge not set up"))?;
                    let j = judge.judge(&prompt, c.completion(), b.completion())?;
                    unparseable += usize::from(!j.parsed);
                    entry["candidate_position"] = json!(j.candidate_position);
                    entry["judge_answer"] = json!(j.answer);
                    entry["parsed"] = json!(j.parsed);
                    j.verdict
                }
            };
            entry["verdict"] = json!(verdict);
            log.push_str(&entry.to_string());
            log.push('\n');
            verdicts.push(verdict);
        }
        write_atomic(&output.join(format!("comparisons-{name}.jsonl")), log.as_bytes())?;
        let w = WinRate::from_verdicts(&verdicts);
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        results.push(CandidateResult {
            name,
            file: path.clone(),
            win_rate: w.win_rate,
            ci95: w.ci95,
            wins: w.wins,
            ties: w.ties,
            losses: w.losses,
            n: verdicts.len(),
            unmatched,
            unparseable,
            mean_candidate_score: mean(&c_scores),
            mean_baseline_score: mean(&b_scores),
        });
    }
    let report = EvalReport {
        judge: judge_spec.to_string(),
        baseline: baseline.to_path_buf(),
        ci_method: "wilson".into(),
        candidates: results,
    };
    crate::fsio::write_json_atomic(&output.join("results.json"), &report)?;
    write_atomic(&output.join("results.md"), markdown(&report).as_bytes())?;
    let bars: Vec<(String, f64, [f64; 2])> =
        report.candidates.iter().map(|c| (c.name.clone(), c.win_rate, c.ci95)).collect();
    super::plot::win_rate_chart(
        &output.join("win_rates.png"),
        &format!("win rate vs {} ({})", stem(baseline), report.judge),
        &bars,
    )?;
    Ok(report)
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn markdown(r: &EvalReport) -> String {
    let mut s = format!(
        "Judge: `{}`. Baseline: `{}`. Ties count half; 95% intervals are Wilson score intervals.\n\n\
         | candidate | win rate | 95% CI | wins / ties / losses | n | unmatched | unparseable |\n|---|---|---|---|---|---|---|\n",
        r.judge,
        r.baseline.display()
    );
    for c in &r.candidates {
        s.push_str(&format!(
            "| {} | {:.3} | [{:.3}, {:.3}] | {} / {} / {} | {} | {} | {} |\n",
            c.name, c.win_rate, c.ci95[0], c.ci95[1], c.wins, c.ties, c.losses, c.n, c.unmatched, c.unparseable
        ));
    }
    s
}
