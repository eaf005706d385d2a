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

    /// A configuration value is invalid. `key` is the TOML key, e.g. `loss.beta`; `origin` is where the
    /// value was written: `FILE:LINE`, `--set KEY=VALUE`, or `config` when no file is involved.
    #[error("{origin}: `{key}`: {message}")]
    Config { origin: String, key: String, message: String },

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

    /// A tensor operation failed inside candle. The message leaves out the backtrace candle attaches when
    /// `RUST_BACKTRACE` is set: it is about our internals, not the user's problem.
    #[error("{}", candle_message(.0))]
    Candle(candle_core::Error),

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
    #[error("step {step} ({loss}): {error}")]
    Step { step: usize, loss: &'static str, error: Box<Error> },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e) // not a `source`: a CLI printing the cause chain would print the backtrace again
    }
}

/// A candle error's message without the backtraces and with its context and path in one line.
fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { origin: "config".into(), key: key.into(), message: message.into() }
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
            e => Error::Step { step, loss, error: Box::new(e) },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_print_without_backtraces() {
        let inner = candle_core::Error::Msg("index 1780 out of range".into());
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = Error::from(traced.context("embedding lookup"));
        assert_eq!(e.to_string(), "embedding lookup: index 1780 out of range");
    }
}
