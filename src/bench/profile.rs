//! `SCRAMJET_BENCH_PERF=<dir>`: records each timed drain with `perf`, for
//! the profiling recipe in BENCHMARKS.md. Two recordings per drain: the
//! daemon with call graphs (`--call-graph dwarf`, so the release profile's
//! debug info names the frames), and the whole machine without them, to see
//! how the broker's and PostgreSQL's time splits.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// The recordings of one drain; stopped (SIGINT, which makes perf write its
/// file) when dropped or by [`Recording::stop`].
pub(super) struct Recording {
    children: Vec<Child>,
}

impl Recording {
    /// Starts recording `pid` and the whole machine into the directory
    /// named by `SCRAMJET_BENCH_PERF`, as `<slug>.daemon.data` and
    /// `<slug>.all.data`; nothing when the variable is unset.
    pub(super) fn start(name: &str, pid: u32) -> Recording {
        let Some(dir) = std::env::var_os("SCRAMJET_BENCH_PERF").map(PathBuf::from) else {
            return Recording { children: vec![] };
        };
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let _ = std::fs::create_dir_all(&dir);
        let runs: [(&str, Vec<String>); 2] = [
            (
                "daemon",
                vec![
                    "--call-graph".into(),
                    "dwarf,16384".into(),
                    "-F".into(),
                    "997".into(),
                    "-p".into(),
                    pid.to_string(),
                ],
            ),
            ("all", vec!["-a".into(), "-F".into(), "997".into()]),
        ];
        let mut children = Vec::new();
        for (what, args) in runs {
            let out = dir.join(format!("{slug}.{what}.data"));
            match Command::new("perf")
                .args(["record", "-q", "-e", "cpu-clock", "-o"])
                .arg(&out)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
            {
                Ok(child) => children.push(child),
                Err(e) => eprintln!("cannot start perf for {}: {e}", out.display()),
            }
        }
        Recording { children }
    }

    /// Stops the recordings and waits for perf to write its files.
    pub(super) fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        for child in &self.children {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.finish();
    }
}
