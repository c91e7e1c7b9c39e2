//! All integration tests, in one binary so they share one build and link step.

mod cli;
mod daemon;
