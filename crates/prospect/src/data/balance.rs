//! Class balance and held-out rows, on rows before tokenization. Everything here is seeded and
//! deterministic.
//!
//! - [`hold_out`]: a fraction of the rows for evaluation; pairs stay whole, so no prompt's chosen side
//!   trains while its rejected side evaluates.
//! - [`keep_fractions`]: the KTO paper's imbalance study. `desirable_fraction` keeps that fraction of the
//!   desirable side. For paired data the base is the number of *pairs* (each side has one row per pair);
//!   HALOs counts generations (2 per pair), which halves what it keeps.
//! - [`auto_weights`]: λ_D, λ_U in the middle of the paper's range.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::rows::{Rows, UnpairedRow};

/// The middle of the KTO paper's recommended range for λ_D·n_D / (λ_U·n_U), which is [1, 4/3].
pub const TARGET_RATIO: f64 = 7.0 / 6.0;

/// Seeded choice of `k` of `n` indices, returned sorted (so kept rows keep their order).
fn choose(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// How many of `n` rows a fraction keeps: rounded, and at least one when the fraction is positive.
pub fn kept(n: usize, fraction: f64) -> usize {
    if n == 0 {
        return 0;
    }
    ((n as f64 * fraction).round() as usize).clamp(1, n)
}

/// Split rows into (train, held out): `round(fraction · n)` rows (at least one) chosen by `seed`.
pub fn hold_out(rows: Rows, fraction: f64, seed: u64) -> (Rows, Rows) {
    fn split<T>(v: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
        let held: std::collections::HashSet<usize> =
            choose(v.len(), kept(v.len(), fraction), seed ^ 0x5eed_e7a1).into_iter().collect();
        let (mut train, mut eval) = (vec![], vec![]);
        for (i, r) in v.into_iter().enumerate() {
            if held.contains(&i) {
                eval.push(r)
            } else {
                train.push(r)
            }
        }
        (train, eval)
    }
    match rows {
        Rows::Unpaired(v) => {
            let (a, b) = split(v, fraction, seed);
            (Rows::Unpaired(a), Rows::Unpaired(b))
        }
        Rows::Paired(v) => {
            let (a, b) = split(v, fraction, seed);
            (Rows::Paired(a), Rows::Paired(b))
        }
        Rows::Sft(v) => {
            let (a, b) = split(v, fraction, seed);
            (Rows::Sft(a), Rows::Sft(b))
        }
    }
}

/// Keep `desirable_fraction` of the desirable rows and `undesirable_fraction` of the undesirable ones,
/// chosen by `seed`, in their original order. Each class's base is its own count: for unpaired pairs
/// that is the number of pairs.
pub fn keep_fractions(
    rows: Vec<UnpairedRow>,
    desirable_fraction: f64,
    undesirable_fraction: f64,
    seed: u64,
) -> Vec<UnpairedRow> {
    if desirable_fraction >= 1.0 && undesirable_fraction >= 1.0 {
        return rows;
    }
    let class = |label: bool| -> Vec<usize> {
        rows.iter().enumerate().filter(|(_, r)| r.label == label).map(|(i, _)| i).collect()
    };
    let mut keep = vec![false; rows.len()];
    for (label, fraction, salt) in [(true, desirable_fraction, 1u64), (false, undesirable_fraction, 2u64)] {
        let members = class(label);
        for j in choose(members.len(), kept(members.len(), fraction), seed.wrapping_mul(31).wrapping_add(salt)) {
            keep[members[j]] = true;
        }
    }
    rows.into_iter().zip(keep).filter(|(_, k)| *k).map(|(r, _)| r).collect()
}

/// (λ_D, λ_U) with λ_D·n_D / (λ_U·n_U) = 7/6: the weight of the scarcer class goes up, the other stays 1.
/// (The paper's "drop 90% of the desirable data, λ_D = 13.33" is the top of the range, 4/3 · 10; the
/// middle gives 7/6 · 10 = 11.67.)
pub fn auto_weights(n_desirable: usize, n_undesirable: usize) -> (f64, f64) {
    let (nd, nu) = (n_desirable.max(1) as f64, n_undesirable.max(1) as f64);
    if nd <= nu {
        (TARGET_RATIO * nu / nd, 1.0)
    } else {
        (1.0, nd / (TARGET_RATIO * nu))
    }
}

/// [`auto_weights`] when both classes are present; `None` when one is empty, since λ_D·n_D / (λ_U·n_U)
/// then has no second class and no weight can bring it into range.
pub fn balanced_weights(n_desirable: usize, n_undesirable: usize) -> Option<(f64, f64)> {
    (n_desirable > 0 && n_undesirable > 0).then(|| auto_weights(n_desirable, n_undesirable))
}

/// A warning, in words, when KTO data has one class only (`None` when both are present, or no rows).
pub fn single_class_warning(n_desirable: usize, n_undesirable: usize) -> Option<String> {
    let (n, only, missing) = match (n_desirable, n_undesirable) {
        (0, 0) => return None,
        (n, 0) => (n, "desirable", "undesirable"),
        (0, n) => (n, "undesirable", "desirable"),
        _ => return None,
    };
    Some(format!(
        "KTO class balance: all {n} examples are {only} and none {missing}, so λ_D·n_D/(λ_U·n_U) has no second \
         class and no class weight can balance it; KTO will only move the {only} side. Add {missing} examples \
         (e.g. label_from on a score), or train with sft"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rows::{unpair, PairedRow};

    fn pairs(n: usize) -> Vec<PairedRow> {
        (0..n)
            .map(|i| PairedRow {
                prompt: format!("p{i}").into(),
                chosen: format!("c{i}").into(),
                rejected: format!("r{i}").into(),
                line: i + 1,
            })
            .collect()
    }

    #[test]
    fn dropping_90_percent_of_desirable_pairs() {
        // 1000 pairs → 1000 desirable + 1000 undesirable rows; keep 10% of the desirable side: 100 rows.
        let rows = keep_fractions(unpair(&pairs(1000)), 0.1, 1.0, 7);
        let nd = rows.iter().filter(|r| r.label).count();
        let nu = rows.len() - nd;
        assert_eq!((nd, nu), (100, 1000));
        // λ_D = 7/6 · 1000/100 = 11.666..., so λ_D·n_D/(λ_U·n_U) = 7/6, inside [1, 4/3].
        let (ld, lu) = auto_weights(nd, nu);
        assert!((ld - 35.0 / 3.0).abs() < 1e-12 && lu == 1.0, "{ld} {lu}");
        // The paper's 13.33 is the range's top: 4/3 · 10.
        assert!((4.0f64 / 3.0 * 10.0 - 13.333).abs() < 1e-3);
    }

    #[test]
    fn auto_weights_lift_the_scarcer_class() {
        assert_eq!(auto_weights(10, 10), (7.0 / 6.0, 1.0));
        // 20 desirable, 10 undesirable: λ_U = 20 / (7/6 · 10) = 12/7.
        let (ld, lu) = auto_weights(20, 10);
        assert!(ld == 1.0 && (lu - 12.0 / 7.0).abs() < 1e-12);
    }

    #[test]
    fn one_class_gets_no_ratio() {
        assert_eq!(balanced_weights(16, 0), None);
        assert_eq!(balanced_weights(0, 3), None);
        assert_eq!(balanced_weights(10, 10), Some((7.0 / 6.0, 1.0)));
        let w = single_class_warning(16, 0).unwrap();
        assert!(w.starts_with("KTO class balance: all 16 examples are desirable and none undesirable"), "{w}");
        let w = single_class_warning(0, 5).unwrap();
        assert!(w.contains("all 5 examples are undesirable and none desirable"), "{w}");
        assert!(w.contains("KTO will only move the undesirable side"), "{w}");
        assert_eq!(single_class_warning(3, 4), None);
        assert_eq!(single_class_warning(0, 0), None);
    }

    #[test]
    fn fractions_are_seeded_and_keep_order() {
        let a = keep_fractions(unpair(&pairs(20)), 0.5, 0.25, 3);
        let b = keep_fractions(unpair(&pairs(20)), 0.5, 0.25, 3);
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|r| r.label).count(), 10);
        assert_eq!(a.iter().filter(|r| !r.label).count(), 5);
        let lines: Vec<usize> = a.iter().filter(|r| r.label).map(|r| r.line).collect();
        assert!(lines.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn hold_out_keeps_pairs_whole() {
        let (train, eval) = hold_out(Rows::Paired(pairs(10)), 0.2, 1);
        assert_eq!((train.len(), eval.len()), (8, 2));
        let (train2, _) = hold_out(Rows::Paired(pairs(10)), 0.2, 1);
        assert_eq!(train, train2);
    }
}
