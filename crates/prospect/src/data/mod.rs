//! Data: files in the layouts feedback comes in, rows in TRL's shapes, token ids as TRL makes them,
//! padded batches. The folders are the stages of the pipeline, in order:
//!
//! ```text
//!  file bytes
//!     │  source/      JSONL, JSON array, Parquet             → Record { line, value }   (FILE:LINE kept)
//!     ▼
//!  records
//!     │  layout/      detect + convert, one file per layout:  → Rows                    (ReadOptions, ReadReport)
//!     │               trl, halos, sharegpt, hh_rlhf, shp,
//!     │               oasst, ultrafeedback; scores → labels
//!     ▼                                  (read.rs: read_rows = source → layout)
//!  rows.rs            Rows::{Unpaired, Paired, Sft}, unpair (TRL's block order)
//!     │  balance.rs   held-out split, KTO class fractions, auto_weights (seeded)
//!     ▼
//!  rows
//!     │  tokenize/    chat template + tokenizer → Sequence; examples.rs: prepare → Examples
//!     ▼
//!  examples
//!     │  batch.rs     collate → SequenceBatch [b, t], rotate_for_kl
//!     ▼
//!  batches
//! ```
//!
//! A stage imports only earlier stages and the shared types: [`Shape`] (here) and the row types in
//! `rows.rs` (which import nothing else of `data/`). `inspect.rs` is a report over the stages for
//! `prospect data inspect`. Nothing in `data/` imports `loss/`, `train/` or `eval/`.

pub mod balance;
pub mod batch;
pub mod inspect;
pub mod layout;
pub mod read;
pub mod rows;
pub mod source;
pub mod tokenize;

pub use batch::{collate, collate_sequences, rotate_for_kl, SequenceBatch};
pub use layout::{DataFormat, LabelFrom, ReadOptions, ReadReport, Statistic, Threshold};
pub use read::{read_jsonl, read_rows};
pub use rows::{unpair, Content, Message, PairedRow, Rows, SftRow, UnpairedRow};
pub use source::Container;
pub use tokenize::chat::{self, ChatTemplate};
pub use tokenize::examples::{self, prepare, Examples, PairedExample, PrepareReport, UnpairedExample};
pub use tokenize::{tokenize_pair, tokenize_text, Sequence, TokenizeReport};

/// The shape of training data: what a loss family reads, and what a file's rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `prompt`, `completion`, `label` rows (paired rows are unpaired into 2n rows).
    Unpaired,
    /// `prompt`, `chosen`, `rejected` rows.
    Paired,
    /// `prompt`, `completion` rows.
    Sft,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shape::Unpaired => "unpaired (prompt, completion, label)",
            Shape::Paired => "paired (prompt, chosen, rejected)",
            Shape::Sft => "sft (prompt, completion)",
        })
    }
}
