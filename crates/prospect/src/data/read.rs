//! The front of the pipeline in one call: a file's bytes (source) → records → rows in TRL's shapes
//! (layout). [`read_jsonl`] is the short path for a file already in TRL's format.

use std::path::Path;

use super::layout;
pub use super::layout::{ReadOptions, ReadReport};
use super::rows::Rows;
pub use super::source::{records, Container, Record};
use crate::error::{Error, Result};

/// Read and convert a data file, or the feedback database a `sqlite://` URL names (its thumbs as TRL's
/// conversational unpaired rows, [`crate::feedback::export_jsonl`]; "line" N is the N-th thumb).
pub fn read_rows(path: &Path, options: &ReadOptions) -> Result<(Rows, ReadReport)> {
    let bytes = read_bytes(path)?;
    parse_rows(&bytes, path, options)
}

/// The bytes of a data file, or of a feedback database's export.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let text = path.to_string_lossy();
    if crate::feedback::DbUrl::is_db(&text) {
        return crate::feedback::export_jsonl(&crate::feedback::DbUrl::parse(&text)?);
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Convert the bytes of a data file; `path` is only used in messages.
pub fn parse_rows(bytes: &[u8], path: &Path, options: &ReadOptions) -> Result<(Rows, ReadReport)> {
    let (container, records) = records(bytes, path)?;
    layout::convert(container, records, path, options)
}

/// Read a file of rows in TRL's format (JSONL, a JSON array or Parquet), every row valid.
pub fn read_jsonl(path: &Path) -> Result<Rows> {
    Ok(read_rows(path, &ReadOptions::default())?.0)
}

/// Parse JSONL bytes in TRL's format; `path` is only used in error messages.
pub fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<Rows> {
    Ok(parse_rows(bytes, path, &ReadOptions::default())?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rows::{SftRow, UnpairedRow};
    use crate::data::Shape;

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
        assert_eq!(rows.shape(), Shape::Paired);
        let rows = parse("{\"prompt\":\"p\",\"completion\":\"c\"}").unwrap();
        assert_eq!(rows, Rows::Sft(vec![SftRow { prompt: "p".into(), completion: "c".into(), line: 1 }]));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            ("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":\"yes\"}",
             "feedback.jsonl:1: field `label` must be true or false, got the string \"yes\""),
            ("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n{\"prompt\":\"a\",\"label\":false}",
             "feedback.jsonl:2: field `completion` is missing; expected a string or a list of {role, content} messages"),
            ("{\"prompt\":\"a\",\"completion\":3,\"label\":true}",
             "feedback.jsonl:1: field `completion` must be a string or a list of {role, content} messages, got the number 3"),
            ("{\"prompt\":\"a\",\"completion\":\"b\",\"label\":true}\n{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}",
             "feedback.jsonl:2: this row is TRL paired (prompt, chosen, rejected), but the file started as TRL unpaired (prompt, completion, label) at line 1"),
            ("\n\n", "feedback.jsonl: the file has no rows"),
            ("[1, 2]", "feedback.jsonl:1: expected a JSON object per row, got the number 1"),
            ("{\"text\":\"x\"}", "feedback.jsonl:1: cannot tell the data format from the fields [\"text\"]"),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(got.starts_with(want), "got: {got}\nwant: {want}");
        }
        let got = parse("{\"prompt\": \"a\",").unwrap_err().to_string();
        assert!(got.starts_with("feedback.jsonl:1: malformed JSON"), "{got}");
        let got = parse_jsonl(b"{\"prompt\":\"a\",\"completion\":\"b\"}\n\xff\xfe", Path::new("f.jsonl"))
            .unwrap_err()
            .to_string();
        assert_eq!(got, "f.jsonl:2: invalid UTF-8 at byte 0 of the line; the file must be UTF-8 text");
    }
}
