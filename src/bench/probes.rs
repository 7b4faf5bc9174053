//! CPU time and peak RSS of processes, read from `/proc`.

use std::process::Command;

pub(super) fn clock_ticks() -> f64 {
    // Linux reports /proc CPU times in USER_HZ, 100 on every common platform.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak RSS (`VmHWM`) of a process, in KiB; 0 once it has exited.
pub(super) fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Busy and total clock ticks of all the machine's CPUs so far, from the
/// first line of `/proc/stat`: busy is everything but idle and iowait.
pub(super) fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    // cpu user nice system idle iowait irq softirq steal (guest time is
    // already counted in user and nice).
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if fields.len() < 5 {
        return (0, 0);
    }
    let total: u64 = fields.iter().sum();
    (total - fields[3] - fields[4], total)
}

/// The share of all CPUs busy between two [`machine_ticks`] readings
/// (1.0 = every core busy all the time).
pub(super) fn busy_between(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / total as f64
}

/// utime + stime of a process, in clock ticks.
pub(super) fn process_cpu_ticks(pid: u32) -> u64 {
    stat_ticks(pid, false)
}

/// utime + stime of a process, plus cutime + cstime (its children that
/// have exited and been waited for) when `children`.
pub(super) fn stat_ticks(pid: u32, children: bool) -> u64 {
    stat_ticks_at(&format!("/proc/{pid}/stat"), children)
}

/// [`stat_ticks`] of the `stat` file at `path` (a process's or a thread's).
fn stat_ticks_at(path: &str, children: bool) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start after ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let own = get(11) + get(12);
    if children {
        own + get(13) + get(14)
    } else {
        own
    }
}

/// CPU ticks of the local RabbitMQ node (its `beam.smp` process), 0 if not found.
pub(super) fn broker_cpu_ticks() -> u64 {
    cpu_ticks_of("beam.smp", false)
}

/// CPU ticks of the local PostgreSQL server: all its processes, and the
/// backends that have exited (counted in the postmaster's children's time),
/// so connections that come and go during a run are counted too.
pub(super) fn postgres_cpu_ticks() -> u64 {
    cpu_ticks_of("postgres", true)
}

/// CPU ticks of every process whose command name is `comm`.
pub(super) fn cpu_ticks_of(comm: &str, children: bool) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(|pid| stat_ticks(pid, children))
        .sum()
}

/// utime + stime of one thread of this process, in clock ticks.
pub(super) fn thread_cpu_ticks(tid: u32) -> u64 {
    stat_ticks_at(&format!("/proc/self/task/{tid}/stat"), false)
}

/// The id of the calling thread.
pub(super) fn this_thread() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// The threads of this process that run a lapin connection's I/O loop
/// (one per connection).
pub(super) fn io_threads() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "lapin-io-loop")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_never_busier_than_all_its_cores() {
        let before = machine_ticks();
        // Busy until some ticks have passed (they are counted in 1/100 s).
        let started = std::time::Instant::now();
        let mut x = 0u64;
        let after = loop {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            let now = machine_ticks();
            if now.1 > before.1 + 2 || started.elapsed().as_secs() > 5 {
                break now;
            }
        };
        std::hint::black_box(x);
        assert!(after.1 > before.1, "no ticks passed: {before:?} {after:?}");
        assert!(after.0 <= after.1);
        let busy = busy_between(before, after);
        assert!((0.0..=1.0).contains(&busy), "{busy}");
        assert_eq!(busy_between(after, after), 0.0);
    }
}
