//! Observability: tracing setup, the metrics (each defined once) and the HTTP endpoints.

pub mod admin;
pub mod http;
pub mod metrics;

use tracing_subscriber::{fmt, EnvFilter};

use crate::cli::LogFormat;

/// Installs the global tracing subscriber on stderr. `RUST_LOG` wins over `verbosity`
/// (0 info, 1 debug, 2+ trace). Calling it twice is harmless (the second call is ignored).
pub fn init_tracing(format: LogFormat, verbosity: u8) {
    let default = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
