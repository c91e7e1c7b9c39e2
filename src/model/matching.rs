//! Minimum-cost assignment (Hungarian / Kuhn-Munkres) for keeping customer segment identities
//! stable: matching a refit's centroids to the previous ones, and the labels of two clusterings
//! of the same customers to each other.
//!
//! Matrices here are at most ~12 x 12, but the algorithm is the O(n² m) shortest augmenting path
//! form with potentials, so larger ones stay cheap too.

use ndarray::ArrayView2;
use thiserror::Error;

/// Reasons an assignment cannot be computed.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum MatchingError {
    /// A cost is NaN or infinite.
    #[error("cost matrix contains a non-finite value ({value}) at row {row}, column {col}")]
    NonFinite {
        /// Row of the first offending cost.
        row: usize,
        /// Column of the first offending cost.
        col: usize,
        /// The offending cost.
        value: f64,
    },
    /// The costs span so wide a range that the dual potentials could overflow `f64`.
    #[error("cost range {span:e} is too wide to solve without overflow")]
    CostRangeTooLarge {
        /// Largest minus smallest cost.
        span: f64,
    },
}

/// For each row, the column assigned to it (None when rows > columns and the row is left over).
/// Minimises total cost.
///
/// Every column is used at most once, and `min(rows, columns)` pairs are always made, so with
/// more columns than rows some columns stay unused. Among equally cheap assignments, which one is
/// returned is unspecified but deterministic.
pub fn min_cost_assignment(cost: ArrayView2<f64>) -> Result<Vec<Option<usize>>, MatchingError> {
    let (rows, cols) = cost.dim();
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    for ((row, col), &value) in cost.indexed_iter() {
        if !value.is_finite() {
            return Err(MatchingError::NonFinite { row, col, value });
        }
        min = min.min(value);
        max = max.max(value);
    }
    if rows == 0 || cols == 0 {
        return Ok(vec![None; rows]);
    }
    // Potentials stay within about (rows + cols) times the span of the shifted costs.
    let span = max - min;
    if !(span * (rows + cols + 1) as f64).is_finite() {
        return Err(MatchingError::CostRangeTooLarge { span });
    }

    if rows <= cols {
        let c = |r: usize, k: usize| cost[[r, k]] - min;
        let row_to_col =
            hungarian(rows, cols, c).ok_or(MatchingError::CostRangeTooLarge { span })?;
        Ok(row_to_col.into_iter().map(Some).collect())
    } else {
        // The algorithm needs at least as many columns as rows, so solve the transpose and invert.
        let c = |r: usize, k: usize| cost[[k, r]] - min;
        let col_to_row =
            hungarian(cols, rows, c).ok_or(MatchingError::CostRangeTooLarge { span })?;
        let mut out = vec![None; rows];
        for (col, row) in col_to_row.into_iter().enumerate() {
            out[row] = Some(col);
        }
        Ok(out)
    }
}

