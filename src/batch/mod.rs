//! The batch subcommands over order-history files: `discover`, `assign` and `validate`; and
//! `audiences` over conversion-score files. They read CSV exports through [`ingest`] into the
//! same per-customer state the daemon keeps, and use the same feature and model code.

pub mod assign;
pub mod audience_plot;
pub mod audiences;
pub mod discover;
pub mod ingest;
pub mod mapping;
pub mod report;
pub mod text;
pub mod validate;

use thiserror::Error;

/// A file of a batch command that could not be read or written, named by its path.
#[derive(Debug, Error)]
pub enum FileError {
    /// Opening, reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The CSV layer failed (an unreadable header, a broken record).
    #[error("{path}: {source}")]
    Csv {
        /// The file.
        path: String,
        /// The cause.
        source: csv::Error,
    },
}

/// One line of a bad-rows file (`file,line,reason`), CSV-quoted as needed.
pub fn bad_row_line(file: &str, line: u64, reason: &str) -> Vec<u8> {
    let mut row = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    // Writing to memory fails only on a bug; a line that cannot be written is left out.
    if row.write_record([file, &line.to_string(), reason]).is_err() || row.flush().is_err() {
        return Vec::new();
    }
    row.into_inner().unwrap_or_default()
}
