//! Data: files in the layouts feedback comes in, rows in TRL's shapes, token ids as TRL makes them,
//! padded batches.
//!
//! Pipeline: `read_rows` (JSONL / JSON / Parquet → records → [`formats`] → [`Rows`]) → [`balance`]
//! (class fractions, held-out split) → [`prepare`] (chat template + tokenizer → [`Examples`]) →
//! [`collate`] → [`SequenceBatch`].

pub mod balance;
pub mod batch;
pub mod chat;
pub mod examples;
pub mod formats;
pub mod inspect;
mod parquet;
pub mod read;
pub mod rows;
pub mod tokenize;

pub use batch::{collate, collate_sequences, rotate_for_kl, SequenceBatch};
pub use chat::{ChatTemplate, Message};
pub use examples::{prepare, Examples, PairedExample, PrepareReport, UnpairedExample};
pub use formats::{DataFormat, LabelFrom, Statistic, Threshold};
pub use read::{read_rows, Container, ReadOptions, ReadReport};
pub use rows::{read_jsonl, unpair, Content, PairedRow, RowFormat, Rows, SftRow, UnpairedRow};
pub use tokenize::{tokenize_pair, tokenize_text, Sequence, TokenizeReport};

/// The shape of training data: what a loss family reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `prompt`, `completion`, `label` rows (paired rows are unpaired into 2n rows).
    Unpaired,
    /// `prompt`, `chosen`, `rejected` rows.
    Paired,
    /// `prompt`, `completion` rows.
    Sft,
}
