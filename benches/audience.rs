//! The audience threshold engine in process:
//! - `engine_observe`: one score into its product's sketch and moments (1,000 products,
//!   Zipf-like popularity, scores over 30 days); target: at least 300,000 scores/s, i.e.
//!   under 3.3 µs per score;
//! - `engine_refresh_1000_products`: every product's thresholds and the pooled ones.

/// The binary's allocator, so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use segmentd::audience::{Engine, ThresholdConfig};
use segmentd::domain::time::EventTime;
use segmentd::synth::scores::{scores, ScoreParams};

fn benches(c: &mut Criterion) {
    let params = ScoreParams {
        scores: 1_000_000,
        products: 1_000,
        visitors: 200_000,
        start: EventTime::from_unix(1_700_000_000).expect("valid"),
        days: 30,
        seed: 1,
    };
    let names: Vec<String> = (0..params.products).map(|p| format!("P{p:05}")).collect();
    let input: Vec<(usize, f64, EventTime)> = scores(&params)
        .map(|s| {
            (
                s.product as usize,
                s.probability,
                EventTime::from_unix(s.time).expect("valid"),
            )
        })
        .collect();

    let mut g = c.benchmark_group("audience");
    g.throughput(Throughput::Elements(input.len() as u64));
    g.sample_size(10);
    g.bench_function("engine_observe", |b| {
        b.iter(|| {
            let mut engine = Engine::new(ThresholdConfig::default());
            for (product, p, t) in &input {
                engine
                    .observe(&names[*product], *p, *t)
                    .expect("valid score");
            }
            black_box(engine.product_count())
        });
    });
    let mut engine = Engine::new(ThresholdConfig::default());
    for (product, p, t) in &input {
        engine
            .observe(&names[*product], *p, *t)
            .expect("valid score");
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("engine_refresh_1000_products", |b| {
        b.iter(|| black_box(engine.refresh()));
    });
    g.finish();
}

criterion_group!(audience, benches);
criterion_main!(audience);
