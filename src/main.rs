//! The `segmentd` binary: parse the command line, set up logging, run the command, and turn
//! the outcome into an exit code (see `segmentd::cli` for the codes).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = segmentd::cli::Cli::parse();
    segmentd::telemetry::init_tracing(cli.log_format, cli.verbose);
    segmentd::cli::run(cli)
}
