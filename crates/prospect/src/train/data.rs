//! The data half of a run: read the files (any layout), hold out eval rows, unpair and balance KTO
//! feedback, tokenize with the chat template, and choose λ when `auto_weights` asks. Everything it
//! decides is reported as [`Event::Notice`]s, so nothing is dropped or reweighted silently.

use std::path::Path;

use super::Event;
use crate::config::TrainConfig;
use crate::data::balance::{balanced_weights, hold_out, keep_fractions, single_class_warning};
use crate::data::examples::prepare_with;
use crate::data::tokenize::Encoder;
use crate::data::{read_rows, unpair, ChatTemplate, Examples, PrepareReport, ReadReport, Rows};
use crate::data::{Sequence, Shape};
use crate::error::{Error, Result};
use crate::loss::{kto::class_weight_advice, Family, LossConfig};
use crate::model::HfTokenizer;

/// What a run trains and evaluates on.
pub struct RunData {
    pub train: Examples,
    pub eval: Option<Examples>,
    /// The loss as configured, with λ_D / λ_U replaced when `auto_weights` is on.
    pub loss: LossConfig,
    /// Rows skipped as invalid (`skip_invalid`), over the train and eval files.
    pub skipped_invalid: usize,
}

pub fn load(config: &TrainConfig, tok: &HfTokenizer, on_event: &mut dyn FnMut(Event)) -> Result<RunData> {
    let options = config.read_options();
    let (rows, report) = read_rows(&config.train_data, &options)?;
    let mut skipped_invalid = report.skipped.len();
    report_read(&config.train_data, &rows, &report, on_event);
    let (rows, eval_rows) = match &config.eval_data {
        Some(path) => {
            let (eval, eval_report) = read_rows(path, &options)?;
            skipped_invalid += eval_report.skipped.len();
            report_read(path, &eval, &eval_report, on_event);
            (rows, Some(eval))
        }
        None if config.eval_fraction > 0.0 => {
            let (train, eval) = hold_out(rows, config.eval_fraction, config.seed);
            on_event(Event::Notice(format!(
                "held out {} of {} rows for evaluation (eval_fraction = {}, seed {})",
                eval.len(),
                train.len() + eval.len(),
                config.eval_fraction,
                config.seed
            )));
            (train, Some(eval))
        }
        None => (rows, None),
    };
    let conversational = rows.is_conversational() || eval_rows.as_ref().is_some_and(Rows::is_conversational);
    let template =
        if conversational { Some(ChatTemplate::for_tokenizer(tok, config.chat_template.as_deref())?) } else { None };
    let encoder = Encoder { tok, template: template.as_ref() };
    let kind = config.loss.shape();

    // Unpaired feedback (KTO): unpair (TRL's block order), then keep the configured fraction of each side.
    let rows = match (kind, rows) {
        (Shape::Unpaired, rows) if config.desirable_fraction < 1.0 || config.undesirable_fraction < 1.0 => {
            let unpaired = match rows {
                Rows::Paired(p) => unpair(&p),
                Rows::Unpaired(u) => u,
                other => return prepare_only(config, other, encoder, on_event, skipped_invalid, eval_rows),
            };
            let count = |v: &[crate::data::UnpairedRow]| {
                (v.iter().filter(|r| r.label).count(), v.iter().filter(|r| !r.label).count())
            };
            let before = count(&unpaired);
            let kept = keep_fractions(unpaired, config.desirable_fraction, config.undesirable_fraction, config.seed);
            let after = count(&kept);
            on_event(Event::Notice(format!(
                "kept {} of {} desirable rows (desirable_fraction = {}) and {} of {} undesirable (undesirable_fraction = {}), seed {}",
                after.0, before.0, config.desirable_fraction, after.1, before.1, config.undesirable_fraction, config.seed
            )));
            Rows::Unpaired(kept)
        }
        (_, rows) => rows,
    };
    prepare_only(config, rows, encoder, on_event, skipped_invalid, eval_rows)
}

fn prepare_only(
    config: &TrainConfig,
    rows: Rows,
    encoder: Encoder,
    on_event: &mut dyn FnMut(Event),
    skipped_invalid: usize,
    eval_rows: Option<Rows>,
) -> Result<RunData> {
    let control_ids = match config.loss.spec().control_tokens() {
        Some((good, bad)) => Some((encoder.tok.token_id(good)?, encoder.tok.token_id(bad)?)),
        None => None,
    };
    let kind = config.loss.shape();
    let (train, report) = prepare_with(rows, kind, encoder, config.max_length, &config.train_data)?;
    let eval = match eval_rows {
        Some(rows) => {
            let path = config.eval_data.as_deref().unwrap_or(&config.train_data);
            let (eval, eval_report) = prepare_with(rows, kind, encoder, config.max_length, path)?;
            report_prepare(config, path, &eval, &eval_report, None, on_event);
            Some(eval)
        }
        None => None,
    };
    check_kl_pairs(config, &train, on_event)?;
    let mut loss = config.loss.clone();
    if let (true, Examples::Unpaired(v)) = (config.auto_weights, &train) {
        let nd = v.iter().filter(|e| e.label).count();
        let Some((ld, lu)) = balanced_weights(nd, v.len() - nd) else {
            let why = single_class_warning(nd, v.len() - nd).unwrap_or_default();
            return Err(Error::DataFile {
                path: config.train_data.clone(),
                message: format!("auto_weights = true has no ratio to aim for: {why}; or set auto_weights = false"),
            });
        };
        loss.set_class_weights(ld, lu);
        on_event(Event::Notice(format!(
            "auto_weights: {nd} desirable and {} undesirable examples; desirable_weight = {ld:.4}, undesirable_weight = {lu:.4} \
             (λ_D·n_D/(λ_U·n_U) = 7/6, the middle of the paper's [1, 4/3])",
            v.len() - nd
        )));
    }
    report_prepare(config, &config.train_data, &train, &report, Some(&loss), on_event);
    let (train, eval) = match control_ids {
        Some(ids) => (with_control_tokens(train, ids)?, eval.map(|e| with_control_tokens(e, ids)).transpose()?),
        None => (train, eval),
    };
    Ok(RunData { train, eval, loss, skipped_invalid })
}

