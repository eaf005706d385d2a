//! CSFT: conditional SFT with control tokens (Korbak et al., 2023, "Pretraining Language Models with
//! Human Preferences", <https://arxiv.org/abs/2302.08582>; HALOs' `ConditionalSFTDataLoader`).
//!
//! ```text
//! y'   = <|good|> y   if y is desirable (or chosen)
//!        <|bad|>  y   if y is undesirable (or rejected)
//! loss = − Σ_{completion tokens of y'} log π_θ(y'_t | x, y'_<t) / N      (SFT on every row)
//! ```
//!
//! The control token is the first completion token, so the model learns p(y | x, <|good|>) and
//! p(y | x, <|bad|>); at generation time `<|good|>` is appended to the prompt
//! ([`CsftConfig::generation_prompt`] for text, [`CsftConfig::generation_suffix`] for
//! `eval::GenerateConfig::append_tokens`, `prospect generate --append-token "<|good|>"`). The token strings are configurable; when the tokenizer lacks
//! them they are added as special tokens and the embedding matrix grows by one row each (see
//! [`crate::model::Policy::add_tokens`]). The loss itself is [`super::sft_loss`]; N counts the
//! completion tokens of the optimizer batch, control tokens included. No reference model.
//!
//! Keys: `good_token` = `"<|good|>"`, `bad_token` = `"<|bad|>"` (HALOs' `config/loss/csft.yaml`).

use serde::{Deserialize, Serialize};

use super::{sft_loss, Loss, LossOutput, Metrics, SftLoss};
use crate::error::{Error, Result};
use candle_core::Tensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsftConfig {
    /// Prepended to desirable/chosen completions.
    #[serde(default = "default_good")]
    pub good_token: String,
    /// Prepended to undesirable/rejected completions.
    #[serde(default = "default_bad")]
    pub bad_token: String,
}

fn default_good() -> String {
    "<|good|>".into()
}
fn default_bad() -> String {
    "<|bad|>".into()
}

impl Default for CsftConfig {
    fn default() -> Self {
        Self { good_token: default_good(), bad_token: default_bad() }
    }
}

impl Loss for CsftConfig {
    fn validate(&self, _microbatch_size: usize) -> Result<()> {
        if self.good_token.is_empty() || self.bad_token.is_empty() || self.good_token == self.bad_token {
            return Err(Error::config(
                "loss.good_token",
                format!(
                    "good_token and bad_token must be two different non-empty strings, got {:?} and {:?}",
                    self.good_token, self.bad_token
                ),
            ));
        }
        Ok(())
    }

    fn control_tokens(&self) -> Option<(&str, &str)> {
        Some((&self.good_token, &self.bad_token))
    }
}

impl CsftConfig {
    /// The prompt to generate from: the prompt followed by the good control token.
    pub fn generation_prompt(&self, prompt: &str) -> String {
        format!("{prompt}{}", self.good_token)
    }

    /// What to append to prompts when sampling, for `GenerateConfig::append_tokens`: the good control
    /// token (the tokenizer of a CSFT run's `final/` has it).
    pub fn generation_suffix(&self) -> Vec<String> {
        vec![self.good_token.clone()]
    }
}

/// CSFT's loss is SFT's: the control tokens are a data transform (see [`Loss::control_tokens`]).
impl SftLoss for CsftConfig {
    fn forward(&self, logps: &Tensor, tokens: usize) -> Result<LossOutput> {
        Ok(LossOutput { loss: sft_loss(logps, tokens)?, metrics: Metrics::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_generation_prompt() {
        let c = CsftConfig::default();
        assert_eq!(c.generation_prompt("Q: hi\nA:"), "Q: hi\nA:<|good|>");
        assert!(c.validate(1).is_ok());
        assert!(CsftConfig { good_token: "<x>".into(), bad_token: "<x>".into() }.validate(1).is_err());
    }
}