/// Shortest augmenting path Hungarian algorithm for `n <= m`, with 1-based work arrays where
/// index 0 is a virtual column that simplifies the augmenting loop. Returns the column of every
/// row, or `None` if arithmetic broke down (only possible with overflowing costs).
fn hungarian(n: usize, m: usize, cost: impl Fn(usize, usize) -> f64) -> Option<Vec<usize>> {
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; m + 1];
    // row_of[j]: row (1-based) matched to column j, 0 when free.
    let mut row_of = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    let mut minv = vec![0.0; m + 1];
    let mut used = vec![false; m + 1];

    for i in 1..=n {
        row_of[0] = i;
        let mut j0 = 0;
        minv.fill(f64::INFINITY);
        used.fill(false);
        loop {
            used[j0] = true;
            let i0 = row_of[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let cur = cost(i0 - 1, j - 1) - u[i0] - v[j];
                if cur < minv[j] {
                    minv[j] = cur;
                    way[j] = j0;
                }
                if minv[j] < delta {
                    delta = minv[j];
                    j1 = j;
                }
            }
            // With finite costs and n <= m a free column always exists; bail out instead of
            // looping forever if overflow produced infinities or NaN.
            if j1 == 0 || !delta.is_finite() {
                return None;
            }
            for j in 0..=m {
                if used[j] {
                    u[row_of[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if row_of[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the virtual column.
        while j0 != 0 {
            let j1 = way[j0];
            row_of[j0] = row_of[j1];
            j0 = j1;
        }
    }

    let mut col_of = vec![0usize; n];
    for (j, &i) in row_of.iter().enumerate().skip(1) {
        if i != 0 {
            col_of[i - 1] = j - 1;
        }
    }
    Some(col_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};
    use proptest::prelude::*;

    fn total(cost: &Array2<f64>, a: &[Option<usize>]) -> f64 {
        a.iter()
            .enumerate()
            .filter_map(|(r, c)| c.map(|c| cost[[r, c]]))
            .sum()
    }

    /// Cheapest total over all injective maps from the smaller side into the larger one.
    fn brute_force(cost: &Array2<f64>) -> f64 {
        fn go(cost: &dyn Fn(usize, usize) -> f64, i: usize, n: usize, used: &mut [bool]) -> f64 {
            if i == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..used.len() {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost(i, j) + go(cost, i + 1, n, used));
                    used[j] = false;
                }
            }
            best
        }
        let (r, c) = cost.dim();
        if r <= c {
            go(&|i, j| cost[[i, j]], 0, r, &mut vec![false; c])
        } else {
            go(&|i, j| cost[[j, i]], 0, c, &mut vec![false; r])
        }
    }

    fn assert_valid(cost: &Array2<f64>, a: &[Option<usize>]) {
        let (r, c) = cost.dim();
        assert_eq!(a.len(), r);
        assert_eq!(a.iter().flatten().count(), r.min(c));
        let mut seen = vec![false; c];
        for &col in a.iter().flatten() {
            assert!(col < c && !seen[col]);
            seen[col] = true;
        }
    }

    #[test]
    fn square_hand_example() {
        // Optimum: row 0 -> col 1 (1), row 1 -> col 0 (2), row 2 -> col 2 (2) = 5.
        let cost = array![[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]];
        let a = min_cost_assignment(cost.view()).unwrap();
        assert_eq!(a, vec![Some(1), Some(0), Some(2)]);
        assert_eq!(total(&cost, &a), 5.0);
    }

    #[test]
    fn identity_is_kept_when_cheapest() {
        let cost = array![[0.0, 9.0, 9.0], [9.0, 0.0, 9.0], [9.0, 9.0, 0.0]];
        let a = min_cost_assignment(cost.view()).unwrap();
        assert_eq!(a, vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn more_columns_than_rows() {
        let cost = array![[5.0, 1.0, 7.0, 3.0], [2.0, 1.5, 8.0, 0.5]];
        let a = min_cost_assignment(cost.view()).unwrap();
        assert_eq!(a, vec![Some(1), Some(3)]);
    }

    #[test]
    fn more_rows_than_columns() {
        let cost = array![[5.0, 1.0], [0.0, 4.0], [1.0, 2.0], [9.0, 9.0]];
        let a = min_cost_assignment(cost.view()).unwrap();
        assert_eq!(a, vec![Some(1), Some(0), None, None]);
    }

    #[test]
    fn negative_costs_and_degenerate_shapes() {
        let cost = array![[-3.0, -1.0], [-2.0, -5.0]];
        assert_eq!(
            min_cost_assignment(cost.view()).unwrap(),
            vec![Some(0), Some(1)]
        );
        assert_eq!(
            min_cost_assignment(Array2::zeros((0, 3)).view()).unwrap(),
            vec![]
        );
        assert_eq!(
            min_cost_assignment(Array2::zeros((2, 0)).view()).unwrap(),
            vec![None, None]
        );
        assert_eq!(
            min_cost_assignment(array![[7.0]].view()).unwrap(),
            vec![Some(0)]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            min_cost_assignment(array![[0.0, f64::NAN]].view()).map_err(|e| e.to_string()),
            Err("cost matrix contains a non-finite value (NaN) at row 0, column 1".into())
        );
        assert!(matches!(
            min_cost_assignment(array![[f64::MAX, -f64::MAX]].view()),
            Err(MatchingError::CostRangeTooLarge { .. })
        ));
    }

    #[test]
    fn transposed_view_works() {
        let cost = array![[5.0, 0.0, 1.0, 9.0], [1.0, 4.0, 2.0, 9.0]];
        let a = min_cost_assignment(cost.t()).unwrap();
        assert_eq!(a, vec![Some(1), Some(0), None, None]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn matches_brute_force(
            rows in 1usize..6,
            cols in 1usize..6,
            values in proptest::collection::vec(-100i32..100, 36),
            fractional in any::<bool>(),
        ) {
            let cost = Array2::from_shape_fn((rows, cols), |(r, c)| {
                let v = values[r * 6 + c] as f64;
                if fractional { v / 7.0 } else { v }
            });
            let a = min_cost_assignment(cost.view()).unwrap();
            assert_valid(&cost, &a);
            let best = brute_force(&cost);
            prop_assert!((total(&cost, &a) - best).abs() < 1e-9, "{} vs {}", total(&cost, &a), best);
        }
    }
}
