//! Terminal reports of the batch commands: concise, aligned, numbers with separators.

use std::path::Path;

use crate::domain::features::{Axis, FEATURES};
use crate::model::validation::KMismatch;

use super::assign::AssignOutcome;
use super::discover::DiscoverOutcome;
use super::text::{count, print_bad_rows, secs};
use super::validate::ValidateOutcome;

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// The `discover` report.
pub fn print_discover(o: &DiscoverOutcome, out: &Path) {
    let s = &o.snapshot;
    println!(
        "\n{} customers, {} order lines; features as of {}",
        count(o.customers as u64),
        count(o.order_lines),
        s.source.as_of
    );
    if s.source.tiers.is_empty() {
        println!(
            "sample: the whole population ({})",
            count(s.source.sampled as u64)
        );
    } else {
        let tiers: Vec<String> = s
            .source
            .tiers
            .iter()
            .map(|t| {
                format!(
                    "{} {} of {} (ltv {:.0}–{:.0})",
                    t.name,
                    count(t.sampled as u64),
                    count(t.population as u64),
                    t.ltv_min,
                    t.ltv_max
                )
            })
            .collect();
        println!(
            "sample: {} customers — {}",
            count(s.source.sampled as u64),
            tiers.join(" · ")
        );
    }
    println!(
        "\n{:<28} {:>2} {:>10}  segments (population share)",
        "axis", "k", "silhouette"
    );
    for axis in &s.axes {
        let segs: Vec<String> = axis
            .segments
            .iter()
            .map(|seg| format!("{} {}", seg.name, pct(seg.share)))
            .collect();
        println!(
            "{:<28} {:>2} {:>10.3}  {}",
            axis.axis.as_str(),
            axis.k,
            axis.silhouette,
            segs.join(" | ")
        );
        for d in &axis.dropped_features {
            println!("{:<28}    without {}: {}", "", d.feature, d.reason);
        }
    }
    for skip in &s.skipped_axes {
        println!("{:<28} skipped: {}", skip.axis.as_str(), skip.reason);
    }
    println!(
        "\ntimings: read {} · sample and features {} · clustering {}",
        secs(o.read_time),
        secs(o.feature_time),
        secs(o.cluster_time)
    );
    println!(
        "snapshot version {} written to {}",
        s.version,
        out.display()
    );
}

/// The `assign` report.
pub fn print_assign(o: &AssignOutcome, out: &Path) {
    println!(
        "\nassigned {} customers against snapshot version {}",
        count(o.customers as u64),
        o.version
    );
    for axis in &o.axes {
        let total = axis.assigned.max(1) as f64;
        let segs: Vec<String> = axis
            .segments
            .iter()
            .map(|(_, name, c)| format!("{name} {}", pct(*c as f64 / total)))
            .collect();
        let missing = if axis.missing > 0 {
            format!(" ({} without this axis)", count(axis.missing as u64))
        } else {
            String::new()
        };
        println!("  {:<28} {}{missing}", axis.axis, segs.join(" | "));
    }
    println!(
        "timings: read {} · assign and write {}",
        secs(o.read_time),
        secs(o.assign_time)
    );
    println!("memberships written to {}", out.display());
}

/// The `validate` report; the verdict is the last line.
pub fn print_validate(o: &ValidateOutcome) {
    let t = &o.thresholds;
    println!(
        "\nsnapshot version {} against the population (pass: KL < {}, mean shift <= {}, agreement >= {})",
        o.version, t.max_kl, t.max_mean_shift, t.min_agreement
    );
    println!(
        "{:<28} {:>10} {:>8} {:>11} {:>10} {:>8}  verdict",
        "axis", "customers", "KL", "mean shift", "agreement", "k / pop"
    );
    let mut k_warnings = Vec::new();
    for a in &o.axes {
        let population_k = a.population_k.map_or("-".to_owned(), |k| k.to_string());
        println!(
            "{:<28} {:>10} {:>8.4} {:>11.3} {:>10.3} {:>8}  {}",
            a.axis,
            count(a.customers as u64),
            a.kl,
            a.max_mean_shift,
            a.agreement,
            format!("{} / {population_k}", a.k),
            if a.pass { "pass" } else { "FAIL" }
        );
        if a.population_k.is_some_and(|k| k != a.k) {
            let scores: Vec<String> = a
                .population_silhouettes
                .iter()
                .map(|(k, s)| format!("k={k} {s:.4}"))
                .collect();
            k_warnings.push(format!(
                "{}: the population prefers k={} to the snapshot's k={} (silhouettes {})",
                a.axis,
                population_k,
                a.k,
                scores.join(", ")
            ));
        }
        if a.max_mean_shift > t.max_mean_shift {
            if let Some((segment, feature)) = &a.worst {
                println!(
                    "{:<28}   largest mean shift: {feature} in \"{segment}\"",
                    ""
                );
            }
        }
    }
    let (label, hint) = match t.k_mismatch {
        KMismatch::Warn => ("warning", "k_mismatch = \"fail\" makes this a failure"),
        KMismatch::Fail => ("failure", "k_mismatch = \"fail\""),
    };
    for w in &k_warnings {
        println!("{label}: {w} ({hint}; re-discover with more samples or a wider k_tolerance)");
    }
    println!("time: {}", secs(o.elapsed));
    println!(
        "verdict: {}",
        if o.pass {
            "PASS — the sample represents the population"
        } else {
            "FAIL — see the axes marked FAIL"
        }
    );
}

