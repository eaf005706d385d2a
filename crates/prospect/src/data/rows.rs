//! Reading training rows from JSONL in TRL's standard (plain-text) formats:
//!
//! | format   | fields                                  |
//! |----------|-----------------------------------------|
//! | unpaired | `prompt`, `completion`, `label` (bool)  |
//! | paired   | `prompt`, `chosen`, `rejected`          |
//! | sft      | `prompt`, `completion`                  |
//!
//! The format is detected from the first row's fields, and every later row must have the same one.
//! Every error names the file, the 1-based line and the field. Blank lines are skipped; extra fields
//! are ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedRow {
    pub prompt: String,
    pub completion: String,
    /// `true` for desirable feedback.
    pub label: bool,
    /// 1-based line in the source file.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PairedRow {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SftRow {
    pub prompt: String,
    pub completion: String,
    pub line: usize,
}

/// The rows of one file, all in one format.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    Unpaired(Vec<UnpairedRow>),
    Paired(Vec<PairedRow>),
    Sft(Vec<SftRow>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    Unpaired,
    Paired,
    Sft,
}

impl std::fmt::Display for RowFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RowFormat::Unpaired => "unpaired (prompt, completion, label)",
            RowFormat::Paired => "paired (prompt, chosen, rejected)",
            RowFormat::Sft => "sft (prompt, completion)",
        })
    }
}

/// TRL's `unpair_preference_dataset` maps in blocks of this many pairs (the `datasets` default batch
/// size) and emits each block's chosen completions before its rejected ones.
pub const UNPAIR_BLOCK: usize = 1000;

impl Rows {
    pub fn format(&self) -> RowFormat {
        match self {
            Rows::Unpaired(_) => RowFormat::Unpaired,
            Rows::Paired(_) => RowFormat::Paired,
            Rows::Sft(_) => RowFormat::Sft,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Unpaired(r) => r.len(),
            Rows::Paired(r) => r.len(),
            Rows::Sft(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Paired rows as unpaired feedback: 2n rows, chosen → desirable, rejected → undesirable.
///
/// The order is TRL's, so `shuffle = false` runs match `KTOTrainer` on the same file: within each block
/// of [`UNPAIR_BLOCK`] pairs, all chosen rows in file order, then all rejected rows in file order.
pub fn unpair(pairs: &[PairedRow]) -> Vec<UnpairedRow> {
    let mut out = Vec::with_capacity(pairs.len() * 2);
    for block in pairs.chunks(UNPAIR_BLOCK) {
        for (completion, label) in [(true, true), (false, false)] {
            out.extend(block.iter().map(|p| UnpairedRow {
                prompt: p.prompt.clone(),
                completion: if completion { p.chosen.clone() } else { p.rejected.clone() },
                label,
                line: p.line,
            }));
        }
    }
    out
}

/// Read a JSONL file of rows.
pub fn read_jsonl(path: &Path) -> Result<Rows> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(&bytes, path)
}

/// Parse JSONL bytes; `path` is only used in error messages.
pub fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<Rows> {
    let err = |line: usize, message: String| Error::Data { path: path.to_path_buf(), line, message };
    let mut rows: Option<(Rows, usize)> = None;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw)
            .map_err(|e| err(line, format!("invalid UTF-8 at byte {} of the line", e.valid_up_to())))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| err(line, format!("malformed JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(err(line, format!("expected a JSON object per line, got {}", kind(&value))));
        };
        let format = detect(&obj).ok_or_else(|| {
            err(
                line,
                format!(
                    "cannot tell the row format from its fields {:?}; expected prompt+completion+label, \
                     prompt+chosen+rejected, or prompt+completion",
                    obj.keys().collect::<Vec<_>>()
                ),
            )
        })?;
        let field = |name: &str| -> Result<String> { string_field(&obj, name).map_err(|m| err(line, m)) };
        match &mut rows {
            None => {
                rows = Some((
                    match format {
                        RowFormat::Unpaired => Rows::Unpaired(vec![]),
                        RowFormat::Paired => Rows::Paired(vec![]),
                        RowFormat::Sft => Rows::Sft(vec![]),
                    },
                    line,
                ))
            }
            Some((r, first)) if r.format() != format => {
                return Err(err(
                    line,
                    format!("this row is {format}, but the file started as {} at line {first}", r.format()),
                ));
            }
            _ => {}
        }
        let Some((rows, _)) = rows.as_mut() else { unreachable!("set just above") };
        match rows {
            Rows::Unpaired(v) => {
                let label = match obj.get("label") {
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(err(line, format!("field `label` must be true or false, got {other}")))
                    }
                    None => unreachable!("detect() saw `label`"),
                };
                v.push(UnpairedRow { prompt: field("prompt")?, completion: field("completion")?, label, line })
            }
            Rows::Paired(v) => v.push(PairedRow {
                prompt: field("prompt")?,
                chosen: field("chosen")?,
                rejected: field("rejected")?,
                line,
            }),
            Rows::Sft(v) => v.push(SftRow { prompt: field("prompt")?, completion: field("completion")?, line }),
        }
    }
    match rows {
        Some((rows, _)) => Ok(rows),
        None => Err(Error::DataFile { path: path.to_path_buf(), message: "the file has no rows".into() }),
    }
}

fn detect(obj: &Map<String, Value>) -> Option<RowFormat> {
    let has = |k: &str| obj.contains_key(k);
    if has("chosen") || has("rejected") {
        Some(RowFormat::Paired)
    } else if has("label") {
        Some(RowFormat::Unpaired)
    } else if has("completion") || has("prompt") {
        Some(RowFormat::Sft)
    } else {
        None
    }
}

fn string_field(obj: &Map<String, Value>, name: &str) -> std::result::Result<String, String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field `{name}` must be a string, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected a string")),
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Rows> {
        parse_jsonl(text.as_bytes(), Path::new("feedback.jsonl"))
    }

