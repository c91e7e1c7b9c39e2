//! Exact mean silhouette coefficient for scoring clusterings of customers' standardised
//! per-axis features, used to choose k.
//!
//! Matches `sklearn.metrics.silhouette_score` with the Euclidean metric:
//! `s(i) = (b - a) / max(a, b)`, with `s(i) = 0` for points alone in their cluster, averaged over
//! all points. The cost is O(n² d) with no n x n matrix; rows are spread over rayon's threads.

use std::borrow::Cow;

use ndarray::ArrayView2;
use rayon::prelude::*;
use thiserror::Error;

use super::input::{check_finite, check_weights, InputError};

/// Reasons a silhouette cannot be computed.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum SilhouetteError {
    /// The data has no rows.
    #[error("cannot compute a silhouette for zero points")]
    NoPoints,
    /// A labeling has a different length than the data has rows.
    #[error("labeling {labeling} has {len} labels but the data has {n_points} points")]
    LengthMismatch {
        /// Index of the labeling in the input slice.
        labeling: usize,
        /// Number of labels it has.
        len: usize,
        /// Number of rows in the data.
        n_points: usize,
    },
    /// A labeling puts all points in one cluster, where the silhouette is undefined.
    #[error(
        "labeling {labeling} has {found} distinct cluster(s); the silhouette needs at least 2"
    )]
    TooFewClusters {
        /// Index of the labeling in the input slice.
        labeling: usize,
        /// Number of distinct labels it uses.
        found: usize,
    },
    /// A label is so large that the labels cannot be dense cluster indices `0..k`.
    #[error("labeling {labeling} uses label {label}, but with {n_points} points labels must be below {n_points}")]
    LabelOutOfRange {
        /// Index of the labeling in the input slice.
        labeling: usize,
        /// The offending label.
        label: u32,
        /// Number of rows in the data.
        n_points: usize,
    },
    /// The points or weights are unusable.
    #[error(transparent)]
    Input(#[from] InputError),
}

/// Mean silhouette for several labelings of the SAME points in one pass over the point pairs
/// (the pairwise distances do not depend on the labeling, so computing them once for k=2..=6
/// saves 5x).
///
/// Each labeling assigns one label per row of `data`; its number of clusters is its largest
/// label plus one, and unused labels below that are allowed. The result has one mean per
/// labeling, in order. Points whose cluster has a single member score 0, so a labeling that puts
/// every point alone scores 0. An empty `labelings` gives an empty result.
pub fn mean_silhouettes(
    data: ArrayView2<f64>,
    labelings: &[&[u32]],
) -> Result<Vec<f64>, SilhouetteError> {
    mean_silhouettes_weighted(data, labelings, None)
}

/// [`mean_silhouettes`], with each point's silhouette counted by its weight in the mean:
/// `Σ w_i s(i) / Σ w_i`. For a stratified sample with design weights this scores a clustering
/// for the population the sample stands for, not for its over-sampled strata. `a(i)` and `b(i)`
/// stay plain means over the other points. `None` weighs every point 1.
pub fn mean_silhouettes_weighted(
    data: ArrayView2<f64>,
    labelings: &[&[u32]],
    weights: Option<&[f64]>,
) -> Result<Vec<f64>, SilhouetteError> {
    let (n, d) = data.dim();
    if let Some(w) = weights {
        check_weights(w, n)?;
    }
    if n == 0 {
        return Err(SilhouetteError::NoPoints);
    }
    check_finite(data)?;
    let n_lab = labelings.len();
    if n_lab == 0 {
        return Ok(Vec::new());
    }

    let (offsets, sizes) = cluster_slots(labelings, n)?;
    let n_slots = sizes.len();
    let mut slot_of = vec![0u32; n * n_lab];
    for (l, labels) in labelings.iter().enumerate() {
        for (j, &c) in labels.iter().enumerate() {
            // Fits in u32: n_slots <= n * n_lab, far below u32::MAX for any quadratic workload.
            slot_of[j * n_lab + l] = (offsets[l] + c as usize) as u32;
        }
    }

    let flat: Cow<[f64]> = match data.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(data.iter().copied().collect()),
    };
    let ctx = Ctx {
        data: flat.as_ref(),
        d,
        n_lab,
        slot_of: &slot_of,
        offsets: &offsets,
        sizes: &sizes,
    };

    let mut scores = vec![0.0; n * n_lab];
    scores
        .par_chunks_mut(n_lab)
        .enumerate()
        .with_min_len(8)
        .for_each_init(
            || vec![0.0; n_slots],
            |sums, (i, out)| match d {
                1 => ctx.row_scores::<1>(i, sums, out),
                2 => ctx.row_scores::<2>(i, sums, out),
                3 => ctx.row_scores::<3>(i, sums, out),
                4 => ctx.row_scores::<4>(i, sums, out),
                _ => ctx.row_scores::<0>(i, sums, out),
            },
        );

    // Summed sequentially so the result does not depend on how rayon split the rows.
    let mut means = vec![0.0; n_lab];
    let mut total = 0.0;
    for (i, row) in scores.chunks_exact(n_lab).enumerate() {
        let w = weights.map_or(1.0, |w| w[i]);
        total += w;
        for (m, s) in means.iter_mut().zip(row) {
            *m += w * s;
        }
    }
    means.iter_mut().for_each(|m| *m /= total);
    Ok(means)
}

