//! The batch subcommands over order-history files: `discover`, `assign` and `validate`; and
//! `audiences` over conversion-score files. They read CSV exports through [`ingest`] into the same per-customer state the
//! daemon keeps, and use the same feature and model code.

pub mod assign;
pub mod audience_plot;
pub mod audiences;
pub mod discover;
pub mod ingest;
pub mod mapping;
pub mod report;
pub mod text;
pub mod validate;
