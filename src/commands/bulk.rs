//! What `scramjet ingest` and `scramjet delete` share: input from a file or
//! stdin, a progress line on a terminal, a summary at the end, and a failing
//! exit status when anything did not go through.

use std::{
    fs::File,
    io::{BufRead, BufReader, IsTerminal},
    path::Path,
    time::Duration,
};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::bulk::{BadRecord, DeleteStep, Summary};

/// Input buffer size: large reads for large files.
const BUFFER: usize = 256 * 1024;

/// Opens `path`, or stdin for `-`.
pub(super) fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(BufReader::with_capacity(BUFFER, std::io::stdin())));
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Box::new(BufReader::with_capacity(BUFFER, file)))
}

/// A spinner with the running counts, drawn only on a terminal.
pub(super) fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints the records a summary kept, each after `label`, then how many of
/// the `total` were only counted (a summary keeps a bounded number).
fn print_kept(what: &str, label: &str, kept: &[BadRecord], total: u64, more: &str) {
    for record in kept {
        eprintln!("{what}: {label}{record}");
    }
    if total > kept.len() as u64 {
        eprintln!("{what}: … and {} {more}", total - kept.len() as u64);
    }
}

/// Prints the summary and the bad records; an error when not everything
/// went through.
pub(super) fn report(what: &str, summary: &Summary) -> anyhow::Result<()> {
    print_kept(
        what,
        "bad record: ",
        &summary.bad,
        summary.bad_count,
        "more bad record(s)",
    );
    for refused in &summary.refused {
        eprintln!("{what}: refused by the database: {refused}");
    }
    print_kept(
        what,
        "",
        &summary.rejected_records,
        summary.rejected,
        "more rejected record(s) (GET /v1/staging/<type> lists them all)",
    );
    println!("{what}: {summary}");
    let mut problems = Vec::new();
    if summary.bad_count > 0 {
        problems.push(format!("{} bad", summary.bad_count));
    }
    if summary.rejected > 0 {
        problems.push(format!("{} rejected", summary.rejected));
    }
    if !summary.refused.is_empty() {
        problems.push(format!("{} refused", summary.refused.len()));
    }
    if let Some(DeleteStep::Refused(why)) = &summary.deletes {
        eprintln!("{what}: no resource was deleted: {why}");
        problems.push("the deletes refused".into());
    }
    anyhow::ensure!(
        summary.is_success(),
        "{what} did not go through completely: {} (each listed on stderr above)",
        problems.join(", ")
    );
    Ok(())
}
