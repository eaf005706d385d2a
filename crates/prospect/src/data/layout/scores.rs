//! Scores thresholded into labels (`label_from`): a row is desirable when its score is at least the
//! threshold. Works with any layout that gives unpaired rows (TRL, ShareGPT, HALOs binary): the score
//! field replaces `label`. `"mean"` and `"median"` thresholds are numpy's, over the file's scores, so
//! they are resolved once every row is read.

use serde::{Deserialize, Serialize};

use super::fields::{known_label, number, Fields};
use crate::data::rows::UnpairedRow;
use crate::error::{Error, Result};

/// `label_from = { field = "rating", threshold = 7.0 }`: a row is desirable when its score is at least
/// the threshold (`"mean"` and `"median"` are over the file's scores).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelFrom {
    pub field: String,
    pub threshold: Threshold,
}

impl LabelFrom {
    /// `FIELD:THRESHOLD`, as `--label-from` spells it: THRESHOLD a number, `mean` or `median`.
    pub fn parse(spec: &str) -> Result<LabelFrom> {
        let (field, threshold) = spec
            .rsplit_once(':')
            .filter(|(field, _)| !field.is_empty())
            .ok_or_else(|| Error::config("label_from", format!("must look like FIELD:THRESHOLD, got {spec:?}")))?;
        let threshold = match threshold {
            "mean" => Threshold::Statistic(Statistic::Mean),
            "median" => Threshold::Statistic(Statistic::Median),
            t => Threshold::Value(t.parse().map_err(|_| {
                Error::config("label_from.threshold", format!("must be a number, mean or median, got {t:?}"))
            })?),
        };
        Ok(LabelFrom { field: field.to_string(), threshold })
    }
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

/// A desirable/undesirable label, or the score it will be computed from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Label {
    Known(bool),
    Score(f64),
}

/// The label: from `label_from`'s field when set, else `label` (a boolean; HALOs also writes 1/0).
pub(super) fn label(
    obj: &Fields,
    label_from: Option<&LabelFrom>,
    allow_int: bool,
) -> std::result::Result<Label, String> {
    if let Some(lf) = label_from {
        return Ok(Label::Score(number(obj, &lf.field)?));
    }
    known_label(obj, allow_int).map(Label::Known)
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

/// Rows with their labels resolved, and the threshold used (`None` without `label_from`).
pub(super) fn resolve(
    rows: Vec<(UnpairedRow, Label)>,
    label_from: Option<&LabelFrom>,
) -> (Vec<UnpairedRow>, Option<f64>) {
    let scores: Vec<f64> =
        rows.iter().filter_map(|(_, l)| if let Label::Score(s) = l { Some(*s) } else { None }).collect();
    let threshold = match label_from.map(|l| l.threshold) {
        None => None,
        Some(Threshold::Value(t)) => Some(t),
        Some(Threshold::Statistic(s)) => statistic(s, &scores),
    };
    let rows = rows
        .into_iter()
        .map(|(mut row, label)| {
            row.label = match label {
                Label::Known(b) => b,
                Label::Score(s) => s >= threshold.unwrap_or(f64::INFINITY),
            };
            row
        })
        .collect();
    (rows, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_from_specs_parse_or_say_what_is_wrong() {
        let lf = LabelFrom::parse("rating:7.5").unwrap();
        assert_eq!(lf, LabelFrom { field: "rating".into(), threshold: Threshold::Value(7.5) });
        // The last colon splits, so field names may hold colons.
        let lf = LabelFrom::parse("a:b:median").unwrap();
        assert_eq!(lf, LabelFrom { field: "a:b".into(), threshold: Threshold::Statistic(Statistic::Median) });
        let e = LabelFrom::parse("rating").unwrap_err().to_string();
        assert_eq!(e, "config: `label_from`: must look like FIELD:THRESHOLD, got \"rating\"");
        let e = LabelFrom::parse(":7").unwrap_err().to_string();
        assert_eq!(e, "config: `label_from`: must look like FIELD:THRESHOLD, got \":7\"");
        let e = LabelFrom::parse("rating:high").unwrap_err().to_string();
        assert_eq!(e, "config: `label_from.threshold`: must be a number, mean or median, got \"high\"");
    }

    #[test]
    fn numpy_mean_and_median() {
        // numpy.mean([1, 2, 4, 9]) == 4.0; numpy.median([1, 2, 4, 9]) == 3.0; numpy.median([3, 1, 2]) == 2.0
        assert_eq!(statistic(Statistic::Mean, &[1.0, 2.0, 4.0, 9.0]), Some(4.0));
        assert_eq!(statistic(Statistic::Median, &[1.0, 2.0, 4.0, 9.0]), Some(3.0));
        assert_eq!(statistic(Statistic::Median, &[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(statistic(Statistic::Mean, &[]), None);
    }
}
