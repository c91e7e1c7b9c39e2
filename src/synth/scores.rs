//! Seeded conversion scores, for `segmentd generate --scores N`, the audience tests and the
//! benchmarks: a propensity model's output per session and product.
//!
//! Each product gets its own score distribution, so the per-product cut-offs have something
//! to adapt to: most are right-skewed Beta distributions scaled below 1 (rare conversions), some
//! are left-skewed (a product nearly everyone who looks at buys), some bimodal. Product
//! popularity is Zipf-like, visitors are uniform, each visitor has a few sessions, and times
//! are uniform over the period. A score converts with its own probability, which is what a
//! calibrated model promises, so premium converts best.

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

use crate::domain::time::EventTime;

/// What to generate.
#[derive(Debug, Clone)]
pub struct ScoreParams {
    /// Scores.
    pub scores: usize,
    /// Products.
    pub products: usize,
    /// Visitors.
    pub visitors: usize,
    /// First day.
    pub start: EventTime,
    /// Days the scores are spread over.
    pub days: u32,
    /// Seed.
    pub seed: u64,
}

/// One score.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Visitor number.
    pub visitor: u64,
    /// Session number (unique across visitors).
    pub session: u64,
    /// Product number.
    pub product: u32,
    /// Conversion probability.
    pub probability: f64,
    /// Unix seconds.
    pub time: i64,
    /// Whether the session bought the product.
    pub converted: bool,
}

enum Shape {
    Beta(Beta<f64>, f64),
    Bimodal(Beta<f64>, Beta<f64>, f64),
}

/// The scores, in generation order (not sorted by time).
pub fn scores(params: &ScoreParams) -> impl Iterator<Item = Score> {
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let products = params.products.max(1);
    let shapes: Vec<Shape> = (0..products)
        .map(|i| match i % 10 {
            // Left-skewed: most who are scored are likely to buy.
            7 => Shape::Beta(Beta::new(6.0, 1.5).expect("valid"), 0.9),
            // Bimodal: a cold majority and a hot minority.
            9 => Shape::Bimodal(
                Beta::new(1.2, 30.0).expect("valid"),
                Beta::new(5.0, 5.0).expect("valid"),
                rng.random_range(0.1..0.3),
            ),
            _ => Shape::Beta(
                Beta::new(rng.random_range(0.8..3.0), rng.random_range(6.0..40.0)).expect("valid"),
                rng.random_range(0.3..1.0),
            ),
        })
        .collect();
    // Zipf-like popularity: cumulative weights of 1/rank^0.8.
    let mut cumulative = Vec::with_capacity(products);
    let mut total = 0.0;
    for rank in 1..=products {
        total += 1.0 / (rank as f64).powf(0.8);
        cumulative.push(total);
    }
    let visitors = params.visitors.max(1) as u64;
    let start = params.start.unix();
    let span = i64::from(params.days.max(1)) * 86_400;
    (0..params.scores).map(move |_| {
        let u = rng.random::<f64>() * total;
        let product = cumulative.partition_point(|&c| c < u).min(products - 1);
        let probability = match &shapes[product] {
            Shape::Beta(beta, scale) => beta.sample(&mut rng) * scale,
            Shape::Bimodal(cold, hot, share) => {
                if rng.random::<f64>() < *share {
                    hot.sample(&mut rng)
                } else {
                    cold.sample(&mut rng)
                }
            }
        }
        .clamp(0.0, 1.0);
        let visitor = rng.random_range(0..visitors);
        Score {
            visitor,
            session: visitor * 8 + rng.random_range(0..8),
            product: product as u32,
            probability,
            time: start + rng.random_range(0..span),
            converted: rng.random::<f64>() < probability,
        }
    })
}

/// Writes `scores.csv` (visitor_id, session_id, product_id, probability, event_time) and
/// `conversions.csv` (session_id, product_id) into `dir`; returns (scores, conversions).
pub fn write_scores(params: &ScoreParams, dir: &Path) -> std::io::Result<(u64, u64)> {
    let open = |name: &str| {
        std::fs::File::create(dir.join(name)).map(|f| std::io::BufWriter::with_capacity(1 << 20, f))
    };
    let mut out = open("scores.csv")?;
    let mut conv = open("conversions.csv")?;
    writeln!(
        out,
        "visitor_id,session_id,product_id,probability,event_time"
    )?;
    writeln!(conv, "session_id,product_id")?;
    let (mut n, mut c) = (0u64, 0u64);
    for s in scores(params) {
        let time = EventTime::from_unix(s.time)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        writeln!(
            out,
            "V{:08},S{:09},P{:05},{:.6},{time}",
            s.visitor, s.session, s.product, s.probability
        )?;
        n += 1;
        if s.converted {
            writeln!(conv, "S{:09},P{:05}", s.session, s.product)?;
            c += 1;
        }
    }
    out.flush()?;
    conv.flush()?;
    Ok((n, c))
}
