//! k-means (Lloyd) clustering of customers' standardised per-axis features.
//!
//! The data has 2-4 columns, up to ~100k rows and k from 2 to ~12. Results must agree with
//! scikit-learn's `KMeans(algorithm="lloyd", n_init=10)` closely (inertia within 1% on the same
//! data), so initialisation, the convergence test and empty-cluster handling follow sklearn's
//! implementation rather than a textbook variant.
//!
//! Usage follows the linfa style: build [`KMeansParams`], validate it with
//! [`KMeansParams::check`], then call [`ValidKMeansParams::fit`].

use std::borrow::Cow;

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use thiserror::Error;

use super::input::{check_finite, check_weights, InputError};

/// Errors from [`KMeansParams::check`]: the hyper-parameters make no sense on their own.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum KMeansParamError {
    /// `k` was zero.
    #[error("number of clusters k must be at least 1")]
    ZeroClusters,
    /// `k` does not fit in the `u32` used for labels.
    #[error("number of clusters k = {0} is too large (labels are stored as u32)")]
    TooManyClusters(usize),
    /// `n_init` was zero.
    #[error("n_init must be at least 1 (number of k-means++ restarts)")]
    ZeroInits,
    /// `max_iter` was zero.
    #[error("max_iter must be at least 1")]
    ZeroMaxIter,
    /// `tol` was negative, NaN or infinite.
    #[error("tolerance must be finite and non-negative, got {0}")]
    InvalidTolerance(f64),
}

/// Errors from [`ValidKMeansParams::fit`]: the data cannot be clustered with these parameters.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum KMeansFitError {
    /// The data has fewer rows than the requested number of clusters.
    #[error(
        "cannot fit {k} clusters to {n_points} points: need at least as many points as clusters"
    )]
    TooFewPoints {
        /// Rows in the data.
        n_points: usize,
        /// Requested number of clusters.
        k: usize,
    },
    /// The data has no feature columns.
    #[error("data has no feature columns")]
    NoFeatures,
    /// The points or weights are unusable.
    #[error(transparent)]
    Input(#[from] InputError),
}

/// Unvalidated k-means hyper-parameters; call [`KMeansParams::check`] to use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeansParams {
    k: usize,
    n_init: usize,
    max_iter: usize,
    tol: f64,
    seed: u64,
}

impl KMeansParams {
    /// Parameters for `k` clusters with sklearn's defaults: `n_init` 10, `max_iter` 300,
    /// `tol` 1e-4, and seed 0.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            n_init: 10,
            max_iter: 300,
            tol: 1e-4,
            seed: 0,
        }
    }

    /// Number of k-means++ restarts; the fit with the lowest inertia is kept.
    pub fn n_init(self, n: usize) -> Self {
        Self { n_init: n, ..self }
    }

    /// Maximum number of Lloyd iterations per restart.
    pub fn max_iter(self, n: usize) -> Self {
        Self {
            max_iter: n,
            ..self
        }
    }

    /// Relative convergence tolerance: a restart stops once the summed squared centroid shift
    /// is at most `tol` times the mean per-feature variance of the data.
    pub fn tol(self, t: f64) -> Self {
        Self { tol: t, ..self }
    }

    /// Seed for the k-means++ initialisation; equal seeds give identical fits.
    pub fn seed(self, s: u64) -> Self {
        Self { seed: s, ..self }
    }

    /// Validates the parameters.
    pub fn check(self) -> Result<ValidKMeansParams, KMeansParamError> {
        if self.k == 0 {
            return Err(KMeansParamError::ZeroClusters);
        }
        if u32::try_from(self.k).is_err() {
            return Err(KMeansParamError::TooManyClusters(self.k));
        }
        if self.n_init == 0 {
            return Err(KMeansParamError::ZeroInits);
        }
        if self.max_iter == 0 {
            return Err(KMeansParamError::ZeroMaxIter);
        }
        if !self.tol.is_finite() || self.tol < 0.0 {
            return Err(KMeansParamError::InvalidTolerance(self.tol));
        }
        Ok(ValidKMeansParams(self))
    }
}

/// k-means hyper-parameters that passed [`KMeansParams::check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidKMeansParams(KMeansParams);

impl ValidKMeansParams {
    /// Number of clusters.
    pub fn k(&self) -> usize {
        self.0.k
    }

    /// Number of k-means++ restarts.
    pub fn n_init(&self) -> usize {
        self.0.n_init
    }

    /// Maximum number of Lloyd iterations per restart.
    pub fn max_iter(&self) -> usize {
        self.0.max_iter
    }

