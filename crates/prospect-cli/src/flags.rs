//! Typed flag values: clap parses each flag straight into the library's type, with the library's own
//! message when a value is wrong. Nothing is parsed by hand later.

use clap::builder::PossibleValue;
use clap::ValueEnum;
use prospect::data::{DataFormat, LabelFrom};
use prospect::eval::judge::JudgeSpec;

/// `--format`: every layout the library reads, named as `data_format` names it in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format(pub DataFormat);

const FORMATS: [Format; DataFormat::ALL.len()] = {
    let mut out = [Format(DataFormat::Trl); DataFormat::ALL.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = Format(DataFormat::ALL[i]);
        i += 1;
    }
    out
};

impl ValueEnum for Format {
    fn value_variants<'a>() -> &'a [Self] {
        &FORMATS
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.0.name()))
    }
}

/// The library's message for a value it rejects (clap adds the flag and the value).
fn message(e: prospect::Error) -> String {
    match e {
        prospect::Error::Config { message, .. } => message,
        other => other.to_string(),
    }
}

/// `--label-from FIELD:THRESHOLD`.
pub fn label_from(text: &str) -> Result<LabelFrom, String> {
    let label_from = LabelFrom::parse(text).map_err(message)?;
    if let prospect::data::Threshold::Value(t) = label_from.threshold {
        prospect::limits::label_threshold(t).map_err(message)?;
    }
    Ok(label_from)
}

/// `--judge rule:NAME | llm:URL | reward:DIR`.
pub fn judge(text: &str) -> Result<JudgeSpec, String> {
    JudgeSpec::parse(text).map_err(message)
}

/// A number parsed from `text`, then checked against the library's range for it (`prospect::limits`).
fn checked<T: std::str::FromStr>(text: &str, check: fn(T) -> prospect::Result<T>) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    check(text.parse::<T>().map_err(|e| format!("{e}"))?).map_err(message)
}

pub fn temperature(text: &str) -> Result<f64, String> {
    checked(text, prospect::limits::temperature)
}

pub fn top_p(text: &str) -> Result<f64, String> {
    checked(text, prospect::limits::top_p)
}

pub fn batch_size(text: &str) -> Result<usize, String> {
    checked(text, prospect::limits::batch_size)
}

pub fn max_new_tokens(text: &str) -> Result<usize, String> {
    checked(text, prospect::limits::max_new_tokens)
}

pub fn num_samples(text: &str) -> Result<usize, String> {
    checked(text, prospect::limits::num_samples)
}

pub fn max_length(text: &str) -> Result<usize, String> {
    checked(text, prospect::limits::max_length)
}

/// `--device`: `cpu`, `cuda` or `cuda:N`, checked as clap parses it; opened with [`open_device`].
pub fn device_spec(s: &str) -> Result<String, String> {
    prospect::device::parse_spec(s).map(|_| s.to_string())
}

/// The device a `--device` flag names (a GPU needs a build with the `cuda` feature).
pub fn open_device(spec: &str) -> prospect::Result<candle_core::Device> {
    prospect::device::open(spec, "--device")
}
