//! Per-event and per-customer costs of the hot path, on a generated shop:
//! - `state_apply_event`: one event into a customer's state (the feature update);
//! - `features_compute`: all 39 features of one customer;
//! - `assign_13_axes`: one customer against a 13-axis snapshot (features + assignment);
//! - `state_encode` / `state_decode`: the RocksDB value codec.
//!
//! Targets: the feature update and the assignment must each stay far below the ~5 µs per
//! event a 200,000 events/s daemon can spend on two cores.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use segmentd::batch::discover::build_snapshot;
use segmentd::config::Config;
use segmentd::domain::event::Event;
use segmentd::domain::features::{FeatureVector, Sources};
use segmentd::domain::state::{CustomerState, StateParams};
use segmentd::model::assign::{Assigner, Assignment};
use segmentd::synth::{Shop, ShopParams};

struct Fixture {
    events: Vec<Event>,
    states: Vec<CustomerState>,
    assigner: Assigner,
    params: StateParams,
    as_of: segmentd::domain::time::EventTime,
}

fn fixture() -> Fixture {
    let shop = Shop::new(ShopParams {
        customers: 3_000,
        order_lines: 45_000,
        ..ShopParams::default()
    })
    .expect("valid shop");
    let events: Vec<Event> = shop.history().collect();
    let params = StateParams::default();
    let (states, last) = shop.history_states(&params);
    let as_of = last.expect("events");
    let mut config = Config::default();
    config.discover.sample_size = segmentd::config::SampleSizeSetting::Count(2_000);
    let built = build_snapshot(&states, Sources::ALL, as_of, &config, 1, vec![]).expect("snapshot");
    let valid = built.snapshot.validate().expect("valid");
    assert_eq!(
        valid.axes().len(),
        13,
        "bench snapshot must cover every axis"
    );
    Fixture {
        events,
        states,
        assigner: Assigner::new(&valid),
        params,
        as_of,
    }
}

fn benches(c: &mut Criterion) {
    let f = fixture();

    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    g.bench_function("state_apply_event", |b| {
        // A fresh state per batch of events so the dedup ring never short-circuits and the
        // state grows as it would for a real customer.
        let mut i = 0usize;
        let mut state = CustomerState::default();
        b.iter(|| {
            let e = &f.events[i % f.events.len()];
            i += 1;
            if i.is_multiple_of(512) {
                state = CustomerState::default();
            }
            black_box(state.apply(black_box(e), &f.params));
        });
    });
    g.bench_function("features_compute", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let s = &f.states[i % f.states.len()];
            i += 1;
            black_box(FeatureVector::compute(black_box(s), f.as_of, &f.params))
        });
    });
    g.bench_function("assign_13_axes", |b| {
        let mut i = 0usize;
        let mut out = Assignment::default();
        b.iter(|| {
            let s = &f.states[i % f.states.len()];
            i += 1;
            let fv = FeatureVector::compute(s, f.as_of, &f.params);
            f.assigner.assign_into(black_box(&fv), &mut out);
            black_box(out.axes.len())
        });
    });
    let encoded: Vec<Vec<u8>> = f.states.iter().map(CustomerState::encode).collect();
    let mean = encoded.iter().map(Vec::len).sum::<usize>() as f64 / encoded.len() as f64;
    let max = encoded.iter().map(Vec::len).max().unwrap_or(0);
    eprintln!(
        "encoded state size over {} customers: mean {mean:.0} bytes, max {max} bytes",
        encoded.len()
    );
    g.bench_function("state_encode", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(f.states[i % f.states.len()].encode())
        });
    });
    g.bench_function("state_decode", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(CustomerState::decode(&encoded[i % encoded.len()]).map(|s| s.orders))
        });
    });
    g.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
