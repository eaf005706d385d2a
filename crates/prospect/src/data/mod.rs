//! Data: rows from files, token ids as TRL makes them, padded batches.
//!
//! Pipeline: `read_jsonl` → [`Rows`] → [`tokenize_text`] → [`Sequence`] → [`collate`] → [`SequenceBatch`].

pub mod batch;
pub mod chat;
pub mod rows;
pub mod tokenize;

pub use batch::{collate, collate_sequences, rotate_for_kl, SequenceBatch};
pub use rows::{read_jsonl, unpair, PairedRow, RowFormat, Rows, SftRow, UnpairedRow};
pub use tokenize::{tokenize_pair, tokenize_text, Sequence, TokenizeReport};
pub mod examples;
pub use examples::{prepare, Examples, PairedExample, PrepareReport, UnpairedExample};
