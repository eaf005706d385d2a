//! The Hugging Face tokenizer of a model folder: `tokenizer.json` for the ids and
//! `tokenizer_config.json` for the special tokens (eos, pad, bos) and the chat template.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// A tokenizer plus the special tokens training needs.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// Text of the end-of-sequence token, appended to plain-text completions.
    pub eos_token: String,
    pub eos_token_id: u32,
    /// Padding id; falls back to eos, as TRL does when a tokenizer has no pad token.
    pub pad_token_id: u32,
    pub bos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// The Jinja chat template, when the tokenizer has one.
    pub chat_template: Option<String>,
}

/// `"<eos>"` or `{"content": "<eos>", ...}` (an AddedToken), as `tokenizer_config.json` may spell it.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl HfTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::model(&tok_path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::model(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            Value::Null
        };
        let eos_token = token_text(cfg.get("eos_token")).ok_or_else(|| {
            Error::model(&cfg_path, "tokenizer_config.json must name an `eos_token` (completions end with it)")
        })?;
        let id_of = |text: &str, field: &str| -> Result<u32> {
            inner.token_to_id(text).ok_or_else(|| {
                Error::model(&cfg_path, format!("`{field}` {text:?} is not in the tokenizer's vocabulary"))
            })
        };
        let eos_token_id = id_of(&eos_token, "eos_token")?;
        let pad_token_id = match token_text(cfg.get("pad_token")) {
            Some(pad) => id_of(&pad, "pad_token")?,
            None => eos_token_id,
        };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // Some configs hold named templates: [{"name": "default", "template": "..."}, ...].
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        Ok(Self {
            inner,
            eos_token,
            eos_token_id,
            pad_token_id,
            bos_token: token_text(cfg.get("bos_token")),
            pad_token: token_text(cfg.get("pad_token")),
            unk_token: token_text(cfg.get("unk_token")),
            chat_template,
        })
    }

    /// Token ids of `text`, with the tokenizer's post-processor applied (`add_special_tokens=True`,
    /// as `tokenizer(text)` does in `transformers`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with no special tokens added (`add_special_tokens=False`): how
    /// `apply_chat_template(tokenize=True)` tokenizes a rendered chat, whose text already carries them.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The special tokens a chat template may refer to, by the names `transformers` passes them under.
    pub fn template_tokens(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("eos_token", self.eos_token.clone())];
        for (name, value) in
            [("bos_token", &self.bos_token), ("pad_token", &self.pad_token), ("unk_token", &self.unk_token)]
        {
            if let Some(v) = value {
                out.push((name, v.clone()));
            }
        }
        out
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token that must be in the vocabulary.
    pub fn token_id(&self, token: &str) -> Result<u32> {
        self.inner.token_to_id(token).ok_or_else(|| Error::Tokenizer(format!("{token:?} is not in the vocabulary")))
    }

    /// Add the tokens the vocabulary lacks as special tokens (never split, as `tokenizer.add_special_tokens`
    /// does in `transformers`; new ids follow the existing ones). Returns the tokens it added.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<Vec<String>> {
        let missing: Vec<String> =
            tokens.iter().filter(|t| self.inner.token_to_id(t).is_none()).map(|t| t.to_string()).collect();
        let added: Vec<tokenizers::AddedToken> =
            missing.iter().map(|t| tokenizers::AddedToken::from(t.clone(), true)).collect();
        self.inner.add_special_tokens(added).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(missing)
    }

    /// `tokenizer.json` as it stands (after [`Self::add_special_tokens`]).
    pub fn to_json_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.inner.to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?.into_bytes())
    }
}
