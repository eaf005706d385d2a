//! Stage 2, layout: records in the layouts data comes in, converted into Prospect's canonical rows
//! (TRL's shapes, `data::rows`). One file per layout; this file detects the layout and drives the conversion.
//!
//! | `data_format`     | detected from                              | becomes                              | file |
//! |-------------------|--------------------------------------------|--------------------------------------|------|
//! | `trl`             | `prompt` + `completion`/`chosen`/`label`   | as is (text or messages)             | `trl.rs` |
//! | `halos_binary`    | `type = "binary_feedback"`                 | unpaired; `label` 1/0                | `halos.rs` |
//! | `halos_pairwise`  | `type = "pairwise_feedback"`               | paired; `label` 1 → `output_A` wins  | `halos.rs` |
//! | `sharegpt`        | `messages` (+ `label`)                     | unpaired with `label`, else SFT      | `sharegpt.rs` |
//! | `sharegpt_dpo`    | `conversations` + `chosen` + `rejected`    | paired                               | `sharegpt.rs` |
//! | `hh_rlhf`         | `chosen` + `rejected` strings, no `prompt` | paired; turns from `\n\nHuman:` ...  | `hh_rlhf.rs` |
//! | `shp`             | `history` + `human_ref_A` + `human_ref_B`  | paired; score ratio ≥ 2 kept         | `shp.rs` |
//! | `oasst1`          | `message_id` + `parent_id` + `role`        | paired; adjacent-rank siblings       | `oasst.rs` |
//! | `ultrafeedback`   | `instruction` + `completions`              | paired; best vs worst `overall_score`| `ultrafeedback.rs` |
//!
//! In every conversational result the prompt is the messages before the reply and the completion is
//! one assistant message. A row whose fields do not fit gives `FILE:LINE: what is wrong, what was
//! expected`; with `skip_invalid` it is skipped and counted instead. Rows a layout's own rule leaves
//! out (SHP's ratio, UltraFeedback ties) are counted in the report, never dropped silently.
//!
//! `label_from` (scores thresholded into labels, `scores.rs`) applies to every layout that gives unpaired
//! rows. Adding a layout: one file here with `detect` and `convert`, one `DataFormat` variant, and its
//! place in [`detect`]'s order.

mod fields;
mod halos;
mod hh_rlhf;
mod oasst;
pub mod scores;
mod sharegpt;
mod shp;
mod trl;
mod ultrafeedback;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rows::{Content, PairedRow, Rows, SftRow, UnpairedRow};
use super::source::{Container, Record};
use super::Shape;
use crate::error::{Error, Result};
use fields::{kind, Fields, Msg};
use scores::Label;
pub use scores::{statistic, LabelFrom, Statistic, Threshold};

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
    /// Every layout, in the order of the table above.
    pub const ALL: [DataFormat; 9] = [
        DataFormat::Trl,
        DataFormat::HalosBinary,
        DataFormat::HalosPairwise,
        DataFormat::Sharegpt,
        DataFormat::SharegptDpo,
        DataFormat::HhRlhf,
        DataFormat::Shp,
        DataFormat::Oasst1,
        DataFormat::Ultrafeedback,
    ];

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

/// How to read rows: the layout (detected when `None`), scores to labels, and whether bad rows are
/// skipped (and counted) instead of stopping the read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOptions {
    pub format: Option<DataFormat>,
    pub label_from: Option<LabelFrom>,
    pub skip_invalid: bool,
}

/// What reading a file found, for the run log and `prospect data inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadReport {
    pub container: Container,
    pub format: DataFormat,
    /// Records (JSON objects / Parquet rows) in the file.
    pub records: usize,
    /// Bad records skipped under `skip_invalid`, with their errors (`FILE:LINE: ...`).
    pub skipped: Vec<String>,
    /// Records the layout's own rule leaves out (SHP score ratio < 2, UltraFeedback ties, ...).
    pub filtered: usize,
    /// Why they were left out.
    pub filter_rule: Option<&'static str>,
    /// The score threshold `label_from` used, once resolved (`mean` and `median` become numbers).
    pub label_threshold: Option<f64>,
}

/// A record's layout and the row shape it gives: the unit of "the format changed mid-file".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    format: DataFormat,
    shape: Shape,
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

/// One record as a layout converts it.
enum Converted {
    Unpaired(Content, Content, Label),
    Paired(Content, Content, Content),
    Sft(Content, Content),
    /// Left out by the layout's own rule (counted).
    Filtered,
}

