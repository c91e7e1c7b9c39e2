//! Lifetime-value-stratified sampling: which customers the segments are discovered on.
//!
//! Customers are split into tiers by quantiles of their lifetime value, and each tier gives a
//! fixed quota. Quotas deliberately over-represent the valuable few (a VIP tier of the top 5%
//! gives 1,000 of 5,000 samples), so k-means sees enough of them to give them segments of their
//! own. Every sampled customer carries a design weight (tier population / tier sample) so that
//! shares, means and scalers estimated from the sample still describe the whole population.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::snapshot::TierRecord;

/// One lifetime-value tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Tier name.
    pub name: String,
    /// Lower bound of the tier as a quantile of lifetime value (0 ≤ q < 1). The tier runs up to
    /// the next higher tier's bound.
    pub min_quantile: f64,
    /// Customers to sample from the tier at the default sample size.
    pub quota: usize,
}

/// The design's tiers: vip (top 5%) 1,000, high (75–95%) 1,500, mid (40–75%) 1,500, low 1,000.
pub fn default_tiers() -> Vec<TierSpec> {
    [
        ("vip", 0.95, 1000),
        ("high", 0.75, 1500),
        ("mid", 0.40, 1500),
        ("low", 0.0, 1000),
    ]
    .into_iter()
    .map(|(name, min_quantile, quota)| TierSpec {
        name: name.into(),
        min_quantile,
        quota,
    })
    .collect()
}

/// How many customers to sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleSize {
    /// About this many, spread over the tiers in proportion to their quotas.
    Count(usize),
    /// Everyone: no sampling, every weight 1.
    All,
}

impl std::str::FromStr for SampleSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        match s.replace('_', "").parse::<usize>() {
            Ok(0) => Err("sample size must be at least 1".into()),
            Ok(n) => Ok(Self::Count(n)),
            Err(_) => Err(format!("sample size {s:?} is neither a number nor \"all\"")),
        }
    }
}

/// Why tiers were refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TierError {
    /// No tiers.
    #[error("at least one tier is needed")]
    Empty,
    /// Bounds outside [0, 1), not distinct, or no tier starting at 0.
    #[error("tier quantiles must be distinct values in [0, 1) and one tier must start at 0")]
    Bounds,
    /// Names repeat or are empty.
    #[error("tier names must be non-empty and unique")]
    Names,
    /// A tier has a quota of zero: its customers would get no voice and weight 0.
    #[error("every tier needs a quota of at least 1")]
    Quotas,
}

/// Checks tier specs and returns them sorted from the top tier down.
pub fn check_tiers(tiers: &[TierSpec]) -> Result<Vec<TierSpec>, TierError> {
    if tiers.is_empty() {
        return Err(TierError::Empty);
    }
    let mut sorted = tiers.to_vec();
    sorted.sort_by(|a, b| b.min_quantile.total_cmp(&a.min_quantile));
    let bounds_ok = sorted
        .iter()
        .all(|t| t.min_quantile.is_finite() && (0.0..1.0).contains(&t.min_quantile))
        && sorted
            .windows(2)
            .all(|w| w[0].min_quantile > w[1].min_quantile)
        && sorted.last().is_some_and(|t| t.min_quantile == 0.0);
    if !bounds_ok {
        return Err(TierError::Bounds);
    }
    let mut names: Vec<&str> = sorted.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.len() != sorted.len() || names.iter().any(|n| n.trim().is_empty()) {
        return Err(TierError::Names);
    }
    if sorted.iter().any(|t| t.quota == 0) {
        return Err(TierError::Quotas);
    }
    Ok(sorted)
}

/// A drawn sample.
#[derive(Debug, Clone, PartialEq)]
pub struct StratifiedSample {
    /// Indices into the population, ascending.
    pub indices: Vec<usize>,
    /// Design weight of each sampled customer, aligned with `indices`.
    pub weights: Vec<f64>,
    /// Per-tier record (empty for [`SampleSize::All`]).
    pub tiers: Vec<TierRecord>,
}