    /// Relative convergence tolerance.
    pub fn tol(&self) -> f64 {
        self.0.tol
    }

    /// Seed for the initialisation.
    pub fn seed(&self) -> u64 {
        self.0.seed
    }

    /// Clusters the rows of `data` (one point per row).
    ///
    /// Runs `n_init` independently seeded restarts in parallel and keeps the one with the lowest
    /// inertia (ties go to the lower restart index), so the result does not depend on the number
    /// of threads.
    pub fn fit(&self, data: ArrayView2<f64>) -> Result<KMeansFit, KMeansFitError> {
        self.fit_weighted(data, None)
    }

    /// Clusters the rows of `data`, each row counting with its weight (as scikit-learn's
    /// `sample_weight`): k-means++ draws and potentials, centroid means and inertia are all
    /// weighted. A stratified sample whose rows carry design weights thus clusters like the
    /// population it stands for. `None` weighs every row 1.
    pub fn fit_weighted(
        &self,
        data: ArrayView2<f64>,
        weights: Option<&[f64]>,
    ) -> Result<KMeansFit, KMeansFitError> {
        let (n, d) = data.dim();
        let k = self.k();
        if d == 0 {
            return Err(KMeansFitError::NoFeatures);
        }
        if n < k {
            return Err(KMeansFitError::TooFewPoints { n_points: n, k });
        }
        check_finite(data)?;
        let ones;
        let weights = match weights {
            Some(w) => {
                check_weights(w, n)?;
                w
            }
            None => {
                ones = vec![1.0; n];
                &ones[..]
            }
        };

        // The inner loops walk rows as contiguous slices; only non-standard layouts pay for a copy.
        let flat: Cow<[f64]> = match data.as_slice() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(data.iter().copied().collect()),
        };
        let flat = flat.as_ref();
        let tol_abs = self.tol() * mean_feature_variance(flat, d);

        let mut runs: Vec<Run> = (0..self.n_init())
            .into_par_iter()
            .map(|restart| {
                // Streams of one ChaCha key are independent, so each restart gets its own stream
                // and no restart's draws depend on another's or on scheduling.
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed());
                rng.set_stream(restart as u64);
                let job = Restart {
                    data: flat,
                    weights,
                    d,
                    k,
                    max_iter: self.max_iter(),
                    tol: tol_abs,
                };
                run_widest(&job, &mut rng)
            })
            .collect();

        // Strict `<` keeps the earliest restart on ties, independent of thread scheduling.
        let best = (1..runs.len()).fold(0, |best, i| {
            if runs[i].inertia < runs[best].inertia {
                i
            } else {
                best
            }
        });
        let run = runs.swap_remove(best);
        let centroids = Array2::from_shape_fn((k, d), |(c, j)| run.centroids[c * d + j]);
        Ok(KMeansFit {
            centroids,
            labels: run.labels,
            inertia: run.inertia,
            n_iter: run.n_iter,
            converged: run.converged,
        })
    }
}

/// Result of a k-means fit.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansFit {
    /// Cluster centres, one row per cluster.
    pub centroids: Array2<f64>,
    /// For each input row, the index of its nearest centroid.
    pub labels: Vec<u32>,
    /// Sum of squared distances from each point to its centroid.
    pub inertia: f64,
    /// Lloyd iterations run by the kept restart.
    pub n_iter: usize,
    /// Whether the kept restart met the tolerance (or stopped changing labels) before `max_iter`.
    pub converged: bool,
}

impl KMeansFit {
    /// Number of clusters.
    pub fn k(&self) -> usize {
        self.centroids.nrows()
    }

    /// Number of points assigned to each cluster, indexed by label.
    pub fn sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.k()];
        for &l in &self.labels {
            if let Some(s) = sizes.get_mut(l as usize) {
                *s += 1;
            }
        }
        sizes
    }
}

/// Index of the nearest centroid (a row of `centroids`) to `point`, and the squared Euclidean
/// distance to it.
///
/// Ties go to the lower index, as in the fit. `point` must have `centroids.ncols()` values.
/// With no centroids the result is `(0, f64::INFINITY)`.
pub fn nearest(centroids: ArrayView2<f64>, point: &[f64]) -> (usize, f64) {
    debug_assert_eq!(centroids.ncols(), point.len());
    let mut best = (0, f64::INFINITY);
    for (j, c) in centroids.rows().into_iter().enumerate() {
        let dist: f64 = c.iter().zip(point).map(|(a, b)| (a - b) * (a - b)).sum();
        if dist < best.1 {
            best = (j, dist);
        }
    }
    best
}

