//! Data layouts as they appear in the wild, converted into Prospect's canonical rows (TRL's shapes).
//!
//! | `data_format`     | detected from                              | becomes                              |
//! |-------------------|--------------------------------------------|--------------------------------------|
//! | `trl`             | `prompt` + `completion`/`chosen`/`label`   | as is (text or messages)             |
//! | `halos_binary`    | `type = "binary_feedback"`                 | unpaired; `label` 1/0                |
//! | `halos_pairwise`  | `type = "pairwise_feedback"`               | paired; `label` 1 → `output_A` wins  |
//! | `sharegpt`        | `messages` (+ `label`)                     | unpaired with `label`, else SFT      |
//! | `sharegpt_dpo`    | `conversations` + `chosen` + `rejected`    | paired                               |
//! | `hh_rlhf`         | `chosen` + `rejected` strings, no `prompt` | paired; turns from `\n\nHuman:` ...  |
//! | `shp`             | `history` + `human_ref_A` + `human_ref_B`  | paired; score ratio ≥ 2 kept         |
//! | `oasst1`          | `message_id` + `parent_id` + `role`        | paired; adjacent-rank siblings       |
//! | `ultrafeedback`   | `instruction` + `completions`              | paired; best vs worst `overall_score`|
//!
//! In every conversational result the prompt is the messages before the reply and the completion is
//! one assistant message. A row whose fields do not fit gives `FILE:LINE: what is wrong, what was
//! expected`; with `skip_invalid` it is skipped and counted instead. Rows a layout's own rule leaves
//! out (SHP's ratio, UltraFeedback ties) are counted in the report, never dropped silently.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::chat::Message;
use super::read::{Container, ReadOptions, ReadReport, Record};
use super::rows::{Content, PairedRow, RowFormat, Rows, SftRow, UnpairedRow};
use crate::error::{Error, Result};

/// The layout of a data file; `data_format = "..."` in the config names one to skip detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Trl,
    HalosBinary,
    HalosPairwise,
    Sharegpt,
    SharegptDpo,
    HhRlhf,
    Shp,
    Oasst1,
    Ultrafeedback,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Trl => "trl",
            DataFormat::HalosBinary => "halos_binary",
            DataFormat::HalosPairwise => "halos_pairwise",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::SharegptDpo => "sharegpt_dpo",
            DataFormat::HhRlhf => "hh_rlhf",
            DataFormat::Shp => "shp",
            DataFormat::Oasst1 => "oasst1",
            DataFormat::Ultrafeedback => "ultrafeedback",
        }
    }
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `label_from = { field = "rating", threshold = 7.0 }`: a row is desirable when its score is at least
/// the threshold (`"mean"` and `"median"` are over the file's scores).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelFrom {
    pub field: String,
    pub threshold: Threshold,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Threshold {
    Value(f64),
    Statistic(Statistic),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    Mean,
    Median,
}

/// A record's layout and the row shape it gives: the unit of "the format changed mid-file".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    format: DataFormat,
    shape: RowFormat,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.format {
            DataFormat::Trl => write!(f, "TRL {}", self.shape),
            DataFormat::Sharegpt => write!(f, "ShareGPT messages ({})", self.shape),
            other => write!(f, "{other}"),
        }
    }
}

/// A desirable/undesirable label, or the score it will be computed from.
#[derive(Debug, Clone, Copy)]
enum Label {
    Known(bool),
    Score(f64),
}

enum Converted {
    Unpaired(Content, Content, Label),
    Paired(Content, Content, Content),
    Sft(Content, Content),
    /// Left out by the layout's own rule (counted).
    Filtered,
}

type Fields = Map<String, Value>;
type Msg = std::result::Result<Converted, String>;

