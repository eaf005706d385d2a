//! Anthropic HH-RLHF: `chosen` and `rejected` transcripts (`"\n\nHuman: ...\n\nAssistant: ..."`) with no
//! `prompt`. Both must share the dialogue before their last Assistant reply, which becomes the prompt.

use super::fields::{split_reply, string, Fields, Msg};
use super::Converted;
use crate::data::rows::{Content, Message};
use crate::data::Shape;

/// `chosen` + `rejected` and no `prompt` (checked after the layouts with more specific fields).
pub(super) fn detect(obj: &Fields, _labelled: bool) -> Option<Shape> {
    let has = |k: &str| obj.contains_key(k);
    (has("chosen") && has("rejected") && !has("prompt")).then_some(Shape::Paired)
}

pub(super) fn convert(obj: &Fields) -> Msg {
    let mut chosen = turns(&string(obj, "chosen")?).map_err(|e| format!("field `chosen`: {e}"))?;
    let mut rejected = turns(&string(obj, "rejected")?).map_err(|e| format!("field `rejected`: {e}"))?;
    let c = split_reply("chosen", &mut chosen)?;
    let r = split_reply("rejected", &mut rejected)?;
    if chosen != rejected {
        return Err("the `chosen` and `rejected` conversations differ before their last Assistant reply; expected one shared dialogue".into());
    }
    Ok(Converted::Paired(Content::Messages(chosen), Content::Messages(vec![c]), Content::Messages(vec![r])))
}

/// The transcript as messages.
fn turns(text: &str) -> Result<Vec<Message>, String> {
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
