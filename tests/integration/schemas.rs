//! The JSON Schemas under `schemas/` against real documents: every schema is a valid draft
//! 2020-12 schema, every input event a generated shop produces passes its kind's schema (and
//! only that one), and documents the daemon would refuse do not pass. The daemon's outputs
//! (membership updates, audience events, audience updates) are checked in `daemon`, the
//! snapshot `segmentd discover` writes in `cli`.

use super::support::*;

use segmentd::synth::{Shop, ShopParams};

const KINDS: [(&str, &str); 4] = [
    ("order", "events/order"),
    ("return", "events/return"),
    ("support_contact", "events/support-contact"),
    ("engagement", "events/engagement"),
];

#[test]
fn every_schema_is_a_valid_draft_2020_12_schema() {
    for name in [
        "events/order",
        "events/return",
        "events/support-contact",
        "events/engagement",
        "membership-update",
        "audience-event",
        "audience-update",
        "snapshot",
    ] {
        schema(name);
    }
}

#[test]
fn generated_input_events_pass_their_kind_and_only_it() {
    let validators: Vec<(&str, jsonschema::Validator)> = KINDS
        .iter()
        .map(|(kind, name)| (*kind, schema(name)))
        .collect();
    let shop = Shop::new(ShopParams {
        customers: 300,
        order_lines: 4_000,
        ..ShopParams::default()
    })
    .unwrap();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for event in shop.history() {
        let value = serde_json::to_value(&event).unwrap();
        let kind = value["kind"].as_str().unwrap().to_owned();
        for (k, validator) in &validators {
            if *k == kind {
                assert_schema_valid(validator, &value, &kind);
            } else {
                assert!(!validator.is_valid(&value), "{kind} passes the {k} schema");
            }
        }
        *seen.entry(kind).or_default() += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
}

#[test]
fn documents_the_daemon_refuses_do_not_pass() {
    let order_schema = schema("events/order");
    let good: serde_json::Value = serde_json::from_str(&order("o1", "C1", 2, "5.0")).unwrap();
    assert_schema_valid(&order_schema, &good, "a good order");
    let broken = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    for (what, bad) in [
        (
            "no customer",
            broken(&|v| {
                v.as_object_mut().unwrap().remove("customer_id");
            }),
        ),
        ("an unknown field", broken(&|v| v["surprise"] = 1.into())),
        (
            "a negative quantity",
            broken(&|v| v["lines"][0]["quantity"] = (-1).into()),
        ),
        (
            "a date that is no date",
            broken(&|v| v["event_time"] = "yesterday".into()),
        ),
        ("no lines", broken(&|v| v["lines"] = serde_json::json!([]))),
    ] {
        assert!(!order_schema.is_valid(&bad), "{what} passes: {bad}");
    }
    let update = schema("membership-update");
    assert!(!update.is_valid(&serde_json::json!({"customer_id": "C1"})));
    let snapshot = schema("snapshot");
    assert!(!snapshot.is_valid(&serde_json::json!({"format": "segmentd-snapshot"})));
}