/// Detection, most specific first: the first layout whose fields a record has wins. `labelled`: the
/// record has `label` or `label_from`'s field.
type Detect = fn(&Fields, bool) -> Option<Shape>;
const DETECT: [(DataFormat, Detect); 9] = [
    (DataFormat::HalosBinary, halos::detect_binary),
    (DataFormat::HalosPairwise, halos::detect_pairwise),
    (DataFormat::SharegptDpo, sharegpt::detect_dpo),
    (DataFormat::Sharegpt, sharegpt::detect),
    (DataFormat::Shp, shp::detect),
    (DataFormat::Oasst1, oasst::detect),
    (DataFormat::Ultrafeedback, ultrafeedback::detect),
    (DataFormat::HhRlhf, hh_rlhf::detect),
    (DataFormat::Trl, trl::detect),
];

fn labelled(obj: &Fields, label_from: Option<&LabelFrom>) -> bool {
    obj.contains_key("label") || label_from.is_some_and(|l| obj.contains_key(&l.field))
}

fn detect(obj: &Fields, label_from: Option<&LabelFrom>) -> Option<Layout> {
    let labelled = labelled(obj, label_from);
    DETECT.iter().find_map(|(format, detect)| detect(obj, labelled).map(|shape| Layout { format: *format, shape }))
}

/// The shape a forced `data_format` gives a record.
fn forced(format: DataFormat, obj: &Fields, label_from: Option<&LabelFrom>) -> Layout {
    let labelled = labelled(obj, label_from);
    let shape = match format {
        DataFormat::Trl if obj.contains_key("chosen") || obj.contains_key("rejected") => Shape::Paired,
        DataFormat::Trl | DataFormat::Sharegpt if labelled => Shape::Unpaired,
        DataFormat::Trl | DataFormat::Sharegpt => Shape::Sft,
        DataFormat::HalosBinary => Shape::Unpaired,
        _ => Shape::Paired,
    };
    Layout { format, shape }
}

/// One record in its layout (oasst1 is converted per tree instead, in `oasst::pairs`).
fn convert_one(layout: Layout, obj: &Fields, label_from: Option<&LabelFrom>) -> Msg {
    match layout.format {
        DataFormat::Trl => trl::convert(obj, layout.shape, label_from),
        DataFormat::HalosBinary => halos::convert_binary(obj, label_from),
        DataFormat::HalosPairwise => halos::convert_pairwise(obj),
        DataFormat::Sharegpt => sharegpt::convert(obj, layout.shape, label_from),
        DataFormat::SharegptDpo => sharegpt::convert_dpo(obj),
        DataFormat::HhRlhf => hh_rlhf::convert(obj),
        DataFormat::Shp => shp::convert(obj),
        DataFormat::Ultrafeedback => ultrafeedback::convert(obj),
        DataFormat::Oasst1 => Err("oasst1 messages are converted per message tree, not per row".into()),
    }
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

/// Records → rows, as `options` says. See the module doc for the layouts.
pub fn convert(
    container: Container,
    records: Vec<Result<Record>>,
    path: &Path,
    options: &ReadOptions,
) -> Result<(Rows, ReadReport)> {
    let mut reader = Reader {
        path,
        options,
        report: ReadReport {
            container,
            format: options.format.unwrap_or(DataFormat::Trl),
            records: records.len(),
            skipped: vec![],
            filtered: 0,
            filter_rule: None,
            label_threshold: None,
        },
        first: None,
        converted: vec![],
        oasst: vec![],
    };
    for record in records {
        reader.record(record)?;
    }
    reader.finish()
}

/// The conversion of one file, record by record.
struct Reader<'a> {
    path: &'a Path,
    options: &'a ReadOptions,
    report: ReadReport,
    /// The first record's layout and line: every other record must match it.
    first: Option<(Layout, usize)>,
    converted: Vec<(usize, Converted)>,
    /// oasst1 messages wait for the whole table.
    oasst: Vec<(usize, Fields)>,
}

