//! Turning text rows into token ids exactly as TRL does, so both produce the same ids:
//!
//! 1. append the tokenizer's eos text to the completion unless it already ends with it;
//! 2. `prompt_ids = tok(prompt)`, `full = tok(prompt + completion)` (special tokens added by the
//!    tokenizer's post-processor, as `tokenizer(text)` does);
//! 3. the completion starts where the two diverge (their common prefix), which is not always the end of
//!    `prompt_ids`: tokens can merge across the boundary.

use crate::error::Result;
use crate::model::HfTokenizer;

/// One prompt + completion, split at the common prefix. Not yet truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.completion_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts of what tokenization noticed, reported once per run rather than per row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizeReport {
    /// Rows whose tokenized prompt is not a prefix of the tokenized prompt + completion.
    pub prompt_not_prefix: usize,
    /// The first such row's prompt tokens that fell out of the prompt, decoded.
    pub first_mismatch: Option<String>,
}

fn with_eos(tok: &HfTokenizer, completion: &str) -> String {
    if completion.ends_with(&tok.eos_token) {
        completion.to_string()
    } else {
        format!("{completion}{}", tok.eos_token)
    }
}

impl TokenizeReport {
    fn note(&mut self, tok: &HfTokenizer, prompt_ids: &[u32], kept: usize) -> Result<()> {
        if kept < prompt_ids.len() {
            self.prompt_not_prefix += 1;
            if self.first_mismatch.is_none() {
                self.first_mismatch = Some(tok.decode(&prompt_ids[kept..], false)?);
            }
        }
        Ok(())
    }
}

/// Tokenize a plain-text prompt + completion the way TRL's KTO and SFT trainers do.
pub fn tokenize_text(tok: &HfTokenizer, prompt: &str, completion: &str, report: &mut TokenizeReport) -> Result<Sequence> {
    let prompt_ids = tok.encode(prompt)?;
    let full = tok.encode(&format!("{prompt}{}", with_eos(tok, completion)))?;
    let n = common_prefix_len(&prompt_ids, &full);
    report.note(tok, &prompt_ids, n)?;
    Ok(Sequence { prompt_ids: prompt_ids[..n].to_vec(), completion_ids: full[n..].to_vec() })
}

/// Tokenize a preference pair the way TRL's DPO trainer does: both sides share one prompt, cut at the
/// shorter of the two common prefixes. Returns (chosen, rejected).
pub fn tokenize_pair(
    tok: &HfTokenizer,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    report: &mut TokenizeReport,
) -> Result<(Sequence, Sequence)> {
    let prompt_ids = tok.encode(prompt)?;
    let full_c = tok.encode(&format!("{prompt}{}", with_eos(tok, chosen)))?;
    let full_r = tok.encode(&format!("{prompt}{}", with_eos(tok, rejected)))?;
    let n = common_prefix_len(&prompt_ids, &full_c).min(common_prefix_len(&prompt_ids, &full_r));
    report.note(tok, &prompt_ids, n)?;
    let side = |full: &[u32]| Sequence { prompt_ids: prompt_ids[..n].to_vec(), completion_ids: full[n..].to_vec() };
    Ok((side(&full_c), side(&full_r)))
}

pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix() {
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix_len(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix_len(&[], &[1]), 0);
    }
}