/// Outcome of one restart; centroids are row-major `k x d`.
struct Run {
    centroids: Vec<f64>,
    labels: Vec<u32>,
    inertia: f64,
    n_iter: usize,
    converged: bool,
}

/// sklearn scales `tol` by this so that it does not depend on the units of the data.
fn mean_feature_variance(flat: &[f64], d: usize) -> f64 {
    let n = (flat.len() / d) as f64;
    let mut mean = vec![0.0; d];
    for row in flat.chunks_exact(d) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    // Two passes rather than E[x^2] - E[x]^2, which cancels badly for offset data.
    let mut var = vec![0.0; d];
    for row in flat.chunks_exact(d) {
        for ((v, m), x) in var.iter_mut().zip(&mean).zip(row) {
            *v += (x - m) * (x - m);
        }
    }
    var.iter().sum::<f64>() / n / d as f64
}

/// Squared Euclidean distance. `D > 0` fixes the dimension at compile time so the loop unrolls;
/// `D == 0` handles any dimension.
#[inline(always)]
fn sq_dist<const D: usize>(a: &[f64], b: &[f64]) -> f64 {
    if D == 0 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    } else {
        let (a, b) = (&a[..D], &b[..D]);
        let mut s = 0.0;
        for t in 0..D {
            let diff = a[t] - b[t];
            s += diff * diff;
        }
        s
    }
}

/// What one restart works on: row-major points of `d` columns, their weights, k, and the
/// iteration limits.
struct Restart<'a> {
    data: &'a [f64],
    weights: &'a [f64],
    d: usize,
    k: usize,
    max_iter: usize,
    tol: f64,
}

/// [`run_once`] for the data's dimension, with the CPU's widest vectors: on x86-64, AVX2 where
/// the CPU has it. The result is the same bits either way: the same IEEE operations run in the
/// same order, only more of them at once.
fn run_widest(job: &Restart, rng: &mut ChaCha8Rng) -> Run {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { run_avx2(job, rng) };
    }
    run_by_dimension(job, rng)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_avx2(job: &Restart, rng: &mut ChaCha8Rng) -> Run {
    run_by_dimension(job, rng)
}

#[inline(always)]
fn run_by_dimension(job: &Restart, rng: &mut ChaCha8Rng) -> Run {
    let &Restart {
        data,
        weights,
        d,
        k,
        max_iter,
        tol,
    } = job;
    match d {
        1 => run_once::<1>(data, weights, d, k, max_iter, tol, rng),
        2 => run_once::<2>(data, weights, d, k, max_iter, tol, rng),
        3 => run_once::<3>(data, weights, d, k, max_iter, tol, rng),
        4 => run_once::<4>(data, weights, d, k, max_iter, tol, rng),
        _ => run_once::<0>(data, weights, d, k, max_iter, tol, rng),
    }
}

/// One k-means++ initialisation followed by Lloyd iterations, as sklearn's `_kmeans_single_lloyd`.
#[inline(always)]
fn run_once<const D: usize>(
    data: &[f64],
    weights: &[f64],
    d: usize,
    k: usize,
    max_iter: usize,
    tol_abs: f64,
    rng: &mut ChaCha8Rng,
) -> Run {
    let n = data.len() / d;
    let mut centroids = kmeans_plus_plus::<D>(data, weights, d, k, rng);
    let mut new_centroids = vec![0.0; k * d];
    let mut labels = vec![0u32; n];
    let mut counts = vec![0usize; k];
    let mut mass = vec![0.0f64; k];

    let mut n_iter = 0;
    let mut converged = false;
    for iter in 0..max_iter {
        n_iter = iter + 1;
        let (_, changed) = assign::<D>(
            data,
            weights,
            d,
            &centroids,
            &mut labels,
            &mut new_centroids,
            &mut counts,
            &mut mass,
        );
        // The first pass compares against the zero-initialised labels, which is meaningless.
        let labels_stable = iter > 0 && !changed;
        let shift = update_centroids::<D>(
            data,
            weights,
            d,
            &centroids,
            &labels,
            &mut new_centroids,
            &mut counts,
            &mut mass,
        );
        std::mem::swap(&mut centroids, &mut new_centroids);
        if labels_stable || shift <= tol_abs {
            converged = true;
            break;
        }
    }

    // The last update moved the centroids after the labels were computed, so re-label against
    // the final centroids to make labels, centroids and inertia consistent with each other.
    let (inertia, _) = assign::<D>(
        data,
        weights,
        d,
        &centroids,
        &mut labels,
        &mut new_centroids,
        &mut counts,
        &mut mass,
    );
    Run {
        centroids,
        labels,
        inertia,
        n_iter,
        converged,
    }
}