fn detect(obj: &Fields, label_from: Option<&LabelFrom>) -> Option<Layout> {
    let has = |k: &str| obj.contains_key(k);
    let labelled = has("label") || label_from.is_some_and(|l| has(&l.field));
    let layout = |format, shape| Some(Layout { format, shape });
    match obj.get("type").and_then(Value::as_str) {
        Some("binary_feedback") => return layout(DataFormat::HalosBinary, RowFormat::Unpaired),
        Some("pairwise_feedback") => return layout(DataFormat::HalosPairwise, RowFormat::Paired),
        _ => {}
    }
    if has("conversations") && has("chosen") && has("rejected") {
        layout(DataFormat::SharegptDpo, RowFormat::Paired)
    } else if has("messages") && !has("prompt") {
        layout(DataFormat::Sharegpt, if labelled { RowFormat::Unpaired } else { RowFormat::Sft })
    } else if has("history") && has("human_ref_A") && has("human_ref_B") {
        layout(DataFormat::Shp, RowFormat::Paired)
    } else if has("message_id") && has("parent_id") && has("role") && has("text") {
        layout(DataFormat::Oasst1, RowFormat::Paired)
    } else if has("instruction") && has("completions") {
        layout(DataFormat::Ultrafeedback, RowFormat::Paired)
    } else if has("chosen") && has("rejected") && !has("prompt") {
        layout(DataFormat::HhRlhf, RowFormat::Paired)
    } else if has("chosen") || has("rejected") {
        layout(DataFormat::Trl, RowFormat::Paired)
    } else if labelled && (has("prompt") || has("completion")) {
        layout(DataFormat::Trl, RowFormat::Unpaired)
    } else if has("completion") || has("prompt") {
        layout(DataFormat::Trl, RowFormat::Sft)
    } else {
        None
    }
}

/// The shape a forced `data_format` gives a record.
fn forced(format: DataFormat, obj: &Fields, label_from: Option<&LabelFrom>) -> Layout {
    let labelled = obj.contains_key("label") || label_from.is_some_and(|l| obj.contains_key(&l.field));
    let shape = match format {
        DataFormat::Trl if obj.contains_key("chosen") || obj.contains_key("rejected") => RowFormat::Paired,
        DataFormat::Trl | DataFormat::Sharegpt if labelled => RowFormat::Unpaired,
        DataFormat::Trl | DataFormat::Sharegpt => RowFormat::Sft,
        DataFormat::HalosBinary => RowFormat::Unpaired,
        _ => RowFormat::Paired,
    };
    Layout { format, shape }
}

/// Records → rows, as `options` says. See the module doc for the layouts.
pub fn convert(
    container: Container,
    records: Vec<Result<Record>>,
    path: &Path,
    options: &ReadOptions,
) -> Result<(Rows, ReadReport)> {
    let mut report = ReadReport {
        container,
        format: options.format.unwrap_or(DataFormat::Trl),
        records: records.len(),
        skipped: vec![],
        filtered: 0,
        filter_rule: None,
        label_threshold: None,
    };
    let err = |line: usize, message: String| Error::Data { path: path.to_path_buf(), line, message };
    // Bad records: an error, or skipped and counted.
    let skip = |report: &mut ReadReport, e: Error| -> Result<()> {
        if options.skip_invalid {
            report.skipped.push(e.to_string());
            Ok(())
        } else {
            Err(e)
        }
    };
    let label_from = options.label_from.as_ref();
    let mut first: Option<(Layout, usize)> = None;
    let mut converted: Vec<(usize, Converted)> = Vec::new();
    let mut oasst: Vec<(usize, Fields)> = Vec::new();
    for record in records {
        let (line, obj) = match record {
            Ok(Record { line, value: Value::Object(obj) }) => (line, obj),
            Ok(Record { line, value }) => {
                skip(&mut report, err(line, format!("expected a JSON object per row, got {}", kind(&value))))?;
                continue;
            }
            Err(e) => {
                skip(&mut report, e)?;
                continue;
            }
        };
        let layout = match options.format {
            Some(f) => forced(f, &obj, label_from),
            None => match detect(&obj, label_from) {
                Some(l) => l,
                None => {
                    skip(&mut report, err(line, format!(
                        "cannot tell the data format from the fields {:?}; expected TRL (prompt + completion [+ label] or prompt + chosen + rejected), \
                         ShareGPT (messages [+ label] or conversations + chosen + rejected), HALOs, HH-RLHF, SHP, oasst1 or UltraFeedback fields, \
                         or set data_format",
                        obj.keys().collect::<Vec<_>>()
                    )))?;
                    continue;
                }
            },
        };
        match first {
            None => first = Some((layout, line)),
            Some((f, at)) if f != layout => {
                skip(
                    &mut report,
                    err(line, format!("this row is {layout}, but the file started as {f} at line {at}")),
                )?;
                continue;
            }
            _ => {}
        }
        if layout.format == DataFormat::Oasst1 {
            oasst.push((line, obj));
            continue;
        }
        match convert_one(layout, &obj, label_from) {
            Ok(c) => converted.push((line, c)),
            Err(m) => skip(&mut report, err(line, m))?,
        }
    }
    let Some((layout, _)) = first else {
        let message = if report.skipped.is_empty() {
            "the file has no rows".to_string()
        } else {
            format!(
                "no valid rows: all {} were skipped as invalid; the first: {}",
                report.skipped.len(),
                report.skipped[0]
            )
        };
        return Err(Error::DataFile { path: path.to_path_buf(), message });
    };
    report.format = layout.format;
    report.filter_rule = filter_rule(layout.format);
    if layout.format == DataFormat::Oasst1 {
        let (pairs, deleted) = oasst1_pairs(&oasst, &mut |line, m| skip(&mut report, err(line, m)))?;
        report.filtered += deleted;
        converted.extend(pairs);
    }
    let rows = assemble(layout.shape, converted, label_from, &mut report)
        .map_err(|m| Error::DataFile { path: path.to_path_buf(), message: m })?;
    if rows.is_empty() {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            message: format!(
                "no usable rows: {} records, {} left out ({})",
                report.records,
                report.filtered,
                report.filter_rule.unwrap_or("no rule applies")
            ),
        });
    }
    Ok((rows, report))
}

