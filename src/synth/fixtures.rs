//! Fixtures built on the simulator: a generated shop's states and the snapshot discovered on
//! them, the starting point of the demo, the benchmark, the harness and the tests of every
//! layer.

use thiserror::Error;

use super::Shop;
use crate::domain::features::Sources;
use crate::domain::state::{CustomerState, StateParams};
use crate::model::assign::AssignConfig;
use crate::model::build::{
    build_snapshot, BuildError, BuildSettings, DiscoverConfig, SampleSizeSetting,
};
use crate::model::snapshot::{SnapshotError, ValidSnapshot};

/// Why a fixture could not be made.
#[derive(Debug, Error)]
pub enum FixtureError {
    /// The shop has no events.
    #[error("the shop has no history")]
    NoHistory,
    /// No snapshot could be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The built snapshot fails its checks (a bug).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// A generated shop's customer states after its history, and the snapshot discovered on a
/// `sample`-customer stratified sample of them (version 1, default settings): the starting
/// point of the demo, the benchmark and the daemon's tests.
pub fn discover_history(
    shop: &Shop,
    sample: usize,
) -> Result<(Vec<CustomerState>, ValidSnapshot), FixtureError> {
    let discover = DiscoverConfig {
        sample_size: SampleSizeSetting::Count(sample),
        ..DiscoverConfig::default()
    };
    let params = StateParams::default();
    let (states, last) = shop.history_states(&params);
    let settings = BuildSettings {
        params: &params,
        discover: &discover,
        membership_exponent: AssignConfig::default().membership_exponent,
    };
    let as_of = last.ok_or(FixtureError::NoHistory)?;
    let built = build_snapshot(
        &states,
        Sources::ALL,
        as_of,
        settings,
        1,
        vec!["generated history".into()],
    )?;
    Ok((states, built.snapshot.validate()?))
}
