//! All integration tests, in one binary so they share one build and link step.

mod architecture;
mod cli;
mod daemon;
mod fleet;
mod guarantees;
mod names;
mod parity;
mod processes;
mod schemas;
mod support;
