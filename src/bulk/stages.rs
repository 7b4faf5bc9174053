//! The stages one by one, as the original library offered them: stash,
//! validate, traject; and listing resources.

use std::time::Instant;

use serde_json::{Map, Value};

use super::{DEFAULT_CHUNK, Resource, Scramjet, Summary, retry_transient};
use crate::{
    api::filter::Filter,
    domain::entity::{EntityId, EntityType},
    pipeline::{self, Prepared, PreparedKind},
    store::{self, StoreError, read, stage::Staged},
};

impl Scramjet {
    /// Stage 1 on its own (the original's stash): writes `records` (id,
    /// entity) of `entity_type` into `staging`, not yet validated
    /// (`is_valid` NULL). Nothing else changes until [`Scramjet::validate`]
    /// and [`Scramjet::traject`] run. Returns how many rows were written.
    pub async fn stash(
        &self,
        entity_type: &str,
        records: &[(String, Map<String, Value>)],
    ) -> anyhow::Result<u64> {
        let entity_type = EntityType::parse(entity_type)?;
        let mut written = 0;
        for chunk in records.chunks(DEFAULT_CHUNK) {
            let mut ids = Vec::with_capacity(chunk.len());
            let mut data = Vec::with_capacity(chunk.len());
            for (id, entity) in chunk {
                EntityId::parse(id.as_str()).map_err(|e| anyhow::anyhow!("id {id:?}: {e}"))?;
                crate::domain::message::check_data(entity, self.limits)
                    .map_err(|e| anyhow::anyhow!("id {id:?}: {e}"))?;
                ids.push(id.as_str());
                data.push(crate::domain::canonical::object_to_canonical(entity));
            }
            let data: Vec<&str> = data.iter().map(String::as_str).collect();
            let client = self.pool.get().await.map_err(StoreError::from)?;
            written += store::stage::stash(&client, &entity_type, &ids, &data).await?;
        }
        Ok(written)
    }

    /// Stage 2 on its own: validates the stashed rows of `entity_type`
    /// (those matching `filter`, when given). A valid row is marked so
    /// (`is_valid` true) and waits for [`Scramjet::traject`]; an invalid
    /// one is rejected as the daemon rejects a save (`is_valid` false, its
    /// errors, a `rejected` event). Counts: `records`, `rejected`.
    pub async fn validate(
        &self,
        entity_type: &str,
        filter: Option<&Filter>,
    ) -> anyhow::Result<Summary> {
        self.stage_pages(
            entity_type,
            Staged::Unvalidated,
            filter,
            |prepared, summary| {
                let (valid, invalid): (Vec<Prepared>, Vec<Prepared>) = prepared
                    .into_iter()
                    .partition(|p| matches!(p.kind, PreparedKind::Save { errors: None, .. }));
                summary.records += (valid.len() + invalid.len()) as u64;
                (valid, invalid)
            },
        )
        .await
    }

    /// Stage 3 on its own: moves the validated rows of `entity_type` (those
    /// matching `filter`, when given) into `resources`, with the daemon's
    /// outcomes and events; their staging rows are cleared. A row no longer
    /// valid under the current schemas is rejected instead.
    pub async fn traject(
        &self,
        entity_type: &str,
        filter: Option<&Filter>,
    ) -> anyhow::Result<Summary> {
        self.stage_pages(entity_type, Staged::Valid, filter, |prepared, summary| {
            summary.records += prepared.len() as u64;
            (Vec::new(), prepared)
        })
        .await
    }

    /// Pages through the staging rows of `entity_type` in `state`. Each page
    /// is one transaction: the keys' advisory locks first (as a daemon batch
    /// takes them, so neither can deadlock the other), then the staging
    /// rows, still in `state`, are locked and read. `split` sorts the page
    /// into rows to mark valid and rows to apply through the pipeline.
    async fn stage_pages(
        &self,
        entity_type: &str,
        state: Staged,
        filter: Option<&Filter>,
        split: impl Fn(Vec<Prepared>, &mut Summary) -> (Vec<Prepared>, Vec<Prepared>),
    ) -> anyhow::Result<Summary> {
        let entity_type = &EntityType::parse(entity_type)?;
        let started = Instant::now();
        let mut summary = Summary::default();
        let mut after = String::new();
        loop {
            let page = retry_transient("a stage page", async || {
                let mut client = self.pool.get().await?;
                let tx = store::begin(&mut client).await?;
                let limit = DEFAULT_CHUNK as i64;
                let ids =
                    store::stage::page_ids(&tx, entity_type, state, filter, &after, limit).await?;
                let Some(last) = ids.last().cloned() else {
                    return Ok(None);
                };
                store::batch::lock_keys(store::Conn::of_tx(&tx), entity_type, &ids).await?;
                let rows = store::stage::lock(&tx, entity_type, &ids, state).await?;
                let mut page = Summary::default();
                let prepared = rows
                    .into_iter()
                    .filter_map(|(id, data)| match data {
                        Value::Object(data) => {
                            let id = EntityId::stored(id);
                            Some(self.prepare_save(entity_type, &id, data, None))
                        }
                        _ => None,
                    })
                    .collect();
                let (mark, apply) = split(prepared, &mut page);
                let marked: Vec<&str> = mark.iter().map(|p| p.id.as_str()).collect();
                store::stage::mark_valid(&tx, entity_type, &marked).await?;
                for outcome in pipeline::process_in_transaction(&tx, &apply).await? {
                    page.count(outcome);
                }
                tx.commit().await?;
                Ok(Some((last, page)))
            })
            .await?;
            let Some((last, page)) = page else { break };
            after = last;
            summary.add(&page);
        }
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// Up to `limit` resources of a type matching `filter` (all when
    /// `None`), in id order after `after`.
    pub async fn list(
        &self,
        entity_type: &str,
        filter: Option<&Filter>,
        after: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<Resource>> {
        let page = read::PageOf {
            entity_type,
            after,
            updated_since: None,
            filter,
            limit,
        };
        Ok(read::resources_page(&self.pool, &page).await?)
    }
}
