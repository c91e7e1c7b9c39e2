//! Checks on the points and weights handed to the model's algorithms (k-means, silhouette),
//! written once so that both refuse bad input with the same words.

use ndarray::ArrayView2;
use thiserror::Error;

/// Points or weights that no algorithm of the model can use.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum InputError {
    /// A value in the data is NaN or infinite.
    #[error("data contains a non-finite value ({value}) at row {row}, column {col}")]
    NonFinite {
        /// Row of the first offending value.
        row: usize,
        /// Column of the first offending value.
        col: usize,
        /// The offending value.
        value: f64,
    },
    /// The weights do not match the points.
    #[error("{weights} weights for {n_points} points")]
    WeightLength {
        /// Weights given.
        weights: usize,
        /// Rows in the data.
        n_points: usize,
    },
    /// A weight is not a positive finite number.
    #[error("weight {value} at row {row} is not a positive finite number")]
    BadWeight {
        /// Row of the first offending weight.
        row: usize,
        /// The offending weight.
        value: f64,
    },
}

/// Refuses data holding a NaN or an infinity, naming the first one.
pub fn check_finite(data: ArrayView2<f64>) -> Result<(), InputError> {
    match data.indexed_iter().find(|(_, v)| !v.is_finite()) {
        Some(((row, col), &value)) => Err(InputError::NonFinite { row, col, value }),
        None => Ok(()),
    }
}

/// Refuses weights that are not one positive finite number per point.
pub fn check_weights(weights: &[f64], n_points: usize) -> Result<(), InputError> {
    if weights.len() != n_points {
        return Err(InputError::WeightLength {
            weights: weights.len(),
            n_points,
        });
    }
    match weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w > 0.0))
    {
        Some((row, &value)) => Err(InputError::BadWeight { row, value }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn names_the_first_bad_value_and_weight() {
        let data = array![[1.0, 2.0], [3.0, f64::NAN], [f64::INFINITY, 0.0]];
        assert!(matches!(
            check_finite(data.view()),
            Err(InputError::NonFinite { row: 1, col: 1, .. })
        ));
        assert_eq!(check_finite(array![[0.0, -1.0]].view()), Ok(()));
        assert_eq!(
            check_weights(&[1.0, 2.0], 3),
            Err(InputError::WeightLength {
                weights: 2,
                n_points: 3
            })
        );
        assert_eq!(
            check_weights(&[1.0, 0.0, -1.0], 3),
            Err(InputError::BadWeight { row: 1, value: 0.0 })
        );
        assert_eq!(check_weights(&[0.5, 2.0], 2), Ok(()));
    }
}
