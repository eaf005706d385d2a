//! JSONL and JSON-array containers → records, with the line each record starts on. A key repeated in
//! one object, at any depth, is an error naming the key ([`Unique`]): serde_json keeps the last one
//! silently, which once flipped a row's label.

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::{data_err, Record};
use crate::error::Result;

/// A JSON value parsed like `serde_json::Value`, except that a key repeated within one object is an error.
struct Unique(Value);

const DUPLICATE: &str = "duplicate key";

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unique(value) = map.next_value()?;
            if obj.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "{DUPLICATE} `{key}`: each key may appear once per object (a JSON reader would keep only the last)"
                )));
            }
            obj.insert(key, value);
        }
        Ok(Value::Object(obj))
    }
}

/// One JSON value from text, duplicate keys rejected.
fn parse_unique(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str::<Unique>(text).map(|u| u.0)
}

/// serde_json's message without its " at line L column C" suffix, which is relative to the record.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let body = text.rfind(" at line ").map_or(text.as_str(), |i| &text[..i]);
    if body.starts_with(DUPLICATE) {
        return body.to_string();
    }
    match text.rfind(" at line ") {
        Some(_) => format!("malformed JSON: {body} (column {})", e.column()),
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
            parse_unique(text).map(|value| Record { line, value }).map_err(|e| data_err(path, line, json_message(&e))),
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
        let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Unique>();
        match stream.next() {
            Some(Ok(Unique(value))) => out.push(Ok(Record { line: start, value })),
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

    const ONCE: &str = ": each key may appear once per object (a JSON reader would keep only the last)";

    #[test]
    fn duplicate_keys_are_errors_at_any_depth() {
        let jsonl = b"{\"label\": true}\n{\"prompt\": \"p\", \"label\": true, \"label\": false}\n";
        let (_, recs) = records(jsonl, Path::new("f.jsonl")).unwrap();
        assert!(recs[0].is_ok());
        let err = recs[1].as_ref().unwrap_err().to_string();
        assert_eq!(err, format!("f.jsonl:2: duplicate key `label`{ONCE}"));
        // Nested: a message object with two `content` keys, in the third line of a JSON array.
        let array = b"[{\"a\": 1},\n {\"messages\": [{\"role\": \"user\",\n \"content\": \"x\", \"content\": \"y\"}]}]";
        let err = records(array, Path::new("f.json")).unwrap_err().to_string();
        assert_eq!(err, format!("f.json:3: duplicate key `content`{ONCE}"));
        // The same key in sibling objects is fine, and values keep their types.
        let (_, recs) = records(b"{\"a\": {\"k\": 1.5}, \"b\": {\"k\": [null, -2, \"s\"]}}", Path::new("f")).unwrap();
        let value = &recs[0].as_ref().unwrap().value;
        assert_eq!(value, &serde_json::json!({"a": {"k": 1.5}, "b": {"k": [null, -2, "s"]}}));
    }
}
