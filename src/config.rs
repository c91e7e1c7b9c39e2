//! Typed, layered configuration.
//!
//! Precedence, lowest first:
//! 1. built-in defaults (every field has one that works);
//! 2. the TOML file given with `--config` (unknown keys are errors);
//! 3. environment variables `SEGMENTD__SECTION__KEY=value` (double underscores separate the
//!    path; values are parsed as TOML scalars, falling back to strings), e.g.
//!    `SEGMENTD__DISCOVER__CLUSTERING__SEED=7`;
//! 4. command-line flags.
//!
//! [`Config::load`] merges layers 1–3 and validates once; commands apply their flags on top and
//! call [`Config::validate`] again, so every command works on a checked configuration.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::admin::AdminConfig;
use crate::api::http::HttpConfig;
use crate::audience::AudienceConfig;
use crate::batch::mapping::{ColumnMap, FileKind};
use crate::control::drift::DriftConfig;
use crate::domain::section::{Checked, Section};
use crate::domain::state::StateParams;
use crate::io::kafka::KafkaConfig;
use crate::io::store::StoreConfig;
use crate::model::assign::AssignConfig;
use crate::model::build::DiscoverConfig;
use crate::model::validation::ValidateConfig;
use crate::pipeline::aging::AgingConfig;
use crate::pipeline::assign::PublishPolicy;
use crate::pipeline::clock::ClockConfig;
use crate::pipeline::sweep::SweepConfig;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "SEGMENTD__";

/// Why configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file or an override is not valid for the schema (includes unknown keys).
    #[error("config: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Rolling-feature parameters.
    pub features: StateParams,
    /// Input column mappings per kind of file.
    pub input: InputConfig,
    /// `segmentd discover`.
    pub discover: DiscoverConfig,
    /// `segmentd assign`.
    pub assign: AssignConfig,
    /// `segmentd validate`.
    pub validate: ValidateConfig,
    /// `segmentd run`: Kafka clients and topics.
    pub kafka: KafkaConfig,
    /// `segmentd run`: the RocksDB state store.
    pub store: StoreConfig,
    /// `segmentd run`: when membership updates are published.
    pub publish: PublishPolicy,
    /// `segmentd run`: the daemon itself.
    pub daemon: DaemonConfig,
    /// `segmentd run`: the HTTP endpoints (metrics, health, customer lookups).
    pub http: HttpConfig,
    /// `segmentd run`: the admin API (snapshots).
    pub admin: AdminConfig,
    /// `segmentd run`: drift monitoring and re-clustering.
    pub drift: DriftConfig,
    /// `segmentd run`: the re-assignment sweep after a snapshot swap.
    pub sweep: SweepConfig,
    /// `segmentd run`: the stream clock every assignment is made at.
    pub clock: ClockConfig,
    /// `segmentd run`: re-assignment as the clock moves on.
    pub aging: AgingConfig,
    /// `segmentd audiences` and `segmentd run`: per-product audience buckets.
    pub audiences: AudienceConfig,
    /// Whether the file or the environment set anything under `[features]` (as opposed to
    /// the defaults): `assign` checks only explicit settings against a snapshot's.
    #[serde(skip)]
    pub features_explicit: bool,
}

/// Column mappings, one table per kind of file, and how order lines are grouped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// How far apart in event time the lines of one order may be spread through a file (real
    /// exports are only roughly sorted). An order stays open this long behind the latest event
    /// read; a line of an order already closed is reported as a bad row.
    pub order_window_days: f64,
    /// Read an order line with a zero quantity and a positive line total as one unit bought,
    /// instead of refusing it as a bad row ("zero quantity: nothing was bought"). Off by
    /// default: a zero quantity usually means nothing changed hands.
    pub zero_quantity_paid_as_one: bool,
    /// Orders file mapping.
    pub orders: FileMapping,
    /// Returns file mapping.
    pub returns: FileMapping,
    /// Support file mapping.
    pub support: FileMapping,
    /// Engagement file mapping.
    pub engagement: FileMapping,
}

/// One file kind's mapping.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileMapping {
    /// Field name → the export's column name.
    pub columns: ColumnMap,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            order_window_days: 3.0,
            zero_quantity_paid_as_one: false,
            orders: FileMapping::default(),
            returns: FileMapping::default(),
            support: FileMapping::default(),
            engagement: FileMapping::default(),
        }
    }
}

