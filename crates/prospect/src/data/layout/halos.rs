//! HALOs' feedback files: `type = "binary_feedback"` (unpaired; `prompt`, `output`, `label` 1/0 or a
//! boolean) and `type = "pairwise_feedback"` (paired; `output_A`, `output_B`, `label` 1 when A wins).
//! A string output after a conversational prompt is the assistant's reply.

use serde_json::Value;

use super::fields::{content, known_label, Fields, Msg};
use super::scores::{label, LabelFrom};
use super::Converted;
use crate::data::rows::{Content, Message};
use crate::data::Shape;

/// `type = "binary_feedback"`.
pub(super) fn detect_binary(obj: &Fields, _labelled: bool) -> Option<Shape> {
    (obj.get("type").and_then(Value::as_str) == Some("binary_feedback")).then_some(Shape::Unpaired)
}

/// `type = "pairwise_feedback"`.
pub(super) fn detect_pairwise(obj: &Fields, _labelled: bool) -> Option<Shape> {
    (obj.get("type").and_then(Value::as_str) == Some("pairwise_feedback")).then_some(Shape::Paired)
}

pub(super) fn convert_binary(obj: &Fields, label_from: Option<&LabelFrom>) -> Msg {
    let prompt = content(obj, "prompt")?;
    let output = reply(obj, "output", &prompt)?;
    Ok(Converted::Unpaired(prompt, output, label(obj, label_from, true)?))
}

pub(super) fn convert_pairwise(obj: &Fields) -> Msg {
    let prompt = content(obj, "prompt")?;
    let a = reply(obj, "output_A", &prompt)?;
    let b = reply(obj, "output_B", &prompt)?;
    let a_wins = known_label(obj, true)?;
    Ok(if a_wins { Converted::Paired(prompt, a, b) } else { Converted::Paired(prompt, b, a) })
}

/// HALOs outputs: a message list, or a string that is the assistant's reply to a conversational prompt.
fn reply(obj: &Fields, name: &str, prompt: &Content) -> Result<Content, String> {
    match (content(obj, name)?, prompt) {
        (Content::Text(t), Content::Messages(_)) => Ok(Content::Messages(vec![Message::new("assistant", &t)])),
        (Content::Messages(_), Content::Text(_)) => Err(format!(
            "field `{name}` is a list of messages but `prompt` is a string; expected both text or both messages"
        )),
        (c, _) => Ok(c),
    }
}