/// What a layout leaves out by its own rule, in words.
fn filter_rule(format: DataFormat) -> Option<&'static str> {
    match format {
        DataFormat::Shp => Some("SHP pairs whose score ratio is below 2, as in the KTO paper"),
        DataFormat::Ultrafeedback => Some("UltraFeedback rows whose completions all have the same overall_score"),
        DataFormat::Oasst1 => Some("oasst1 messages marked deleted"),
        _ => None,
    }
}

fn assemble(
    shape: RowFormat,
    converted: Vec<(usize, Converted)>,
    label_from: Option<&LabelFrom>,
    report: &mut ReadReport,
) -> std::result::Result<Rows, String> {
    let mut unpaired: Vec<(UnpairedRow, Label)> = vec![];
    let mut paired = vec![];
    let mut sft = vec![];
    for (line, c) in converted {
        match c {
            Converted::Unpaired(prompt, completion, label) => {
                unpaired.push((UnpairedRow { prompt, completion, label: false, line }, label))
            }
            Converted::Paired(prompt, chosen, rejected) => paired.push(PairedRow { prompt, chosen, rejected, line }),
            Converted::Sft(prompt, completion) => sft.push(SftRow { prompt, completion, line }),
            Converted::Filtered => report.filtered += 1,
        }
    }
    Ok(match shape {
        RowFormat::Unpaired => {
            let scores: Vec<f64> =
                unpaired.iter().filter_map(|(_, l)| if let Label::Score(s) = l { Some(*s) } else { None }).collect();
            let threshold = match label_from.map(|l| l.threshold) {
                None => None,
                Some(Threshold::Value(t)) => Some(t),
                Some(Threshold::Statistic(s)) => statistic(s, &scores),
            };
            report.label_threshold = threshold;
            Rows::Unpaired(
                unpaired
                    .into_iter()
                    .map(|(mut row, label)| {
                        row.label = match label {
                            Label::Known(b) => b,
                            Label::Score(s) => s >= threshold.unwrap_or(f64::INFINITY),
                        };
                        row
                    })
                    .collect(),
            )
        }
        RowFormat::Paired => Rows::Paired(paired),
        RowFormat::Sft => Rows::Sft(sft),
    })
}

/// numpy's mean and median (the median of an even count is the mean of the middle two).
pub fn statistic(s: Statistic, scores: &[f64]) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    Some(match s {
        Statistic::Mean => scores.iter().sum::<f64>() / scores.len() as f64,
        Statistic::Median => {
            let mut v = scores.to_vec();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        }
    })
}

