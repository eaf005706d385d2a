//! Batched incremental decoding with a KV cache, on the same [`CausalLm`] (same modules, same weights)
//! the trainer uses. Prompts are left-padded; each row stops at eos, at a stop string, or after
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
/// decoding step produced, for progress displays. One random stream serves the whole call, row after
/// row, step after step, so a seed fixes every sample of the file.
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
    let suffix = append_ids(tok, &cfg.append_tokens)?;
    let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().chain(&suffix).copied().collect()).collect();
    for chunk in prompts.chunks(cfg.batch_size.max(1)) {
        let rows: Vec<RowSpec> = chunk
            .iter()
            .map(|p| RowSpec {
                prompt_ids: p.clone(),
                max_new_tokens: cfg.max_new_tokens,
                sampling: cfg.sampling,
                stop: cfg.stop.clone(),
            })
            .collect();
        out.extend(decode_rows(model, tok, &rows, Rngs::Shared(&mut rng), device, on_tokens, &mut |_, _| {})?);
    }
    Ok(out)
}

/// The ids of `append_tokens` (a CSFT model's control token), each a single vocabulary token.
fn append_ids(tok: &HfTokenizer, tokens: &[String]) -> Result<Vec<u32>> {
    tokens
        .iter()
        .map(|t| {
            tok.token_id(t).map_err(|_| {
                Error::Tokenizer(format!(
                    "cannot append {t:?} to the prompts: the model's tokenizer has no such token \
                     (a CSFT run's final/ has its control tokens)"
                ))
            })
        })
        .collect()
}

/// One row of a decoding batch, with its own length limit, sampling and stop strings.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSpec {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
}

/// Where a batch's random draws come from.
pub enum Rngs<'a> {
    /// One stream for every row (`prospect generate`: a file's samples fixed by one seed).
    Shared(&'a mut rand::rngs::StdRng),
    /// A stream per row (`prospect serve`: a request's answer does not depend on what it was batched with).
    PerRow(Vec<rand::rngs::StdRng>),
}

impl Rngs<'_> {
    fn for_row(&mut self, i: usize) -> &mut rand::rngs::StdRng {
        match self {
            Rngs::Shared(r) => r,
            Rngs::PerRow(v) => &mut v[i],
        }
    }
}

/// A row's decoding state: its tokens, and how much of its text has been handed out.
struct RowState {
    gen: Generation,
    done: bool,
    /// Bytes of the visible text already given to `on_text`.
    emitted: usize,
}

/// Decode `rows` together, left-padded in one batch with a KV cache. Each row stops at eos, at one of
/// its stop strings, after its `max_new_tokens`, or at the model's context. `on_text(row, piece)` hears
/// each row's text as it grows, in pieces whose concatenation is exactly the row's final `completion`
/// (text that could still turn into a stop string is held back until it cannot).
pub fn decode_rows(
    model: &CausalLm,
    tok: &HfTokenizer,
    rows: &[RowSpec],
    mut rngs: Rngs,
    device: &Device,
    on_tokens: &mut dyn FnMut(usize),
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let b = rows.len();
    let width = rows.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0).max(1);
    let pad = tok.pad_token_id;
    // Left padding, so every row's next token sits in the same column.
    let mut mask: Vec<Vec<u8>> = Vec::with_capacity(b);
    let mut ids = Vec::with_capacity(b * width);
    for r in rows {
        let n_pad = width - r.prompt_ids.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(r.prompt_ids.iter().copied()));
        mask.push(std::iter::repeat_n(0, n_pad).chain(std::iter::repeat_n(1, r.prompt_ids.len())).collect());
    }
    let mut cache = model.new_cache();
    let mut logits =
        last_logits(&model.forward_cached(&Tensor::from_vec(ids, (b, width), device)?, &mask, &mut cache)?)?;
    let empty = Generation { completion_ids: vec![], completion: String::new(), finish: FinishReason::Length };
    let mut state: Vec<RowState> = (0..b).map(|_| RowState { gen: empty.clone(), done: false, emitted: 0 }).collect();
    // A row stops at the model's context: prompt + completion never exceed `max_position_embeddings`.
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    let longest = rows.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
    for _ in 0..longest {
        let mut next = Vec::with_capacity(b);
        let mut produced = 0;
        for (i, row) in logits.iter().enumerate() {
            let (spec, s) = (&rows[i], &mut state[i]);
            let n = s.gen.completion_ids.len();
            if !s.done && (spec.prompt_ids.len() + n >= context || n >= spec.max_new_tokens) {
                s.done = true; // finish stays `Length`
                emit(tok, spec, s, true, i, on_text)?;
            }
            if s.done {
                next.push(pad);
                mask[i].push(0);
                continue;
            }
            let token = sample(row, &spec.sampling, rngs.for_row(i));
            produced += 1;
            next.push(token);
            mask[i].push(1);
            if token == tok.eos_token_id {
                s.done = true;
                s.gen.finish = FinishReason::Eos;
            } else {
                s.gen.completion_ids.push(token);
            }
            emit(tok, spec, s, s.done, i, on_text)?;
        }
        on_tokens(produced);
        if state.iter().all(|s| s.done) {
            break;
        }
        let step = Tensor::from_vec(next, (b, 1), device)?;
        logits = last_logits(&model.forward_cached(&step, &mask, &mut cache)?)?;
    }
    for (i, s) in state.iter_mut().enumerate() {
        if !s.done {
            s.done = true;
            emit(tok, &rows[i], s, true, i, on_text)?;
        }
    }
    Ok(state.into_iter().map(|s| s.gen).collect())
}

/// Decode a row's text, cut it at its first stop string (which ends the row), and hand out what is new.
/// Until the row is done, the last `longest stop − 1` bytes stay back: they might begin a stop string.
fn emit(
    tok: &HfTokenizer,
    spec: &RowSpec,
    s: &mut RowState,
    finishing: bool,
    i: usize,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<()> {
    let mut text = tok.decode(&s.gen.completion_ids, true)?;
    if let Some(cut) = spec.stop.iter().filter_map(|p| text.find(p.as_str())).min() {
        text.truncate(cut);
        if !s.done {
            s.done = true;
            s.gen.finish = FinishReason::Stop;
        }
    }
    let done = s.done || finishing;
    let hold = if done { 0 } else { spec.stop.iter().map(|p| p.len().saturating_sub(1)).max().unwrap_or(0) };
    // A token that ends inside a multi-byte character decodes to U+FFFD until the character is complete.
    let stable = if done { text.len() } else { text.trim_end_matches('\u{FFFD}').len() };
    let mut upto = stable.saturating_sub(hold);
    while !text.is_char_boundary(upto) {
        upto -= 1;
    }
    if upto > s.emitted {
        on_text(i, &text[s.emitted..upto]);
        s.emitted = upto;
    }
    if done {
        s.gen.completion = text;
    }
    Ok(())
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
