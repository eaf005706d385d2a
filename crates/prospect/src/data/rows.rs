//! Training rows in Prospect's canonical shapes, which are TRL's:
//!
//! | shape    | fields                                  |
//! |----------|-----------------------------------------|
//! | unpaired | `prompt`, `completion`, `label` (bool)  |
//! | paired   | `prompt`, `chosen`, `rejected`          |
//! | sft      | `prompt`, `completion`                  |
//!
//! Each text field is either plain text (TRL's "standard" format) or a list of `{role, content}`
//! messages (TRL's "conversational" format, rendered later with the model's chat template). Within a
//! row, prompt and completions are both text or both messages.
//!
//! These types are the vocabulary every stage after `source` speaks: the layout stage produces them,
//! balance and tokenize consume them. This file imports no other stage. Reading files and converting
//! public layouts into these rows is `read.rs` (source → layout).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Shape;

/// One chat message, as TRL's conversational format and HF templates spell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// A prompt or a completion: plain text, or chat messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_string())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

impl From<Vec<Message>> for Content {
    fn from(m: Vec<Message>) -> Self {
        Content::Messages(m)
    }
}

impl Content {
    pub fn is_messages(&self) -> bool {
        matches!(self, Content::Messages(_))
    }

    /// The text, for plain-text content.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Content::Text(s) => Some(s),
            Content::Messages(_) => None,
        }
    }

    /// As TRL writes it in JSON: a string or a list of `{"role", "content"}` objects (in that key order).
    pub fn to_json(&self) -> String {
        let quote = |s: &str| Value::String(s.to_string()).to_string();
        match self {
            Content::Text(s) => quote(s),
            Content::Messages(m) => {
                let items: Vec<String> = m
                    .iter()
                    .map(|m| format!("{{\"role\": {}, \"content\": {}}}", quote(&m.role), quote(&m.content)))
                    .collect();
                format!("[{}]", items.join(", "))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedRow {
    pub prompt: Content,
    pub completion: Content,
    /// `true` for desirable feedback.
    pub label: bool,
    /// 1-based line (for Parquet: row) of the source record.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PairedRow {
    pub prompt: Content,
    pub chosen: Content,
    pub rejected: Content,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SftRow {
    pub prompt: Content,
    pub completion: Content,
    pub line: usize,
}

/// The rows of one file, all in one shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    Unpaired(Vec<UnpairedRow>),
    Paired(Vec<PairedRow>),
    Sft(Vec<SftRow>),
}

/// TRL's `unpair_preference_dataset` maps in blocks of this many pairs (the `datasets` default batch
/// size) and emits each block's chosen completions before its rejected ones.
pub const UNPAIR_BLOCK: usize = 1000;

impl Rows {
    pub fn shape(&self) -> Shape {
        match self {
            Rows::Unpaired(_) => Shape::Unpaired,
            Rows::Paired(_) => Shape::Paired,
            Rows::Sft(_) => Shape::Sft,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Unpaired(r) => r.len(),
            Rows::Paired(r) => r.len(),
            Rows::Sft(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the rows hold chat messages (and so need a chat template).
    pub fn is_conversational(&self) -> bool {
        match self {
            Rows::Unpaired(r) => r.iter().any(|r| r.prompt.is_messages()),
            Rows::Paired(r) => r.iter().any(|r| r.prompt.is_messages()),
            Rows::Sft(r) => r.iter().any(|r| r.prompt.is_messages()),
        }
    }

    /// The rows as canonical JSONL (TRL's format, TRL's key order), one object per line; the `line`
    /// numbers are not kept.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        let mut push = |fields: &[(&str, String)]| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            out.push_str(&format!("{{{}}}\n", body.join(", ")));
        };
        match self {
            Rows::Unpaired(rows) => rows.iter().for_each(|r| {
                push(&[
                    ("prompt", r.prompt.to_json()),
                    ("completion", r.completion.to_json()),
                    ("label", r.label.to_string()),
                ])
            }),
            Rows::Paired(rows) => rows.iter().for_each(|r| {
                push(&[
                    ("prompt", r.prompt.to_json()),
                    ("chosen", r.chosen.to_json()),
                    ("rejected", r.rejected.to_json()),
                ])
            }),
            Rows::Sft(rows) => rows
                .iter()
                .for_each(|r| push(&[("prompt", r.prompt.to_json()), ("completion", r.completion.to_json())])),
        }
        out
    }
}

/// Paired rows as unpaired feedback: 2n rows, chosen → desirable, rejected → undesirable.
///
/// The order is TRL's, so `shuffle = false` runs match `KTOTrainer` on the same file: within each block
/// of [`UNPAIR_BLOCK`] pairs, all chosen rows in file order, then all rejected rows in file order.
pub fn unpair(pairs: &[PairedRow]) -> Vec<UnpairedRow> {
    let mut out = Vec::with_capacity(pairs.len() * 2);
    for block in pairs.chunks(UNPAIR_BLOCK) {
        for (completion, label) in [(true, true), (false, false)] {
            out.extend(block.iter().map(|p| UnpairedRow {
                prompt: p.prompt.clone(),
                completion: if completion { p.chosen.clone() } else { p.rejected.clone() },
                label,
                line: p.line,
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpairing_follows_trl_block_order() {
        let pairs: Vec<PairedRow> = (0..3)
            .map(|i| PairedRow {
                prompt: format!("p{i}").into(),
                chosen: format!("c{i}").into(),
                rejected: format!("r{i}").into(),
                line: i + 1,
            })
            .collect();
        let rows = unpair(&pairs);
        let seen: Vec<(&str, bool)> = rows.iter().map(|r| (r.completion.as_text().unwrap(), r.label)).collect();
        assert_eq!(seen, vec![("c0", true), ("c1", true), ("c2", true), ("r0", false), ("r1", false), ("r2", false)]);
        assert_eq!(rows[4].prompt, "p1".into());
    }
}