fn convert_one(layout: Layout, obj: &Fields, label_from: Option<&LabelFrom>) -> Msg {
    match (layout.format, layout.shape) {
        (DataFormat::Trl, shape) => trl(obj, shape, label_from),
        (DataFormat::HalosBinary, _) => {
            let prompt = content(obj, "prompt")?;
            let output = reply(obj, "output", &prompt)?;
            Ok(Converted::Unpaired(prompt, output, label(obj, label_from, true)?))
        }
        (DataFormat::HalosPairwise, _) => {
            let prompt = content(obj, "prompt")?;
            let a = reply(obj, "output_A", &prompt)?;
            let b = reply(obj, "output_B", &prompt)?;
            let a_wins = known_label(obj, true)?;
            Ok(if a_wins { Converted::Paired(prompt, a, b) } else { Converted::Paired(prompt, b, a) })
        }
        (DataFormat::Sharegpt, shape) => {
            let mut messages = messages(obj, "messages")?;
            let last = split_reply("messages", &mut messages)?;
            let prompt = with_system(obj, Content::Messages(messages))?;
            let completion = Content::Messages(vec![last]);
            Ok(match shape {
                RowFormat::Unpaired => Converted::Unpaired(prompt, completion, label(obj, label_from, false)?),
                _ => Converted::Sft(prompt, completion),
            })
        }
        (DataFormat::SharegptDpo, _) => {
            let prompt = with_system(obj, Content::Messages(messages(obj, "conversations")?))?;
            let side = |name: &str| -> std::result::Result<Content, String> {
                let m = match obj.get(name) {
                    Some(Value::Object(o)) => message(o).map_err(|e| format!("field `{name}`: {e}"))?,
                    Some(Value::Array(_)) => return content(obj, name),
                    Some(other) => {
                        return Err(format!("field `{name}` must be one {{from, value}} message, got {}", kind(other)))
                    }
                    None => return Err(format!("field `{name}` is missing; expected one {{from, value}} message")),
                };
                Ok(Content::Messages(vec![m]))
            };
            Ok(Converted::Paired(prompt, side("chosen")?, side("rejected")?))
        }
        (DataFormat::HhRlhf, _) => {
            let mut chosen = hh_turns(&string(obj, "chosen")?).map_err(|e| format!("field `chosen`: {e}"))?;
            let mut rejected = hh_turns(&string(obj, "rejected")?).map_err(|e| format!("field `rejected`: {e}"))?;
            let c = split_reply("chosen", &mut chosen)?;
            let r = split_reply("rejected", &mut rejected)?;
            if chosen != rejected {
                return Err("the `chosen` and `rejected` conversations differ before their last Assistant reply; expected one shared dialogue".into());
            }
            Ok(Converted::Paired(Content::Messages(chosen), Content::Messages(vec![c]), Content::Messages(vec![r])))
        }
        (DataFormat::Shp, _) => {
            let history = string(obj, "history")?;
            let (a, b) = (string(obj, "human_ref_A")?, string(obj, "human_ref_B")?);
            let (sa, sb) = (number(obj, "score_A")?, number(obj, "score_B")?);
            let a_wins = match obj.get("labels") {
                Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
                Some(Value::Number(n)) if n.as_f64() == Some(0.0) => false,
                Some(other) => {
                    return Err(format!(
                        "field `labels` must be 1 (A preferred) or 0 (B preferred), got {}",
                        kind(other)
                    ))
                }
                None => return Err("field `labels` is missing; expected 1 (A preferred) or 0 (B preferred)".into()),
            };
            // The KTO paper's SHP filter (from HALOs): keep pairs whose score ratio is at least 2.
            let (hi, lo) = (sa.max(sb), sa.min(sb));
            let keep = hi > 0.0 && hi >= 2.0 * lo;
            if !keep {
                return Ok(Converted::Filtered);
            }
            let prompt = Content::Messages(vec![Message::new("user", &history)]);
            let reply = |t: &str| Content::Messages(vec![Message::new("assistant", t)]);
            Ok(if a_wins {
                Converted::Paired(prompt, reply(&a), reply(&b))
            } else {
                Converted::Paired(prompt, reply(&b), reply(&a))
            })
        }
        (DataFormat::Ultrafeedback, _) => {
            let instruction = string(obj, "instruction")?;
            let Some(Value::Array(list)) = obj.get("completions") else {
                return Err("field `completions` must be a list of {response, overall_score} objects".into());
            };
            let mut scored = Vec::new();
            for (i, c) in list.iter().enumerate() {
                let Value::Object(c) = c else {
                    return Err(format!(
                        "field `completions`[{i}] must be an object with `response` and `overall_score`"
                    ));
                };
                let response = string(c, "response").map_err(|e| format!("`completions`[{i}]: {e}"))?;
                let score = number(c, "overall_score").map_err(|e| format!("`completions`[{i}]: {e}"))?;
                scored.push((score, response));
            }
            if scored.len() < 2 {
                return Err(format!(
                    "field `completions` has {} entries; expected at least 2 to form a pair",
                    scored.len()
                ));
            }
            // Best against worst by `overall_score`; the first on ties. Equal scores carry no preference.
            let best = scored.iter().enumerate().fold(0, |b, (i, s)| if s.0 > scored[b].0 { i } else { b });
            let worst = scored.iter().enumerate().fold(0, |w, (i, s)| if s.0 < scored[w].0 { i } else { w });
            if scored[best].0 == scored[worst].0 {
                return Ok(Converted::Filtered);
            }
            let prompt = Content::Messages(vec![Message::new("user", &instruction)]);
            let reply = |t: &str| Content::Messages(vec![Message::new("assistant", t)]);
            Ok(Converted::Paired(prompt, reply(&scored[best].1), reply(&scored[worst].1)))
        }
        (DataFormat::Oasst1, _) => unreachable!("oasst1 is converted per tree, in oasst1_pairs"),
    }
}

