//! Stage 4, tokenize: rows → token ids exactly as TRL makes them (chat template + tokenizer), so both
//! produce the same ids. `chat.rs` renders conversations; `examples.rs` tokenizes whole files of rows into
//! the [`examples::Examples`] a loss trains on.
//!
//!
//! 1. append the tokenizer's eos text to the completion unless it already ends with it;
//! 2. `prompt_ids = tok(prompt)`, `full = tok(prompt + completion)` (special tokens added by the
//!    tokenizer's post-processor, as `tokenizer(text)` does);
//!
//! Conversational rows (lists of messages) follow TRL's conversational path instead:
//! `prompt_ids = tok(template(prompt, add_generation_prompt=True))` and
//! `full = tok(template(prompt + completion))`, both with `add_special_tokens=False` and no eos
//! appended, because the rendered template already carries every special token. Then:
//!
//! 3. the completion starts where the two diverge (their common prefix), which is not always the end of
//!    `prompt_ids`: tokens can merge across the boundary.

pub mod chat;
pub mod examples;

use super::rows::{Content, Message};
use crate::error::{Error, Result};
use crate::model::HfTokenizer;
use chat::ChatTemplate;

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
pub fn tokenize_text(
    tok: &HfTokenizer,
    prompt: &str,
    completion: &str,
    report: &mut TokenizeReport,
) -> Result<Sequence> {
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

/// What turns a row's content into ids: the tokenizer, and the chat template for conversations.
#[derive(Clone, Copy)]
pub struct Encoder<'a> {
    pub tok: &'a HfTokenizer,
    pub template: Option<&'a ChatTemplate>,
}

impl Encoder<'_> {
    fn template(&self) -> Result<&ChatTemplate> {
        self.template.ok_or_else(|| {
            Error::config(
                "chat_template",
                "conversational rows need a chat template; set chat_template = \"path/to/template.jinja\"",
            )
        })
    }

    /// `tok(template(messages, add_generation_prompt))` without added special tokens.
    fn chat_ids(&self, messages: &[&Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let owned: Vec<Message> = messages.iter().map(|m| (*m).clone()).collect();
        self.tok.encode_raw(&self.template()?.render(&owned, add_generation_prompt)?)
    }

    /// One prompt + completion as TRL's KTO and SFT trainers tokenize it (text or conversational).
    pub fn sequence(&self, prompt: &Content, completion: &Content, report: &mut TokenizeReport) -> Result<Sequence> {
        match (prompt, completion) {
            (Content::Text(p), Content::Text(c)) => tokenize_text(self.tok, p, c, report),
            (Content::Messages(p), Content::Messages(c)) => {
                let prompt_ids = self.chat_ids(&p.iter().collect::<Vec<_>>(), true)?;
                let full = self.chat_ids(&p.iter().chain(c).collect::<Vec<_>>(), false)?;
                let n = common_prefix_len(&prompt_ids, &full);
                report.note(self.tok, &prompt_ids, n)?;
                Ok(Sequence { prompt_ids: prompt_ids[..n].to_vec(), completion_ids: full[n..].to_vec() })
            }
            _ => Err(Error::Tokenizer(
                "a row mixes plain text and messages; prompt and completion must be the same kind".into(),
            )),
        }
    }

    /// A preference pair as TRL's DPO trainer tokenizes it: one prompt, cut at the shorter common prefix.
    pub fn pair(
        &self,
        prompt: &Content,
        chosen: &Content,
        rejected: &Content,
        report: &mut TokenizeReport,
    ) -> Result<(Sequence, Sequence)> {
        match (prompt, chosen, rejected) {
            (Content::Text(p), Content::Text(c), Content::Text(r)) => tokenize_pair(self.tok, p, c, r, report),
            (Content::Messages(p), Content::Messages(c), Content::Messages(r)) => {
                let prompt_ids = self.chat_ids(&p.iter().collect::<Vec<_>>(), true)?;
                let full_c = self.chat_ids(&p.iter().chain(c).collect::<Vec<_>>(), false)?;
                let full_r = self.chat_ids(&p.iter().chain(r).collect::<Vec<_>>(), false)?;
                let n = common_prefix_len(&prompt_ids, &full_c).min(common_prefix_len(&prompt_ids, &full_r));
                report.note(self.tok, &prompt_ids, n)?;
                let side = |full: &[u32]| Sequence {
                    prompt_ids: prompt_ids[..n].to_vec(),
                    completion_ids: full[n..].to_vec(),
                };
                Ok((side(&full_c), side(&full_r)))
            }
            _ => Err(Error::Tokenizer(
                "a row mixes plain text and messages; prompt and completions must be the same kind".into(),
            )),
        }
    }
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
