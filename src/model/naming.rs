//! Deterministic, human-readable segment names from centroid profiles, e.g.
//! "frequent · low basket".
//!
//! A centroid's standardised coordinates say how its members differ from the average customer.
//! The name is built from the features that differ most: each contributes its catalogue word for
//! "low" or "high" (prefixed "very" beyond 1.5 standard deviations). Names are made unique
//! within an axis by adding further features to the colliding names, then a numeric suffix as a
//! last resort. The same centroids always produce the same names.

use crate::domain::features::FeatureId;

/// Coordinates within this many standard deviations of the mean do not earn a word.
const NOTABLE: f64 = 0.35;
/// Beyond this many standard deviations the word gets "very".
const EXTREME: f64 = 1.5;
/// Name for a centroid that sits near the mean on every feature.
const TYPICAL: &str = "typical";

fn word(id: FeatureId, z: f64) -> String {
    let (low, high) = id.def().words;
    let base = if z >= 0.0 { high } else { low };
    if z.abs() >= EXTREME {
        format!("very {base}")
    } else {
        base.to_owned()
    }
}

/// Features of a centroid ordered by how far they sit from the mean (ties: catalogue order).
fn ranked(centroid: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..centroid.len()).collect();
    order.sort_by(|&a, &b| {
        centroid[b]
            .abs()
            .total_cmp(&centroid[a].abs())
            .then(a.cmp(&b))
    });
    order
}

fn name_with(features: &[FeatureId], centroid: &[f64], words: usize, force: bool) -> String {
    let parts: Vec<String> = ranked(centroid)
        .into_iter()
        .filter(|&i| force || centroid[i].abs() >= NOTABLE)
        .take(words)
        .map(|i| word(features[i], centroid[i]))
        .collect();
    if parts.is_empty() {
        TYPICAL.to_owned()
    } else {
        parts.join(" · ")
    }
}

/// Names the centroids (standardised, one row per segment) of an axis whose features are
/// `features`. Returns one unique name per centroid.
pub fn name_segments(features: &[FeatureId], centroids: &[Vec<f64>]) -> Vec<String> {
    let mut words = vec![2usize; centroids.len()];
    let mut force = vec![false; centroids.len()];
    let mut names: Vec<String> = centroids
        .iter()
        .map(|c| name_with(features, c, 2, false))
        .collect();
    // Lengthen every colliding name together (so both sides of a collision read alike) until
    // they differ or run out of features.
    for _ in 0..=features.len() {
        let colliding: Vec<bool> = (0..names.len())
            .map(|i| (0..names.len()).any(|j| j != i && names[j] == names[i]))
            .collect();
        let mut changed = false;
        for i in (0..names.len()).filter(|&i| colliding[i]) {
            if force[i] && words[i] >= features.len() {
                continue;
            }
            if force[i] {
                words[i] += 1;
            } else {
                force[i] = true;
            }
            names[i] = name_with(features, &centroids[i], words[i], force[i]);
            changed = true;
        }
        if !changed {
            break;
        }
    }
    // Still equal (identical profiles): number them in order.
    let mut out = names.clone();
    for i in 0..names.len() {
        let same: Vec<usize> = (0..names.len()).filter(|&j| names[j] == names[i]).collect();
        if same.len() > 1 {
            let rank = same.iter().position(|&j| j == i).unwrap_or(0) + 1;
            out[i] = format!("{} ({rank})", names[i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<FeatureId> {
        names
            .iter()
            .map(|n| FeatureId::by_name(n).unwrap())
            .collect()
    }

    #[test]
    fn names_come_from_the_strongest_features() {
        let f = ids(&[
            "monthly_orders_log",
            "lifetime_orders_log",
            "active_week_share",
        ]);
        let names = name_segments(
            &f,
            &[
                vec![1.0, 0.1, -0.6],
                vec![-2.0, -0.2, 0.0],
                vec![0.1, 0.0, -0.2],
            ],
        );
        assert_eq!(names[0], "frequent · sporadic");
        assert_eq!(names[1], "very infrequent");
        assert_eq!(names[2], TYPICAL);
    }

    #[test]
    fn collisions_are_resolved_by_more_features() {
        let f = ids(&[
            "avg_order_value_log",
            "monthly_spend_log",
            "units_per_order_log",
        ]);
        let names = name_segments(&f, &[vec![1.0, 0.2, 0.1], vec![1.0, -0.2, 0.1]]);
        assert_eq!(names[0], "high basket · high spend");
        assert_eq!(names[1], "high basket · low spend");
    }

    #[test]
    fn identical_profiles_are_numbered() {
        let f = ids(&["avg_order_value_log", "monthly_spend_log"]);
        let names = name_segments(&f, &[vec![0.0, 0.0], vec![0.0, 0.0]]);
        assert_ne!(names[0], names[1]);
        assert!(names[0].ends_with("(1)"));
    }
}
