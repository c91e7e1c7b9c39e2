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
    let huge_pages = transparent_huge_pages_off();
    let cli = segmentd::cli::Cli::parse();
    segmentd::telemetry::init_tracing(cli.log_format, cli.verbose);
    if let Err(reason) = huge_pages {
        tracing::debug!(%reason, "transparent huge pages not turned off by segmentd");
    }
    segmentd::cli::run(cli)
}

/// Turns transparent huge pages off for this process (and the processes it starts), unless
/// `MIMALLOC_ALLOW_THP` is set, which mimalloc reads itself (`1` keeps them on).
///
/// mimalloc asks for huge pages on the memory it maps, and the first touch of a huge page makes
/// the kernel clear all 2 MiB of it, used or not. With 4 KiB pages the 1M-customer daemon
/// process peaked 50–80 MiB lower (about a tenth) and `segmentd assign` 20 MiB lower and 4%
/// faster, with throughput otherwise within noise (README, "Huge pages"). Must run first: only
/// memory touched later is affected.
fn transparent_huge_pages_off() -> Result<(), String> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return Err("MIMALLOC_ALLOW_THP is set".into());
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and reads or writes none of
        // this process's memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("prctl: {}", std::io::Error::last_os_error()))
        }
    }
    #[cfg(not(target_os = "linux"))]
    Err("not Linux".into())
}
