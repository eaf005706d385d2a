//! A Hugging Face `tokenizer.json` rebuilt from a GGUF file's byte-level BPE tokenizer
//! (`tokenizer.ggml.model = "gpt2"`): vocabulary, merges, token types and the pre-tokenizer name.
//!
//! Not responsible for: SentencePiece (`"llama"`) tokenizers, which llama.cpp stores differently and
//! which this import rejects, or `tokenizer_config.json` (that is `gguf.rs`).

use serde_json::{json, Map, Value};

/// llama.cpp's token types (`llama_token_type`), as `tokenizer.ggml.token_type` stores them.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What GGUF stores about a byte-level BPE tokenizer.
pub struct GgufBpe<'a> {
    /// `tokenizer.ggml.tokens`: token text by id, in the GPT-2 byte-to-unicode alphabet.
    pub tokens: &'a [String],
    /// `tokenizer.ggml.merges`: `"left right"`, highest priority first.
    pub merges: &'a [String],
    /// `tokenizer.ggml.token_type`, one per token.
    pub token_types: &'a [i64],
    /// `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer regex.
    pub pre: &'a str,
}

/// The pre-tokenizer names this import knows, and the Hugging Face pre-tokenizer each stands for.
pub const KNOWN_PRE_TOKENIZERS: &[&str] = &["smollm", "gpt-2"];

/// The Hugging Face pre-tokenizer for llama.cpp's pre-tokenizer `name` (llama.cpp sets it in
/// `convert_hf_to_gguf.py::get_vocab_base_pre` from a hash of the original tokenizer's output).
fn pre_tokenizer(name: &str) -> Option<Value> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    match name {
        // SmolLM / SmolLM2 (StarCoder's tokenizer): each digit on its own, then GPT-2's regex.
        "smollm" => Some(json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level,
        ]})),
        "gpt-2" => Some(byte_level),
        _ => None,
    }
}

/// Build `tokenizer.json`. Control tokens (type 3) become special added tokens and user-defined ones
/// (type 4) plain added tokens, as `transformers` marks them in the tokenizers llama.cpp converts from.
pub fn tokenizer_json(bpe: &GgufBpe) -> Result<Value, String> {
    if bpe.token_types.len() != bpe.tokens.len() {
        return Err(format!(
            "`tokenizer.ggml.token_type` has {} entries for {} tokens",
            bpe.token_types.len(),
            bpe.tokens.len()
        ));
    }
    let pre = pre_tokenizer(bpe.pre).ok_or_else(|| {
        format!("pre-tokenizer `{}` (tokenizer.ggml.pre) is not supported; known: {KNOWN_PRE_TOKENIZERS:?}", bpe.pre)
    })?;
    let mut vocab = Map::new();
    for (id, token) in bpe.tokens.iter().enumerate() {
        if vocab.insert(token.clone(), json!(id)).is_some() {
            return Err(format!("token {token:?} appears twice in `tokenizer.ggml.tokens` (second time: id {id})"));
        }
    }
    let added: Vec<Value> = bpe
        .token_types
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(id, t)| {
            json!({"id": id, "content": bpe.tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *t == TOKEN_TYPE_CONTROL})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": bpe.merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy byte-level vocabulary (`Ġ` is GPT-2's stand-in for the space byte) with one merge,
    /// `Ġ b` → `Ġb`, one control token (type 3) and one user-defined token (type 4).
    fn toy() -> (Vec<String>, Vec<String>, Vec<i64>) {
        let tokens: Vec<String> =
            ["<|endoftext|>", "a", "b", "Ġ", "1", "2", "Ġb", "<tool>"].iter().map(|s| s.to_string()).collect();
        let merges = vec!["Ġ b".to_string()];
        let types = vec![3, 1, 1, 1, 1, 1, 1, 4];
        (tokens, merges, types)
    }

    fn load(json: &Value) -> tokenizers::Tokenizer {
        json.to_string().parse().unwrap()
    }

    #[test]
    fn smollm_splits_digits_and_merges() {
        let (tokens, merges, token_types) = toy();
        let json =
            tokenizer_json(&GgufBpe { tokens: &tokens, merges: &merges, token_types: &token_types, pre: "smollm" })
                .unwrap();
        let tok = load(&json);
        let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
        assert_eq!(ids("a b12"), [1, 6, 4, 5]); // a, Ġb, 1, 2: digits one by one
        assert_eq!(ids("<|endoftext|>a<tool>"), [0, 1, 7]); // added tokens are matched whole
        let added = json["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 2);
        assert_eq!((added[0]["special"].as_bool(), added[1]["special"].as_bool()), (Some(true), Some(false)));
        assert_eq!(tok.decode(&[1, 6, 4], false).unwrap(), "a b1");
    }

    #[test]
    fn unknown_pre_tokenizer_and_bad_lengths_are_errors() {
        let (tokens, merges, token_types) = toy();
        let err =
            tokenizer_json(&GgufBpe { tokens: &tokens, merges: &merges, token_types: &token_types, pre: "qwen2" })
                .unwrap_err();
        assert!(err.contains("`qwen2`") && err.contains("smollm"), "{err}");
        let err =
            tokenizer_json(&GgufBpe { tokens: &tokens, merges: &merges, token_types: &token_types[..3], pre: "gpt-2" })
                .unwrap_err();
        assert!(err.contains("3 entries for 8 tokens"), "{err}");
    }
}
