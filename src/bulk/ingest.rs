//! Ingesting a feed, and the full-set sync: deleting, behind its guards,
//! what the feed no longer holds.

use std::{io::BufRead, time::Instant};

use anyhow::Context;

use super::{
    DeleteStep, Format, IngestOptions, RecordShape, Records, Scramjet, Summary,
    chunks::chunks_on_a_thread, retry_transient,
};
use crate::{
    domain::entity::{EntityId, EntityType},
    domain::message::{Action, Inbound},
    domain::outcome::Outcome,
    pipeline::{self, Prepared},
    store::{self, StoreError, sync},
};

impl Scramjet {
    /// Ingests `input`: every record is stashed, validated and trajected
    /// as the daemon does a save, in chunks of `options.chunk` records per
    /// transaction. With `full_set`, the resources of the type that were
    /// not in the input are deleted afterwards (see [`IngestOptions`] for
    /// the guards). `progress` is called after every chunk.
    pub async fn ingest(
        &self,
        input: impl BufRead + Send + 'static,
        format: Format,
        options: &IngestOptions,
        mut progress: impl FnMut(&Summary),
    ) -> anyhow::Result<Summary> {
        let entity_type = EntityType::parse(options.entity_type.as_str())?;
        let most = crate::config::MAX_KEYS_PER_TRANSACTION;
        anyhow::ensure!(
            (1..=most).contains(&options.chunk),
            "the chunk size must be from 1 to {most}"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&options.max_delete_ratio),
            "the largest share of deletes must be between 0 and 1"
        );
        let started = Instant::now();
        let mut summary = Summary::default();
        // The sync's own connection holds the seen ids (a temporary table).
        let seen = if options.full_set {
            let client = self.pool.get().await.map_err(StoreError::from)?;
            sync::begin_seen(&client).await?;
            Some(client)
        } else {
            None
        };
        let sync_began = match &seen {
            Some(client) => Some(sync::began(client).await?),
            None => None,
        };

        let schemas = self.schemas.clone();
        let shape = RecordShape {
            id_field: options.id_field.clone(),
            version_field: options.version_field.clone(),
            limits: self.limits,
        };
        // Reading, parsing, validating and hashing run on their own thread,
        // overlapping with the database work of the chunk before.
        let reader_type = entity_type.clone();
        let (reader, mut rx) = chunks_on_a_thread(options.chunk, move || {
            Records::new(input, format, shape).map(move |record| {
                record.map(|r| {
                    let inbound = Inbound {
                        entity_type: reader_type.clone(),
                        id: r.id,
                        version: r.version,
                        action: Action::Save { data: r.data },
                    };
                    (r.line, Prepared::new(inbound, None, None, &schemas))
                })
            })
        });

        while let Some(chunk) = rx.recv().await {
            if let Some(client) = &seen {
                let ids: Vec<&str> = chunk.prepared.iter().map(|p| p.id.as_str()).collect();
                let (recorded, applied) = tokio::join!(
                    sync::add_seen(client, &ids),
                    self.apply_chunk(&chunk, options.dry_run, &mut summary)
                );
                recorded?;
                applied?;
            } else {
                self.apply_chunk(&chunk, options.dry_run, &mut summary)
                    .await?;
            }
            summary.elapsed = started.elapsed();
            progress(&summary);
        }
        reader.await.context("the reader thread failed")?;

        if let (Some(mut client), Some(began)) = (seen, sync_began) {
            let step = self
                .delete_unseen(&mut client, &entity_type, options, &began, &mut summary)
                .await;
            // Back to the pool without the table, whatever happened.
            let ended = sync::end_seen(&client).await;
            summary.deletes = Some(step?);
            ended?;
        }
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// The delete step of a full-set sync, guards first.
    async fn delete_unseen(
        &self,
        client: &mut deadpool_postgres::Client,
        entity_type: &EntityType,
        options: &IngestOptions,
        began: &sync::Began,
        summary: &mut Summary,
    ) -> anyhow::Result<DeleteStep> {
        if summary.bad_count > 0 {
            return Ok(DeleteStep::Refused(format!(
                "{} record(s) could not be read, so the input may be incomplete",
                summary.bad_count
            )));
        }
        if !summary.refused.is_empty() {
            return Ok(DeleteStep::Refused(format!(
                "{} record(s) were refused by the database",
                summary.refused.len()
            )));
        }
        let scope = options.scope.as_ref();
        let unseen = sync::count_unseen(client, entity_type, scope, began).await?;
        let total = sync::count_scope(client, entity_type, scope).await?;
        if summary.records == 0 && unseen > 0 && !options.allow_delete_all {
            return Ok(DeleteStep::Refused(format!(
                "the input is empty; it would delete all {unseen} resource(s) \
                 (use --allow-delete-all to allow it)"
            )));
        }
        let ratio = unseen as f64 / total.max(1) as f64;
        if ratio > options.max_delete_ratio && !options.allow_delete_all {
            return Ok(DeleteStep::Refused(format!(
                "it would delete {unseen} of {total} resource(s) ({:.1} %), more than \
                 --max-delete-ratio {}",
                ratio * 100.0,
                options.max_delete_ratio
            )));
        }
        if options.dry_run {
            return Ok(DeleteStep::WouldDelete(unseen as u64));
        }
        let mut after = String::new();
        let mut done = 0u64;
        loop {
            let (page, outcomes) = self
                .delete_page(client, entity_type, options, began, &after)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            for outcome in outcomes {
                if outcome == Outcome::Deleted {
                    done += 1;
                }
                summary.count(outcome);
            }
        }
        Ok(DeleteStep::Done(done))
    }

    /// One page of the delete step in one transaction: the page's ids, their
    /// keys' advisory locks (before any row's lock, in the order every
    /// writer takes them, so that the step never holds a row a daemon batch
    /// waits for while it waits for that batch's key), those still to
    /// delete, deleted through the pipeline (events, tombstones). Returns
    /// the page's ids, for the next page to start after, and the outcomes.
    /// Retried when the database fails for a moment.
    async fn delete_page(
        &self,
        client: &mut deadpool_postgres::Client,
        entity_type: &EntityType,
        options: &IngestOptions,
        began: &sync::Began,
        after: &str,
    ) -> anyhow::Result<(Vec<String>, Vec<Outcome>)> {
        let (scope, limit) = (options.scope.as_ref(), options.chunk as i64);
        retry_transient("the delete step", async || {
            let tx = store::begin(client).await?;
            let page = sync::unseen_page(&tx, entity_type, scope, began, after, limit).await?;
            if page.is_empty() {
                return Ok((page, Vec::new()));
            }
            store::batch::lock_keys(store::Conn::of_tx(&tx), entity_type, &page).await?;
            let ids = sync::still_unseen(&tx, entity_type, scope, began, &page).await?;
            let prepared: Vec<Prepared> = ids
                .iter()
                .map(|id| self.prepare_delete(entity_type, &EntityId::stored(id.clone())))
                .collect();
            let outcomes = pipeline::process_in_transaction(&tx, &prepared).await?;
            tx.commit().await?;
            Ok((page, outcomes))
        })
        .await
    }
}
