//! CPU time and memory of a process, from /proc.

use anyhow::{bail, Context};

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User plus system CPU time of all its threads, in nanoseconds.
    pub cpu_ns: u64,
    /// Resident set now (VmRSS), bytes.
    pub rss: u64,
    /// Peak resident set (VmHWM), bytes.
    pub hwm: u64,
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime from the text of /proc/PID/stat, in clock ticks.
fn stat_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat.rsplit_once(')').context("no ')' in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
        bail!("stat too short");
    };
    Ok(u.parse::<u64>()? + s.parse::<u64>()?)
}

/// A `VmXXX:   123 kB` line of /proc/PID/status, in bytes.
fn status_bytes(status: &str, key: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .with_context(|| format!("no {key} in status"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse()?;
    Ok(kb * 1024)
}

pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Sample {
        cpu_ns: stat_ticks(&stat)? * 1_000_000_000 / ticks_per_sec(),
        rss: status_bytes(&status, "VmRSS")?,
        hwm: status_bytes(&status, "VmHWM")?,
    })
}

/// This process.
pub fn own() -> anyhow::Result<Sample> {
    sample(std::process::id())
}

/// One reading of each of `pids`, in order.
pub fn samples(pids: &[u32]) -> anyhow::Result<Vec<Sample>> {
    pids.iter().map(|p| sample(*p)).collect()
}

/// Readings of the nodes, of auxiliary processes (Redis, say) and of this process, taken together
/// at one moment of a run.
pub struct Readings {
    pub nodes: Vec<Sample>,
    pub aux: Vec<Sample>,
    pub own: Sample,
}

impl Readings {
    pub fn take(pids: &[u32], aux_pids: &[u32]) -> anyhow::Result<Readings> {
        Ok(Readings {
            nodes: samples(pids)?,
            aux: samples(aux_pids)?,
            own: own()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_an_awkward_name() {
        let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100 \
                    1000000 500 18446744073709551615";
        assert_eq!(stat_ticks(stat).unwrap(), 325);
        assert!(stat_ticks("1 (x) S 1").is_err());
    }

    #[test]
    fn parses_status_lines() {
        let status = "Name:\tshardcast\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_bytes(status, "VmRSS").unwrap(), 100 << 20);
        assert_eq!(status_bytes(status, "VmHWM").unwrap(), 200 << 20);
        assert!(status_bytes(status, "VmSwap").is_err());
    }

    #[test]
    fn reads_this_process() {
        let s = own().unwrap();
        assert!(s.rss > 0 && s.hwm >= s.rss);
    }
}