/// Draws a seeded stratified sample of the customers whose lifetime values are `ltv`.
/// `tiers` must have passed [`check_tiers`].
pub fn stratified_sample(
    ltv: &[f64],
    tiers: &[TierSpec],
    size: SampleSize,
    seed: u64,
) -> StratifiedSample {
    let n = ltv.len();
    let (quota_total, target) = match size {
        SampleSize::All => (0, n),
        SampleSize::Count(c) => (tiers.iter().map(|t| t.quota).sum::<usize>(), c),
    };
    if matches!(size, SampleSize::All) || target >= n {
        return StratifiedSample {
            indices: (0..n).collect(),
            weights: vec![1.0; n],
            tiers: Vec::new(),
        };
    }

    // Cut-offs from the data: the value at each tier's lower quantile.
    let mut sorted: Vec<f64> = ltv.to_vec();
    sorted.sort_by(f64::total_cmp);
    let cut = |q: f64| sorted[((q * n as f64).floor() as usize).min(n - 1)];
    let cuts: Vec<f64> = tiers.iter().map(|t| cut(t.min_quantile)).collect();

    // Tiers are sorted top-down; a customer belongs to the first tier whose cut it reaches.
    // Ties at a cut all go to the higher tier, so a tier can come out empty when many
    // customers share a value (e.g. zero): the report shows it.
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); tiers.len()];
    for (i, v) in ltv.iter().enumerate() {
        let tier = cuts.iter().position(|c| v >= c).unwrap_or(tiers.len() - 1);
        members[tier].push(i);
    }

    let quotas = allocate(
        &tiers.iter().map(|t| t.quota).collect::<Vec<_>>(),
        quota_total,
        target,
        &members.iter().map(Vec::len).collect::<Vec<_>>(),
    );

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked: Vec<(usize, f64)> = Vec::with_capacity(target);
    let mut records = Vec::with_capacity(tiers.len());
    for ((tier, pool), quota) in tiers.iter().zip(members.iter_mut()).zip(quotas) {
        let population = pool.len();
        let (lo, hi) = pool
            .iter()
            .map(|&i| ltv[i])
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let (chosen, _) = pool.partial_shuffle(&mut rng, quota);
        let weight = if quota > 0 {
            population as f64 / quota as f64
        } else {
            0.0
        };
        picked.extend(chosen.iter().map(|&i| (i, weight)));
        records.push(TierRecord {
            name: tier.name.clone(),
            ltv_min: if population > 0 { lo } else { 0.0 },
            ltv_max: if population > 0 { hi } else { 0.0 },
            population,
            sampled: quota,
            weight,
        });
    }
    picked.sort_unstable_by_key(|(i, _)| *i);
    StratifiedSample {
        indices: picked.iter().map(|(i, _)| *i).collect(),
        weights: picked.iter().map(|(_, w)| *w).collect(),
        tiers: records,
    }
}