impl Reader<'_> {
    fn err(&self, line: usize, message: String) -> Error {
        Error::Data { path: self.path.to_path_buf(), line, message }
    }

    fn file_err(&self, message: String) -> Error {
        Error::DataFile { path: self.path.to_path_buf(), message }
    }

    /// A bad record: an error, or skipped and counted under `skip_invalid`.
    fn skip(&mut self, e: Error) -> Result<()> {
        if self.options.skip_invalid {
            self.report.skipped.push(e.to_string());
            Ok(())
        } else {
            Err(e)
        }
    }

    /// The record's layout: forced by `data_format`, or detected from its fields.
    fn layout(&self, line: usize, obj: &Fields) -> Result<Layout> {
        let label_from = self.options.label_from.as_ref();
        match self.options.format {
            Some(f) => Ok(forced(f, obj, label_from)),
            None => detect(obj, label_from).ok_or_else(|| self.err(line, format!(
                "cannot tell the data format from the fields {:?}; expected TRL (prompt + completion [+ label] or prompt + chosen + rejected), \
                 ShareGPT (messages [+ label] or conversations + chosen + rejected), HALOs, HH-RLHF, SHP, oasst1 or UltraFeedback fields, \
                 or set data_format",
                obj.keys().collect::<Vec<_>>()
            ))),
        }
    }

    fn record(&mut self, record: Result<Record>) -> Result<()> {
        let (line, obj) = match record {
            Ok(Record { line, value: Value::Object(obj) }) => (line, obj),
            Ok(Record { line, value }) => {
                return self.skip(self.err(line, format!("expected a JSON object per row, got {}", kind(&value))))
            }
            Err(e) => return self.skip(e),
        };
        let layout = match self.layout(line, &obj) {
            Ok(layout) => layout,
            Err(e) => return self.skip(e),
        };
        match self.first {
            None => self.first = Some((layout, line)),
            Some((f, at)) if f != layout => {
                let e = self.err(line, format!("this row is {layout}, but the file started as {f} at line {at}"));
                return self.skip(e);
            }
            _ => {}
        }
        if layout.format == DataFormat::Oasst1 {
            self.oasst.push((line, obj));
            return Ok(());
        }
        match convert_one(layout, &obj, self.options.label_from.as_ref()) {
            Ok(c) => self.converted.push((line, c)),
            Err(m) => self.skip(self.err(line, m))?,
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Rows, ReadReport)> {
        let Some((layout, _)) = self.first else {
            let message = match self.report.skipped.is_empty() {
                true => "the file has no rows".to_string(),
                false => self.no_usable_rows(),
            };
            return Err(self.file_err(message));
        };
        self.report.format = layout.format;
        self.report.filter_rule = filter_rule(layout.format);
        if layout.format == DataFormat::Oasst1 {
            let oasst = std::mem::take(&mut self.oasst);
            let (pairs, deleted) = oasst::pairs(&oasst, &mut |line, m| self.skip(self.err(line, m)))?;
            self.report.filtered += deleted;
            self.converted.extend(pairs);
        }
        let rows = self.assemble(layout.shape);
        if rows.is_empty() {
            return Err(self.file_err(self.no_usable_rows()));
        }
        Ok((rows, self.report))
    }

    /// Why a file gave no rows: every row invalid (with the first error), left out by the layout's rule, or both.
    fn no_usable_rows(&self) -> String {
        let r = &self.report;
        let rule = r.filter_rule.unwrap_or("no rule applies");
        match (r.skipped.first(), r.filtered) {
            (Some(first), 0) if r.skipped.len() == r.records => format!(
                "no usable rows: every one of the {} records was invalid (skipped under skip_invalid = true); \
                 the first error: {first}",
                r.records
            ),
            (Some(first), filtered) => format!(
                "no usable rows: of {} records, {} rows were invalid (skipped under skip_invalid = true) and {filtered} \
                 left out ({rule}); the first error: {first}",
                r.records,
                r.skipped.len()
            ),
            (None, filtered) => format!("no usable rows: {} records, {filtered} left out ({rule})", r.records),
        }
    }

    /// The converted records as rows of `shape`, with score labels resolved.
    fn assemble(&mut self, shape: Shape) -> Rows {
        let mut unpaired: Vec<(UnpairedRow, Label)> = vec![];
        let mut paired = vec![];
        let mut sft = vec![];
        for (line, c) in std::mem::take(&mut self.converted) {
            match c {
                Converted::Unpaired(prompt, completion, label) => {
                    unpaired.push((UnpairedRow { prompt, completion, label: false, line }, label))
                }
                Converted::Paired(prompt, chosen, rejected) => {
                    paired.push(PairedRow { prompt, chosen, rejected, line })
                }
                Converted::Sft(prompt, completion) => sft.push(SftRow { prompt, completion, line }),
                Converted::Filtered => self.report.filtered += 1,
            }
        }
        match shape {
            Shape::Unpaired => {
                let (rows, threshold) = scores::resolve(unpaired, self.options.label_from.as_ref());
                self.report.label_threshold = threshold;
                Rows::Unpaired(rows)
            }
            Shape::Paired => Rows::Paired(paired),
            Shape::Sft => Rows::Sft(sft),
        }
    }
}