/// The accumulator slots of every labeling: all labelings share one accumulator per row, and
/// labeling l's cluster c lives at `offsets[l] + c`. Returns the offsets and each slot's
/// cluster size, after checking each labeling's length, labels and number of clusters.
fn cluster_slots(
    labelings: &[&[u32]],
    n: usize,
) -> Result<(Vec<usize>, Vec<usize>), SilhouetteError> {
    let n_lab = labelings.len();
    let mut offsets = Vec::with_capacity(n_lab);
    let mut sizes: Vec<usize> = Vec::new();
    for (l, labels) in labelings.iter().enumerate() {
        if labels.len() != n {
            return Err(SilhouetteError::LengthMismatch {
                labeling: l,
                len: labels.len(),
                n_points: n,
            });
        }
        let max = labels.iter().copied().max().unwrap_or(0);
        if max as usize >= n {
            return Err(SilhouetteError::LabelOutOfRange {
                labeling: l,
                label: max,
                n_points: n,
            });
        }
        let offset = sizes.len();
        offsets.push(offset);
        sizes.resize(offset + max as usize + 1, 0);
        for &c in labels.iter() {
            sizes[offset + c as usize] += 1;
        }
        let found = sizes[offset..].iter().filter(|&&s| s > 0).count();
        if found < 2 {
            return Err(SilhouetteError::TooFewClusters { labeling: l, found });
        }
    }
    Ok((offsets, sizes))
}

/// Mean silhouette of one labeling; see [`mean_silhouettes`] for the rules and errors.
pub fn mean_silhouette(data: ArrayView2<f64>, labels: &[u32]) -> Result<f64, SilhouetteError> {
    let means = mean_silhouettes(data, &[labels])?;
    Ok(means.first().copied().unwrap_or(0.0))
}

/// Read-only inputs shared by all rows.
struct Ctx<'a> {
    data: &'a [f64],
    d: usize,
    n_lab: usize,
    /// `slot_of[j * n_lab + l]`: accumulator slot of point j's cluster under labeling l.
    slot_of: &'a [u32],
    offsets: &'a [usize],
    sizes: &'a [usize],
}

impl Ctx<'_> {
    /// Writes s(i) for every labeling into `out`. `D > 0` fixes the dimension at compile time.
    #[inline(always)]
    fn row_scores<const D: usize>(&self, i: usize, sums: &mut [f64], out: &mut [f64]) {
        let d = self.d;
        let n_lab = self.n_lab;
        sums.fill(0.0);
        let xi = &self.data[i * d..(i + 1) * d];
        for (xj, slots) in self
            .data
            .chunks_exact(d)
            .zip(self.slot_of.chunks_exact(n_lab))
        {
            let dist = euclidean::<D>(xi, xj);
            for &s in slots {
                sums[s as usize] += dist;
            }
        }

        let own_slots = &self.slot_of[i * n_lab..(i + 1) * n_lab];
        for (l, (score, &own)) in out.iter_mut().zip(own_slots).enumerate() {
            let own = own as usize;
            let own_size = self.sizes[own];
            if own_size <= 1 {
                *score = 0.0;
                continue;
            }
            // The point's distance to itself is 0, so dividing by size - 1 averages over the others.
            let a = sums[own] / (own_size - 1) as f64;
            let end = self.offsets.get(l + 1).copied().unwrap_or(self.sizes.len());
            let b = (self.offsets[l]..end)
                .filter(|&c| c != own && self.sizes[c] > 0)
                .map(|c| sums[c] / self.sizes[c] as f64)
                .fold(f64::INFINITY, f64::min);
            let denom = a.max(b);
            // a == b == 0 (duplicate points across clusters) is 0/0; sklearn maps it to 0.
            *score = if denom > 0.0 { (b - a) / denom } else { 0.0 };
        }
    }
}

