//! `prospect eval`: judge candidates' generations against a baseline's, prompt by prompt, and report
//! win rates with Wilson 95% intervals as `results.json`, a markdown table, a PNG chart and one
//! `comparisons-NAME.jsonl` per candidate for auditing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::files::{pair_by_prompt, read_rows, Row};
use super::judge::{by_score, JudgeSpec, LlmJudge, RewardJudge};
use super::rules::Rule;
use super::winrate::Verdict;
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
    judge: &JudgeSpec,
    llm: &LlmOptions,
    seed: u64,
    output: &Path,
) -> Result<EvalReport> {
    let base_rows = read_rows(baseline, true)?;
    let reward = match judge {
        JudgeSpec::Reward(dir) => Some(RewardJudge::load(dir, 1024, &candle_core::Device::Cpu)?),
        _ => None,
    };
    let mut results = Vec::new();
    for (ci, path) in candidates.iter().enumerate() {
        let mut scorer = match judge {
            JudgeSpec::Rule(rule) => Scorer::Rule(*rule),
            JudgeSpec::Reward(_) => {
                Scorer::Reward(reward.as_ref().ok_or_else(|| Error::config("judge", "reward model not loaded"))?)
            }
            JudgeSpec::Llm { url } => Scorer::Llm(Box::new(LlmJudge::new(
                url,
                &llm.model,
                llm.api_key.clone(),
                llm.prompt_template.clone(),
                seed.wrapping_add(ci as u64),
            ))),
        };
        let name =
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("candidate{ci}"));
        results.push(compare(name, path, baseline, &base_rows, &mut scorer, output)?);
    }
    let report = EvalReport {
        judge: judge.to_string(),
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

/// A judge set up for one candidate file.
enum Scorer<'a> {
    Rule(Rule),
    Reward(&'a RewardJudge),
    Llm(Box<LlmJudge>),
}

/// One comparison: the verdict, the two scores (rule and reward judges), and whether an LLM judge's
/// answer could not be parsed. Audit fields go into `entry`.
struct Judged {
    verdict: Verdict,
    scores: Option<(f64, f64)>,
    unparseable: bool,
}

impl Scorer<'_> {
    fn judge(&mut self, c: &Row, b: &Row, prompt: &str, entry: &mut serde_json::Value) -> Result<Judged> {
        let scores = match self {
            Scorer::Rule(rule) => {
                (f64::from(rule.score(prompt, c.completion())), f64::from(rule.score(prompt, b.completion())))
            }
            Scorer::Reward(judge) => {
                let raw_prompt = c.fields.get("prompt").cloned().unwrap_or_default();
                (judge.score(&raw_prompt, c.completion())?, judge.score(&raw_prompt, b.completion())?)
            }
            Scorer::Llm(judge) => {
                let j = judge.judge(prompt, c.completion(), b.completion())?;
                entry["candidate_position"] = json!(j.candidate_position);
                entry["judge_answer"] = json!(j.answer);
                entry["parsed"] = json!(j.parsed);
                return Ok(Judged { verdict: j.verdict, scores: None, unparseable: !j.parsed });
            }
        };
        entry["candidate_score"] = json!(scores.0);
        entry["baseline_score"] = json!(scores.1);
        Ok(Judged { verdict: by_score(scores.0, scores.1), scores: Some(scores), unparseable: false })
    }
}

/// Judge one candidate file against the baseline, prompt by prompt; the comparisons go to
/// `comparisons-NAME.jsonl`.
fn compare(
    name: String,
    path: &Path,
    baseline: &Path,
    base_rows: &[Row],
    scorer: &mut Scorer,
    output: &Path,
) -> Result<CandidateResult> {
    let rows = read_rows(path, true)?;
    let (pairs, unmatched) = pair_by_prompt(&rows, base_rows);
    if pairs.is_empty() {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            message: format!("no prompt of this file appears in the baseline {}", baseline.display()),
        });
    }
    let mut verdicts = Vec::with_capacity(pairs.len());
    let mut log = String::new();
    let (mut c_scores, mut b_scores) = (Vec::new(), Vec::new());
    let mut unparseable = 0;
    for &(i, j) in &pairs {
        let (c, b): (&Row, &Row) = (&rows[i], &base_rows[j]);
        let prompt = c.prompt_text();
        let mut entry = json!({"prompt": prompt, "candidate": c.completion(), "baseline": b.completion(),
                               "candidate_line": c.line, "baseline_line": b.line});
        let judged = scorer.judge(c, b, &prompt, &mut entry)?;
        if let Some((cs, bs)) = judged.scores {
            c_scores.push(cs);
            b_scores.push(bs);
        }
        unparseable += usize::from(judged.unparseable);
        entry["verdict"] = json!(judged.verdict);
        log.push_str(&entry.to_string());
        log.push('\n');
        verdicts.push(judged.verdict);
    }
    write_atomic(&output.join(format!("comparisons-{name}.jsonl")), log.as_bytes())?;
    let w = WinRate::from_verdicts(&verdicts);
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Ok(CandidateResult {
        name,
        file: path.to_path_buf(),
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
    })
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
