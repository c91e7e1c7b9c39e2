//! Text shared by the batch commands and their reports: numbers with separators, and the
//! per-file reading summary every command prints as soon as its input is read.

use std::time::Duration;

use super::ingest::{BadRow, FileReport};

/// `1234567` → `1,234,567`.
pub fn count(n: impl Into<u64>) -> String {
    let digits = n.into().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds with two decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Bad rows by reason, then the first few with their line numbers.
pub fn print_bad_rows(
    total: u64,
    by_reason: &std::collections::BTreeMap<String, u64>,
    examples: &[BadRow],
) {
    if total == 0 {
        return;
    }
    for (reason, n) in by_reason {
        println!("    {:>8} × {reason}", count(*n));
    }
    for bad in examples {
        println!("    line {}: {}", bad.line, bad.reason);
    }
    if total as usize > examples.len() {
        println!(
            "    … {} more (write them all with --bad-rows FILE)",
            count(total - examples.len() as u64)
        );
    }
}

/// Per-file reading summary, with bad rows by reason and the first few with line numbers.
pub fn print_files(files: &[FileReport]) {
    for f in files {
        let kind = f.kind.map_or("?", |k| k.as_str());
        println!(
            "read {kind:<10} {}: {} rows, {} events, {} bad rows, {} duplicates ({})",
            f.path.display(),
            count(f.rows),
            count(f.events),
            count(f.bad_rows),
            count(f.duplicates),
            secs(f.elapsed)
        );
        if f.after_as_of > 0 {
            println!(
                "    {} rows later than the as-of time left out",
                count(f.after_as_of)
            );
        }
        if f.zero_quantity_as_one > 0 {
            println!(
                "    {} order lines with a zero quantity and a positive line total read as one unit",
                count(f.zero_quantity_as_one)
            );
        }
        print_bad_rows(f.bad_rows, &f.bad_by_reason, &f.examples);
    }
}
