//! The Hugging Face tokenizer of a model folder: `tokenizer.json` for the ids and
//! `tokenizer_config.json` for the special tokens (eos, pad, bos) and the chat template.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Largest `tokenizer.json` read (the largest public ones are about 35 MB).
const MAX_TOKENIZER_BYTES: u64 = 1 << 30;
/// Largest `tokenizer_config.json` or `chat_template.jinja` read (real ones are a few hundred KiB at most).
const MAX_SIDE_FILE_BYTES: u64 = 64 << 20;

/// A tokenizer plus the special tokens training needs.
#[derive(Clone)]
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
    /// Load `tokenizer.json` and `tokenizer_config.json` from a model folder. When the folder has a
    /// `config.json`, every token id must be a row of the model's embedding (`id < vocab_size`).
    pub fn load(dir: &Path) -> Result<Self> {
        super::check_model_dir(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let inner = parse_tokenizer(&super::read_bounded(&tok_path, MAX_TOKENIZER_BYTES)?, &tok_path)?;
        check_fits_model(&inner, dir)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let bytes = super::read_bounded(&cfg_path, MAX_SIDE_FILE_BYTES)?;
            serde_json::from_slice(&bytes).map_err(|e| Error::model(&cfg_path, format!("invalid JSON: {e}")))?
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
                    let bytes = super::read_bounded(&jinja, MAX_SIDE_FILE_BYTES)?;
                    Some(String::from_utf8(bytes).map_err(|e| Error::model(&jinja, format!("not UTF-8: {e}")))?)
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

    /// Check that every token id is a row of another folder's model (a reference model loaded from its
    /// own folder): ids must be < its `config.json`'s `vocab_size`.
    pub fn check_fits(&self, model_dir: &Path) -> Result<()> {
        check_fits_model(&self.inner, model_dir)
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

/// `tokenizer.json` through the `tokenizers` crate, behind a boundary: tokenizers 0.23.2 panics
/// (`.expect("Helper")`, `src/decoders/mod.rs:90`) on a syntax error inside `decoder` instead of
/// returning an error. A panic becomes an error naming the file, with serde_json's position of the
/// first syntax error when there is one.
fn parse_tokenizer(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    match catch_panic(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(Ok(tokenizer)) => Ok(tokenizer),
        Ok(Err(e)) => Err(Error::model(path, format!("cannot load tokenizer: {e}"))),
        Err(panic) => {
            let syntax = serde_json::from_slice::<serde::de::IgnoredAny>(bytes).err();
            let why = syntax.map_or_else(|| "malformed tokenizer".to_string(), |e| format!("invalid JSON: {e}"));
            Err(Error::model(path, format!("cannot load tokenizer: {why} (the tokenizers crate panicked: {panic})")))
        }
    }
}

/// Run `f`, turning a panic into `Err(panic message)`. While `f` runs, the panic hook says nothing for
/// this thread (no "panicked at" line on stderr for a panic that is handled here); panics on other
/// threads still reach the previous hook, which is put back afterwards.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;
    // One swap at a time: two threads swapping hooks concurrently could lose the original one.
    static SWAP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _swap = SWAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let me = std::thread::current().id();
    let previous: std::sync::Arc<Hook> = std::sync::Arc::new(std::panic::take_hook());
    let forward = std::sync::Arc::clone(&previous);
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != me {
            forward(info);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    drop(std::panic::take_hook()); // the silencing hook, and with it `forward`
    let previous: Hook = std::sync::Arc::try_unwrap(previous).unwrap_or_else(|shared| Box::new(move |i| shared(i)));
    std::panic::set_hook(previous);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string payload".to_string())
    })
}

/// Largest token id (the added tokens included) against the model's `vocab_size`, read leniently from
/// the folder's `config.json` (a folder without one, or with one that does not parse, is checked when
/// the model is loaded). An id >= vocab_size would fail later as an out-of-range embedding lookup.
fn check_fits_model(tokenizer: &tokenizers::Tokenizer, dir: &Path) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct VocabSize {
        vocab_size: Option<u64>,
    }
    let config = dir.join("config.json");
    let Ok(bytes) = super::read_bounded(&config, 16 << 20) else { return Ok(()) };
    let Some(vocab_size) = serde_json::from_slice::<VocabSize>(&bytes).ok().and_then(|c| c.vocab_size) else {
        return Ok(());
    };
    let Some((token, max_id)) = tokenizer.get_vocab(true).into_iter().max_by_key(|(_, id)| *id) else {
        return Ok(());
    };
    if u64::from(max_id) >= vocab_size {
        return Err(Error::model(
            dir,
            format!(
                "tokenizer.json has token ids up to {max_id} ({token:?}), {} tokens, but config.json has \
                 vocab_size {vocab_size}: ids must be < vocab_size (is the tokenizer from another model?)",
                tokenizer.get_vocab_size(true)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest input found that makes tokenizers 0.23.2 panic instead of erroring (the upstream
    /// report in docs/RELIABILITY.md): a syntax error inside `decoder`. When this test fails, the crate
    /// returns an error there now and the report can be closed.
    const UPSTREAM_PANIC: &str = r#"{"decoder": {"type": "ByteLevel" "x"}}"#;

    #[test]
    fn the_tokenizers_crate_still_panics_on_a_syntax_error_in_decoder() {
        let panic = catch_panic(|| tokenizers::Tokenizer::from_bytes(UPSTREAM_PANIC.as_bytes())).err();
        assert!(panic.as_deref().is_some_and(|m| m.starts_with("Helper")), "{panic:?}");
    }

    #[test]
    fn a_panic_in_the_crate_is_an_error_naming_the_file_and_position() {
        let path = Path::new("dir/tokenizer.json");
        let Err(e) = parse_tokenizer(UPSTREAM_PANIC.as_bytes(), path) else { panic!("parsed") };
        let message = e.to_string();
        assert!(message.starts_with("model dir/tokenizer.json: cannot load tokenizer: invalid JSON: "), "{message}");
        assert!(message.contains("line 1 column 34"), "{message}");
        assert!(message.contains("(the tokenizers crate panicked: Helper"), "{message}");
    }

    #[test]
    fn catch_panic_returns_the_value_or_the_message() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        assert_eq!(catch_panic(|| -> u8 { panic!("boom {}", 1) }), Err("boom 1".to_string()));
        assert_eq!(catch_panic(|| -> u8 { std::panic::panic_any(5u8) }), Err("a non-string payload".to_string()));
    }
}
