//! Deterministic, human-readable segment names from centroid profiles, e.g.
//! "frequent · low basket".
//!
//! A centroid's standardised coordinates say how its members differ from the average customer.
//! The name is built from the features that differ most: each contributes its catalogue word for
//! "low" or "high". The leading feature, when it lies beyond 1.5 standard deviations, uses the
//! catalogue's written-out extreme form instead ("never returns", "very frequent"); later parts
//! never do, so a name carries at most one intensifier. Names are made unique within an axis by
//! adding further features to the colliding names, then a numeric suffix as a last resort. The
//! same centroids always produce the same names.

use crate::domain::features::FeatureId;

/// Coordinates within this many standard deviations of the mean do not earn a word.
const NOTABLE: f64 = 0.35;
/// Beyond this many standard deviations the leading word takes its extreme form.
const EXTREME: f64 = 1.5;
/// Name for a centroid that sits near the mean on every feature.
const TYPICAL: &str = "typical";

fn word(id: FeatureId, z: f64, leading: bool) -> &'static str {
    let def = id.def();
    let (low, high) = if leading && z.abs() >= EXTREME {
        def.strong_words
    } else {
        def.words
    };
    if z >= 0.0 {
        high
    } else {
        low
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
    let parts: Vec<&str> = ranked(centroid)
        .into_iter()
        .filter(|&i| force || centroid[i].abs() >= NOTABLE)
        .take(words)
        .enumerate()
        .map(|(rank, i)| word(features[i], centroid[i], rank == 0))
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

/// Words that qualify another; a name that carries one of them twice reads badly ("very
/// budget items · very no big-ticket").
const QUALIFIERS: [&str; 12] = [
    "very", "much", "fully", "strictly", "mostly", "always", "never", "sharply", "strongly",
    "rarely", "often", "only",
];

/// What makes `name` read badly, if anything: a qualifier twice, "very" before a negation, an
/// empty or repeated part. Empty when the name reads as plain English.
pub fn reading_problems(name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let base = match name.rsplit_once(" (") {
        Some((head, tail)) if tail.ends_with(')') => head,
        _ => name,
    };
    let parts: Vec<&str> = base.split(" · ").collect();
    let words: Vec<&str> = base
        .split(|c: char| c.is_whitespace() || c == '·')
        .filter(|w| !w.is_empty())
        .collect();
    for q in QUALIFIERS {
        let n = words.iter().filter(|w| **w == q).count();
        if n > 1 {
            problems.push(format!("{q:?} {n} times"));
        }
    }
    for pair in words.windows(2) {
        if pair[0] == "very" && matches!(pair[1], "no" | "not" | "never" | "very") {
            problems.push(format!("\"very {}\"", pair[1]));
        }
    }
    for (i, part) in parts.iter().enumerate() {
        if part.trim().is_empty() {
            problems.push("an empty part".to_owned());
        } else if parts[..i].contains(part) {
            problems.push(format!("{part:?} twice"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::features::Axis;

    /// Every name the catalogue can give: on every axis, each feature leading (moderate or
    /// extreme, low or high) with each other feature second, and alone.
    #[test]
    fn every_name_the_catalogue_can_give_reads_as_plain_english() {
        let mut bad = Vec::new();
        let mut seen = 0;
        for axis in Axis::ALL {
            let features: Vec<FeatureId> = axis.features().map(|(id, _)| id).collect();
            let n = features.len();
            for lead in 0..n {
                for second in (0..n).filter(|&j| j != lead).map(Some).chain([None]) {
                    for z_lead in [-2.0, -0.8, 0.8, 2.0] {
                        for z_second in [-0.7, -0.5, 0.5, 0.7] {
                            let mut centroid = vec![0.0; n];
                            centroid[lead] = z_lead;
                            if let Some(j) = second {
                                centroid[j] = z_second;
                            }
                            let name = name_with(&features, &centroid, 2, false);
                            seen += 1;
                            let problems = reading_problems(&name);
                            if !problems.is_empty() {
                                bad.push(format!("{}: {name:?}: {problems:?}", axis.as_str()));
                            }
                        }
                    }
                }
            }
        }
        bad.sort();
        bad.dedup();
        assert!(seen > 1_000, "{seen}");
        assert!(
            bad.is_empty(),
            "{} names read badly:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn the_reading_check_catches_the_names_that_read_badly() {
        for name in [
            "very budget items · very no big-ticket",
            "very recent returns · very returns value",
            "very contacts often · very one issue type",
            "frequent · frequent",
        ] {
            assert!(!reading_problems(name).is_empty(), "{name}");
        }
        for name in [
            "never returns · keeps purchases",
            "typical",
            "frequent · steady (2)",
        ] {
            assert_eq!(reading_problems(name), Vec::<String>::new(), "{name}");
        }
    }

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