/// The feature catalogue for `segmentd schema`.
pub fn print_schema() {
    for axis in Axis::ALL {
        println!("{axis}");
        for def in FEATURES.iter().filter(|d| d.axis == axis) {
            println!("  {:<26} {:<8} {}", def.name, def.range, def.formula);
        }
    }
}

/// The `audiences` report: what was read, the pooled cut-offs, the largest products and the
/// files written.
pub fn print_audiences(
    o: &super::audiences::AudiencesOutcome,
    job: &super::audiences::AudiencesJob,
) {
    use crate::audience::engine::Readiness;
    println!(
        "read scores {}: {} rows, {} scores, {} bad rows ({})",
        job.scores.display(),
        count(o.rows),
        count(o.scores),
        count(o.bad_rows),
        secs(o.timings[0])
    );
    print_bad_rows(o.bad_rows, &o.bad_by_reason, &o.examples);
    if let Some(n) = o.converted_sessions {
        println!("read conversions: {} converting sessions", count(n));
    }
    let products = &o.products[o.products.len().min(1)..];
    let by = |r: Readiness| {
        products
            .iter()
            .filter(|p| p.thresholds.readiness == r)
            .count()
    };
    println!(
        "products: {} ({} ready, {} with too few scores, {} constant); thresholds in {}",
        count(products.len() as u64),
        count(by(Readiness::Ready) as u64),
        count(by(Readiness::TooFewScores) as u64),
        count(by(Readiness::Constant) as u64),
        secs(o.timings[1])
    );
    if let Some(pooled) = o.products.first().filter(|p| p.product == "*") {
        print_pooled_audience(o, pooled);
    }
    print_largest_products(products);
    println!(
        "wrote {} and {} ({})",
        job.out.display(),
        job.summary.display(),
        secs(o.timings[2])
    );
    if let Some(dir) = &job.plots {
        let drawn = products.iter().filter(|p| p.plot.is_some()).count();
        println!(
            "drew {} plots in {} ({})",
            count(drawn as u64),
            dir.display(),
            secs(o.timings[3])
        );
    }
}

/// The pooled cut-offs, how many pairs each tier placed and, with conversions, each tier's
/// conversion rate.
fn print_pooled_audience(
    o: &super::audiences::AudiencesOutcome,
    pooled: &super::audiences::ProductSummary,
) {
    let t = &pooled.thresholds;
    println!(
        "pooled: skewness {:.2}, variance {:.4}; premium ≥ {:.4} (p{:.1}), growth ≥ {:.4} \
         (p{:.1}), volume ≥ {:.4} (p{:.1})",
        t.skewness,
        t.variance,
        t.own.premium,
        t.percentiles.premium,
        t.own.growth,
        t.percentiles.growth,
        t.own.volume,
        t.percentiles.volume
    );
    print!(
        "placed {} of {} visitor–product pairs: premium {}, growth {}, volume {}",
        count(o.placed),
        count(o.pairs),
        count(pooled.sizes[0]),
        count(pooled.sizes[1]),
        count(pooled.sizes[2])
    );
    match &pooled.conversions {
        Some(c) => {
            let rate = |(k, n): (u64, u64)| {
                if n == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}%", 100.0 * k as f64 / n as f64)
                }
            };
            println!(
                "; conversion premium {}, growth {}, volume {}, unplaced {}",
                rate(c[0]),
                rate(c[1]),
                rate(c[2]),
                rate(c[3])
            );
        }
        None => println!(),
    }
}

/// A table of the ten products with the most scores: shape, and each tier's cut-off,
/// percentile and size.
fn print_largest_products(products: &[super::audiences::ProductSummary]) {
    use crate::audience::engine::Readiness;
    let mut largest: Vec<_> = products.iter().collect();
    largest.sort_by_key(|p| std::cmp::Reverse(p.thresholds.count));
    let shown = largest.len().min(10);
    if shown == 0 {
        return;
    }
    println!(
        "{:<20} {:>10} {:>7} {:>9} {:>5}  {:>22}  {:>22}  {:>22}",
        "largest products", "scores", "skew", "variance", "conf", "premium", "growth", "volume"
    );
    for p in &largest[..shown] {
        let t = &p.thresholds;
        let cell = |i: usize, tier: crate::audience::Tier| {
            format!(
                "{:.4} p{:.1} ({})",
                t.cutoffs.get(tier),
                t.percentiles.get(tier),
                count(p.sizes[i])
            )
        };
        let mut name = p.product.clone();
        if name.chars().count() > 20 {
            name = name.chars().take(19).collect::<String>() + "…";
        }
        println!(
            "{name:<20} {:>10} {:>7.2} {:>9.5} {:>5.2}  {:>22}  {:>22}  {:>22}{}",
            count(t.count),
            t.skewness,
            t.variance,
            t.confidence,
            cell(0, crate::audience::Tier::Premium),
            cell(1, crate::audience::Tier::Growth),
            cell(2, crate::audience::Tier::Volume),
            if t.readiness == Readiness::Ready {
                String::new()
            } else {
                format!("  [{}]", t.readiness.as_str())
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_separators() {
        assert_eq!(count(0u64), "0");
        assert_eq!(count(999u64), "999");
        assert_eq!(count(1000u64), "1,000");
        assert_eq!(count(1_234_567u64), "1,234,567");
    }
}