fn trl(obj: &Fields, shape: RowFormat, label_from: Option<&LabelFrom>) -> Msg {
    let prompt = with_system(obj, content(obj, "prompt")?)?;
    let same_kind = |name: &str, c: &Content| {
        if c.is_messages() == prompt.is_messages() {
            Ok(())
        } else {
            Err(format!("fields `prompt` and `{name}` must both be text or both be lists of messages"))
        }
    };
    match shape {
        RowFormat::Unpaired | RowFormat::Sft => {
            let completion = content(obj, "completion")?;
            same_kind("completion", &completion)?;
            Ok(match shape {
                RowFormat::Unpaired => Converted::Unpaired(prompt, completion, label(obj, label_from, false)?),
                _ => Converted::Sft(prompt, completion),
            })
        }
        RowFormat::Paired => {
            let (chosen, rejected) = (content(obj, "chosen")?, content(obj, "rejected")?);
            same_kind("chosen", &chosen)?;
            same_kind("rejected", &rejected)?;
            Ok(Converted::Paired(prompt, chosen, rejected))
        }
    }
}

/// The label: from `label_from`'s field when set, else `label` (a boolean; HALOs also writes 1/0).
fn label(obj: &Fields, label_from: Option<&LabelFrom>, allow_int: bool) -> std::result::Result<Label, String> {
    if let Some(lf) = label_from {
        return Ok(Label::Score(number(obj, &lf.field)?));
    }
    known_label(obj, allow_int).map(Label::Known)
}

/// The `label` field: a boolean, or (HALOs) 1 / 0 when `allow_int`.
fn known_label(obj: &Fields, allow_int: bool) -> std::result::Result<bool, String> {
    match obj.get("label") {
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Number(n)) if allow_int && (n.as_f64() == Some(1.0) || n.as_f64() == Some(0.0)) => {
            Ok(n.as_f64() == Some(1.0))
        }
        Some(other) if allow_int => Err(format!("field `label` must be 1, 0, true or false, got {}", kind(other))),
        Some(other) => Err(format!("field `label` must be true or false, got {}", kind(other))),
        None => Err("field `label` is missing; expected true or false".into()),
    }
}

fn string(obj: &Fields, name: &str) -> std::result::Result<String, String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field `{name}` must be a string, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected a string")),
    }
}

fn number(obj: &Fields, name: &str) -> std::result::Result<f64, String> {
    match obj.get(name) {
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| format!("field `{name}` is not a finite number")),
        Some(other) => Err(format!("field `{name}` must be a number, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected a number")),
    }
}

