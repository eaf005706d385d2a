//! Prospect: align causal language models with human feedback (KTO, DPO, SFT), numerically
//! checked against TRL.
//!
//! The whole path, one module per stage:
//!
//! ```text
//! data::read_jsonl(path)                    -> Rows        (unpaired / paired / sft, FILE:LINE errors)
//! data::prepare(rows, kind, tokenizer, ..)  -> Examples    (TRL's tokenization, prompt/completion split)
//! data::collate(..)                         -> SequenceBatch  [b, t] ids + completion mask
//! model::Llama::forward(ids)                -> logits      [b, t, v], differentiable end to end
//! model::sequence_logps(logits, ids, mask)  -> logps       [b], summed over completion tokens
//!   (training calls model::completion_logps(model, ids, mask): the same, with the LM head applied
//!    only at completion positions)
//! loss::{kto_loss, dpo_loss, sft_loss}      -> loss        pure functions of log-probs
//! train::optim::AdamW::step                 -> updated Vars, then `final/` in Hugging Face layout
//! ```
//!
//! [`train::train`] runs that loop from a [`config::TrainConfig`].

pub mod config;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod fsio;
pub mod import;
pub mod loss;
pub mod model;
pub mod train;

pub use config::TrainConfig;
pub use error::{Error, Result};
