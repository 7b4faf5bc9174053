//! Deleting a group of ids (the original's `RemoveRecords`).

use std::{io::BufRead, time::Instant};

use anyhow::Context;

use crate::domain::entity::{EntityId, EntityType};

use super::{BadRecord, Scramjet, Summary, chunks::chunks_on_a_thread};

impl Scramjet {
    /// Deletes the resources `ids` of `entity_type` (the original's
    /// `RemoveRecords`), with `deleted` events. `ids` holds one id per
    /// line; blank lines are skipped.
    pub async fn remove(
        &self,
        entity_type: &str,
        ids: impl BufRead + Send + 'static,
        chunk: usize,
        mut progress: impl FnMut(&Summary),
    ) -> anyhow::Result<Summary> {
        let entity_type = EntityType::parse(entity_type)?;
        let started = Instant::now();
        let mut summary = Summary::default();
        let this = self.clone();
        let chunk = chunk.clamp(1, crate::config::MAX_KEYS_PER_TRANSACTION);
        let (reader, mut rx) = chunks_on_a_thread(chunk, move || {
            let mut failed = false;
            ids.lines()
                .enumerate()
                // After a read error the input cannot be trusted to go on.
                .take_while(move |(_, line)| !std::mem::replace(&mut failed, line.is_err()))
                .filter_map(move |(n, line)| {
                    let line_number = n as u64 + 1;
                    let id = match line {
                        Ok(line) => line.trim().to_owned(),
                        Err(e) => {
                            return Some(Err(BadRecord {
                                line: line_number,
                                reason: format!("cannot read the input: {e}"),
                            }));
                        }
                    };
                    if id.is_empty() {
                        return None;
                    }
                    Some(match EntityId::parse(id) {
                        Ok(id) => Ok((line_number, this.prepare_delete(&entity_type, &id))),
                        Err(e) => Err(BadRecord {
                            line: line_number,
                            reason: e.0,
                        }),
                    })
                })
        });
        while let Some(chunk) = rx.recv().await {
            self.apply_chunk(&chunk, false, &mut summary).await?;
            summary.elapsed = started.elapsed();
            progress(&summary);
        }
        reader.await.context("the reader thread failed")?;
        summary.elapsed = started.elapsed();
        Ok(summary)
    }
}
