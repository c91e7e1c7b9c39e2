//! Benchmarks for the clustering math on seeded synthetic customer-like data: k-means fits and
//! multi-labeling silhouettes at the sizes segmentd sees.

/// The binary's allocator, so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use segmentd::model::kmeans::KMeansParams;
use segmentd::model::silhouette::mean_silhouettes;

/// `n` points in `d` dimensions drawn around four loosely separated centres, so k-means has real
/// structure to find but still needs several iterations.
fn synthetic(n: usize, d: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f64>> = (0..4)
        .map(|_| (0..d).map(|_| rng.random_range(-3.0..3.0)).collect())
        .collect();
    let mut data = Array2::zeros((n, d));
    for mut row in data.rows_mut() {
        let c = &centres[rng.random_range(0..centres.len())];
        for (v, m) in row.iter_mut().zip(c) {
            // Sum of uniforms: cheap, roughly normal noise.
            let noise: f64 = (0..4).map(|_| rng.random_range(-1.0..1.0)).sum();
            *v = m + noise;
        }
    }
    data
}

fn kmeans(c: &mut Criterion) {
    let mut group = c.benchmark_group("kmeans_fit_d3_k4_ninit10");
    group.sample_size(10);
    let params = match KMeansParams::new(4).n_init(10).seed(0).check() {
        Ok(p) => p,
        Err(e) => panic!("invalid bench parameters: {e}"),
    };
    for n in [1_000, 5_000, 20_000] {
        let data = synthetic(n, 3, 1);
        group.bench_with_input(BenchmarkId::from_parameter(n), &data, |b, data| {
            b.iter(|| black_box(params.fit(black_box(data.view()))))
        });
    }
    group.finish();
}

fn silhouette(c: &mut Criterion) {
    let mut group = c.benchmark_group("mean_silhouettes_d3_5labelings");
    group.sample_size(10);
    for n in [1_000, 5_000] {
        let data = synthetic(n, 3, 2);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let labelings: Vec<Vec<u32>> = (2..=6u32)
            .map(|k| (0..n).map(|_| rng.random_range(0..k)).collect())
            .collect();
        let refs: Vec<&[u32]> = labelings.iter().map(Vec::as_slice).collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &data, |b, data| {
            b.iter(|| black_box(mean_silhouettes(black_box(data.view()), &refs)))
        });
    }
    group.finish();
}

criterion_group!(benches, kmeans, silhouette);
criterion_main!(benches);
