//! Prospect: align causal language models with human feedback (KTO, DPO, SFT), numerically
//! checked against TRL.
//!
//! The whole path, one module per stage:
//!
//! ```text
//! data::read_rows(path, options)            -> Rows        (JSONL / JSON / Parquet; TRL, ShareGPT, HALOs, HH,
//!                                                          SHP, oasst1, UltraFeedback; FILE:LINE errors)
//! data::balance::{hold_out, keep_fractions} -> Rows        (eval split, KTO class fractions; seeded)
//! data::prepare(rows, kind, tokenizer, ..)  -> Examples    (TRL's tokenization; chat template for messages)
//! data::collate(..)                         -> SequenceBatch  [b, t] ids + completion mask
//! model::CausalLm::forward(ids)             -> logits      [b, t, v], differentiable end to end
//! model::sequence_logps(logits, ids, mask)  -> logps       [b], summed over completion tokens
//! loss::{kto_loss, dpo_loss, ipo_loss, ..} -> loss        pure functions of log-probs, one file per method
//!   (training calls model::completion_logps(model, ids, mask): the same, with the LM head applied
//!    only at completion positions)
//! train::optim::AdamW::step                 -> updated Vars, then `final/` in Hugging Face layout
//! ```
//!
//! [`train::train`] runs that loop from a [`config::TrainConfig`].

pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod feedback;
pub mod fsio;
pub mod import;
pub mod limits;
pub mod loss;
pub mod model;
pub mod sweep;
pub mod train;

pub use config::TrainConfig;
pub use error::{Error, Result};
