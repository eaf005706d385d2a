//! Reading a data file into records (JSON objects with their line numbers), then into rows.
//!
//! Containers: JSONL (one object per line, blank lines skipped), a JSON array of objects, or Parquet
//! (the layout the Hugging Face hub serves; each row becomes a JSON object). The container is told
//! from the bytes: Parquet's `PAR1` magic, a leading `[`, or else JSONL.
//!
//! Line numbers are 1-based: the line of a JSONL row, the line where a JSON array element starts, or
//! the row number in a Parquet file. What the fields mean is `formats.rs`'s business.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::formats::{self, DataFormat, LabelFrom};
use super::rows::Rows;
use crate::error::{Error, Result};

/// One JSON object of a data file, with where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub line: usize,
    pub value: Value,
}

/// The file container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Container {
    Jsonl,
    JsonArray,
    Parquet,
}

impl std::fmt::Display for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Container::Jsonl => "JSONL",
            Container::JsonArray => "JSON array",
            Container::Parquet => "Parquet",
        })
    }
}

/// How to read rows: the layout (detected when `None`), scores to labels, and whether bad rows are
/// skipped (and counted) instead of stopping the read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOptions {
    pub format: Option<DataFormat>,
    pub label_from: Option<LabelFrom>,
    pub skip_invalid: bool,
}

/// What reading a file found, for the run log and `prospect data inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadReport {
    pub container: Container,
    pub format: DataFormat,
    /// Records (JSON objects / Parquet rows) in the file.
    pub records: usize,
    /// Bad records skipped under `skip_invalid`, with their errors (`FILE:LINE: ...`).
    pub skipped: Vec<String>,
    /// Records the layout's own rule leaves out (SHP score ratio < 2, UltraFeedback ties, ...).
    pub filtered: usize,
    /// Why they were left out.
    pub filter_rule: Option<&'static str>,
    /// The score threshold `label_from` used, once resolved (`mean` and `median` become numbers).
    pub label_threshold: Option<f64>,
}

/// Read and convert a data file.
pub fn read_rows(path: &Path, options: &ReadOptions) -> Result<(Rows, ReadReport)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_rows(&bytes, path, options)
}

/// Convert the bytes of a data file; `path` is only used in messages.
pub fn parse_rows(bytes: &[u8], path: &Path, options: &ReadOptions) -> Result<(Rows, ReadReport)> {
    let (container, records) = records(bytes, path)?;
    formats::convert(container, records, path, options)
}

/// The records of a file. A record that cannot be parsed is an `Err` in place (so `skip_invalid` can
/// skip it); a file that cannot be read at all is an `Err` for the whole.
pub fn records(bytes: &[u8], path: &Path) -> Result<(Container, Vec<Result<Record>>)> {
    if bytes.starts_with(b"PAR1") {
        return Ok((Container::Parquet, super::parquet::records(bytes, path)?));
    }
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        return Ok((Container::JsonArray, json_array(body, path)?));
    }
    Ok((Container::Jsonl, jsonl(body, path)))
}

fn data_err(path: &Path, line: usize, message: String) -> Error {
    Error::Data { path: path.to_path_buf(), line, message }
}

/// serde_json's message without its " at line L column C" suffix, which is relative to the record.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => format!("malformed JSON: {} (column {})", &text[..i], e.column()),
        None => format!("malformed JSON: {text}"),
    }
}

fn jsonl(bytes: &[u8], path: &Path) -> Vec<Result<Record>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                out.push(Err(data_err(
                    path,
                    line,
                    format!("invalid UTF-8 at byte {} of the line; the file must be UTF-8 text", e.valid_up_to()),
                )));
                continue;
            }
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str::<Value>(text)
                .map(|value| Record { line, value })
                .map_err(|e| data_err(path, line, json_message(&e))),
        );
    }
    out
}

fn json_array(bytes: &[u8], path: &Path) -> Result<Vec<Result<Record>>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        data_err(path, line, "invalid UTF-8; the file must be UTF-8 text".into())
    })?;
    // Line numbers are counted incrementally (positions only move forward), so a large array stays linear.
    let (mut seen, mut lines_before) = (0usize, 0usize);
    let mut line_at = |pos: usize| {
        let pos = pos.min(text.len());
        lines_before += text.as_bytes()[seen.min(pos)..pos].iter().filter(|&&b| b == b'\n').count();
        seen = seen.max(pos);
        lines_before + 1
    };
    let skip_ws = |mut pos: usize| {
        while pos < text.len() && text.as_bytes()[pos].is_ascii_whitespace() {
            pos += 1;
        }
        pos
    };
    let mut pos = skip_ws(0) + 1; // past '['
    let mut out = Vec::new();
    loop {
        pos = skip_ws(pos);
        if text.as_bytes().get(pos) == Some(&b']') && out.is_empty() {
            pos += 1;
            break;
        }
        let start = line_at(pos);
        let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => out.push(Ok(Record { line: start, value })),
            Some(Err(e)) => return Err(data_err(path, start + e.line().saturating_sub(1), json_message(&e))),
            None => return Err(data_err(path, start, "malformed JSON: the array is not closed with `]`".into())),
        }
        pos = skip_ws(pos + stream.byte_offset());
        match text.as_bytes().get(pos) {
            Some(b',') => pos += 1,
            Some(b']') => {
                pos += 1;
                break;
            }
            _ => {
                return Err(data_err(
                    path,
                    line_at(pos.min(text.len())),
                    "malformed JSON: expected `,` or `]` after an array element".into(),
                ))
            }
        }
    }
    if skip_ws(pos) < text.len() {
        return Err(data_err(path, line_at(skip_ws(pos)), "malformed JSON: text after the closing `]`".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_array_elements_keep_their_lines() {
        let text = b"[\n  {\"a\": 1},\n\n  {\"a\":\n 2}\n]\n";
        let (container, recs) = records(text, Path::new("x.json")).unwrap();
        assert_eq!(container, Container::JsonArray);
        let lines: Vec<usize> = recs.iter().map(|r| r.as_ref().unwrap().line).collect();
        assert_eq!(lines, vec![2, 4]);
        assert!(records(b"[]", Path::new("x.json")).unwrap().1.is_empty());
    }

    #[test]
    fn json_array_errors_point_at_the_element() {
        let err = records(b"[\n{\"a\": 1},\n{\"a\": }\n]", Path::new("x.json")).unwrap_err().to_string();
        assert_eq!(err, "x.json:3: malformed JSON: expected value (column 7)");
        let err = records(b"[{\"a\": 1} {\"a\": 2}]", Path::new("x.json")).unwrap_err().to_string();
        assert_eq!(err, "x.json:1: malformed JSON: expected `,` or `]` after an array element");
        let err = records(b"[{\"a\": 1}\n", Path::new("x.json")).unwrap_err().to_string();
        assert_eq!(err, "x.json:2: malformed JSON: expected `,` or `]` after an array element");
        let err = records(b"[\n{\"a\": \"\xff\"}]", Path::new("x.json")).unwrap_err().to_string();
        assert_eq!(err, "x.json:2: invalid UTF-8; the file must be UTF-8 text");
    }
}
