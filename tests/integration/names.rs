//! Segment names as analysts read them: on generated shops of several sizes and seeds, and on
//! the fixture the other tests use, every name reads as plain English, is unique within its
//! axis, and comes out the same on a second discovery.

use std::collections::BTreeSet;

use segmentd::model::naming::reading_problems;
use segmentd::model::snapshot::ValidSnapshot;
use segmentd::synth::{Shop, ShopParams};

/// Every axis's segment names, in order.
fn names(snapshot: &ValidSnapshot) -> Vec<(String, Vec<String>)> {
    snapshot
        .snapshot()
        .axes
        .iter()
        .map(|a| {
            let names = a.segments.iter().map(|s| s.name.clone()).collect();
            (a.axis.as_str().to_owned(), names)
        })
        .collect()
}

#[test]
fn names_on_generated_shops_read_as_plain_english_unique_and_stable() {
    let mut bad = Vec::new();
    let mut seen = BTreeSet::new();
    let shops = [
        (400, 6_000, 300, 1),
        (3_000, 40_000, 1_000, 7),
        (3_000, 40_000, 2_000, 42),
    ];
    for (customers, order_lines, sample, seed) in shops {
        let shop = Shop::new(ShopParams {
            customers,
            order_lines,
            seed,
            ..ShopParams::default()
        })
        .unwrap();
        let (_, first) = segmentd::synth::fixtures::discover_history(&shop, sample).unwrap();
        let (_, again) = segmentd::synth::fixtures::discover_history(&shop, sample).unwrap();
        assert_eq!(names(&first), names(&again), "seed {seed}: names changed");
        for (axis, names) in names(&first) {
            let unique: BTreeSet<&String> = names.iter().collect();
            assert_eq!(unique.len(), names.len(), "{axis}: {names:?}");
            for name in names {
                let problems = reading_problems(&name);
                if !problems.is_empty() {
                    bad.push(format!("seed {seed} {axis}: {name:?}: {problems:?}"));
                }
                seen.insert(name);
            }
        }
    }
    assert!(seen.len() > 40, "too few names to judge: {seen:?}");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
