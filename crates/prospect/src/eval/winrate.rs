//! Win rates with 95% confidence intervals, as the KTO paper reports them against the SFT model.
//!
//! A comparison is a win, a loss or a tie for the candidate; ties count as half a win. The interval is
//! the Wilson score interval for a binomial proportion (Wilson, 1927), with the half-wins counted as
//! successes:
//!
//! ```text
//! p̂ = (wins + ties/2) / n,  z = 1.959964
//! centre = (p̂ + z²/2n) / (1 + z²/n)
//! half   = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)
//! ```

use serde::{Deserialize, Serialize};

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959963984540054;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Candidate,
    Baseline,
    Tie,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    /// (wins + ties/2) / n.
    pub win_rate: f64,
    /// Wilson 95% interval.
    pub ci95: [f64; 2],
}

impl WinRate {
    pub fn from_verdicts(verdicts: &[Verdict]) -> Self {
        let count = |v: Verdict| verdicts.iter().filter(|&&x| x == v).count();
        let (wins, losses, ties) = (count(Verdict::Candidate), count(Verdict::Baseline), count(Verdict::Tie));
        let n = verdicts.len();
        let p = if n == 0 { 0.5 } else { (wins as f64 + ties as f64 / 2.0) / n as f64 };
        Self { wins, losses, ties, win_rate: p, ci95: wilson(p, n, Z95) }
    }

    pub fn n(&self) -> usize {
        self.wins + self.losses + self.ties
    }
}

/// Wilson score interval for proportion `p` over `n` trials; `[0, 1]` when `n` is 0.
pub fn wilson(p: f64, n: usize, z: f64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let n = n as f64;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_hand_values() {
        // python: d=1+z*z/n; c=(p+z*z/(2*n))/d; h=z/d*math.sqrt(p*(1-p)/n+z*z/(4*n*n)); (c-h, c+h)
        //   with p=.7, n=100, z=1.959963984540054  ->  (0.6041514536665332, 0.7810511470506724)
        let [lo, hi] = wilson(0.7, 100, Z95);
        assert!((lo - 0.60415).abs() < 1e-4 && (hi - 0.78105).abs() < 1e-4, "{lo} {hi}");
        // p = 0 still has a non-degenerate upper bound: z²/(n + z²) = 3.8415/13.8415 for n = 10
        let [lo, hi] = wilson(0.0, 10, Z95);
        assert!(lo == 0.0 && (hi - 0.27753).abs() < 1e-4, "{hi}");
    }

    #[test]
    fn ties_count_half() {
        use Verdict::*;
        let w = WinRate::from_verdicts(&[Candidate, Candidate, Tie, Baseline]);
        assert_eq!((w.wins, w.ties, w.losses), (2, 1, 1));
        assert!((w.win_rate - 0.625).abs() < 1e-12);
        assert!(w.ci95[0] < 0.625 && w.ci95[1] > 0.625);
    }
}
