//! UltraFeedback: `instruction` + `completions` (a list of `{response, overall_score}`). The pair is the
//! best against the worst `overall_score` (the first on ties); a row whose completions all score the same
//! carries no preference and is counted as filtered.

use serde_json::Value;

use super::fields::{assistant, number, string, user, Fields, Msg};
use super::Converted;
use crate::data::Shape;

pub(super) fn detect(obj: &Fields, _labelled: bool) -> Option<Shape> {
    (obj.contains_key("instruction") && obj.contains_key("completions")).then_some(Shape::Paired)
}

pub(super) fn convert(obj: &Fields) -> Msg {
    let instruction = string(obj, "instruction")?;
    let Some(Value::Array(list)) = obj.get("completions") else {
        return Err("field `completions` must be a list of {response, overall_score} objects".into());
    };
    let mut scored = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let Value::Object(c) = c else {
            return Err(format!("field `completions`[{i}] must be an object with `response` and `overall_score`"));
        };
        let response = string(c, "response").map_err(|e| format!("`completions`[{i}]: {e}"))?;
        let score = number(c, "overall_score").map_err(|e| format!("`completions`[{i}]: {e}"))?;
        scored.push((score, response));
    }
    if scored.len() < 2 {
        return Err(format!("field `completions` has {} entries; expected at least 2 to form a pair", scored.len()));
    }
    // Best against worst by `overall_score`; the first on ties. Equal scores carry no preference.
    let best = scored.iter().enumerate().fold(0, |b, (i, s)| if s.0 > scored[b].0 { i } else { b });
    let worst = scored.iter().enumerate().fold(0, |w, (i, s)| if s.0 < scored[w].0 { i } else { w });
    if scored[best].0 == scored[worst].0 {
        return Ok(Converted::Filtered);
    }
    Ok(Converted::Paired(user(&instruction), assistant(&scored[best].1), assistant(&scored[worst].1)))
}
