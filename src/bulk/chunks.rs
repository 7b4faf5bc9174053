//! Records in chunks: read and prepared on a thread of their own, applied
//! one transaction per chunk. Shared by ingest and remove.

use super::{
    BadRecord, Scramjet, Summary,
    summary::{KEEP_BAD, rejection},
};
use crate::{
    domain::outcome::Outcome,
    pipeline::{self, Prepared, PreparedKind},
    store::{self, StoreError},
};

/// One chunk from the reader thread: prepared records (with their lines)
/// and the bad ones among them.
pub(super) struct Chunk {
    /// The good records, prepared.
    pub(super) prepared: Vec<Prepared>,
    /// The input line of each good record.
    pub(super) lines: Vec<u64>,
    /// The records that could not be read or were malformed.
    pub(super) bad: Vec<BadRecord>,
}

impl Scramjet {
    /// Applies one chunk (or, in a dry run, applies and rolls back) and
    /// counts the outcomes.
    pub(super) async fn apply_chunk(
        &self,
        chunk: &Chunk,
        dry_run: bool,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        for bad in &chunk.bad {
            summary.bad(bad.clone());
        }
        summary.records += chunk
            .prepared
            .iter()
            .filter(|p| matches!(p.kind, PreparedKind::Save { .. }))
            .count() as u64;
        let results = if dry_run {
            self.try_chunk(&chunk.prepared)
                .await?
                .into_iter()
                .map(Ok)
                .collect()
        } else {
            self.apply(&chunk.prepared).await?
        };
        for ((result, line), prepared) in results.into_iter().zip(&chunk.lines).zip(&chunk.prepared)
        {
            match result {
                Ok(outcome) => {
                    summary.count(outcome);
                    if outcome == Outcome::Rejected && summary.rejected_records.len() < KEEP_BAD {
                        summary.rejected_records.push(BadRecord {
                            line: *line,
                            reason: rejection(prepared),
                        });
                    }
                }
                Err(reason) => summary.refused.push(BadRecord {
                    line: *line,
                    reason,
                }),
            }
        }
        Ok(())
    }

    /// Applies `prepared` in a transaction that is rolled back: the exact
    /// outcomes, and no change.
    async fn try_chunk(&self, prepared: &[Prepared]) -> anyhow::Result<Vec<Outcome>> {
        let mut client = self.pool.get().await.map_err(StoreError::from)?;
        let tx = store::begin(&mut client).await.map_err(StoreError::from)?;
        let outcomes = pipeline::process_in_transaction(&tx, prepared).await?;
        tx.rollback().await.map_err(StoreError::from)?;
        Ok(outcomes)
    }
}

/// Runs `records` (made on the thread, where the reading happens) on a
/// blocking thread and hands them over in chunks of `size` good records.
/// At most two chunks wait, so a fast reader never runs far ahead.
pub(super) fn chunks_on_a_thread<I>(
    size: usize,
    records: impl FnOnce() -> I + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Receiver<Chunk>,
)
where
    I: Iterator<Item = Result<(u64, Prepared), BadRecord>>,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let handle = tokio::task::spawn_blocking(move || {
        let mut chunk = Chunk::empty(size);
        for record in records() {
            match record {
                Ok((line, prepared)) => {
                    chunk.lines.push(line);
                    chunk.prepared.push(prepared);
                }
                Err(bad) => chunk.bad.push(bad),
            }
            if chunk.prepared.len() >= size {
                let full = std::mem::replace(&mut chunk, Chunk::empty(size));
                if tx.blocking_send(full).is_err() {
                    return;
                }
            }
        }
        let _ = tx.blocking_send(chunk);
    });
    (handle, rx)
}

impl Chunk {
    fn empty(capacity: usize) -> Chunk {
        Chunk {
            prepared: Vec::with_capacity(capacity),
            lines: Vec::with_capacity(capacity),
            bad: Vec::new(),
        }
    }
}