/// Scales quotas to `target` (largest remainder), caps each at its tier's population, and
/// hands what a small tier cannot use to the tiers that still have customers, in proportion
/// to their quotas.
fn allocate(quotas: &[usize], quota_total: usize, target: usize, caps: &[usize]) -> Vec<usize> {
    let scaled: Vec<f64> = quotas
        .iter()
        .map(|&q| q as f64 * target as f64 / quota_total.max(1) as f64)
        .collect();
    let mut out: Vec<usize> = scaled.iter().map(|s| s.floor() as usize).collect();
    let mut rest = target.saturating_sub(out.iter().sum());
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = scaled[a] - scaled[a].floor();
        let fb = scaled[b] - scaled[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(rest.min(quotas.len())) {
        out[i] += 1;
    }
    // Every tier with customers gets at least one sample when the target allows: a tier with
    // none would leave its whole population with design weight 0.
    let non_empty = caps.iter().filter(|&&c| c > 0).count();
    if target >= non_empty {
        for i in 0..out.len() {
            if caps[i] > 0 && out[i] == 0 {
                if let Some(donor) = (0..out.len())
                    .filter(|&j| out[j] > 1)
                    .max_by_key(|&j| out[j])
                {
                    out[donor] -= 1;
                    out[i] = 1;
                }
            }
        }
    }
    rest = 0;
    for (o, &cap) in out.iter_mut().zip(caps) {
        if *o > cap {
            rest += *o - cap;
            *o = cap;
        }
    }
    while rest > 0 {
        let open: Vec<usize> = (0..out.len()).filter(|&i| out[i] < caps[i]).collect();
        if open.is_empty() {
            break;
        }
        let weight: usize = open.iter().map(|&i| quotas[i].max(1)).sum();
        let mut given = 0;
        for &i in &open {
            let share = (rest * quotas[i].max(1)).div_ceil(weight);
            let add = share.min(caps[i] - out[i]).min(rest - given);
            out[i] += add;
            given += add;
        }
        if given == 0 {
            break;
        }
        rest -= given;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tiers_are_valid_and_sum_to_5000() {
        let tiers = check_tiers(&default_tiers()).unwrap();
        assert_eq!(tiers.iter().map(|t| t.quota).sum::<usize>(), 5000);
        assert_eq!(tiers[0].name, "vip");
    }

    #[test]
    fn tier_checks() {
        let mut t = default_tiers();
        t[3].min_quantile = 0.1;
        assert_eq!(check_tiers(&t), Err(TierError::Bounds));
        let mut t = default_tiers();
        t[1].name = "vip".into();
        assert_eq!(check_tiers(&t), Err(TierError::Names));
        let mut t = default_tiers();
        t[2].quota = 0;
        assert_eq!(check_tiers(&t), Err(TierError::Quotas));
        assert_eq!(check_tiers(&[]), Err(TierError::Empty));
    }

    #[test]
    fn sample_size_parses() {
        assert_eq!("all".parse(), Ok(SampleSize::All));
        assert_eq!("5_000".parse(), Ok(SampleSize::Count(5000)));
        assert!("0".parse::<SampleSize>().is_err());
        assert!("lots".parse::<SampleSize>().is_err());
    }

    #[test]
    fn quotas_tiers_and_weights_by_hand() {
        // 1,000 customers with values 0..999: vip = top 50 (950..999), high = 750..949 (200),
        // mid = 400..749 (350), low = 0..399 (400). Sample 100 = quotas 20/30/30/20.
        let ltv: Vec<f64> = (0..1000).map(f64::from).collect();
        let tiers = check_tiers(&default_tiers()).unwrap();
        let s = stratified_sample(&ltv, &tiers, SampleSize::Count(100), 7);
        assert_eq!(s.indices.len(), 100);
        let pops: Vec<usize> = s.tiers.iter().map(|t| t.population).collect();
        assert_eq!(pops, vec![50, 200, 350, 400]);
        let sampled: Vec<usize> = s.tiers.iter().map(|t| t.sampled).collect();
        assert_eq!(sampled, vec![20, 30, 30, 20]);
        assert_eq!(s.tiers[0].ltv_min, 950.0);
        assert_eq!(s.tiers[0].weight, 2.5);
        // Weights add back up to the population.
        let total: f64 = s.weights.iter().sum();
        assert!((total - 1000.0).abs() < 1e-9);
        // VIPs are sampled with their tier's weight.
        for (i, w) in s.indices.iter().zip(&s.weights) {
            if *i >= 950 {
                assert_eq!(*w, 2.5);
            }
        }
    }

    #[test]
    fn sampling_is_seeded() {
        let ltv: Vec<f64> = (0..5000).map(|i| f64::from(i % 977)).collect();
        let tiers = check_tiers(&default_tiers()).unwrap();
        let a = stratified_sample(&ltv, &tiers, SampleSize::Count(500), 1);
        let b = stratified_sample(&ltv, &tiers, SampleSize::Count(500), 1);
        let c = stratified_sample(&ltv, &tiers, SampleSize::Count(500), 2);
        assert_eq!(a, b);
        assert_ne!(a.indices, c.indices);
    }

    #[test]
    fn a_small_tier_hands_its_quota_on() {
        // Half the customers share the value 0. The 0.40 quantile cut is then 0, so all of
        // them land in "mid" and "low" is empty; "vip" (5 customers) cannot fill its 12.
        let mut ltv = vec![0.0; 50];
        ltv.extend((1..=50).map(f64::from));
        let tiers = check_tiers(&default_tiers()).unwrap();
        let s = stratified_sample(&ltv, &tiers, SampleSize::Count(60), 3);
        let by_name = |n: &str| s.tiers.iter().find(|t| t.name == n).unwrap().clone();
        assert_eq!(by_name("low").population, 0);
        assert_eq!(by_name("vip").population, 5);
        assert_eq!(
            by_name("vip").sampled,
            5,
            "a small tier gives everyone it has"
        );
        // The rest of the target went to the other tiers: still 60 in all.
        assert_eq!(s.indices.len(), 60);
        // Weights still add up to the population.
        let total: f64 = s.weights.iter().sum();
        assert!((total - 100.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn every_non_empty_tier_gets_a_sample() {
        // A sample of 4 with quotas 1000/1500/1500/1000 would round the vip share to 0.8 -> 0
        // or 1; every tier must get at least one so no customer has weight 0.
        let ltv: Vec<f64> = (0..1000).map(f64::from).collect();
        let tiers = check_tiers(&default_tiers()).unwrap();
        let s = stratified_sample(&ltv, &tiers, SampleSize::Count(4), 1);
        assert!(s.tiers.iter().all(|t| t.sampled >= 1), "{:?}", s.tiers);
        let total: f64 = s.weights.iter().sum();
        assert!((total - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn all_means_everyone_with_weight_one() {
        let ltv = vec![1.0, 2.0, 3.0];
        let s = stratified_sample(&ltv, &default_tiers(), SampleSize::All, 0);
        assert_eq!(s.indices, vec![0, 1, 2]);
        assert_eq!(s.weights, vec![1.0; 3]);
    }
}
