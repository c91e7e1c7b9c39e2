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
/// `MIMALLOC_ALLOW_THP` is set, which mimalloc reads itself (in any case): `1` leaves them as the
/// process inherited them, `0` makes mimalloc turn them off.
///
/// mimalloc asks for huge pages on the memory it maps, and the first touch of a huge page makes
/// the kernel clear all 2 MiB of it, used or not. With 4 KiB pages the 1M-customer daemon
/// process peaked about a tenth lower (498–535 against 573–589 MiB) and `segmentd assign`
/// 166 against 187 MiB, with throughput within noise (README, "Huge pages"). Must run first:
/// only memory touched later is affected.
fn transparent_huge_pages_off() -> Result<(), String> {
    if std::env::vars_os().any(|(name, _)| name.eq_ignore_ascii_case("MIMALLOC_ALLOW_THP")) {
        return Err("MIMALLOC_ALLOW_THP is set".into());
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and reads or writes none of
        // this process's memory.
        // prctl reads its arguments as unsigned longs.
        let rc = unsafe {
            let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
            libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("prctl: {}", std::io::Error::last_os_error()))
        }
    }
    #[cfg(not(target_os = "linux"))]
    Err("not Linux".into())
}
