//! Per-event and per-customer costs of the hot path, on a generated shop:
//! - `decode_event`: one event's JSON payload into an event (the daemon's decoder), over the
//!   shop's mix of orders, returns, contacts and engagement;
//! - `state_apply_event`: one event into a customer's state (the feature update);
//! - `features_compute`: all 39 features of one customer;
//! - `assign_13_axes`: one customer against a 13-axis snapshot (features + assignment);
//! - `state_encode` / `state_decode`: the RocksDB value codec;
//! - `process_batch_5000`: one 5,000-event poll batch through `process_batch` against a
//!   RocksDB store holding the shop's customers (multi-get, decode, apply, assign, decide,
//!   encode), per event;
//! - `update_to_json`: one membership update serialised for the output topic;
//! - `sweep_scan` / `sweep_reassign`: the re-assignment sweep's two halves per customer,
//!   reading a chunk of records from RocksDB in key order, and re-assigning them against a
//!   new snapshot (decode, 13 axes, decide).
//!
//! Targets: the feature update and the assignment must each stay far below the ~5 µs per
//! event a 200,000 events/s daemon can spend on two cores.

/// The binary's allocator, so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use segmentd::config::Config;
use segmentd::domain::aging::AgingState;
use segmentd::domain::event::Event;
use segmentd::domain::features::{FeatureVector, Sources};
use segmentd::domain::record::CustomerRecord;
use segmentd::domain::state::{CustomerState, StateParams};
use segmentd::io::store::{RocksStore, StateStore, StoreBatch, StoreConfig};
use segmentd::model::assign::{Assigner, Assignment};
use segmentd::model::build::build_snapshot;
use segmentd::pipeline::assign::{published_record, PublishPolicy};
use segmentd::pipeline::decode::{decode, Input, Source};
use segmentd::pipeline::sweep::reassign_batch;
use segmentd::pipeline::update::process_batch;
use segmentd::synth::{Shop, ShopParams};

struct Fixture {
    shop: Shop,
    snapshot: segmentd::model::snapshot::ValidSnapshot,
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
    config.discover.sample_size = segmentd::model::build::SampleSizeSetting::Count(2_000);
    let built = build_snapshot(
        &states,
        Sources::ALL,
        as_of,
        config.build_settings(),
        1,
        vec![],
    )
    .expect("snapshot");
    let valid = built.snapshot.validate().expect("valid");
    assert_eq!(
        valid.axes().len(),
        13,
        "bench snapshot must cover every axis"
    );
    Fixture {
        shop,
        assigner: Assigner::new(&valid),
        snapshot: valid,
        events,
        states,
        params,
        as_of,
    }
}

fn benches(c: &mut Criterion) {
    let f = fixture();

    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_event", |b| {
        let payloads: Vec<(Vec<u8>, Vec<u8>)> = f
            .events
            .iter()
            .map(|e| {
                let key = e.customer_id.as_str().as_bytes().to_vec();
                (key, serde_json::to_vec(e).expect("an event serialises"))
            })
            .collect();
        // Every payload decodes, so the bench times the decoder and not the dead-letter path.
        for (key, payload) in &payloads {
            decode(Some(key), Some(payload)).expect("a generated event decodes");
        }
        let mut i = 0usize;
        b.iter(|| {
            let (key, payload) = &payloads[i % payloads.len()];
            i += 1;
            black_box(decode(Some(key), Some(payload)).map(|e| e.event_time))
        })
    });
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

    // A whole poll batch through process_batch, against RocksDB.
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RocksStore::open(&StoreConfig {
        path: dir.path().join("db"),
        ..StoreConfig::default()
    })
    .expect("store");
    let records: Vec<(Vec<u8>, Vec<u8>)> = f
        .shop
        .customer_ids()
        .iter()
        .zip(&f.states)
        .map(|(id, state)| {
            let record = CustomerRecord {
                state: state.clone(),
                published: None,
                as_of: None,
                home: Some(0),
                applied: Vec::new(),
            };
            (
                segmentd::io::store::customer_key(0, id.as_str().as_bytes()),
                record.encode(),
            )
        })
        .collect();
    store
        .commit(&StoreBatch {
            records,
            offsets: Default::default(),
            meta: Vec::new(),
        })
        .expect("seed");
    let topic: std::sync::Arc<str> = std::sync::Arc::from("orders");
    let inputs: Vec<Input> = f
        .shop
        .live(7)
        .take(5_000)
        .enumerate()
        .map(|(i, event)| {
            let source = Source {
                topic: topic.clone(),
                partition: 0,
                offset: i as i64,
            };
            Input::in_order(event, source)
        })
        .collect();
    let policy = PublishPolicy::default();
    let offsets = Default::default();
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(inputs.len() as u64));
    g.sample_size(20);
    g.bench_function("process_batch_5000", |b| {
        b.iter(|| {
            black_box(
                process_batch(&store, &f.snapshot, &f.assigner, &policy, &inputs, &offsets)
                    .expect("batch")
                    .updates
                    .len(),
            )
        });
    });
    let updates = process_batch(&store, &f.snapshot, &f.assigner, &policy, &inputs, &offsets)
        .expect("batch")
        .updates;
    g.throughput(Throughput::Elements(1));
    g.bench_function("update_to_json", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(serde_json::to_vec(&updates[i % updates.len()]).map(|v| v.len()))
        });
    });
    // What the daemon runs: the same bytes, written directly.
    g.bench_function("update_write_json", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let mut out = Vec::with_capacity(2048);
            updates[i % updates.len()].write_json(&mut out);
            black_box(out.len())
        });
    });

    // The sweep's two halves over the same store.
    let customers = f.states.len();
    g.throughput(Throughput::Elements(customers as u64));
    g.bench_function("sweep_scan", |b| {
        b.iter(|| black_box(store.records_after(None, customers).expect("scan").len()));
    });
    let chunk = store.records_after(None, customers).expect("scan");
    g.bench_function("sweep_reassign", |b| {
        b.iter(|| {
            black_box(
                reassign_batch(
                    &f.snapshot,
                    &f.assigner,
                    &policy,
                    &AgingState::default(),
                    &chunk,
                )
                .expect("sweep")
                .updates
                .len(),
            )
        });
    });
    // The sweep after a swap that carried every id (what a re-clustering of unchanged data
    // makes): customers published at version 1, re-assigned against version 2; nobody
    // changes, so nothing is written or published.
    let next = {
        let mut next = f.snapshot.snapshot().clone();
        next.version += 1;
        segmentd::model::lineage::carry_ids(&f.snapshot, &mut next, 0.5).expect("carried");
        next.validate().expect("valid")
    };
    let next_assigner = Assigner::new(&next);
    let published: Vec<(Vec<u8>, Vec<u8>)> = chunk
        .iter()
        .zip(&f.states)
        .map(|((key, _), state)| {
            let as_of = state.last_event_time().unwrap_or(f.as_of);
            let record = published_record(state.clone(), &f.snapshot, &f.assigner, as_of, 1);
            (key.clone(), record.encode())
        })
        .collect();
    g.bench_function("sweep_reassign_unchanged", |b| {
        b.iter(|| {
            black_box(
                reassign_batch(
                    &next,
                    &next_assigner,
                    &policy,
                    &AgingState::default(),
                    &published,
                )
                .expect("sweep")
                .store_batch
                .records
                .len(),
            )
        });
    });
    g.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
