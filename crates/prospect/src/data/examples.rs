//! Rows → tokenized examples in the shape a loss trains on.
//!
//! Conversions between shapes: paired rows given to an unpaired loss (KTO) are unpaired into 2n rows
//! ([`super::unpair`]); SFT trains on plain `prompt`/`completion` rows, on the desirable rows of
//! unpaired feedback, or on the chosen side of pairs. Rows whose prompt alone fills `max_length` are
//! dropped, as TRL drops them, and counted.

use std::path::Path;

use super::chat::ChatTemplate;
use super::rows::Content;
use super::rows::{unpair, Rows};
use super::tokenize::{Encoder, Sequence, TokenizeReport};
use crate::data::Shape as DataKind;
use crate::error::{Error, Result};
use crate::model::HfTokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpairedExample {
    pub seq: Sequence,
    /// `true`: desirable.
    pub label: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedExample {
    pub chosen: Sequence,
    pub rejected: Sequence,
}

/// Tokenized training examples, one variant per data shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Examples {
    Unpaired(Vec<UnpairedExample>),
    Paired(Vec<PairedExample>),
    Sft(Vec<Sequence>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Unpaired(v) => v.len(),
            Examples::Paired(v) => v.len(),
            Examples::Sft(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What preparing the data did, for the run log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareReport {
    /// Rows in the file.
    pub rows_read: usize,
    /// Rows left out because the loss does not train on them (e.g. undesirable rows for SFT).
    pub rows_unused: usize,
    /// Examples dropped because the prompt alone fills `max_length`.
    pub dropped_long_prompt: usize,
    pub tokenize: TokenizeReport,
}

/// Tokenize `rows` for a loss that trains on `kind` data, with the tokenizer's own chat template for
/// conversational rows.
pub fn prepare(
    rows: Rows,
    kind: DataKind,
    tok: &HfTokenizer,
    max_length: usize,
    path: &Path,
) -> Result<(Examples, PrepareReport)> {
    let template = if rows.is_conversational() { Some(ChatTemplate::for_tokenizer(tok, None)?) } else { None };
    prepare_with(rows, kind, Encoder { tok, template: template.as_ref() }, max_length, path)
}

/// Tokenize `rows` for a loss that trains on `kind` data with `encoder`.
pub fn prepare_with(
    rows: Rows,
    kind: DataKind,
    encoder: Encoder,
    max_length: usize,
    path: &Path,
) -> Result<(Examples, PrepareReport)> {
    let mut report = PrepareReport { rows_read: rows.len(), ..Default::default() };
    let mut pair_report = TokenizeReport::default();
    // A template or tokenizer failure names the row's file and line.
    let at = |line: usize| {
        move |e: Error| match e {
            Error::Template { origin, message } => {
                Error::Data { path: path.to_path_buf(), line, message: format!("chat template ({origin}): {message}") }
            }
            Error::Tokenizer(message) => Error::Data { path: path.to_path_buf(), line, message },
            other => other,
        }
    };
    let mut seq = |prompt: &Content, completion: &Content, line: usize| {
        encoder.sequence(prompt, completion, &mut report.tokenize).map_err(at(line))
    };
    let fits = |s: &Sequence| s.prompt_ids.len() < max_length;
    let examples = match (kind, rows) {
        (DataKind::Unpaired, Rows::Unpaired(rows)) => unpaired(&rows, &mut seq)?,
        (DataKind::Unpaired, Rows::Paired(pairs)) => unpaired(&unpair(&pairs), &mut seq)?,
        (DataKind::Paired, Rows::Paired(pairs)) => Examples::Paired(
            pairs
                .iter()
                .map(|p| {
                    let (chosen, rejected) = encoder.pair(&p.prompt, &p.chosen, &p.rejected, &mut pair_report).map_err(at(p.line))?;
                    Ok(PairedExample { chosen, rejected })
                })
                .collect::<Result<_>>()?,
        ),
        (DataKind::Sft, Rows::Sft(rows)) => {
            Examples::Sft(rows.iter().map(|r| seq(&r.prompt, &r.completion, r.line)).collect::<Result<_>>()?)
        }
        (DataKind::Sft, Rows::Unpaired(rows)) => Examples::Sft(
            rows.iter().filter(|r| r.label).map(|r| seq(&r.prompt, &r.completion, r.line)).collect::<Result<_>>()?,
        ),
        (DataKind::Sft, Rows::Paired(pairs)) => {
            Examples::Sft(pairs.iter().map(|p| seq(&p.prompt, &p.chosen, p.line)).collect::<Result<_>>()?)
        }
        (DataKind::Paired, other) => {
            return Err(Error::DataFile {
                path: path.to_path_buf(),
                message: format!(
                    "this loss trains on pairs (prompt, chosen, rejected), but the file holds {} rows",
                    other.format()
                ),
            })
        }
        (DataKind::Unpaired, other) => {
            return Err(Error::DataFile {
                path: path.to_path_buf(),
                message: format!(
                    "this loss trains on unpaired feedback (prompt, completion, label) or pairs, but the file holds {} rows",
                    other.format()
                ),
            })
        }
    };
    report.tokenize.prompt_not_prefix += pair_report.prompt_not_prefix;
    if report.tokenize.first_mismatch.is_none() {
        report.tokenize.first_mismatch = pair_report.first_mismatch;
    }
    report.rows_unused = match &examples {
        Examples::Sft(v) if kind == DataKind::Sft => report.rows_read - v.len(),
        _ => 0,
    };
    let before = examples.len();
    let examples = match examples {
        Examples::Unpaired(v) => Examples::Unpaired(v.into_iter().filter(|e| fits(&e.seq)).collect()),
        Examples::Paired(v) => {
            Examples::Paired(v.into_iter().filter(|e| fits(&e.chosen) && fits(&e.rejected)).collect())
        }
        Examples::Sft(v) => Examples::Sft(v.into_iter().filter(|s| fits(s)).collect()),
    };
    report.dropped_long_prompt = before - examples.len();
    if examples.is_empty() {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            message: format!(
                "no usable examples: {} rows read, {} dropped because the prompt alone fills max_length = {max_length}",
                report.rows_read, report.dropped_long_prompt
            ),
        });
    }
    Ok((examples, report))
}

fn unpaired(
    rows: &[super::rows::UnpairedRow],
    seq: &mut impl FnMut(&Content, &Content, usize) -> Result<Sequence>,
) -> Result<Examples> {
    Ok(Examples::Unpaired(
        rows.iter()
            .map(|r| Ok(UnpairedExample { seq: seq(&r.prompt, &r.completion, r.line)?, label: r.label }))
            .collect::<Result<_>>()?,
    ))
}