impl Section for InputConfig {
    const KEY: &'static str = "input";

    fn problems(&self) -> Result<(), String> {
        if !(self.order_window_days.is_finite() && self.order_window_days >= 0.0) {
            return Err("order_window_days must be a number of days >= 0".into());
        }
        Ok(())
    }
}

impl InputConfig {
    /// The grouping window in seconds.
    pub fn order_window_seconds(&self) -> i64 {
        (self.order_window_days * 86_400.0).round() as i64
    }

    /// The mapping for a kind of file.
    pub fn columns(&self, kind: FileKind) -> &ColumnMap {
        match kind {
            FileKind::Orders => &self.orders.columns,
            FileKind::Returns => &self.returns.columns,
            FileKind::Support => &self.support.columns,
            FileKind::Engagement => &self.engagement.columns,
        }
    }

    /// Adds (or replaces) mappings for a kind of file.
    pub fn extend(&mut self, kind: FileKind, map: ColumnMap) {
        let target = match kind {
            FileKind::Orders => &mut self.orders.columns,
            FileKind::Returns => &mut self.returns.columns,
            FileKind::Support => &mut self.support.columns,
            FileKind::Engagement => &mut self.engagement.columns,
        };
        target.extend(map);
    }
}

/// `segmentd run` settings that are not Kafka's, the store's or publishing's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The centroid snapshot to assign against (written by `segmentd discover`).
    pub snapshot: std::path::PathBuf,
    /// After SIGTERM or SIGINT, how long the daemon may take to finish and commit the batch
    /// in hand before it exits anyway (a second signal exits at once).
    pub shutdown_deadline_seconds: u64,
    /// Where accepted snapshots are kept, with their metadata and the active version.
    pub snapshot_dir: std::path::PathBuf,
    /// How many of the newest snapshots to keep (the active one is always kept).
    pub keep_snapshots: usize,
    /// A directory to watch for new snapshot files (empty: none).
    pub snapshot_watch_dir: std::path::PathBuf,
    /// How often to look at `snapshot_watch_dir`, in seconds.
    pub snapshot_watch_seconds: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            snapshot: std::path::PathBuf::from("snapshot.json"),
            shutdown_deadline_seconds: 30,
            snapshot_dir: std::path::PathBuf::from("data/snapshots"),
            keep_snapshots: 5,
            snapshot_watch_dir: std::path::PathBuf::new(),
            snapshot_watch_seconds: 2,
        }
    }
}

impl Section for DaemonConfig {
    const KEY: &'static str = "daemon";

    fn problems(&self) -> Result<(), String> {
        if self.keep_snapshots == 0 || self.snapshot_watch_seconds == 0 {
            return Err("keep_snapshots and snapshot_watch_seconds must be at least 1".into());
        }
        Ok(())
    }
}

impl Config {
    /// What building a snapshot reads: the rolling-feature parameters, `[discover]` and the
    /// membership exponent.
    pub fn build_settings(&self) -> crate::model::build::BuildSettings<'_> {
        crate::model::build::BuildSettings {
            params: &self.features,
            discover: &self.discover,
            membership_exponent: self.assign.membership_exponent,
        }
    }

    /// What re-clustering in the daemon reads.
    pub fn recluster_settings(&self) -> crate::control::recluster::ReclusterSettings {
        crate::control::recluster::ReclusterSettings {
            discover: self.discover.clone(),
            validate: self.validate.clone(),
            same_segment_distance: self.drift.same_segment_distance,
            auto_activate: self.drift.auto_activate,
            membership_exponent: self.assign.membership_exponent,
        }
    }

    /// Defaults, then the file (if any), then `SEGMENTD__` environment overrides; validated.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self::load_with_env(path, &env)
    }

    /// [`Config::load`] with explicit environment pairs (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut doc = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        for (key, value) in env {
            apply_env(&mut doc, key, value)?;
        }
        let features_explicit = doc.contains_key("features");
        let mut config: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.features_explicit = features_explicit;
        config.validate()?;
        Ok(config)
    }

    /// Checks every section; called after each layer of overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.problems().map_err(ConfigError::Invalid)
    }

    /// The configuration, checked: what the daemon takes.
    pub fn check(self) -> Result<Checked<Config>, ConfigError> {
        Section::check(self).map_err(|e| ConfigError::Invalid(e.message))
    }
}