/// Greedy k-means++ exactly as sklearn's `_kmeans_plusplus`: each new centre is the best of
/// `2 + floor(ln k)` candidates drawn proportionally to the current squared distance, judged
/// by the potential (total squared distance) it would leave.
fn kmeans_plus_plus<const D: usize>(
    data: &[f64],
    weights: &[f64],
    d: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<f64> {
    let n = data.len() / d;
    let n_local_trials = 2 + (k as f64).ln().floor() as usize;
    let mut centroids = Vec::with_capacity(k * d);

    // The first centre is drawn with probability proportional to weight (uniform when all
    // weights are equal, as in the unweighted algorithm).
    let uniform = weights.windows(2).all(|w| w[0] == w[1]);
    let first = if uniform {
        rng.random_range(0..n)
    } else {
        let total: f64 = weights.iter().sum();
        let r = rng.random::<f64>() * total;
        let mut acc = 0.0;
        weights
            .iter()
            .position(|w| {
                acc += w;
                acc > r
            })
            .unwrap_or(n - 1)
    };
    let first_row = &data[first * d..(first + 1) * d];
    centroids.extend_from_slice(first_row);
    // Weighted squared distances: what the draws are proportional to and the potential sums.
    let mut closest: Vec<f64> = data
        .chunks_exact(d)
        .zip(weights)
        .map(|(x, w)| w * sq_dist::<D>(x, first_row))
        .collect();
    let mut current_pot = unrolled_sum(&closest);

    let mut cumsum = vec![0.0; n];
    let mut candidate = vec![0.0; n];
    let mut best = vec![0.0; n];
    for _ in 1..k {
        let mut acc = 0.0;
        for (c, &v) in cumsum.iter_mut().zip(&closest) {
            acc += v;
            *c = acc;
        }
        let mut best_pot = f64::INFINITY;
        let mut best_id = 0;
        for _ in 0..n_local_trials {
            let r = rng.random::<f64>() * current_pot;
            // numpy's searchsorted(side="left") clipped to the last index.
            let id = cumsum.partition_point(|&c| c < r).min(n - 1);
            let cand_row = &data[id * d..(id + 1) * d];
            for (((out, x), &old), w) in candidate
                .iter_mut()
                .zip(data.chunks_exact(d))
                .zip(&closest)
                .zip(weights)
            {
                *out = (w * sq_dist::<D>(x, cand_row)).min(old);
            }
            let pot = unrolled_sum(&candidate);
            if pot < best_pot {
                best_pot = pot;
                best_id = id;
                std::mem::swap(&mut candidate, &mut best);
            }
        }
        current_pot = best_pot;
        std::mem::swap(&mut closest, &mut best);
        centroids.extend_from_slice(&data[best_id * d..(best_id + 1) * d]);
    }
    centroids
}

/// Sum with four independent accumulators: a single running sum is a serial chain of
/// floating-point additions and was a visible share of the k-means++ time.
fn unrolled_sum(v: &[f64]) -> f64 {
    let (chunks, rest) = v.as_chunks::<4>();
    let mut acc = [0.0; 4];
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + rest.iter().sum::<f64>()
}

/// Labels every point with its nearest centroid (ties to the lower index) and accumulates the
/// per-cluster coordinate sums and counts needed for the next update. Returns the inertia and
/// whether any label changed.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn assign<const D: usize>(
    data: &[f64],
    weights: &[f64],
    d: usize,
    centroids: &[f64],
    labels: &mut [u32],
    sums: &mut [f64],
    counts: &mut [usize],
    mass: &mut [f64],
) -> (f64, bool) {
    sums.fill(0.0);
    counts.fill(0);
    mass.fill(0.0);
    if D > 0 {
        return assign_fixed::<D>(data, weights, centroids, labels, sums, counts, mass);
    }
    let mut inertia = 0.0;
    let mut changed = false;
    for ((x, label), &w) in data.chunks_exact(d).zip(labels.iter_mut()).zip(weights) {
        let mut best = 0usize;
        let mut best_dist = f64::INFINITY;
        for (j, c) in centroids.chunks_exact(d).enumerate() {
            let dist = sq_dist::<D>(x, c);
            if dist < best_dist {
                best_dist = dist;
                best = j;
            }
        }
        inertia += w * best_dist;
        changed |= *label as usize != best;
        *label = best as u32;
        counts[best] += 1;
        mass[best] += w;
        for (s, v) in sums[best * d..(best + 1) * d].iter_mut().zip(x) {
            *s += w * v;
        }
    }
    (inertia, changed)
}

