//! The `segmentd` binary: parse the command line, set up logging, run the command, and turn
//! the outcome into an exit code (see `segmentd::cli` for the codes).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than the system allocator: the daemon allocates and frees many small,
/// short-lived buffers per event across threads (decoded events, state records, payloads),
/// which glibc malloc served with heavy consolidation and fragmentation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = segmentd::cli::Cli::parse();
    segmentd::telemetry::init_tracing(cli.log_format, cli.verbose);
    segmentd::cli::run(cli)
}