/// The whole configuration is a section whose problems are its sections' problems, so
/// [`Section::check`] yields the `Checked<Config>` the daemon takes.
impl Section for Config {
    const KEY: &'static str = "config";

    fn problems(&self) -> Result<(), String> {
        let sections: [(&str, Result<(), String>); 16] = [
            (StateParams::KEY, self.features.problems()),
            (InputConfig::KEY, self.input.problems()),
            (DiscoverConfig::KEY, self.discover.problems()),
            (AssignConfig::KEY, self.assign.problems()),
            (ValidateConfig::KEY, self.validate.problems()),
            (KafkaConfig::KEY, self.kafka.problems()),
            (StoreConfig::KEY, self.store.problems()),
            (PublishPolicy::KEY, self.publish.problems()),
            (DaemonConfig::KEY, self.daemon.problems()),
            (HttpConfig::KEY, self.http.problems()),
            (AdminConfig::KEY, self.admin.problems()),
            (DriftConfig::KEY, self.drift.problems()),
            (SweepConfig::KEY, self.sweep.problems()),
            (ClockConfig::KEY, self.clock.problems()),
            (AgingConfig::KEY, self.aging.problems()),
            (AudienceConfig::KEY, self.audiences.problems()),
        ];
        for (section, result) in sections {
            result.map_err(|message| format!("{section}: {message}"))?;
        }
        Ok(())
    }
}

/// Sets `SEGMENTD__A__B=v` as `a.b = v` in the document.
fn apply_env(doc: &mut toml::Table, key: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = key[ENV_PREFIX.len()..]
        .split("__")
        .map(|p| p.to_ascii_lowercase())
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::Parse(format!(
            "environment override {key} has an empty part"
        )));
    }
    // Parse the value as a TOML value ("7", "true", "[1,2]", "\"x\""), else take it as text.
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let mut table = doc;
    for part in &path[..path.len() - 1] {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| {
            ConfigError::Parse(format!("environment override {key}: {part} is not a table"))
        })?;
    }
    if let Some(last) = path.last() {
        table.insert(last.clone(), parsed);
    }
    Ok(())
}

/// The documented example config shipped in `config/segmentd.toml`, checked by tests to load.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/segmentd.toml");

/// A parsed `KIND.FIELD=COLUMN` map, merged per kind.
pub type MapArgs = BTreeMap<FileKind, ColumnMap>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::SampleSizeSetting;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.features.half_life_days, 90.0);
    }

    #[test]
    fn the_shipped_example_shows_the_defaults() {
        let f = write(EXAMPLE_CONFIG);
        let loaded = Config::load_with_env(Some(f.path()), &[]).unwrap();
        assert!(loaded.features_explicit);
        assert_eq!(
            Config {
                features_explicit: false,
                ..loaded
            },
            Config::default()
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let f = write("[discover]\nsample_sise = 10\n");
        let err = Config::load_with_env(Some(f.path()), &[]).unwrap_err();
        assert!(err.to_string().contains("sample_sise"), "{err}");
    }

    #[test]
    fn env_overrides_the_file() {
        let f =
            write("[discover]\nsample_size = 100\n[input.orders.columns]\ncustomer_id = \"cid\"\n");
        let env = vec![
            (
                "SEGMENTD__DISCOVER__SAMPLE_SIZE".to_owned(),
                "all".to_owned(),
            ),
            (
                "SEGMENTD__DISCOVER__CLUSTERING__SEED".to_owned(),
                "7".to_owned(),
            ),
        ];
        let c = Config::load_with_env(Some(f.path()), &env).unwrap();
        assert_eq!(
            c.discover.sample_size,
            SampleSizeSetting::Word(crate::model::build::AllWord::All)
        );
        assert_eq!(c.discover.clustering.seed, 7);
        assert_eq!(c.input.orders.columns["customer_id"], "cid");
    }

    #[test]
    fn invalid_values_are_named() {
        let f = write("[features]\nhalf_life_days = -1\n");
        let err = Config::load_with_env(Some(f.path()), &[]).unwrap_err();
        assert!(err.to_string().contains("half-life"), "{err}");
        let f = write("[validate]\nmin_agreement = 2\n");
        assert!(Config::load_with_env(Some(f.path()), &[]).is_err());
    }
}
