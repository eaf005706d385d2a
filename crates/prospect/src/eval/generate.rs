//! Batched incremental decoding with a KV cache, on the same [`Llama`] (same modules, same weights) the
//! trainer uses. Prompts are left-padded; each row stops at eos, at a stop string, or after
//! `max_new_tokens`.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::files::Row;
use super::sampling::{sample, SamplingConfig};
use crate::data::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::model::{CausalLm, HfTokenizer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop a row when its decoded completion contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    pub seed: u64,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Vocabulary tokens appended (by id) to every prompt before decoding: a CSFT model is sampled
    /// with its good control token, `["<|good|>"]` ([`crate::loss::CsftConfig::generation_suffix`]).
    #[serde(default)]
    pub append_tokens: Vec<String>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::default(),
            stop: vec![],
            seed: 0,
            batch_size: 8,
            append_tokens: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New tokens, without the eos that ended them.
    pub completion_ids: Vec<u32>,
    /// The completion decoded without special tokens, cut at a stop string.
    pub completion: String,
    pub finish: FinishReason,
}

/// Generate a completion for each prompt (token ids). `on_tokens` is told how many tokens each
/// decoding step produced, for progress displays.
pub fn generate(
    model: &CausalLm,
    tok: &HfTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    device: &Device,
    on_tokens: &mut dyn FnMut(usize),
) -> Result<Vec<Generation>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut out = Vec::with_capacity(prompts.len());
    let suffixed: Vec<Vec<u32>>;
    let prompts = if cfg.append_tokens.is_empty() {
        prompts
    } else {
        let ids: Vec<u32> = cfg
            .append_tokens
            .iter()
            .map(|t| {
                tok.token_id(t).map_err(|_| {
                    Error::Tokenizer(format!(
                        "cannot append {t:?} to the prompts: the model's tokenizer has no such token \
                         (a CSFT run's final/ has its control tokens)"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        suffixed = prompts.iter().map(|p| p.iter().chain(&ids).copied().collect()).collect();
        &suffixed
    };
    for chunk in prompts.chunks(cfg.batch_size.max(1)) {
        out.extend(generate_batch(model, tok, chunk, cfg, device, &mut rng, on_tokens)?);
    }
    Ok(out)
}

fn generate_batch(
    model: &CausalLm,
    tok: &HfTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    device: &Device,
    rng: &mut rand::rngs::StdRng,
    on_tokens: &mut dyn FnMut(usize),
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let pad = tok.pad_token_id;
    // Left padding, so every row's next token sits in the same column.
    let mut mask: Vec<Vec<u8>> = Vec::with_capacity(b);
    let mut ids = Vec::with_capacity(b * width);
    for p in prompts {
        let n_pad = width - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        mask.push(std::iter::repeat_n(0, n_pad).chain(std::iter::repeat_n(1, p.len())).collect());
    }
    let mut cache = model.new_cache();
    let mut logits =
        last_logits(&model.forward_cached(&Tensor::from_vec(ids, (b, width), device)?, &mask, &mut cache)?)?;
    let mut gens: Vec<Generation> = (0..b)
        .map(|_| Generation { completion_ids: vec![], completion: String::new(), finish: FinishReason::Length })
        .collect();
    let mut done = vec![false; b];
    // A row stops at the model's context: prompt + completion never exceed `max_position_embeddings`.
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    for _ in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(b);
        let mut produced = 0;
        for (i, row) in logits.iter().enumerate() {
            if !done[i] && prompts[i].len() + gens[i].completion_ids.len() >= context {
                done[i] = true; // finish stays `Length`
            }
            if done[i] {
                next.push(pad);
                mask[i].push(0);
                continue;
            }
            let token = sample(row, &cfg.sampling, rng);
            produced += 1;
            next.push(token);
            mask[i].push(1);
            if token == tok.eos_token_id {
                done[i] = true;
                gens[i].finish = FinishReason::Eos;
                continue;
            }
            gens[i].completion_ids.push(token);
            if !cfg.stop.is_empty() {
                let text = tok.decode(&gens[i].completion_ids, true)?;
                if cfg.stop.iter().any(|s| text.contains(s.as_str())) {
                    done[i] = true;
                    gens[i].finish = FinishReason::Stop;
                }
            }
        }
        on_tokens(produced);
        if done.iter().all(|&d| d) {
            break;
        }
        let step = Tensor::from_vec(next, (b, 1), device)?;
        logits = last_logits(&model.forward_cached(&step, &mask, &mut cache)?)?;
    }
    for g in &mut gens {
        let mut text = tok.decode(&g.completion_ids, true)?;
        if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        g.completion = text;
    }
    Ok(gens)
}

/// Logits of the last position of each row, as `[b][v]` f32.
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (_, t, _) = logits.dims3()?;
    Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

/// Generate `num_samples` completions for every row of the prompt file `prompts_file` (read into `rows`)
/// with `model` (a model folder, or a PEFT adapter applied unmerged to its base). Each output row is the input row plus `completion`, `completion_ids`,
/// `finish`, `model` and, when there are several samples, `sample`. A prompt that leaves no room in the
/// model's context (`max_position_embeddings`) is an error naming its line.
pub fn generate_rows(
    model: &crate::model::ModelSource,
    prompts_file: &std::path::Path,
    rows: &[Row],
    num_samples: usize,
    cfg: &GenerateConfig,
    device: &Device,
    on_tokens: &mut dyn FnMut(usize),
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let source = model;
    let tok = HfTokenizer::load(source.tokenizer_dir())?;
    let model = crate::model::load_frozen_source(source, device)?;
    let context = model.config().max_position_embeddings;
    let mut prompts = Vec::with_capacity(rows.len() * num_samples);
    for row in rows {
        let ids = match row.fields.get("prompt") {
            Some(serde_json::Value::String(text)) => tok.encode(text)?,
            _ => chat_prompt_ids(&tok, row, prompts_file)?,
        };
        let n = ids.len() + cfg.append_tokens.len();
        if let Some(context) = context.filter(|&c| n >= c) {
            return Err(Error::Data {
                path: prompts_file.to_path_buf(),
                line: row.line,
                message: format!(
                    "`prompt` is {n} tokens, which leaves no room to generate: the model's context is {context} \
                     tokens (max_position_embeddings in {})",
                    source.base.join("config.json").display()
                ),
            });
        }
        prompts.extend(std::iter::repeat_n(ids, num_samples));
    }
    let gens = generate(&model, &tok, &prompts, cfg, device, on_tokens)?;
    let mut out = Vec::with_capacity(gens.len());
    for (k, g) in gens.into_iter().enumerate() {
        let mut fields = rows[k / num_samples].fields.clone();
        fields.insert("completion".into(), g.completion.into());
        fields.insert("completion_ids".into(), serde_json::json!(g.completion_ids));
        fields.insert("finish".into(), serde_json::json!(g.finish));
        let name = source.adapter.as_ref().unwrap_or(&source.base);
        fields.insert("model".into(), name.display().to_string().into());
        if num_samples > 1 {
            fields.insert("sample".into(), (k % num_samples).into());
        }
        out.push(fields);
    }
    Ok(out)
}

/// Token ids of a conversational prompt row for generation: the messages rendered with the model's chat
/// template and `add_generation_prompt`, tokenized without adding special tokens (the template carries
/// them), as `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` does.
fn chat_prompt_ids(tok: &HfTokenizer, row: &Row, prompts_file: &std::path::Path) -> Result<Vec<u32>> {
    let messages: Vec<Message> = serde_json::from_value(row.fields.get("prompt").cloned().unwrap_or_default())
        .map_err(|e| Error::Data {
            path: prompts_file.to_path_buf(),
            line: row.line,
            message: format!("`prompt` must be a string or a list of {{role, content}} messages: {e}"),
        })?;
    let template = ChatTemplate::for_tokenizer(tok, None)?;
    tok.encode_raw(&template.render(&messages, true)?)
}
