//! What /proc tells about a process: CPU time and resident memory, of the gateway (given
//! its pid) and of the simulator itself, so a report shows when the simulator, not the
//! gateway, was the bottleneck. Also the open-file limit, which the simulator raises to
//! its hard limit because every device connection is a file.

/// Clock ticks per second of `/proc/*/stat` times (`CLK_TCK`, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// CPU ticks (user + system) of a process, from /proc; `None` if it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU ticks (user + system) of this process.
pub fn own_cpu_ticks() -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU use between two tick readings over `secs` seconds, in percent of one core.
pub fn cpu_percent(start: Option<u64>, end: Option<u64>, secs: f64) -> Option<f64> {
    let (start, end) = (start?, end?);
    (secs > 0.0).then(|| end.saturating_sub(start) as f64 / TICKS_PER_SEC / secs * 100.0)
}

/// Raise this process's open-file limit to its hard limit; returns the limit in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_command_name() {
        let stat = "42 (a b) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert_eq!(cpu_percent(Some(100), Some(150), 1.0), Some(50.0));
        assert_eq!(cpu_percent(None, Some(150), 1.0), None);
        let limit = raise_nofile_limit().unwrap();
        assert!(limit >= 1_024, "{limit}");
    }
}
