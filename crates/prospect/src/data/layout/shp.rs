//! Stanford Human Preferences (SHP): `history`, `human_ref_A`, `human_ref_B`, `score_A`, `score_B` and
//! `labels` (1 when A is preferred). As in the KTO paper (from HALOs), only pairs whose higher score is
//! at least twice the lower are kept; the others are counted as filtered.

use serde_json::Value;

use super::fields::{assistant, kind, number, string, user, Fields, Msg};
use super::Converted;
use crate::data::Shape;

pub(super) fn detect(obj: &Fields, _labelled: bool) -> Option<Shape> {
    ["history", "human_ref_A", "human_ref_B"].iter().all(|k| obj.contains_key(*k)).then_some(Shape::Paired)
}

pub(super) fn convert(obj: &Fields) -> Msg {
    let history = string(obj, "history")?;
    let (a, b) = (string(obj, "human_ref_A")?, string(obj, "human_ref_B")?);
    let (sa, sb) = (number(obj, "score_A")?, number(obj, "score_B")?);
    let a_wins = match obj.get("labels") {
        Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => false,
        Some(other) => {
            return Err(format!("field `labels` must be 1 (A preferred) or 0 (B preferred), got {}", kind(other)))
        }
        None => return Err("field `labels` is missing; expected 1 (A preferred) or 0 (B preferred)".into()),
    };
    // The KTO paper's SHP filter (from HALOs): keep pairs whose score ratio is at least 2.
    let (hi, lo) = (sa.max(sb), sa.min(sb));
    let keep = hi > 0.0 && hi >= 2.0 * lo;
    if !keep {
        return Ok(Converted::Filtered);
    }
    let prompt = user(&history);
    Ok(if a_wins {
        Converted::Paired(prompt, assistant(&a), assistant(&b))
    } else {
        Converted::Paired(prompt, assistant(&b), assistant(&a))
    })
}
