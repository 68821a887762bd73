//! `run --resources`: the host resources a run used — peak resident memory (`VmHWM` of
//! `/proc/self/status`, Linux's high-water mark of the process's RSS, fs/proc/task_mmu.c) and wall time —
//! printed to stderr, never into the report, so reports stay identical from host to host.

use std::time::{Duration, Instant};

/// Returns the host instant a run starts at, for its wall time.
pub(crate) fn start() -> Instant {
    #[expect(
        clippy::disallowed_methods,
        reason = "`--resources` reports host wall time on stderr; it never reaches the simulation"
    )]
    Instant::now()
}

/// Returns the process's peak resident set size in bytes (`VmHWM`), or `None` where `/proc` does not say.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// Parses the `VmHWM:` line of a `/proc/<pid>/status` text (a number of KiB).
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Renders the resources line: peak RSS and wall time.
pub(crate) fn render(peak: Option<u64>, wall: Duration) -> String {
    let peak = peak.map_or_else(
        || "unavailable".to_owned(),
        |b| {
            #[expect(clippy::cast_precision_loss, reason = "a display figure")]
            let mib = b as f64 / f64::from(1u32 << 20);
            format!("{mib:.1} MiB ({b} bytes)")
        },
    );
    format!(
        "resources: peak RSS {peak}, wall time {:.3} s",
        wall.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_water_mark_is_read_in_kib() {
        let status = "Name:\tpeerdma\nVmPeak:\t  999 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t1 kB\n"), None);
        assert_eq!(
            render(Some(3 << 20), Duration::from_millis(1500)),
            "resources: peak RSS 3.0 MiB (3145728 bytes), wall time 1.500 s"
        );
    }

    #[test]
    fn this_process_reports_a_peak_on_linux() {
        if cfg!(target_os = "linux") {
            let peak = peak_rss_bytes().expect("/proc/self/status has VmHWM on Linux");
            assert!(peak > 0);
        }
    }
}
