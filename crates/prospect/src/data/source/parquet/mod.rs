//! Parquet files as records: each row becomes a JSON object (lists of structs become arrays of
//! objects), numbered from 1. This is the layout the Hugging Face hub serves datasets in. Only the
//! Snappy codec (the `datasets` default) and uncompressed pages are built in, to keep the dependency
//! small; other codecs give an error that says so.
//!
//! Everything the parquet crate does happens behind one boundary (`isolate.rs`): a panic or a run past
//! the deadline is an error naming the file. Around it, the work is bounded from outside, since a corrupt
//! file can otherwise make the crate allocate without limit or yield errors forever:
//! 1. before the crate sees the footer, every Thrift list and string in it must fit in the footer
//!    (`thrift.rs`), so no count can size an allocation beyond the file;
//! 2. every column chunk must lie inside the file, and every page header in it must fit in its chunk,
//!    with an uncompressed size a Snappy page can reach (at most 32× its compressed size + 64: a Snappy
//!    copy of ≤ 64 bytes costs ≥ 2 bytes);
//! 3. rows are decoded up to the row groups' `num_rows`, within a budget of decoded bytes (64× the
//!    pages' uncompressed bytes + 256 MiB: dictionary pages legitimately repeat a string many times), and
//!    the first row that fails ends the read (the crate yields errors forever after one).

mod isolate;
mod thrift;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use super::Record;
use crate::error::{Error, Result};
use isolate::Outcome;
use thrift::Skim;

/// Extra decoded bytes a file may produce beyond 64× its pages' uncompressed size.
const DECODE_SLACK: usize = 256 << 20;
/// Page headers per byte of a column chunk: a header takes at least 3 bytes.
const MIN_PAGE_HEADER: usize = 3;

/// The records of a Parquet file; any failure names the file.
pub fn records(bytes: &[u8], path: &Path) -> Result<Vec<Result<Record>>> {
    let file_err = |message: String| Error::DataFile { path: path.to_path_buf(), message };
    let footer_len = check_footer(bytes).map_err(|m| file_err(format!("not a readable Parquet file: {m}")))?;
    let file = Bytes::copy_from_slice(bytes);
    let owned: PathBuf = path.to_path_buf();
    // A generous deadline, proportional to the size: 10 s + 2 s per MiB (decoding runs at tens of MiB/s).
    let deadline = Duration::from_secs(10) + Duration::from_secs(2 * (bytes.len() as u64 >> 20));
    match isolate::run(deadline, move || decode(file, footer_len, &owned)) {
        Outcome::Done(result) => result,
        Outcome::Panicked(m) => Err(file_err(format!(
            "the Parquet decoder failed on this file (the parquet crate panicked: {m}); the file is corrupt or \
             unsupported: write it again, e.g. with pandas' or datasets' to_parquet"
        ))),
        Outcome::TimedOut => Err(file_err(format!(
            "decoding this Parquet file did not finish within {} s; the file is probably corrupt (the decoding \
             thread is left behind until Prospect exits)",
            deadline.as_secs()
        ))),
        Outcome::NoThread(e) => Err(file_err(format!("cannot start the Parquet decoding thread: {e}"))),
    }
}

/// `PAR1` … footer, footer length (u32 LE), `PAR1`: the footer must fit and its Thrift must be bounded.
fn check_footer(bytes: &[u8]) -> std::result::Result<usize, String> {
    let n = bytes.len();
    if n < 12 || !bytes.ends_with(b"PAR1") {
        return Err(format!("{n} bytes, no `PAR1` at the end (truncated?)"));
    }
    let footer_len = u32::from_le_bytes([bytes[n - 8], bytes[n - 7], bytes[n - 6], bytes[n - 5]]) as usize;
    if footer_len > n - 12 {
        return Err(format!("the footer claims {footer_len} bytes in a file of {n}"));
    }
    let footer = &bytes[n - 8 - footer_len..n - 8];
    let mut skim = Skim::new(footer);
    skim.structure(0).map_err(|m| format!("footer metadata: {m}"))?;
    Ok(footer_len)
}

/// Checks metadata and page headers, then decodes the rows within the budget. Runs inside the boundary.
fn decode(file: Bytes, footer_len: usize, path: &Path) -> Result<Vec<Result<Record>>> {
    let file_err = |message: String| Error::DataFile { path: path.to_path_buf(), message };
    let data_end = file.len() - 8 - footer_len;
    let reader = SerializedFileReader::new(file.clone()).map_err(|e| file_err(format!("cannot read Parquet: {e}")))?;
    let (rows, uncompressed) =
        check_chunks(&reader, &file[..data_end]).map_err(|m| file_err(format!("corrupt Parquet file: {m}")))?;
    let budget = uncompressed.saturating_mul(64).saturating_add(DECODE_SLACK);
    let iter = reader.get_row_iter(None).map_err(|e| file_err(format!("cannot read Parquet rows: {e}")))?;
    let mut out = Vec::new();
    let mut decoded = 0usize;
    for (i, row) in iter.take(rows).enumerate() {
        let line = i + 1;
        let value = match row {
            Ok(row) => row.to_json_value(),
            // After one bad row the crate's iterator goes on yielding errors: the read ends here.
            Err(e) => {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line,
                    message: format!(
                        "cannot decode this Parquet row: {e}; the file is corrupt from here on (Prospect reads \
                         Snappy-compressed or uncompressed Parquet)"
                    ),
                })
            }
        };
        decoded = decoded.saturating_add(json_size(&value));
        if decoded > budget {
            return Err(file_err(format!(
                "row {line} takes the decoded rows past {budget} bytes, 64× the pages' {uncompressed} bytes + \
                 256 MiB; the file is corrupt or pathologically repetitive"
            )));
        }
        out.push(Ok(Record { line, value }));
    }
    Ok(out)
}