/// A string (plain text) or a non-empty list of messages.
fn content(obj: &Fields, name: &str) -> std::result::Result<Content, String> {
    const WANT: &str = "a string or a list of {role, content} messages";
    match obj.get(name) {
        Some(Value::String(s)) => Ok(Content::Text(s.clone())),
        Some(Value::Array(_)) => Ok(Content::Messages(messages(obj, name)?)),
        Some(other) => Err(format!("field `{name}` must be {WANT}, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected {WANT}")),
    }
}

/// HALOs outputs: a message list, or a string that is the assistant's reply to a conversational prompt.
fn reply(obj: &Fields, name: &str, prompt: &Content) -> std::result::Result<Content, String> {
    match (content(obj, name)?, prompt) {
        (Content::Text(t), Content::Messages(_)) => Ok(Content::Messages(vec![Message::new("assistant", &t)])),
        (Content::Messages(_), Content::Text(_)) => Err(format!(
            "field `{name}` is a list of messages but `prompt` is a string; expected both text or both messages"
        )),
        (c, _) => Ok(c),
    }
}

fn messages(obj: &Fields, name: &str) -> std::result::Result<Vec<Message>, String> {
    let Some(Value::Array(list)) = obj.get(name) else {
        return match obj.get(name) {
            None => Err(format!("field `{name}` is missing; expected a list of {{role, content}} messages")),
            Some(other) => {
                Err(format!("field `{name}` must be a list of {{role, content}} messages, got {}", kind(other)))
            }
        };
    };
    if list.is_empty() {
        return Err(format!("field `{name}` is an empty list; expected at least one {{role, content}} message"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::Object(o) => message(o).map_err(|e| format!("field `{name}`[{i}]: {e}")),
            other => Err(format!("field `{name}`[{i}] must be a {{role, content}} object, got {}", kind(other))),
        })
        .collect()
}

/// `{role, content}`, or ShareGPT's `{from, value}` with `human`/`gpt`/`observation`/`function_call`.
fn message(o: &Fields) -> std::result::Result<Message, String> {
    let get = |k: &str| o.get(k).and_then(Value::as_str);
    let (role, content) = match (get("role"), get("content"), get("from"), get("value")) {
        (Some(r), Some(c), _, _) => (r, c),
        (_, _, Some(f), Some(v)) => (f, v),
        _ => {
            return Err(format!(
                "expected string fields `role` and `content` (or ShareGPT's `from` and `value`), got keys {:?}",
                o.keys().collect::<Vec<_>>()
            ))
        }
    };
    let role = match role {
        "human" => "user",
        "gpt" | "function_call" => "assistant",
        "observation" => "tool",
        other => other,
    };
    Ok(Message::new(role, content))
}

/// Split off the last message as the reply: it must be the assistant's, after at least one message.
fn split_reply(name: &str, messages: &mut Vec<Message>) -> std::result::Result<Message, String> {
    match messages.last() {
        Some(m) if m.role != "assistant" => Err(format!(
            "field `{name}`: the last message must be the assistant's reply (the completion), got role {:?}",
            m.role
        )),
        _ if messages.len() < 2 => Err(format!(
            "field `{name}` has {} message(s); expected at least one prompt message before the assistant's reply",
            messages.len()
        )),
        _ => Ok(messages.pop().unwrap_or_else(|| Message::new("assistant", ""))),
    }
}

/// An optional `system` string becomes the prompt's first message.
fn with_system(obj: &Fields, prompt: Content) -> std::result::Result<Content, String> {
    match (obj.get("system"), prompt) {
        (None | Some(Value::Null), p) => Ok(p),
        (Some(Value::String(s)), Content::Messages(mut m)) => {
            if !s.is_empty() {
                m.insert(0, Message::new("system", s));
            }
            Ok(Content::Messages(m))
        }
        (Some(Value::String(_)), Content::Text(_)) => {
            Err("field `system` needs a conversational prompt (a list of messages); put plain-text system prompts into `prompt`".into())
        }
        (Some(other), _) => Err(format!("field `system` must be a string, got {}", kind(other))),
    }
}

/// Anthropic HH-RLHF's `"\n\nHuman: ...\n\nAssistant: ..."` transcript as messages.
fn hh_turns(text: &str) -> std::result::Result<Vec<Message>, String> {
    const HUMAN: &str = "\n\nHuman:";
    const ASSISTANT: &str = "\n\nAssistant:";
    if !text.starts_with(HUMAN) {
        return Err(format!(
            "expected the transcript to start with {HUMAN:?}, got {:?}",
            text.chars().take(20).collect::<String>()
        ));
    }
    let mut out: Vec<Message> = Vec::new();
    let mut rest = text;
    loop {
        let (role, marker) = if rest.starts_with(HUMAN) { ("user", HUMAN) } else { ("assistant", ASSISTANT) };
        rest = &rest[marker.len()..];
        let next = [rest.find(HUMAN), rest.find(ASSISTANT)].into_iter().flatten().min();
        let body = &rest[..next.unwrap_or(rest.len())];
        out.push(Message::new(role, body.strip_prefix(' ').unwrap_or(body)));
        match next {
            Some(i) => rest = &rest[i..],
            None => break,
        }
    }
    Ok(out)
}

/// oasst1's message table: for each message with two or more ranked assistant replies, pair replies
/// of adjacent rank (rank 0 is best): (0 vs 1), (1 vs 2), ... The prompt is the thread from the root.
fn oasst1_pairs(
    records: &[(usize, Fields)],
    skip: &mut dyn FnMut(usize, String) -> Result<()>,
) -> Result<(Vec<(usize, Converted)>, usize)> {
    let mut deleted = 0;
    let mut by_id: HashMap<&str, (usize, &Fields)> = HashMap::new();
    // parent id → its ranked assistant replies as (rank, line, record)
    type Replies<'a> = Vec<(i64, usize, &'a Fields)>;
    let mut children: HashMap<&str, Replies> = HashMap::new();
    for (line, obj) in records {
        let Some(id) = obj.get("message_id").and_then(Value::as_str) else {
            skip(*line, "field `message_id` must be a string".into())?;
            continue;
        };
        if obj.get("deleted").and_then(Value::as_bool) == Some(true) {
            deleted += 1; // oasst1 marks removed messages; they are not part of the tree (counted).
            continue;
        }
        by_id.insert(id, (*line, obj));
        let parent = obj.get("parent_id").and_then(Value::as_str);
        let rank = obj.get("rank").and_then(Value::as_f64);
        let role = obj.get("role").and_then(Value::as_str);
        if let (Some(p), Some(r), Some("assistant")) = (parent, rank, role) {
            children.entry(p).or_default().push((r as i64, *line, obj));
        }
    }
    let thread = |start: &str| -> std::result::Result<Vec<Message>, String> {
        let mut out = Vec::new();
        let mut id = start.to_string();
        for _ in 0..10_000 {
            let Some((_, obj)) = by_id.get(id.as_str()) else {
                return Err(format!(
                    "message {id:?} of this reply's thread is not in the file; expected whole message trees"
                ));
            };
            let text = obj.get("text").and_then(Value::as_str).ok_or("field `text` must be a string")?;
            let role = match obj.get("role").and_then(Value::as_str) {
                Some("prompter") => "user",
                Some("assistant") => "assistant",
                other => return Err(format!("field `role` must be \"prompter\" or \"assistant\", got {other:?}")),
            };
            out.push(Message::new(role, text));
            match obj.get("parent_id").and_then(Value::as_str) {
                Some(p) => id = p.to_string(),
                None => break,
            }
        }
        out.reverse();
        Ok(out)
    };
    let mut parents: Vec<(&str, Replies)> = children.into_iter().filter(|(_, c)| c.len() >= 2).collect();
    parents.sort_by_key(|(_, c)| c.iter().map(|x| x.1).min());
    let mut out = Vec::new();
    for (parent, mut replies) in parents {
        replies.sort_by_key(|(rank, line, _)| (*rank, *line));
        let prompt = match thread(parent) {
            Ok(p) => p,
            Err(m) => {
                skip(replies[0].1, m)?;
                continue;
            }
        };
        for w in replies.windows(2) {
            let text = |o: &Fields| o.get("text").and_then(Value::as_str).unwrap_or_default().to_string();
            out.push((
                w[0].1,
                Converted::Paired(
                    Content::Messages(prompt.clone()),
                    Content::Messages(vec![Message::new("assistant", &text(w[0].2))]),
                    Content::Messages(vec![Message::new("assistant", &text(w[1].2))]),
                ),
            ));
        }
    }
    Ok((out, deleted))
}

pub(crate) fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}
