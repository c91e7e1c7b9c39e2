//! Fits k-means to a CSV of points and prints the inertia as one JSON line, so
//! `scripts/check_kmeans_vs_sklearn.py` can compare it with scikit-learn on the same data.
//!
//! Usage: `kmeans_inertia FILE K [SEED]` where FILE is a headerless CSV of floats, one point
//! per line, and SEED (default 0) seeds the restarts.
//! Output: `{"k":K,"inertia":...,"n_iter":...}`.

use std::error::Error;

use ndarray::Array2;
use segmentd::model::kmeans::KMeansParams;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: kmeans_inertia FILE K [SEED]";
    let path = args.next().ok_or(usage)?;
    let k: usize = args
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("K must be a non-negative integer: {e}"))?;
    let seed: u64 = match args.next() {
        Some(text) => text
            .parse()
            .map_err(|e| format!("SEED must be a non-negative integer: {e}"))?,
        None => 0,
    };

    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let mut values = Vec::new();
    let mut n_cols = None;
    let mut n_rows = 0;
    for (line_no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let before = values.len();
        for field in line.split(',') {
            let v: f64 = field
                .trim()
                .parse()
                .map_err(|e| format!("{path}:{}: bad number {field:?}: {e}", line_no + 1))?;
            values.push(v);
        }
        let cols = values.len() - before;
        match n_cols {
            None => n_cols = Some(cols),
            Some(c) if c != cols => {
                return Err(
                    format!("{path}:{}: expected {c} columns, got {cols}", line_no + 1).into(),
                )
            }
            Some(_) => {}
        }
        n_rows += 1;
    }
    let data = Array2::from_shape_vec((n_rows, n_cols.unwrap_or(0)), values)?;

    let fit = KMeansParams::new(k)
        .n_init(10)
        .seed(seed)
        .check()?
        .fit(data.view())?;
    // `{:?}` prints f64 with full round-trip precision.
    println!(
        "{{\"k\":{k},\"inertia\":{:?},\"n_iter\":{}}}",
        fit.inertia, fit.n_iter
    );
    Ok(())
}
