//! TRL's own rows (`data_format = "trl"`): `prompt` + `completion` [+ `label`], or `prompt` + `chosen` +
//! `rejected`; each field plain text or a list of `{role, content}` messages, with an optional `system`
//! string for conversations. Rows come out as they are.

use super::fields::{content, with_system, Fields, Msg};
use super::scores::{label, LabelFrom};
use super::Converted;
use crate::data::rows::Content;
use crate::data::Shape;

/// Paired when `chosen` or `rejected` is there, unpaired when labelled, else SFT.
pub(super) fn detect(obj: &Fields, labelled: bool) -> Option<Shape> {
    let has = |k: &str| obj.contains_key(k);
    if has("chosen") || has("rejected") {
        Some(Shape::Paired)
    } else if labelled && (has("prompt") || has("completion")) {
        Some(Shape::Unpaired)
    } else if has("completion") || has("prompt") {
        Some(Shape::Sft)
    } else {
        None
    }
}

pub(super) fn convert(obj: &Fields, shape: Shape, label_from: Option<&LabelFrom>) -> Msg {
    let prompt = with_system(obj, content(obj, "prompt")?)?;
    let same_kind = |name: &str, c: &Content| {
        if c.is_messages() == prompt.is_messages() {
            Ok(())
        } else {
            Err(format!("fields `prompt` and `{name}` must both be text or both be lists of messages"))
        }
    };
    match shape {
        Shape::Unpaired | Shape::Sft => {
            let completion = content(obj, "completion")?;
            same_kind("completion", &completion)?;
            Ok(match shape {
                Shape::Unpaired => Converted::Unpaired(prompt, completion, label(obj, label_from, false)?),
                _ => Converted::Sft(prompt, completion),
            })
        }
        Shape::Paired => {
            let (chosen, rejected) = (content(obj, "chosen")?, content(obj, "rejected")?);
            same_kind("chosen", &chosen)?;
            same_kind("rejected", &rejected)?;
            Ok(Converted::Paired(prompt, chosen, rejected))
        }
    }
}
