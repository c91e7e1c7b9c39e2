//! Exact mean silhouette coefficient for scoring clusterings of customers' standardised
//! per-axis features, used to choose k.
//!
//! Matches `sklearn.metrics.silhouette_score` with the Euclidean metric:
//! `s(i) = (b - a) / max(a, b)`, with `s(i) = 0` for points alone in their cluster, averaged over
//! all points. The cost is O(n² d) with no n x n matrix. Points are scored eight at a time, on
//! rayon's threads: their distances to every point are computed side by side (square roots in
//! vector registers, AVX2 where the CPU has it), then summed per cluster from each cluster's
//! member list. Every sum adds the same distances in the same order as a plain pass per point
//! would, so the scores are bit for bit that pass's.

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

    let flat: Cow<[f64]> = match data.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(data.iter().copied().collect()),
    };
    let scores = Ctx::new(flat.as_ref(), (n, d), labelings)?.point_scores(Vectors::Widest);

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
    slot_of: Vec<u32>,
    offsets: Vec<usize>,
    sizes: Vec<usize>,
    /// Every slot's points in row order: slot s's are `members[starts[s]..starts[s + 1]]`.
    members: Vec<u32>,
    starts: Vec<usize>,
}

/// Which vector instructions [`Ctx::point_scores`] may use.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Vectors {
    /// The widest the CPU has.
    Widest,
    /// Those every CPU of the target has.
    #[cfg_attr(not(test), allow(dead_code))]
    Baseline,
}

impl<'a> Ctx<'a> {
    /// The inputs for scoring `labelings` of the `n` points in `data` (row-major, `d`
    /// columns), after checking the labelings (see [`cluster_slots`]).
    fn new(
        data: &'a [f64],
        (n, d): (usize, usize),
        labelings: &[&[u32]],
    ) -> Result<Self, SilhouetteError> {
        let n_lab = labelings.len();
        let (offsets, sizes) = cluster_slots(labelings, n)?;
        let mut slot_of = vec![0u32; n * n_lab];
        for (l, labels) in labelings.iter().enumerate() {
            for (j, &c) in labels.iter().enumerate() {
                // Fits in u32: n_slots <= n * n_lab, far below u32::MAX for any quadratic
                // workload.
                slot_of[j * n_lab + l] = (offsets[l] + c as usize) as u32;
            }
        }
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        starts.push(0);
        for &size in &sizes {
            starts.push(starts.last().copied().unwrap_or(0) + size);
        }
        let mut members = vec![0u32; n * n_lab];
        let mut next = starts.clone();
        for (j, slots) in slot_of.chunks_exact(n_lab).enumerate() {
            for &slot in slots {
                // Fits in u32, as the slots do.
                members[next[slot as usize]] = j as u32;
                next[slot as usize] += 1;
            }
        }
        Ok(Self {
            data,
            d,
            n_lab,
            slot_of,
            offsets,
            sizes,
            members,
            starts,
        })
    }

    /// Every point's s(i) under every labeling (`n_lab` per point, point by point), a few
    /// points at a time on rayon's threads.
    fn point_scores(&self, vectors: Vectors) -> Vec<f64> {
        let n = self.slot_of.len() / self.n_lab;
        let n_slots = self.sizes.len();
        let mut scores = vec![0.0; n * self.n_lab];
        scores
            .par_chunks_mut(self.n_lab * ROWS_AT_ONCE)
            .enumerate()
            .for_each_init(
                || {
                    (
                        vec![[0.0; ROWS_AT_ONCE]; n],
                        vec![[0.0; ROWS_AT_ONCE]; n_slots],
                    )
                },
                |scratch, (g, out)| {
                    let first = g * ROWS_AT_ONCE;
                    let scratch = (scratch.0.as_mut_slice(), scratch.1.as_mut_slice());
                    match vectors {
                        Vectors::Widest => self.group_scores(first, scratch, out),
                        Vectors::Baseline => self.group_by_dimension(first, scratch, out),
                    }
                },
            );
        scores
    }
}

