//! Parquet files as records: each row becomes a JSON object (lists of structs become arrays of
//! objects), numbered from 1. This is the layout the Hugging Face hub serves datasets in. Only the
//! Snappy codec (the `datasets` default) and uncompressed pages are built in, to keep the dependency
//! small; other codecs give an error that says so.

use std::path::Path;

use super::Record;
use crate::error::{Error, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};

pub fn records(bytes: &[u8], path: &Path) -> Result<Vec<Result<Record>>> {
    let file_err = |message: String| Error::DataFile { path: path.to_path_buf(), message };
    let reader = SerializedFileReader::new(bytes::Bytes::copy_from_slice(bytes))
        .map_err(|e| file_err(format!("cannot read Parquet: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| file_err(format!("cannot read Parquet rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        out.push(match row {
            Ok(row) => Ok(Record { line: i + 1, value: row.to_json_value() }),
            Err(e) => Err(Error::Data {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!(
                    "cannot decode this Parquet row: {e} (Prospect reads Snappy-compressed or uncompressed Parquet)"
                ),
            }),
        });
    }
    Ok(out)
}
