//! Reading typed fields out of a record, with the messages every layout shares: `field `x` must be ...,
//! got ...`. The layout stage adds the file and line.

use serde_json::{Map, Value};

use super::Converted;
use crate::data::rows::{Content, Message};

/// A record's fields.
pub(super) type Fields = Map<String, Value>;
/// A record converted, or what is wrong with it (the caller adds FILE:LINE).
pub(super) type Msg = std::result::Result<Converted, String>;
type Field<T> = std::result::Result<T, String>;

pub(super) fn string(obj: &Fields, name: &str) -> Field<String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field `{name}` must be a string, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected a string")),
    }
}

pub(super) fn number(obj: &Fields, name: &str) -> Field<f64> {
    match obj.get(name) {
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| format!("field `{name}` is not a finite number")),
        Some(other) => Err(format!("field `{name}` must be a number, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected a number")),
    }
}

/// The `label` field: a boolean, or (HALOs) 1 / 0 when `allow_int`.
pub(super) fn known_label(obj: &Fields, allow_int: bool) -> Field<bool> {
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

/// A string (plain text) or a non-empty list of messages.
pub(super) fn content(obj: &Fields, name: &str) -> Field<Content> {
    const WANT: &str = "a string or a list of {role, content} messages";
    match obj.get(name) {
        Some(Value::String(s)) => Ok(Content::Text(s.clone())),
        Some(Value::Array(_)) => Ok(Content::Messages(messages(obj, name)?)),
        Some(other) => Err(format!("field `{name}` must be {WANT}, got {}", kind(other))),
        None => Err(format!("field `{name}` is missing; expected {WANT}")),
    }
}

pub(super) fn messages(obj: &Fields, name: &str) -> Field<Vec<Message>> {
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
pub(super) fn message(o: &Fields) -> Field<Message> {
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
pub(super) fn split_reply(name: &str, messages: &mut Vec<Message>) -> Field<Message> {
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
pub(super) fn with_system(obj: &Fields, prompt: Content) -> Field<Content> {
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

/// A one-message assistant reply.
pub(super) fn assistant(text: &str) -> Content {
    Content::Messages(vec![Message::new("assistant", text)])
}

/// A one-message user prompt.
pub(super) fn user(text: &str) -> Content {
    Content::Messages(vec![Message::new("user", text)])
}

/// A JSON value in words, for "got ..." in messages.
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
