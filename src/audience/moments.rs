//! Weighted running moments (mean, variance, skewness) that can be merged.
//!
//! The update is the pairwise formula of Chan et al., extended to the third moment by Pébay:
//! adding one score is merging a one-point summary, and merging two products' summaries (for
//! the pooled cut-offs, or two engines) is the same formula. Central moments are kept rather
//! than raw power sums, so a narrow distribution far from zero keeps its precision.

use serde::{Deserialize, Serialize};

/// Weighted central moments of a set of values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// Total weight.
    pub weight: f64,
    /// Weighted mean.
    pub mean: f64,
    /// Σ w (x − mean)².
    pub m2: f64,
    /// Σ w (x − mean)³.
    pub m3: f64,
}

impl Moments {
    /// Adds one value with a positive weight.
    pub fn push(&mut self, value: f64, weight: f64) {
        self.merge(&Moments {
            weight,
            mean: value,
            m2: 0.0,
            m3: 0.0,
        });
    }

    /// Adds another summary's values.
    pub fn merge(&mut self, other: &Moments) {
        if other.weight <= 0.0 {
            return;
        }
        if self.weight <= 0.0 {
            *self = *other;
            return;
        }
        let (wa, wb) = (self.weight, other.weight);
        let w = wa + wb;
        let delta = other.mean - self.mean;
        let mean = self.mean + delta * wb / w;
        let m2 = self.m2 + other.m2 + delta * delta * wa * wb / w;
        let m3 = self.m3
            + other.m3
            + delta.powi(3) * wa * wb * (wa - wb) / (w * w)
            + 3.0 * delta * (wa * other.m2 - wb * self.m2) / w;
        *self = Moments {
            weight: w,
            mean,
            m2,
            m3,
        };
    }

    /// Multiplies every weight by `factor` (the moments' shape is unchanged).
    pub fn scale(&mut self, factor: f64) {
        self.weight *= factor;
        self.m2 *= factor;
        self.m3 *= factor;
    }

    /// Weighted population variance; 0 when empty.
    pub fn variance(&self) -> f64 {
        if self.weight > 0.0 {
            (self.m2 / self.weight).max(0.0)
        } else {
            0.0
        }
    }

    /// Weighted population skewness (third standardised moment); 0 when the variance is
    /// (numerically) zero, since a constant distribution leans neither way.
    pub fn skewness(&self) -> f64 {
        let variance = self.variance();
        if self.weight <= 0.0 || variance <= 1e-18 {
            return 0.0;
        }
        (self.m3 / self.weight) / variance.powf(1.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &[(f64, f64)]) -> (f64, f64, f64) {
        let w: f64 = values.iter().map(|(_, w)| w).sum();
        let mean = values.iter().map(|(x, w)| x * w).sum::<f64>() / w;
        let var = values
            .iter()
            .map(|(x, w)| w * (x - mean).powi(2))
            .sum::<f64>()
            / w;
        let m3 = values
            .iter()
            .map(|(x, w)| w * (x - mean).powi(3))
            .sum::<f64>()
            / w;
        (mean, var, m3 / var.powf(1.5))
    }

    #[test]
    fn matches_the_two_pass_formulas_and_merges_in_any_split() {
        let values: Vec<(f64, f64)> = (0..200)
            .map(|i| {
                let x = ((i * 37) % 101) as f64 / 101.0;
                (x * x, 0.5 + (i % 7) as f64)
            })
            .collect();
        let (mean, var, skew) = exact(&values);
        let mut all = Moments::default();
        values.iter().for_each(|&(x, w)| all.push(x, w));
        assert!((all.mean - mean).abs() < 1e-12);
        assert!((all.variance() - var).abs() < 1e-12);
        assert!((all.skewness() - skew).abs() < 1e-9);
        for split in [1, 50, 199] {
            let (mut a, mut b) = (Moments::default(), Moments::default());
            values[..split].iter().for_each(|&(x, w)| a.push(x, w));
            values[split..].iter().for_each(|&(x, w)| b.push(x, w));
            a.merge(&b);
            assert!((a.variance() - var).abs() < 1e-12, "split {split}");
            assert!((a.skewness() - skew).abs() < 1e-9, "split {split}");
        }
        let mut scaled = all;
        scaled.scale(1e-6);
        assert!((scaled.skewness() - skew).abs() < 1e-9);
    }

    #[test]
    fn a_constant_has_no_variance_or_skew() {
        let mut m = Moments::default();
        (0..10).for_each(|_| m.push(0.3, 1.0));
        assert!(m.variance() < 1e-18);
        assert_eq!(m.skewness(), 0.0);
        assert_eq!(Moments::default().skewness(), 0.0);
    }
}
