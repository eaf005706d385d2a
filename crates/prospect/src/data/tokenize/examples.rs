//! Rows → tokenized examples in the shape a loss trains on.
//!
//! Conversions between shapes: paired rows given to an unpaired loss (KTO) are unpaired into 2n rows
//! ([`crate::data::unpair`]); SFT trains on plain `prompt`/`completion` rows, on the desirable rows of
//! unpaired feedback, or on the chosen side of pairs. Rows whose prompt alone fills `max_length` are
//! dropped, as TRL drops them, and counted.

use std::path::Path;

use super::chat::ChatTemplate;
use super::{Encoder, Sequence, TokenizeReport};
use crate::data::rows::{unpair, Content, PairedRow, Rows, UnpairedRow};
use crate::data::Shape;
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

/// Tokenize `rows` for a loss that trains on `shape` data, with the tokenizer's own chat template for
/// conversational rows.
pub fn prepare(
    rows: Rows,
    shape: Shape,
    tok: &HfTokenizer,
    max_length: usize,
    path: &Path,
) -> Result<(Examples, PrepareReport)> {
    let template = if rows.is_conversational() { Some(ChatTemplate::for_tokenizer(tok, None)?) } else { None };
    prepare_with(rows, shape, Encoder { tok, template: template.as_ref() }, max_length, path)
}

/// Tokenize `rows` for a loss that trains on `shape` data with `encoder`.
pub fn prepare_with(
    rows: Rows,
    shape: Shape,
    encoder: Encoder,
    max_length: usize,
    path: &Path,
) -> Result<(Examples, PrepareReport)> {
    let mut report = PrepareReport { rows_read: rows.len(), ..Default::default() };
    let mut rows_tok = RowTokenizer { encoder, path, report: &mut report.tokenize };
    let examples = rows_tok.examples(rows, shape)?;
    report.rows_unused = match &examples {
        Examples::Sft(v) if shape == Shape::Sft => report.rows_read - v.len(),
        _ => 0,
    };
    let before = examples.len();
    // TRL drops rows whose prompt alone fills max_length.
    let fits = |s: &Sequence| s.prompt_ids.len() < max_length;
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

/// Rows of one file → sequences, with failures named by the row's file and line.
struct RowTokenizer<'a> {
    encoder: Encoder<'a>,
    path: &'a Path,
    report: &'a mut TokenizeReport,
}

impl RowTokenizer<'_> {
    /// A template or tokenizer failure at `line`.
    fn at(&self, line: usize, e: Error) -> Error {
        let path = self.path.to_path_buf();
        match e {
            Error::Template { origin, message } => {
                Error::Data { path, line, message: format!("chat template ({origin}): {message}") }
            }
            Error::Tokenizer(message) => Error::Data { path, line, message },
            other => other,
        }
    }

    fn seq(&mut self, prompt: &Content, completion: &Content, line: usize) -> Result<Sequence> {
        self.encoder.sequence(prompt, completion, self.report).map_err(|e| self.at(line, e))
    }

    fn pair(&mut self, p: &PairedRow) -> Result<PairedExample> {
        let (chosen, rejected) =
            self.encoder.pair(&p.prompt, &p.chosen, &p.rejected, self.report).map_err(|e| self.at(p.line, e))?;
        Ok(PairedExample { chosen, rejected })
    }

    fn unpaired(&mut self, rows: &[UnpairedRow]) -> Result<Examples> {
        let examples = rows
            .iter()
            .map(|r| Ok(UnpairedExample { seq: self.seq(&r.prompt, &r.completion, r.line)?, label: r.label }))
            .collect::<Result<_>>()?;
        Ok(Examples::Unpaired(examples))
    }

    /// The examples a loss that trains on `shape` data gets from `rows`: paired rows unpair for an
    /// unpaired loss; SFT takes plain rows, desirable rows, or the chosen side of pairs.
    fn examples(&mut self, rows: Rows, shape: Shape) -> Result<Examples> {
        let wrong = |want: &str, got: Shape| Error::DataFile {
            path: self.path.to_path_buf(),
            message: format!("this loss trains on {want}, but the file holds {got} rows"),
        };
        Ok(match (shape, rows) {
            (Shape::Unpaired, Rows::Unpaired(rows)) => self.unpaired(&rows)?,
            (Shape::Unpaired, Rows::Paired(pairs)) => self.unpaired(&unpair(&pairs))?,
            (Shape::Paired, Rows::Paired(pairs)) => {
                Examples::Paired(pairs.iter().map(|p| self.pair(p)).collect::<Result<_>>()?)
            }
            (Shape::Sft, Rows::Sft(rows)) => {
                Examples::Sft(rows.iter().map(|r| self.seq(&r.prompt, &r.completion, r.line)).collect::<Result<_>>()?)
            }
            (Shape::Sft, Rows::Unpaired(rows)) => Examples::Sft(
                rows.iter()
                    .filter(|r| r.label)
                    .map(|r| self.seq(&r.prompt, &r.completion, r.line))
                    .collect::<Result<_>>()?,
            ),
            (Shape::Sft, Rows::Paired(pairs)) => {
                Examples::Sft(pairs.iter().map(|p| self.seq(&p.prompt, &p.chosen, p.line)).collect::<Result<_>>()?)
            }
            (Shape::Paired, other) => return Err(wrong("pairs (prompt, chosen, rejected)", other.shape())),
            (Shape::Unpaired, other) => {
                return Err(wrong("unpaired feedback (prompt, completion, label) or pairs", other.shape()))
            }
        })
    }
}