/// KTO's KL term pairs each prompt with another example's completion (`rotate_for_kl`): with one
/// example the pair would be the example with itself, which is not a mismatched pair. A last microbatch of
/// one example (`n % microbatch_size == 1`) pairs that example with itself, as TRL's rotation does: said,
/// not refused.
fn check_kl_pairs(config: &TrainConfig, train: &Examples, on_event: &mut dyn FnMut(Event)) -> Result<()> {
    let Family::Unpaired(loss) = config.loss.family() else { return Ok(()) };
    if !loss.kl_pairs() {
        return Ok(());
    }
    if train.len() < 2 {
        return Err(Error::DataFile {
            path: config.train_data.clone(),
            message: format!(
                "`{}` estimates its KL term from mismatched pairs (a prompt with another example's completion), \
                 which needs at least 2 examples; this file gives {}",
                config.loss.name(),
                train.len()
            ),
        });
    }
    if train.len() % config.microbatch_size == 1 {
        on_event(Event::Notice(format!(
            "{} examples in microbatches of {}: the last microbatch of each epoch holds one example, so its KL \
             pair is that example with itself (TRL's rotation does the same); drop or add an example to avoid it",
            train.len(),
            config.microbatch_size
        )));
    }
    Ok(())
}

/// CSFT's data transform: labelled rows become SFT examples whose completion starts with the control
/// token of their label, `<|good|> y` or `<|bad|> y` (HALOs' `ConditionalSFTDataLoader`).
fn with_control_tokens(examples: Examples, (good, bad): (u32, u32)) -> Result<Examples> {
    let Examples::Unpaired(rows) = examples else {
        return Err(crate::error::Error::Compute("control tokens apply to labelled rows".into()));
    };
    let seqs = rows
        .into_iter()
        .map(|e| {
            let control = if e.label { good } else { bad };
            let completion_ids = std::iter::once(control).chain(e.seq.completion_ids).collect();
            Sequence { prompt_ids: e.seq.prompt_ids, completion_ids }
        })
        .collect();
    Ok(Examples::Sft(seqs))
}

fn report_read(path: &Path, rows: &Rows, report: &ReadReport, on_event: &mut dyn FnMut(Event)) {
    let path = path.display();
    on_event(Event::Notice(format!(
        "{path}: {} {}, format {}{}, {} rows",
        report.records,
        if report.records == 1 { "record" } else { "records" },
        report.format,
        if rows.is_conversational() { " (conversational)" } else { "" },
        rows.len()
    )));
    if report.filtered > 0 {
        on_event(Event::Notice(format!(
            "{path}: left out {} records: {}",
            report.filtered,
            report.filter_rule.unwrap_or("the layout's rule")
        )));
    }
    if let Some(t) = report.label_threshold {
        on_event(Event::Notice(format!(
            "{path}: label_from threshold {t}: a row is desirable when its score is >= {t}"
        )));
    }
    if !report.skipped.is_empty() {
        on_event(Event::Notice(format!(
            "{path}: skipped {} invalid rows (skip_invalid = true); first: {}",
            report.skipped.len(),
            report.skipped[0]
        )));
    }
}

/// `loss` is the training loss for the training file (class-weight advice), `None` for eval files.
fn report_prepare(
    config: &TrainConfig,
    path: &Path,
    examples: &Examples,
    report: &PrepareReport,
    loss: Option<&LossConfig>,
    on_event: &mut dyn FnMut(Event),
) {
    let path = path.display();
    on_event(Event::Notice(format!("{path}: {} rows read, {} examples", report.rows_read, examples.len())));
    if report.rows_unused > 0 {
        on_event(Event::Notice(format!(
            "{path}: {} rows not used by `{}` (SFT keeps desirable/chosen completions)",
            report.rows_unused,
            config.loss.name()
        )));
    }
    if report.dropped_long_prompt > 0 {
        on_event(Event::Notice(format!(
            "{path}: dropped {} examples whose prompt alone fills max_length = {}",
            report.dropped_long_prompt, config.max_length
        )));
    }
    if report.tokenize.prompt_not_prefix > 0 {
        on_event(Event::Notice(format!(
            "{path}: in {} rows the tokenized prompt is not a prefix of prompt + completion (the chat template renders the prompt \
             differently, or tokens merge across the boundary); the completion starts where they diverge. First dropped prompt text: {:?}",
            report.tokenize.prompt_not_prefix,
            report.tokenize.first_mismatch.as_deref().unwrap_or("")
        )));
    }
    let weights = loss.and_then(LossConfig::class_weights);
    if let (Some((ld, lu)), Examples::Unpaired(v), false) = (weights, examples, config.auto_weights) {
        let nd = v.iter().filter(|e| e.label).count();
        // With one class there is no ratio: say so instead of advising weights that cannot apply.
        let advice = single_class_warning(nd, v.len() - nd).or_else(|| class_weight_advice(ld, lu, nd, v.len() - nd));
        if let Some(advice) = advice {
            on_event(Event::Notice(advice));
        }
    }
}