/// Every column chunk inside the data region, every page header inside its chunk with a size Snappy can
/// reach. Returns (total rows, total uncompressed page bytes).
fn check_chunks(reader: &SerializedFileReader<Bytes>, data: &[u8]) -> std::result::Result<(usize, usize), String> {
    let meta = reader.metadata();
    let columns = meta.file_metadata().schema_descr().num_columns();
    let (mut rows, mut uncompressed) = (0usize, 0usize);
    for (g, group) in meta.row_groups().iter().enumerate() {
        let n =
            usize::try_from(group.num_rows()).map_err(|_| format!("row group {g}: num_rows {}", group.num_rows()))?;
        rows = rows.saturating_add(n);
        if group.num_columns() != columns {
            return Err(format!("row group {g} has {} columns, the schema {columns}", group.num_columns()));
        }
        for (c, chunk) in group.columns().iter().enumerate() {
            let (start, len) = chunk.byte_range();
            let end = start.checked_add(len).filter(|&e| e <= data.len() as u64);
            let Some(end) = end else {
                return Err(format!(
                    "row group {g}, column {c} ({}): bytes {start}..+{len} lie outside the file's {} data bytes",
                    chunk.column_path(),
                    data.len()
                ));
            };
            let chunk_bytes = &data[start as usize..end as usize];
            let pages = check_pages(chunk_bytes)
                .map_err(|m| format!("row group {g}, column {c} ({}): {m}", chunk.column_path()))?;
            uncompressed = uncompressed.saturating_add(pages);
        }
    }
    Ok((rows, uncompressed))
}

/// Walks the page headers of one column chunk; returns the pages' total uncompressed size.
fn check_pages(chunk: &[u8]) -> std::result::Result<usize, String> {
    let (mut pos, mut total, mut pages) = (0usize, 0usize, 0usize);
    while pos < chunk.len() {
        pages += 1;
        if pages > chunk.len() / MIN_PAGE_HEADER + 1 {
            return Err("more page headers than the chunk can hold".into());
        }
        let mut skim = Skim::new(&chunk[pos..]);
        let ints = skim.structure(0).map_err(|m| format!("page header at chunk byte {pos}: {m}"))?;
        let size = |id: usize, name: &str| {
            ints[id]
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("page header at chunk byte {pos}: `{name}` is {:?}", ints[id]))
        };
        let (raw, packed) = (size(2, "uncompressed_page_size")?, size(3, "compressed_page_size")?);
        let next = pos + skim.pos;
        if packed > chunk.len() - next {
            return Err(format!(
                "a page of {packed} bytes at chunk byte {next} runs past the chunk's {} bytes",
                chunk.len()
            ));
        }
        if raw > packed.saturating_mul(32).saturating_add(64) {
            return Err(format!("a page of {packed} bytes claims {raw} bytes uncompressed, more than Snappy can give"));
        }
        total = total.saturating_add(raw);
        pos = next + packed;
    }
    Ok(total)
}

/// Roughly the memory a decoded value takes: its strings' bytes plus 16 per node.
fn json_size(value: &Value) -> usize {
    16 + match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(json_size).sum(),
        Value::Object(map) => map.iter().map(|(k, v)| k.len() + json_size(v)).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page header (compact Thrift): type (field 1), uncompressed size (2), compressed size (3), stop.
    fn page(raw: u32, packed: u32) -> Vec<u8> {
        let mut out = vec![0x15, 0x00];
        for v in [raw, packed] {
            out.push(0x15);
            let mut z = u64::from(v) << 1; // zigzag of a positive value
            while z >= 0x80 {
                out.push((z as u8) | 0x80);
                z >>= 7;
            }
            out.push(z as u8);
        }
        out.push(0);
        out.extend(vec![7u8; packed as usize]);
        out
    }

    #[test]
    fn page_headers_must_fit_their_chunk_and_snappy() {
        // Two pages: 4 → 100 and 10 → 10 bytes; 100 ≤ 32·4 + 64.
        let mut chunk = page(100, 4);
        chunk.extend(page(10, 10));
        assert_eq!(check_pages(&chunk), Ok(110));
        // 4 bytes cannot give 193 (> 32·4 + 64 = 192) with Snappy.
        assert_eq!(
            check_pages(&page(193, 4)),
            Err("a page of 4 bytes claims 193 bytes uncompressed, more than Snappy can give".into())
        );
        // The header (7 bytes: 2 + 2 + 2 + stop) claims 50 bytes; 4 follow.
        let mut short = page(50, 50);
        short.truncate(short.len() - 46);
        assert_eq!(
            check_pages(&short),
            Err("a page of 50 bytes at chunk byte 7 runs past the chunk's 11 bytes".into())
        );
    }

    #[test]
    fn the_footer_must_fit_the_file() {
        let mut file = b"PAR1".to_vec();
        file.extend(1000u32.to_le_bytes());
        file.extend(b"PAR1");
        assert_eq!(check_footer(&file), Err("the footer claims 1000 bytes in a file of 12".into()));
        assert_eq!(check_footer(b"PAR1PAR1"), Err("8 bytes, no `PAR1` at the end (truncated?)".into()));
        let err = records(b"PAR1\x19\xfc\x80\x80\x80\x80\x08\x07\0\0\0PAR1", Path::new("f.parquet")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.parquet: not a readable Parquet file: footer metadata: a Thrift list or string claims 2147483648 \
             items where 0 bytes are left"
        );
    }
}
