//! Conversational prompts for generation. Rendering with the model's chat template arrives with the
//! conversational data formats; until then a conversational prompt is a clear error, not a guess.

use std::path::Path;

use crate::error::{Error, Result};
use crate::eval::files::Row;
use crate::model::HfTokenizer;

/// Token ids of a conversational prompt, rendered with `add_generation_prompt`.
pub fn prompt_ids(_tok: &HfTokenizer, row: &Row, model_dir: &Path) -> Result<Vec<u32>> {
    Err(Error::Data {
        path: model_dir.to_path_buf(),
        line: row.line,
        message: "conversational prompts are not supported by this build yet; give `prompt` as a string".into(),
    })
}
