//! ShareGPT / LLaMA-Factory conversations: `messages` (or `conversations`) of `{from, value}` or
//! `{role, content}` turns, an optional `system` string.
//!
//! - `sharegpt`: `messages` [+ `label`]; the last message is the assistant's completion. With a label
//!   (or `label_from`'s field) the rows are unpaired feedback, else SFT.
//! - `sharegpt_dpo`: `conversations` + `chosen` + `rejected`, each side one message (or a list).

use serde_json::Value;

use super::fields::{content, kind, message, messages, split_reply, with_system, Fields, Msg};
use super::scores::{label, LabelFrom};
use super::Converted;
use crate::data::rows::Content;
use crate::data::Shape;

/// `messages` without a TRL `prompt`: unpaired when labelled, else SFT.
pub(super) fn detect(obj: &Fields, labelled: bool) -> Option<Shape> {
    let chat = obj.contains_key("messages") && !obj.contains_key("prompt");
    chat.then_some(if labelled { Shape::Unpaired } else { Shape::Sft })
}

/// `conversations` + `chosen` + `rejected`.
pub(super) fn detect_dpo(obj: &Fields, _labelled: bool) -> Option<Shape> {
    ["conversations", "chosen", "rejected"].iter().all(|k| obj.contains_key(*k)).then_some(Shape::Paired)
}

pub(super) fn convert(obj: &Fields, shape: Shape, label_from: Option<&LabelFrom>) -> Msg {
    let mut messages = messages(obj, "messages")?;
    let last = split_reply("messages", &mut messages)?;
    let prompt = with_system(obj, Content::Messages(messages))?;
    let completion = Content::Messages(vec![last]);
    Ok(match shape {
        Shape::Unpaired => Converted::Unpaired(prompt, completion, label(obj, label_from, false)?),
        _ => Converted::Sft(prompt, completion),
    })
}

pub(super) fn convert_dpo(obj: &Fields) -> Msg {
    let prompt = with_system(obj, Content::Messages(messages(obj, "conversations")?))?;
    let side = |name: &str| -> Result<Content, String> {
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
