//! Distances and fuzzy memberships: how far a customer's standardised features sit from each
//! centroid of an axis, turned into shares that sum to 1.
//!
//! Membership in segment `i` is `w_i / Σ_j w_j` with `w_i = (1 / (1 + d_i))^p`, where `d_i` is
//! the Euclidean distance to centroid `i` in standardised units and `p` the exponent
//! (`membership_exponent`, default 1).
//!
//! Why this form: `1/(1+d)` is bounded (a customer sitting on a centroid gets weight 1, not
//! infinity as with fuzzy c-means' `d^(-2/(m-1))`), so memberships are defined everywhere and
//! vary smoothly, which keeps published updates from jumping. `p` tunes crispness: `p > 1`
//! sharpens towards the nearest segment, `p < 1` softens towards uniform. The nearest centroid
//! always has the largest membership, so the hard segment and the fuzzy one agree.

use thiserror::Error;

/// Why membership parameters were refused.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("membership exponent must be a finite number > 0, got {0}")]
pub struct ExponentError(pub f64);

/// Checks a membership exponent.
pub fn check_exponent(exponent: f64) -> Result<f64, ExponentError> {
    if exponent.is_finite() && exponent > 0.0 {
        Ok(exponent)
    } else {
        Err(ExponentError(exponent))
    }
}

/// Squared Euclidean distance.
#[inline]
pub fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Fills `out` with the memberships for `distances` (see the module docs). `out` and
/// `distances` have the same length, at least 1.
pub fn fuzzy_memberships(distances: &[f64], exponent: f64, out: &mut [f64]) {
    if exponent == 1.0 {
        // The common case: weights are in (0, 1] for finite distances, so the total is > 0.
        let mut total = 0.0;
        for (w, d) in out.iter_mut().zip(distances) {
            *w = 1.0 / (1.0 + d.max(0.0));
            total += *w;
        }
        out.iter_mut().for_each(|w| *w /= total);
        return;
    }
    // (1/(1+d))^p underflows to 0 for every segment when p·ln(1+d) is large; scaling by the
    // nearest segment's weight (log space) keeps the largest weight at 1.
    let min_log = distances
        .iter()
        .map(|d| d.max(0.0).ln_1p())
        .fold(f64::INFINITY, f64::min);
    let mut total = 0.0;
    for (w, d) in out.iter_mut().zip(distances) {
        *w = (-exponent * (d.max(0.0).ln_1p() - min_log)).exp();
        total += *w;
    }
    out.iter_mut().for_each(|w| *w /= total);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn memberships_by_hand() {
        // d = 0, 1, 3 -> weights 1, 1/2, 1/4 -> total 7/4 -> 4/7, 2/7, 1/7.
        let mut out = [0.0; 3];
        fuzzy_memberships(&[0.0, 1.0, 3.0], 1.0, &mut out);
        let expected = [4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-15);
        }
        // p = 2: weights 1, 1/4, 1/16 -> total 21/16.
        fuzzy_memberships(&[0.0, 1.0, 3.0], 2.0, &mut out);
        let expected = [16.0 / 21.0, 4.0 / 21.0, 1.0 / 21.0];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-15);
        }
    }

    #[test]
    fn a_huge_exponent_does_not_underflow_to_nan() {
        let mut out = [0.0; 2];
        fuzzy_memberships(&[1e6, 2e6], 500.0, &mut out);
        assert!(out.iter().all(|m| m.is_finite()));
        assert_eq!(out[0], 1.0);
    }

    #[test]
    fn squared_distance_by_hand() {
        assert_eq!(squared_distance(&[1.0, 2.0], &[4.0, 6.0]), 25.0);
    }

    #[test]
    fn exponent_is_checked() {
        assert!(check_exponent(0.5).is_ok());
        assert!(check_exponent(0.0).is_err());
        assert!(check_exponent(f64::NAN).is_err());
    }

    proptest! {
        #[test]
        fn memberships_sum_to_one_and_favour_the_nearest(
            distances in prop::collection::vec(0.0f64..1e6, 1..12),
            exponent in 0.1f64..8.0,
        ) {
            let mut out = vec![0.0; distances.len()];
            fuzzy_memberships(&distances, exponent, &mut out);
            let sum: f64 = out.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9);
            prop_assert!(out.iter().all(|m| (0.0..=1.0).contains(m)));
            let nearest = distances
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap();
            let top = out.iter().cloned().fold(f64::MIN, f64::max);
            prop_assert!((out[nearest] - top).abs() < 1e-12);
        }
    }
}
