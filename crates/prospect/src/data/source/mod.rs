//! Stage 1, source: the bytes of a data file → records (JSON objects with the line they start on).
//!
//! Containers: JSONL (one object per line, blank lines skipped), a JSON array of objects, or Parquet
//! (the layout the Hugging Face hub serves; each row becomes a JSON object). The container is told
//! from the bytes: Parquet's `PAR1` magic, a leading `[`, or else JSONL.
//!
//! Line numbers are 1-based: the line of a JSONL row, the line where a JSON array element starts, or
//! the row number in a Parquet file. What the fields mean is the layout stage's business
//! (`data/layout/`); this stage knows nothing of prompts or labels.

mod json;
mod parquet;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// The records of a file. A record that cannot be parsed is an `Err` in place (so `skip_invalid` can
/// skip it); a file that cannot be read at all is an `Err` for the whole.
pub fn records(bytes: &[u8], path: &Path) -> Result<(Container, Vec<Result<Record>>)> {
    if bytes.starts_with(b"PAR1") {
        return Ok((Container::Parquet, parquet::records(bytes, path)?));
    }
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        return Ok((Container::JsonArray, json::json_array(body, path)?));
    }
    Ok((Container::Jsonl, json::jsonl(body, path)))
}

fn data_err(path: &Path, line: usize, message: String) -> Error {
    Error::Data { path: path.to_path_buf(), line, message }
}
