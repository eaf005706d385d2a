//! The ranges of numeric settings, in one place. The CLI's flag parsers, the library's entry points
//! (`GenerateConfig::validate`, `LabelFrom::parse`) and `prospect data inspect` all check through these
//! functions, so a value that `train` rejects is rejected everywhere, with the same words.
//!
//! Each check returns the value when it is in range, else `Error::Config` naming the key, the range and
//! what was given. f64 checks reject NaN and ±∞ explicitly: a NaN compares false with every bound.

use crate::error::{Error, Result};

/// `temperature`: a finite number ≥ 0 (0 is greedy decoding).
pub fn temperature(value: f64) -> Result<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(Error::config("temperature", format!("must be a finite number >= 0 (0 is greedy), got {value}")))
    }
}

/// `top_p`: in (0, 1] (1 keeps every token).
pub fn top_p(value: f64) -> Result<f64> {
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(Error::config("top_p", format!("must be in (0, 1] (1 keeps every token), got {value}")))
    }
}

fn at_least(key: &str, min: usize, value: usize) -> Result<usize> {
    if value >= min {
        Ok(value)
    } else {
        Err(Error::config(key, format!("must be at least {min}, got {value}")))
    }
}

/// `batch_size` (prompts decoded together, or rows per optimizer step): ≥ 1.
pub fn batch_size(value: usize) -> Result<usize> {
    at_least("batch_size", 1, value)
}

/// `max_new_tokens`: ≥ 1.
pub fn max_new_tokens(value: usize) -> Result<usize> {
    at_least("max_new_tokens", 1, value)
}

/// `num_samples` (completions per prompt): ≥ 1.
pub fn num_samples(value: usize) -> Result<usize> {
    at_least("num_samples", 1, value)
}

/// `max_length` (tokens of prompt + completion): ≥ 2, as the training config requires (one prompt token
/// and one completion token).
pub fn max_length(value: usize) -> Result<usize> {
    at_least("max_length", 2, value)
}

/// `label_from.threshold` as a number: finite (`mean` and `median` are the other choices).
pub fn label_threshold(value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::config(
            "label_from.threshold",
            format!("must be a finite number, \"mean\" or \"median\", got {value}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_range_values_pass_through() {
        assert_eq!(temperature(0.0).unwrap(), 0.0);
        assert_eq!(temperature(0.7).unwrap(), 0.7);
        assert_eq!(top_p(1.0).unwrap(), 1.0);
        assert_eq!(top_p(1e-9).unwrap(), 1e-9);
        assert_eq!(batch_size(1).unwrap(), 1);
        assert_eq!(max_new_tokens(128).unwrap(), 128);
        assert_eq!(max_length(2).unwrap(), 2);
        assert_eq!(label_threshold(-3.5).unwrap(), -3.5);
    }

    #[test]
    fn out_of_range_values_name_the_key_and_the_range() {
        let msg = |r: Result<f64>| r.unwrap_err().to_string();
        assert_eq!(msg(temperature(-1.0)), "config: `temperature`: must be a finite number >= 0 (0 is greedy), got -1");
        assert_eq!(
            msg(temperature(f64::NAN)),
            "config: `temperature`: must be a finite number >= 0 (0 is greedy), got NaN"
        );
        assert_eq!(
            msg(temperature(f64::INFINITY)),
            "config: `temperature`: must be a finite number >= 0 (0 is greedy), got inf"
        );
        for bad in [2.0, -0.5, 0.0, f64::NAN] {
            assert!(msg(top_p(bad)).starts_with("config: `top_p`: must be in (0, 1]"), "{bad}");
        }
        assert_eq!(batch_size(0).unwrap_err().to_string(), "config: `batch_size`: must be at least 1, got 0");
        assert_eq!(max_new_tokens(0).unwrap_err().to_string(), "config: `max_new_tokens`: must be at least 1, got 0");
        assert_eq!(num_samples(0).unwrap_err().to_string(), "config: `num_samples`: must be at least 1, got 0");
        assert_eq!(max_length(0).unwrap_err().to_string(), "config: `max_length`: must be at least 2, got 0");
        assert!(msg(label_threshold(f64::NAN)).ends_with("got NaN"));
        assert!(msg(label_threshold(f64::NEG_INFINITY)).ends_with("got -inf"));
    }
}
