//! The library's one error type. Every variant carries the context a user needs to fix the problem:
//! the file, the line, the field, what was expected and what was found.

use std::path::PathBuf;

/// Errors raised by the Prospect library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A row of a data file is malformed. `line` is 1-based.
    #[error("{}:{line}: {message}", path.display())]
    Data { path: PathBuf, line: usize, message: String },

    /// A data file as a whole is unusable (empty, no usable rows, ...).
    #[error("{}: {message}", path.display())]
    DataFile { path: PathBuf, message: String },

    /// A configuration value is invalid. `key` is the TOML key, e.g. `loss.beta`.
    #[error("config: `{key}`: {message}")]
    Config { key: String, message: String },

    /// A model folder is missing a file or holds one we cannot use.
    #[error("model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },

    /// A tensor did not have the shape the code expected.
    #[error("shape of `{name}`: expected {expected:?}, got {got:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },

    /// A chat template failed to compile or render. `origin` says where the template came from.
    #[error("chat template ({origin}): {message}")]
    Template { origin: String, message: String },

    /// A tokenizer failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A judge could not score (an LLM judge's HTTP call failed, or it answered something unusable).
    #[error("judge {judge}: {message}")]
    Judge { judge: String, message: String },

    /// A number went non-finite or out of range: a loss, a gradient norm, the weights after a step.
    #[error("numerics: {0}")]
    Numerics(String),

    /// Inputs a loss or a model cannot compute on (e.g. a microbatch with no completion tokens).
    #[error("{0}")]
    Compute(String),

    /// Writing a report, a plot or a metrics line failed for a reason other than I/O.
    #[error("{}: {message}", path.display())]
    Output { path: PathBuf, message: String },

    /// `--resume` cannot continue from this checkpoint folder.
    #[error("cannot resume from {}: {message}", path.display())]
    Resume { path: PathBuf, message: String },

    /// An error raised inside an optimizer step, with the step (1-based) and the loss that was running.
    #[error("step {step} ({loss}): {source}")]
    Step { step: usize, loss: &'static str, source: Box<Error> },
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { key: key.into(), message: message.into() }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model { path: path.into(), message: message.into() }
    }

    pub(crate) fn output(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Output { path: path.into(), message: message.to_string() }
    }

    /// Attach the optimizer step and the loss to an error raised inside a step.
    pub(crate) fn in_step(self, step: usize, loss: &'static str) -> Self {
        match self {
            e @ Error::Step { .. } => e,
            e => Error::Step { step, loss, source: Box::new(e) },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