#[inline(always)]
fn euclidean<const D: usize>(a: &[f64], b: &[f64]) -> f64 {
    if D == 0 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
    } else {
        let (a, b) = (&a[..D], &b[..D]);
        let mut s = 0.0;
        for t in 0..D {
            let diff = a[t] - b[t];
            s += diff * diff;
        }
        s.sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_average_the_per_point_scores() {
        // [0,1,4,5] with labels [0,0,1,1]: s = 7/9, 5/7, 5/7, 7/9. Weight 3 on the first point:
        // (3·7/9 + 5/7 + 5/7 + 7/9) / 6.
        let data = ndarray::array![[0.0], [1.0], [4.0], [5.0]];
        let labels = [0u32, 0, 1, 1];
        let got = mean_silhouettes_weighted(data.view(), &[&labels], Some(&[3.0, 1.0, 1.0, 1.0]))
            .unwrap()[0];
        let expected = (3.0 * 7.0 / 9.0 + 5.0 / 7.0 + 5.0 / 7.0 + 7.0 / 9.0) / 6.0;
        assert!((got - expected).abs() < 1e-12);
        assert!(matches!(
            mean_silhouettes_weighted(data.view(), &[&labels], Some(&[1.0; 3])),
            Err(SilhouetteError::Input(InputError::WeightLength { .. }))
        ));
        assert!(matches!(
            mean_silhouettes_weighted(data.view(), &[&labels], Some(&[1.0, -1.0, 1.0, 1.0])),
            Err(SilhouetteError::Input(InputError::BadWeight { row: 1, .. }))
        ));
    }
    use ndarray::{array, Array2, ShapeBuilder};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// O(n²) textbook silhouette straight from the definition, for cross-checking.
    fn reference(data: ArrayView2<f64>, labels: &[u32]) -> f64 {
        let n = data.nrows();
        let k = *labels.iter().max().unwrap() as usize + 1;
        let dist = |i: usize, j: usize| (&data.row(i) - &data.row(j)).mapv(|v| v * v).sum().sqrt();
        let mut total = 0.0;
        for i in 0..n {
            let mut sums = vec![0.0; k];
            let mut counts = vec![0usize; k];
            for j in 0..n {
                if j != i {
                    sums[labels[j] as usize] += dist(i, j);
                    counts[labels[j] as usize] += 1;
                }
            }
            let own = labels[i] as usize;
            if counts[own] == 0 {
                continue;
            }
            let a = sums[own] / counts[own] as f64;
            let b = (0..k)
                .filter(|&c| c != own && counts[c] > 0)
                .map(|c| sums[c] / counts[c] as f64)
                .fold(f64::INFINITY, f64::min);
            if a.max(b) > 0.0 {
                total += (b - a) / a.max(b);
            }
        }
        total / n as f64
    }

    #[test]
    fn hand_computed_one_dimensional() {
        // s(0) = (4.5 - 1) / 4.5 = 7/9, s(1) = (3.5 - 1) / 3.5 = 5/7, and symmetrically for 4, 5.
        let data = array![[0.0], [1.0], [4.0], [5.0]];
        let s = mean_silhouette(data.view(), &[0, 0, 1, 1]).unwrap();
        let expected = (7.0 / 9.0 + 5.0 / 7.0 + 5.0 / 7.0 + 7.0 / 9.0) / 4.0;
        assert_eq!(s, expected);
        assert!((s - 47.0 / 63.0).abs() < 1e-15);
    }

    #[test]
    fn singleton_scores_zero() {
        // 10 is alone: s = 0. s(0) = (10 - 1) / 10, s(1) = (9 - 1) / 9.
        let data = array![[0.0], [1.0], [10.0]];
        let s = mean_silhouette(data.view(), &[0, 0, 1]).unwrap();
        assert_eq!(s, (0.9 + 8.0 / 9.0 + 0.0) / 3.0);
        let all_alone = mean_silhouette(data.view(), &[0, 1, 2]).unwrap();
        assert_eq!(all_alone, 0.0);
    }

    #[test]
    fn duplicate_points_in_different_clusters_score_zero() {
        let data = array![[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]];
        assert_eq!(mean_silhouette(data.view(), &[0, 0, 1, 1]).unwrap(), 0.0);
    }

    #[test]
    fn gaps_in_labels_are_ignored() {
        let data = array![[0.0], [1.0], [4.0], [5.0]];
        let dense = mean_silhouette(data.view(), &[0, 0, 1, 1]).unwrap();
        let gappy = mean_silhouette(data.view(), &[0, 0, 2, 2]).unwrap();
        assert_eq!(dense, gappy);
    }

    #[test]
    fn batch_and_single_scores_match_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 300;
        let data = Array2::from_shape_fn((n, 3), |_| rng.random_range(-2.0..2.0));
        let labelings: Vec<Vec<u32>> = (2..=6)
            .map(|k| (0..n).map(|_| rng.random_range(0..k)).collect())
            .collect();
        let refs: Vec<&[u32]> = labelings.iter().map(Vec::as_slice).collect();
        let multi = mean_silhouettes(data.view(), &refs).unwrap();
        assert_eq!(multi.len(), 5);
        // Each labeling scored in the batch and scored alone both match the textbook
        // definition (`mean_silhouette` runs the batch code on one labeling, so comparing the
        // two with each other would prove nothing).
        for (m, labels) in multi.iter().zip(&labelings) {
            let want = reference(data.view(), labels);
            assert!((m - want).abs() < 1e-12, "batch {m} vs {want}");
            let alone = mean_silhouette(data.view(), labels).unwrap();
            assert!((alone - want).abs() < 1e-12, "alone {alone} vs {want}");
        }
    }

    #[test]
    fn layouts_and_dimensions_agree_with_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for d in 1..=6 {
            let data = Array2::from_shape_fn((60, d), |_| rng.random_range(-1.0..1.0));
            let labels: Vec<u32> = (0..60).map(|i| (i % 3) as u32).collect();
            let mut fortran = Array2::zeros((60, d).f());
            fortran.assign(&data);
            let s = mean_silhouette(data.view(), &labels).unwrap();
            assert_eq!(s, mean_silhouette(fortran.view(), &labels).unwrap());
            assert!((s - reference(data.view(), &labels)).abs() < 1e-12);
        }
    }

    #[test]
    fn well_separated_clusters_score_near_one() {
        let data = array![[0.0, 0.0], [0.1, 0.0], [100.0, 0.0], [100.1, 0.0]];
        let s = mean_silhouette(data.view(), &[1, 1, 0, 0]).unwrap();
        assert!(s > 0.998);
    }

    #[test]
    fn errors() {
        let data = array![[0.0], [1.0], [2.0]];
        assert_eq!(
            mean_silhouette(Array2::zeros((0, 2)).view(), &[]),
            Err(SilhouetteError::NoPoints)
        );
        assert_eq!(
            mean_silhouette(data.view(), &[0, 1]),
            Err(SilhouetteError::LengthMismatch {
                labeling: 0,
                len: 2,
                n_points: 3
            })
        );
        assert_eq!(
            mean_silhouettes(data.view(), &[&[0, 1, 0], &[2, 2, 2]]),
            Err(SilhouetteError::TooFewClusters {
                labeling: 1,
                found: 1
            })
        );
        assert_eq!(
            mean_silhouette(data.view(), &[0, 1, 7]),
            Err(SilhouetteError::LabelOutOfRange {
                labeling: 0,
                label: 7,
                n_points: 3
            })
        );
        assert!(matches!(
            mean_silhouette(array![[0.0], [f64::NAN]].view(), &[0, 1]),
            Err(SilhouetteError::Input(InputError::NonFinite {
                row: 1,
                col: 0,
                ..
            }))
        ));
        assert_eq!(mean_silhouettes(data.view(), &[]), Ok(vec![]));
    }
}