/// Points handled together by [`assign_fixed`]; each has its own running minimum, so the CPU can
/// overlap their otherwise serial compare-and-select chains.
const BLOCK: usize = 4;

/// [`assign`] for a compile-time dimension `D > 0`, where nearly all of a fit's time goes. Rows
/// as fixed-size arrays drop the bounds checks, the branch-free minimum avoids mispredictions
/// when neighbouring points belong to different clusters, and points go in blocks of
/// [`BLOCK`]. Tie-breaking and summation order are the same as in the generic path.
#[inline(always)]
fn assign_fixed<const D: usize>(
    data: &[f64],
    weights: &[f64],
    centroids: &[f64],
    labels: &mut [u32],
    sums: &mut [f64],
    counts: &mut [usize],
    mass: &mut [f64],
) -> (f64, bool) {
    let (points, _) = data.as_chunks::<D>();
    let (cents, _) = centroids.as_chunks::<D>();
    let (sums, _) = sums.as_chunks_mut::<D>();
    let mut inertia = 0.0;
    let mut changed = false;
    let mut record = |x: &[f64; D], w: f64, label: &mut u32, best: usize, best_dist: f64| {
        inertia += w * best_dist;
        changed |= *label as usize != best;
        *label = best as u32;
        counts[best] += 1;
        mass[best] += w;
        for (s, v) in sums[best].iter_mut().zip(x) {
            *s += w * v;
        }
    };

    let (blocks, tail) = points.as_chunks::<BLOCK>();
    let (label_blocks, label_tail) = labels.as_chunks_mut::<BLOCK>();
    let (weight_blocks, weight_tail) = weights.as_chunks::<BLOCK>();
    for ((xs, ls), ws) in blocks
        .iter()
        .zip(label_blocks.iter_mut())
        .zip(weight_blocks)
    {
        let mut best = [0usize; BLOCK];
        let mut best_dist = [f64::INFINITY; BLOCK];
        for (j, c) in cents.iter().enumerate() {
            for p in 0..BLOCK {
                let dist = sq_dist_fixed(&xs[p], c);
                let better = dist < best_dist[p];
                best_dist[p] = if better { dist } else { best_dist[p] };
                best[p] = if better { j } else { best[p] };
            }
        }
        for p in 0..BLOCK {
            record(&xs[p], ws[p], &mut ls[p], best[p], best_dist[p]);
        }
    }
    for ((x, label), &w) in tail.iter().zip(label_tail.iter_mut()).zip(weight_tail) {
        let mut best = 0usize;
        let mut best_dist = f64::INFINITY;
        for (j, c) in cents.iter().enumerate() {
            let dist = sq_dist_fixed(x, c);
            let better = dist < best_dist;
            best_dist = if better { dist } else { best_dist };
            best = if better { j } else { best };
        }
        record(x, w, label, best, best_dist);
    }
    (inertia, changed)
}

#[inline(always)]
fn sq_dist_fixed<const D: usize>(a: &[f64; D], b: &[f64; D]) -> f64 {
    let mut s = 0.0;
    for t in 0..D {
        let diff = a[t] - b[t];
        s += diff * diff;
    }
    s
}

/// Turns the sums from [`assign`] into means in place, relocating empty clusters first, and
/// returns the summed squared shift from `old`.
#[allow(clippy::too_many_arguments)]
fn update_centroids<const D: usize>(
    data: &[f64],
    weights: &[f64],
    d: usize,
    old: &[f64],
    labels: &[u32],
    sums: &mut [f64],
    counts: &mut [usize],
    mass: &mut [f64],
) -> f64 {
    if counts.contains(&0) {
        relocate_empty::<D>(data, weights, d, old, labels, sums, counts, mass);
    }
    let mut shift = 0.0;
    for (((new_c, old_c), &count), &m) in sums
        .chunks_exact_mut(d)
        .zip(old.chunks_exact(d))
        .zip(counts.iter())
        .zip(mass.iter())
    {
        if count == 0 {
            // Unreachable after relocation (n >= k); keeping the old centre beats a NaN.
            new_c.copy_from_slice(old_c);
            continue;
        }
        let inv = 1.0 / m;
        new_c.iter_mut().for_each(|v| *v *= inv);
        shift += sq_dist::<D>(new_c, old_c);
    }
    shift
}

