//! Evaluation: sampling from models, judging completions, and win rates with confidence intervals.

pub mod generate;
pub mod sampling;

pub use generate::{generate, FinishReason, GenerateConfig, Generation};
pub use sampling::SamplingConfig;