/// Rows scored together: their distances to a point lie side by side, so one pass over a
/// slot's points adds to all of their sums at once, in registers.
const ROWS_AT_ONCE: usize = 8;

impl Ctx<'_> {
    /// [`Ctx::group_at`] for the data's dimension, with the CPU's widest vectors: on x86-64,
    /// AVX2 where the CPU has it (four square roots at once instead of two). The results are
    /// the same bits either way: the steps are the same IEEE operations, in the same order.
    fn group_scores(
        &self,
        first: usize,
        scratch: (&mut [[f64; ROWS_AT_ONCE]], &mut [[f64; ROWS_AT_ONCE]]),
        out: &mut [f64],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.group_scores_avx2(first, scratch, out) };
        }
        self.group_by_dimension(first, scratch, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn group_scores_avx2(
        &self,
        first: usize,
        scratch: (&mut [[f64; ROWS_AT_ONCE]], &mut [[f64; ROWS_AT_ONCE]]),
        out: &mut [f64],
    ) {
        self.group_by_dimension(first, scratch, out);
    }

    #[inline(always)]
    fn group_by_dimension(
        &self,
        first: usize,
        scratch: (&mut [[f64; ROWS_AT_ONCE]], &mut [[f64; ROWS_AT_ONCE]]),
        out: &mut [f64],
    ) {
        match self.d {
            1 => self.group_at::<1>(first, scratch, out),
            2 => self.group_at::<2>(first, scratch, out),
            3 => self.group_at::<3>(first, scratch, out),
            4 => self.group_at::<4>(first, scratch, out),
            _ => self.group_at::<0>(first, scratch, out),
        }
    }

    /// Writes s(i) for every labeling into `out`, for the rows from `first` on (up to
    /// [`ROWS_AT_ONCE`] of them, one chunk of `n_lab` scores each). `D > 0` fixes the
    /// dimension at compile time.
    ///
    /// A row's sum for a slot adds its distances to the slot's points in row order (its own
    /// distance, 0, changes no sum), as a pass over all points adding each distance to the
    /// sum of that point's slot would; it is built from a slot's point list in one register
    /// instead, where that pass read and wrote a sum in memory for every point and labeling.
    #[inline(always)]
    fn group_at<const D: usize>(
        &self,
        first: usize,
        (dists, sums): (&mut [[f64; ROWS_AT_ONCE]], &mut [[f64; ROWS_AT_ONCE]]),
        out: &mut [f64],
    ) {
        let d = self.d;
        let rows = out.len() / self.n_lab;
        // The rows' coordinates side by side, a dimension at a time (a missing row repeats the
        // last), so that each step below works on all the rows at once.
        let mut coords = vec![[0.0; ROWS_AT_ONCE]; d];
        for (t, lanes) in coords.iter_mut().enumerate() {
            for (r, c) in lanes.iter_mut().enumerate() {
                *c = self.data[(first + r.min(rows - 1)) * d + t];
            }
        }
        let dims = if D == 0 { d } else { D };
        for (xj, to_j) in self.data.chunks_exact(d).zip(dists.iter_mut()) {
            // As a plain Euclidean distance adds them: from 0, a dimension at a time, then
            // the root (the tests' pass per point does the same).
            let mut acc = [0.0; ROWS_AT_ONCE];
            for (lanes, &x) in coords[..dims].iter().zip(&xj[..dims]) {
                for r in 0..ROWS_AT_ONCE {
                    let diff = lanes[r] - x;
                    acc[r] += diff * diff;
                }
            }
            for r in 0..ROWS_AT_ONCE {
                to_j[r] = acc[r].sqrt();
            }
        }
        for (slot, sum) in sums.iter_mut().enumerate() {
            let mut acc = [0.0; ROWS_AT_ONCE];
            for &j in &self.members[self.starts[slot]..self.starts[slot + 1]] {
                let to_j = &dists[j as usize];
                for r in 0..ROWS_AT_ONCE {
                    acc[r] += to_j[r];
                }
            }
            *sum = acc;
        }
        for (r, out) in out.chunks_exact_mut(self.n_lab).enumerate() {
            self.row_scores(first + r, |slot| sums[slot][r], out);
        }
    }

    /// Writes s(i) for every labeling into `out`, given the sum of point i's distances to
    /// the points of each slot.
    fn row_scores(&self, i: usize, sum: impl Fn(usize) -> f64, out: &mut [f64]) {
        let n_lab = self.n_lab;
        let own_slots = &self.slot_of[i * n_lab..(i + 1) * n_lab];
        for (l, (score, &own)) in out.iter_mut().zip(own_slots).enumerate() {
            let own = own as usize;
            let own_size = self.sizes[own];
            if own_size <= 1 {
                *score = 0.0;
                continue;
            }
            // The point's distance to itself is 0, so dividing by size - 1 averages over the others.
            let a = sum(own) / (own_size - 1) as f64;
            let end = self.offsets.get(l + 1).copied().unwrap_or(self.sizes.len());
            let b = (self.offsets[l]..end)
                .filter(|&c| c != own && self.sizes[c] > 0)
                .map(|c| sum(c) / self.sizes[c] as f64)
                .fold(f64::INFINITY, f64::min);
            let denom = a.max(b);
            // a == b == 0 (duplicate points across clusters) is 0/0; sklearn maps it to 0.
            *score = if denom > 0.0 { (b - a) / denom } else { 0.0 };
        }
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

    /// Every point's scores as a pass over all points for each point computes them: each
    /// distance (from 0, a dimension at a time, then the root) added to the sum of the other
    /// point's slot under each labeling, in row order.
    fn scores_point_by_point(ctx: &Ctx) -> Vec<f64> {
        let (n_lab, n_slots) = (ctx.n_lab, ctx.sizes.len());
        let points: Vec<&[f64]> = ctx.data.chunks_exact(ctx.d).collect();
        let mut scores = vec![0.0; points.len() * n_lab];
        for (i, out) in scores.chunks_exact_mut(n_lab).enumerate() {
            let mut sums = vec![0.0; n_slots];
            for (j, xj) in points.iter().enumerate() {
                let dist = points[i]
                    .iter()
                    .zip(*xj)
                    .fold(0.0, |s, (a, b)| s + (a - b) * (a - b))
                    .sqrt();
                for &s in &ctx.slot_of[j * n_lab..(j + 1) * n_lab] {
                    sums[s as usize] += dist;
                }
            }
            ctx.row_scores(i, |s| sums[s], out);
        }
        scores
    }

    #[test]
    fn scores_are_bit_for_bit_those_of_a_pass_per_point() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // Row counts around a group's, and dimensions through the fixed and general loops.
        for (n, d) in [(2, 2), (7, 1), (8, 3), (9, 4), (203, 2), (131, 6), (64, 3)] {
            let data: Vec<f64> = (0..n * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let mut labelings: Vec<Vec<u32>> = (2..=5)
                .map(|k| (0..n).map(|_| rng.random_range(0..k)).collect())
                .collect();
            for labels in &mut labelings {
                labels[0] = 0;
                labels[1] = 1;
            }
            let refs: Vec<&[u32]> = labelings.iter().map(Vec::as_slice).collect();
            let ctx = Ctx::new(&data, (n, d), &refs).unwrap();
            let bits = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let want = bits(scores_point_by_point(&ctx));
            for vectors in [Vectors::Widest, Vectors::Baseline] {
                let got = bits(ctx.point_scores(vectors));
                assert_eq!(got, want, "n {n}, d {d}, {vectors:?}");
            }
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
