//! `prospect data inspect` and `prospect data convert`, computed here and printed by the binary:
//! what a file holds (layout, rows, label balance), how long its prompts and completions are in a
//! model's tokens, what `max_length` would cut or drop, and the λ that KTO's class balance calls for.

use std::path::{Path, PathBuf};

use super::balance::{balanced_weights, single_class_warning};
use super::layout::{DataFormat, ReadOptions, ReadReport};
use super::read::read_rows;
use super::rows::Rows;
use super::source::Container;
use super::tokenize::chat::ChatTemplate;
use super::tokenize::{Encoder, Sequence, TokenizeReport};
use super::Shape;
use crate::error::{Error, Result};
use crate::model::HfTokenizer;

/// Nearest-rank percentiles of a length distribution, in tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub min: usize,
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
    pub mean: f64,
}

impl Percentiles {
    /// `None` for an empty sample. The p-th percentile is the value at rank ⌈p·n⌉ (1-based).
    pub fn of(values: &[usize]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            min: v[0],
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<usize>() as f64 / v.len() as f64,
        })
    }
}

/// Token lengths under a model's tokenizer (and chat template, for conversations).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLengths {
    pub prompt: Percentiles,
    /// Every completion: for pairs, the chosen and the rejected one.
    pub completion: Percentiles,
    pub max_length: usize,
    /// Rows whose prompt + completion exceeds `max_length` (cut at the end), prompt shorter than it.
    pub truncated: usize,
    /// Rows whose prompt alone fills `max_length` (dropped, as TRL drops them).
    pub dropped: usize,
    /// Rows whose tokenized prompt is not a prefix of prompt + completion.
    pub prompt_not_prefix: usize,
}

/// What `prospect data inspect` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub path: PathBuf,
    pub container: Container,
    pub format: DataFormat,
    pub shape: Shape,
    pub conversational: bool,
    pub rows: usize,
    pub read: ReadReport,
    /// Desirable / undesirable rows as KTO sees them (paired rows unpair into one of each).
    pub desirable: Option<usize>,
    pub undesirable: Option<usize>,
    /// (λ_D, λ_U) that `auto_weights` would choose for KTO; `None` with one class only.
    pub recommended_weights: Option<(f64, f64)>,
    /// Set when the rows have one KTO class only: no class weight can balance them.
    pub class_warning: Option<String>,
    pub tokens: Option<TokenLengths>,
}

/// Inspect a data file; with a tokenizer, also measure token lengths against `max_length`.
pub fn inspect(
    path: &Path,
    options: &ReadOptions,
    tok: Option<&HfTokenizer>,
    chat_template: Option<&Path>,
    max_length: usize,
) -> Result<Inspection> {
    let (rows, read) = read_rows(path, options)?;
    let (desirable, undesirable) = match &rows {
        Rows::Unpaired(v) => {
            let nd = v.iter().filter(|r| r.label).count();
            (Some(nd), Some(v.len() - nd))
        }
        Rows::Paired(v) => (Some(v.len()), Some(v.len())),
        Rows::Sft(_) => (None, None),
    };
    let (recommended_weights, class_warning) = match (desirable, undesirable) {
        (Some(nd), Some(nu)) => (balanced_weights(nd, nu), single_class_warning(nd, nu)),
        _ => (None, None),
    };
    let tokens = match tok {
        Some(tok) => Some(token_lengths(&rows, tok, chat_template, max_length, path)?),
        None => None,
    };
    Ok(Inspection {
        path: path.to_path_buf(),
        container: read.container,
        format: read.format,
        shape: rows.shape(),
        conversational: rows.is_conversational(),
        rows: rows.len(),
        read,
        desirable,
        undesirable,
        recommended_weights,
        class_warning,
        tokens,
    })
}

fn token_lengths(
    rows: &Rows,
    tok: &HfTokenizer,
    chat_template: Option<&Path>,
    max_length: usize,
    path: &Path,
) -> Result<TokenLengths> {
    let template = if rows.is_conversational() || chat_template.is_some() {
        Some(ChatTemplate::for_tokenizer(tok, chat_template)?)
    } else {
        None
    };
    let encoder = Encoder { tok, template: template.as_ref() };
    let mut report = TokenizeReport::default();
    let (mut prompts, mut completions) = (vec![], vec![]);
    let (mut truncated, mut dropped) = (0, 0);
    let mut count = |sides: &[&Sequence], prompts: &mut Vec<usize>, completions: &mut Vec<usize>| {
        prompts.push(sides[0].prompt_ids.len());
        completions.extend(sides.iter().map(|s| s.completion_ids.len()));
        if sides[0].prompt_ids.len() >= max_length {
            dropped += 1;
        } else if sides.iter().any(|s| s.len() > max_length) {
            truncated += 1;
        }
    };
    match rows {
        Rows::Unpaired(v) => {
            for r in v {
                let s =
                    encoder.sequence(&r.prompt, &r.completion, &mut report).map_err(|e| at_line(e, path, r.line))?;
                count(&[&s], &mut prompts, &mut completions);
            }
        }
        Rows::Sft(v) => {
            for r in v {
                let s =
                    encoder.sequence(&r.prompt, &r.completion, &mut report).map_err(|e| at_line(e, path, r.line))?;
                count(&[&s], &mut prompts, &mut completions);
            }
        }
        Rows::Paired(v) => {
            for r in v {
                let (c, j) = encoder
                    .pair(&r.prompt, &r.chosen, &r.rejected, &mut report)
                    .map_err(|e| at_line(e, path, r.line))?;
                count(&[&c, &j], &mut prompts, &mut completions);
            }
        }
    }
    let (Some(prompt), Some(completion)) = (Percentiles::of(&prompts), Percentiles::of(&completions)) else {
        return Err(Error::DataFile { path: path.to_path_buf(), message: "no rows to measure".into() });
    };
    Ok(TokenLengths { prompt, completion, max_length, truncated, dropped, prompt_not_prefix: report.prompt_not_prefix })
}

/// A template or tokenizer failure on one row, with the row's place in the file.
fn at_line(e: Error, path: &Path, line: usize) -> Error {
    match e {
        Error::Template { message, .. } | Error::Tokenizer(message) => {
            Error::Data { path: path.to_path_buf(), line, message }
        }
        other => other,
    }
}

/// Read `input` in any supported layout and write it to `output` as canonical JSONL (TRL's format).
/// Returns the number of rows written and what reading found.
pub fn convert(input: &Path, output: &Path, options: &ReadOptions) -> Result<(usize, ReadReport)> {
    let (rows, report) = read_rows(input, options)?;
    crate::fsio::write_atomic(output, rows.to_jsonl().as_bytes())?;
    Ok((rows.len(), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        // numpy.percentile(range(1, 101), [50, 90, 99], method="inverted_cdf") == [50, 90, 99]
        let v: Vec<usize> = (1..=100).collect();
        let p = Percentiles::of(&v).unwrap();
        assert_eq!((p.min, p.p50, p.p90, p.p99, p.max), (1, 50, 90, 99, 100));
        assert_eq!(p.mean, 50.5);
        let p = Percentiles::of(&[7]).unwrap();
        assert_eq!((p.p50, p.p99), (7, 7));
        assert!(Percentiles::of(&[]).is_none());
    }
}
