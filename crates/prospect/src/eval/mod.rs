//! Evaluation: sampling from models, judging completions, and win rates with confidence intervals.

pub mod files;
pub mod generate;
pub mod judge;
pub mod plot;
pub mod report;
pub mod rules;
pub mod sampling;
pub mod winrate;

pub use generate::{generate, FinishReason, GenerateConfig, Generation};
pub use sampling::SamplingConfig;
