//! The JSONL files `prospect generate` reads and writes and `prospect eval` compares.
//!
//! Prompt files: one object per line with a `prompt` (a string; conversational prompts are a list of
//! `{role, content}` messages) plus any other fields, which are carried through to the output.
//! Generation files: the same rows with `completion` added.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One row of a prompt or generation file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The whole JSON object, so other fields travel through.
    pub fields: Map<String, Value>,
    /// 1-based line.
    pub line: usize,
}

impl Row {
    /// The prompt as text: a string as is; messages as `role: content` lines (for judges and matching).
    pub fn prompt_text(&self) -> String {
        match self.fields.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(msgs)) => msgs
                .iter()
                .map(|m| format!("{}: {}", m["role"].as_str().unwrap_or(""), m["content"].as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        }
    }

    pub fn completion(&self) -> &str {
        self.fields.get("completion").and_then(Value::as_str).unwrap_or("")
    }
}

/// Read rows that must have a `prompt` (string or message list) and, when `need_completion`, a string
/// `completion`. Errors name the file and line.
pub fn read_rows(path: &Path, need_completion: bool) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let err = |line: usize, message: String| Error::Data { path: path.to_path_buf(), line, message };
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text =
            std::str::from_utf8(raw).map_err(|e| err(line, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| err(line, format!("malformed JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(err(line, "expected a JSON object per line".into()));
        };
        match fields.get("prompt") {
            Some(Value::String(_)) => {}
            Some(Value::Array(msgs)) if msgs.iter().all(|m| m["role"].is_string() && m["content"].is_string()) => {}
            Some(_) => {
                return Err(err(line, "field `prompt` must be a string or a list of {role, content} messages".into()))
            }
            None => return Err(err(line, "field `prompt` is missing; expected a string or a list of messages".into())),
        }
        if need_completion && !fields.get("completion").is_some_and(Value::is_string) {
            return Err(err(line, "field `completion` is missing or not a string (expected a generation file)".into()));
        }
        rows.push(Row { fields, line });
    }
    if rows.is_empty() {
        return Err(Error::DataFile { path: path.to_path_buf(), message: "the file has no rows".into() });
    }
    Ok(rows)
}

/// Match candidate rows with baseline rows by prompt: the k-th occurrence of a prompt in one file goes
/// with its k-th occurrence in the other (several samples per prompt pair up in order). Returns the
/// index pairs and the number of candidate rows with no baseline partner.
pub fn pair_by_prompt(candidate: &[Row], baseline: &[Row]) -> (Vec<(usize, usize)>, usize) {
    let mut pool: std::collections::HashMap<String, std::collections::VecDeque<usize>> = Default::default();
    for (j, r) in baseline.iter().enumerate() {
        pool.entry(r.prompt_text()).or_default().push_back(j);
    }
    let mut pairs = Vec::new();
    let mut unmatched = 0;
    for (i, r) in candidate.iter().enumerate() {
        match pool.get_mut(&r.prompt_text()).and_then(|q| q.pop_front()) {
            Some(j) => pairs.push((i, j)),
            None => unmatched += 1,
        }
    }
    (pairs, unmatched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str, need: bool) -> Result<Vec<Row>> {
        let dir = std::env::temp_dir().join(format!("prospect-files-{}-{}", std::process::id(), text.len()));
        std::fs::write(&dir, text).unwrap();
        let r = read_rows(&dir, need);
        std::fs::remove_file(&dir).unwrap();
        r
    }

    #[test]
    fn pairs_samples_in_order_and_counts_strays() {
        let c = rows("{\"prompt\":\"a\",\"completion\":\"1\"}\n{\"prompt\":\"a\",\"completion\":\"2\"}\n{\"prompt\":\"z\",\"completion\":\"3\"}\n", true).unwrap();
        let b =
            rows("{\"prompt\":\"a\",\"completion\":\"x\"}\n\n{\"prompt\":\"a\",\"completion\":\"y\"}\n", true).unwrap();
        let (pairs, unmatched) = pair_by_prompt(&c, &b);
        assert_eq!(pairs, vec![(0, 0), (1, 1)]);
        assert_eq!(unmatched, 1);
        assert_eq!(b[1].line, 3);
    }

    #[test]
    fn bad_rows_name_the_line() {
        let e = rows("{\"prompt\":\"a\"}\n{\"prompt\":3}\n", false).unwrap_err().to_string();
        assert!(e.ends_with(":2: field `prompt` must be a string or a list of {role, content} messages"), "{e}");
        let e = rows("{\"prompt\":\"a\"}\n", true).unwrap_err().to_string();
        assert!(e.contains(":1: field `completion` is missing"), "{e}");
        let msgs = rows("{\"prompt\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n", false).unwrap();
        assert_eq!(msgs[0].prompt_text(), "user: hi");
    }
}
