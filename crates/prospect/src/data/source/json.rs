//! JSONL and JSON-array containers → records, with the line each record starts on.

use std::path::Path;

use serde_json::Value;

use super::{data_err, Record};
use crate::error::Result;

/// serde_json's message without its " at line L column C" suffix, which is relative to the record.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => format!("malformed JSON: {} (column {})", &text[..i], e.column()),
        None => format!("malformed JSON: {text}"),
    }
}

pub(super) fn jsonl(bytes: &[u8], path: &Path) -> Vec<Result<Record>> {
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

pub(super) fn json_array(bytes: &[u8], path: &Path) -> Result<Vec<Result<Record>>> {
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
    use super::super::{records, Container};
    use std::path::Path;

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