    #[test]
    fn reads_each_format_and_skips_blank_lines() {
        let rows = parse("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n\n{\"prompt\":\"c\",\"completion\":\"d\",\"label\":false,\"extra\":1}\n").unwrap();
        assert_eq!(
            rows,
            Rows::Unpaired(vec![
                UnpairedRow { prompt: "a".into(), completion: "b".into(), label: true, line: 1 },
                UnpairedRow { prompt: "c".into(), completion: "d".into(), label: false, line: 3 },
            ])
        );
        let rows = parse("{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}").unwrap();
        assert_eq!(rows.format(), RowFormat::Paired);
        let rows = parse("{\"prompt\":\"p\",\"completion\":\"c\"}").unwrap();
        assert_eq!(rows, Rows::Sft(vec![SftRow { prompt: "p".into(), completion: "c".into(), line: 1 }]));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            ("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":\"yes\"}",
             "feedback.jsonl:1: field `label` must be true or false, got \"yes\""),
            ("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n{\"prompt\":\"a\",\"label\":false}",
             "feedback.jsonl:2: field `completion` is missing; expected a string"),
            ("{\"prompt\":\"a\",\"completion\":3,\"label\":true}",
             "feedback.jsonl:1: field `completion` must be a string, got the number 3"),
            ("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}",
             "feedback.jsonl:2: this row is paired (prompt, chosen, rejected), but the file started as unpaired (prompt, completion, label) at line 1"),
            ("\n\n", "feedback.jsonl: the file has no rows"),
            ("[1, 2]", "feedback.jsonl:1: expected a JSON object per line, got an array"),
            ("{\"text\":\"x\"}", "feedback.jsonl:1: cannot tell the row format"),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(got.starts_with(want), "got: {got}\nwant: {want}");
        }
        let got = parse("{\"prompt\": \"a\",").unwrap_err().to_string();
        assert!(got.starts_with("feedback.jsonl:1: malformed JSON"), "{got}");
        let got = parse_jsonl(b"{\"prompt\":\"a\",\"completion\":\"b\"}\n\xff\xfe", Path::new("f.jsonl")).unwrap_err().to_string();
        assert_eq!(got, "f.jsonl:2: invalid UTF-8 at byte 0 of the line");
    }

    #[test]
    fn unpairing_follows_trl_block_order() {
        let pairs: Vec<PairedRow> = (0..3)
            .map(|i| PairedRow { prompt: format!("p{i}"), chosen: format!("c{i}"), rejected: format!("r{i}"), line: i + 1 })
            .collect();
        let rows = unpair(&pairs);
        let seen: Vec<(&str, bool)> = rows.iter().map(|r| (r.completion.as_str(), r.label)).collect();
        assert_eq!(seen, vec![("c0", true), ("c1", true), ("c2", true), ("r0", false), ("r1", false), ("r2", false)]);
        assert_eq!(rows[4].prompt, "p1");
    }
}