/// Like sklearn's `_relocate_empty_clusters_dense`: each empty cluster takes over one of the
/// points farthest from their current centroid, and that point is removed from its old cluster.
///
/// Unlike sklearn, a point is never taken from a cluster it is alone in, which would only empty
/// another cluster; with n >= k there are always enough other points.
#[allow(clippy::too_many_arguments)]
fn relocate_empty<const D: usize>(
    data: &[f64],
    weights: &[f64],
    d: usize,
    old: &[f64],
    labels: &[u32],
    sums: &mut [f64],
    counts: &mut [usize],
    mass: &mut [f64],
) {
    let mut far: Vec<(f64, usize)> = data
        .chunks_exact(d)
        .zip(labels)
        .enumerate()
        .map(|(i, (x, &l))| {
            let l = l as usize;
            (sq_dist::<D>(x, &old[l * d..(l + 1) * d]), i)
        })
        .collect();
    // Farthest first; ties by index keep the choice deterministic.
    far.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));

    let mut candidates = far.into_iter().map(|(_, i)| i);
    for empty in 0..counts.len() {
        if counts[empty] != 0 {
            continue;
        }
        let Some(i) = candidates.find(|&i| counts[labels[i] as usize] > 1) else {
            return;
        };
        let from = labels[i] as usize;
        let x = &data[i * d..(i + 1) * d];
        let w = weights[i];
        for (s, v) in sums[from * d..(from + 1) * d].iter_mut().zip(x) {
            *s -= w * v;
        }
        counts[from] -= 1;
        mass[from] -= w;
        for (s, v) in sums[empty * d..(empty + 1) * d].iter_mut().zip(x) {
            *s = w * v;
        }
        counts[empty] = 1;
        mass[empty] = w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2, ShapeBuilder};
    use proptest::prelude::*;
    use rand::Rng;

    fn fit(data: ArrayView2<f64>, k: usize) -> KMeansFit {
        KMeansParams::new(k).check().unwrap().fit(data).unwrap()
    }

    fn sorted_first_column(c: &Array2<f64>) -> Vec<f64> {
        let mut v: Vec<f64> = c.column(0).to_vec();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Three well separated 2-D blobs of 50 points each around the given centres.
    fn blobs(seed: u64) -> (Array2<f64>, [[f64; 2]; 3]) {
        let centres = [[-10.0, 0.0], [0.0, 10.0], [10.0, -5.0]];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let data = Array2::from_shape_fn((150, 2), |(i, j)| {
            centres[i / 50][j] + rng.random_range(-1.0..1.0)
        });
        (data, centres)
    }

    #[test]
    fn weights_act_like_repeated_points() {
        // [0, 1, 10, 11] with the point 1 weighted 3: the left centroid is (0 + 3)/4 = 0.75,
        // inertia 0.75² + 3·0.25² + 2·0.5² = 1.25 — the same as repeating the point 1 three times.
        let data = array![[0.0], [1.0], [10.0], [11.0]];
        let fit = KMeansParams::new(2)
            .check()
            .unwrap()
            .fit_weighted(data.view(), Some(&[1.0, 3.0, 1.0, 1.0]))
            .unwrap();
        assert_eq!(sorted_first_column(&fit.centroids), vec![0.75, 10.5]);
        assert!((fit.inertia - 1.25).abs() < 1e-12);
        let repeated = array![[0.0], [1.0], [1.0], [1.0], [10.0], [11.0]];
        let plain = super::tests::fit(repeated.view(), 2);
        assert!((plain.inertia - fit.inertia).abs() < 1e-12);
    }

    #[test]
    fn bad_weights_are_refused() {
        let data = array![[0.0], [1.0]];
        let p = KMeansParams::new(1).check().unwrap();
        assert!(matches!(
            p.fit_weighted(data.view(), Some(&[1.0])),
            Err(KMeansFitError::Input(InputError::WeightLength { .. }))
        ));
        assert!(matches!(
            p.fit_weighted(data.view(), Some(&[1.0, 0.0])),
            Err(KMeansFitError::Input(InputError::BadWeight { row: 1, .. }))
        ));
    }

    #[test]
    fn one_dimensional_hand_example() {
        let data = array![[0.0], [1.0], [10.0], [11.0]];
        let f = fit(data.view(), 2);
        assert_eq!(sorted_first_column(&f.centroids), vec![0.5, 10.5]);
        assert_eq!(f.inertia, 1.0);
        assert_eq!(f.labels[0], f.labels[1]);
        assert_eq!(f.labels[2], f.labels[3]);
        assert_ne!(f.labels[0], f.labels[2]);
        assert_eq!(f.sizes(), vec![2, 2]);
        assert_eq!(f.k(), 2);
        assert!(f.converged);
    }

    #[test]
    fn recovers_blobs() {
        let (data, centres) = blobs(7);
        let f = fit(data.view(), 3);
        assert_eq!(f.sizes(), vec![50, 50, 50]);
        for (b, centre) in centres.iter().enumerate() {
            let label = f.labels[b * 50];
            assert!(f.labels[b * 50..(b + 1) * 50].iter().all(|&l| l == label));
            let c = f.centroids.row(label as usize);
            assert!((c[0] - centre[0]).abs() < 0.3 && (c[1] - centre[1]).abs() < 0.3);
        }
        assert!(f.converged);
    }

    #[test]
    fn deterministic_for_fixed_seed_and_thread_count() {
        let (data, _) = blobs(3);
        let params = KMeansParams::new(4).seed(42).check().unwrap();
        let a = params.fit(data.view()).unwrap();
        let b = params.fit(data.view()).unwrap();
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| params.fit(data.view()).unwrap());
        assert_eq!(a, b);
        assert_eq!(a, single);
    }

    #[test]
    fn non_standard_layout_gives_same_fit() {
        let (data, _) = blobs(5);
        let mut fortran = Array2::zeros(data.dim().f());
        fortran.assign(&data);
        assert!(fortran.as_slice().is_none());
        assert_eq!(fit(data.view(), 3), fit(fortran.view(), 3));
    }

    #[test]
    fn empty_cluster_takes_farthest_point() {
        // Every point is nearest to centre 1.0, so the centre at 100 gets nothing; the point
        // farthest from its centre (10, at squared distance 81) must move to it.
        let data = [0.0, 1.0, 2.0, 10.0];
        let old = [1.0, 100.0];
        let mut labels = vec![0; 4];
        let mut sums = vec![0.0; 2];
        let mut counts = vec![0; 2];
        let mut mass = vec![0.0; 2];
        let w = [1.0; 4];
        assign::<1>(
            &data,
            &w,
            1,
            &old,
            &mut labels,
            &mut sums,
            &mut counts,
            &mut mass,
        );
        assert_eq!(counts, vec![4, 0]);
        let shift = update_centroids::<1>(
            &data,
            &w,
            1,
            &old,
            &labels,
            &mut sums,
            &mut counts,
            &mut mass,
        );
        assert_eq!(sums, vec![1.0, 10.0]);
        assert_eq!(counts, vec![3, 1]);
        // Centre 0 stays at 1; centre 1 moves from 100 to 10.
        assert_eq!(shift, 90.0 * 90.0);
    }

    #[test]
    fn duplicate_points_never_give_nan_centroids() {
        // Two distinct points but three clusters: one cluster must end up empty or duplicated,
        // and it must not turn into NaN.
        let mut data = Array2::zeros((10, 2));
        data.slice_mut(ndarray::s![5.., ..]).fill(1.0);
        let f = fit(data.view(), 3);
        assert!(f.centroids.iter().all(|v| v.is_finite()));
        assert_eq!(f.inertia, 0.0);
        assert_eq!(f.sizes().iter().sum::<usize>(), 10);

        let same = Array2::from_elem((6, 3), 2.5);
        let f = fit(same.view(), 2);
        assert!(f.centroids.iter().all(|&v| v == 2.5));
        assert_eq!(f.inertia, 0.0);
    }

    #[test]
    fn k_equal_to_n_puts_each_point_alone() {
        let data = array![[0.0, 0.0], [5.0, 5.0], [9.0, 1.0]];
        let f = fit(data.view(), 3);
        assert_eq!(f.inertia, 0.0);
        assert_eq!(f.sizes(), vec![1, 1, 1]);
    }

    #[test]
    fn high_dimension_uses_generic_path() {
        let data = Array2::from_shape_fn((40, 6), |(i, j)| {
            if i < 20 {
                j as f64 * 0.01
            } else {
                50.0 + i as f64 * 0.001
            }
        });
        let f = fit(data.view(), 2);
        assert_eq!(f.sizes(), vec![20, 20]);
    }

    #[test]
    fn the_widest_vectors_give_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (n, d, k) in [
            (301, 1, 3),
            (402, 2, 4),
            (503, 3, 5),
            (250, 4, 2),
            (199, 6, 3),
        ] {
            let data: Vec<f64> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let weights: Vec<f64> = (0..n).map(|_| rng.random_range(0.5..3.0)).collect();
            let tol = 1e-4 * mean_feature_variance(&data, d);
            let job = Restart {
                data: &data,
                weights: &weights,
                d,
                k,
                max_iter: 300,
                tol,
            };
            let run = |widest: bool| {
                let mut rng = ChaCha8Rng::seed_from_u64(1);
                let run = if widest {
                    run_widest(&job, &mut rng)
                } else {
                    run_by_dimension(&job, &mut rng)
                };
                let bits: Vec<u64> = run.centroids.iter().map(|c| c.to_bits()).collect();
                (bits, run.labels, run.inertia.to_bits(), run.n_iter)
            };
            assert_eq!(run(true), run(false), "n {n}, d {d}, k {k}");
        }
    }

    #[test]
    fn nearest_picks_closest_and_lowest_index_on_ties() {
        let c = array![[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]];
        assert_eq!(nearest(c.view(), &[1.9, 0.5]), (1, 0.1f64 * 0.1 + 0.25));
        assert_eq!(nearest(c.view(), &[1.0, 0.0]), (0, 1.0));
        assert_eq!(
            nearest(Array2::zeros((0, 2)).view(), &[1.0, 0.0]).1,
            f64::INFINITY
        );
    }

    #[test]
    fn param_errors() {
        assert_eq!(
            KMeansParams::new(0).check(),
            Err(KMeansParamError::ZeroClusters)
        );
        assert_eq!(
            KMeansParams::new(2).n_init(0).check(),
            Err(KMeansParamError::ZeroInits)
        );
        assert_eq!(
            KMeansParams::new(2).max_iter(0).check(),
            Err(KMeansParamError::ZeroMaxIter)
        );
        assert_eq!(
            KMeansParams::new(2).tol(-1.0).check(),
            Err(KMeansParamError::InvalidTolerance(-1.0))
        );
        assert!(matches!(
            KMeansParams::new(2).tol(f64::NAN).check(),
            Err(KMeansParamError::InvalidTolerance(_))
        ));
        let p = KMeansParams::new(3)
            .n_init(2)
            .max_iter(7)
            .tol(0.0)
            .seed(9)
            .check()
            .unwrap();
        assert_eq!(
            (p.k(), p.n_init(), p.max_iter(), p.tol(), p.seed()),
            (3, 2, 7, 0.0, 9)
        );
    }

    #[test]
    fn fit_errors() {
        let p = KMeansParams::new(3).check().unwrap();
        assert_eq!(
            p.fit(array![[0.0], [1.0]].view()),
            Err(KMeansFitError::TooFewPoints { n_points: 2, k: 3 })
        );
        assert_eq!(
            p.fit(Array2::zeros((5, 0)).view()),
            Err(KMeansFitError::NoFeatures)
        );
        let err = p
            .fit(array![[0.0, 1.0], [2.0, f64::INFINITY], [3.0, 3.0]].view())
            .unwrap_err();
        assert_eq!(
            err,
            KMeansFitError::Input(InputError::NonFinite {
                row: 1,
                col: 1,
                value: f64::INFINITY
            })
        );
        assert_eq!(
            err.to_string(),
            "data contains a non-finite value (inf) at row 1, column 1"
        );
    }

    #[test]
    fn max_iter_cap_reports_not_converged() {
        let (data, _) = blobs(11);
        let f = KMeansParams::new(3)
            .max_iter(1)
            .tol(0.0)
            .n_init(1)
            .check()
            .unwrap()
            .fit(data.view())
            .unwrap();
        assert_eq!(f.n_iter, 1);
        assert!(!f.converged);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn fit_is_self_consistent(
            raw in proptest::collection::vec(-5.0f64..5.0, 6..120),
            k in 1usize..5,
            seed in any::<u64>(),
        ) {
            let n = raw.len() / 3;
            prop_assume!(n >= k);
            let data = Array2::from_shape_vec((n, 3), raw[..n * 3].to_vec()).unwrap();
            let f = KMeansParams::new(k).n_init(3).seed(seed).check().unwrap()
                .fit(data.view()).unwrap();
            let mut inertia = 0.0;
            for (row, &label) in data.rows().into_iter().zip(&f.labels) {
                let (j, dist) = nearest(f.centroids.view(), row.as_slice().unwrap());
                prop_assert_eq!(j, label as usize);
                inertia += dist;
            }
            prop_assert!((inertia - f.inertia).abs() <= 1e-9 * (1.0 + inertia));
            prop_assert!(f.centroids.iter().all(|v| v.is_finite()));
        }
    }
}
