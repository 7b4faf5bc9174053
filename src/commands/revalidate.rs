//! `scramjet revalidate`: after a schema change, validate the rejected rows
//! kept in staging again and traject the ones that now pass, with the same
//! events the daemon publishes.
//!
//! Each page runs in one transaction that reads a page of rejected keys,
//! takes their advisory locks (as every batch does first, in the same
//! order), then reads and locks (`FOR UPDATE`) those of their staging rows
//! still rejected. A newer message for the same id either committed before
//! (it replaced or removed the staging row, which this run then does not
//! see) or waits for this transaction and applies after it, so an old
//! rejected document can never overwrite a newer save; and since no row is
//! held while a key is awaited, it cannot deadlock with a batch. A page the
//! database could not take is retried.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::{
    api::filter::Filter,
    config::Settings,
    domain::entity::{EntityId, EntityType},
    domain::message::{Action, Inbound},
    domain::outcome::Outcome,
    domain::validate::SchemaRegistry,
    pipeline::{self, Prepared},
    store::{self, StoreError},
    support::{backoff::Backoff, retry::Retry},
};

/// The arguments of `scramjet revalidate`.
#[derive(Debug, Clone, clap::Args)]
pub struct RevalidateArgs {
    /// Only this type.
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: Option<String>,
    /// Only rows whose id and data match this filter (docs/filters.md),
    /// e.g. 'age >= 30 and dept in ("a", "b")'.
    #[arg(long = "where", value_name = "FILTER")]
    pub filter: Option<String>,
}

/// `scramjet revalidate`: parses `--where`, then [`revalidate`]s.
pub async fn run(settings: &Settings, args: RevalidateArgs) -> anyhow::Result<()> {
    let filter = super::parse_where(args.filter.as_deref())?;
    revalidate(settings, args.entity_type.as_deref(), filter.as_ref())
        .await
        .map(drop)
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// Rejected rows looked at.
    pub checked: u64,
    /// Rows that now pass and became new resources.
    pub created: u64,
    /// Rows that now pass and changed an existing resource.
    pub updated: u64,
    /// Rows that now pass but changed nothing (the resource already had
    /// that data, or a newer version).
    pub unchanged: u64,
    /// Rows that still fail; they stay in staging as they were.
    pub still_invalid: u64,
}

/// Revalidates the rejected rows of `entity_type` (all types when `None`)
/// whose `id` and `data` match `filter` (all when `None`), against the
/// schemas in `validation.schema_dir`, printing its progress.
pub async fn revalidate(
    settings: &Settings,
    entity_type: Option<&str>,
    filter: Option<&Filter>,
) -> anyhow::Result<Summary> {
    let schemas = crate::bulk::load_schemas(settings)?;
    let pool = store::connect(settings).await?;
    let retry = Retry::new(Backoff::starting_at(
        Duration::from_millis(200),
        Duration::from_secs(5),
    ));
    let summary = revalidate_on(&pool, &schemas, entity_type, filter, retry, |summary| {
        println!(
            "checked {}: {} now valid, {} still invalid",
            summary.checked,
            summary.created + summary.updated + summary.unchanged,
            summary.still_invalid
        )
    })
    .await
    .context("revalidation failed")?;
    println!(
        "done: {} rejected row(s) checked; created {}, updated {}, unchanged {}; {} still invalid",
        summary.checked, summary.created, summary.updated, summary.unchanged, summary.still_invalid
    );
    Ok(summary)
}

/// Revalidates as [`revalidate`] does, on `pool` with `schemas`, one page
/// per transaction; `on_page` gets the totals after each page. A page the
/// database could not take (an outage, a deadlock with the pipeline) is
/// tried again as `retry` allows; once it gives up, the error is returned,
/// and the pages already committed stay committed.
pub(crate) async fn revalidate_on(
    pool: &deadpool_postgres::Pool,
    schemas: &SchemaRegistry,
    entity_type: Option<&str>,
    filter: Option<&Filter>,
    mut retry: Retry,
    mut on_page: impl FnMut(&Summary),
) -> Result<Summary, StoreError> {
    let mut summary = Summary::default();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = loop {
            match page(pool, schemas, entity_type, filter, after.as_ref()).await {
                Err(e @ StoreError::Unavailable { .. }) => {
                    let again = retry
                        .failed(|pause| tracing::warn!(error = %e, retry_in_ms = pause.retry_in_ms(), "revalidation page failed; retrying"))
                        .await;
                    if !again {
                        return Err(e);
                    }
                }
                other => break other?,
            }
        };
        retry.succeeded();
        let Some((last, s)) = page else { break };
        summary.checked += s.checked;
        summary.created += s.created;
        summary.updated += s.updated;
        summary.unchanged += s.unchanged;
        summary.still_invalid += s.still_invalid;
        on_page(&summary);
        after = Some(last);
    }
    Ok(summary)
}

/// Rows per transaction.
const PAGE: i64 = 500;

/// One page: returns the last key seen and what happened, or `None` at the end.
async fn page(
    pool: &deadpool_postgres::Pool,
    schemas: &SchemaRegistry,
    entity_type: Option<&str>,
    filter: Option<&Filter>,
    after: Option<&(String, String)>,
) -> Result<Option<((String, String), Summary)>, StoreError> {
    let mut client = pool.get().await?;
    let tx = store::begin(&mut client).await?;
    // Keys first, as every batch takes them, then the rows: a batch that
    // holds one of these keys and writes its staging row never waits for
    // this transaction while it waits for that batch.
    let keys = store::read::rejected_keys(&tx, entity_type, after, filter, PAGE).await?;
    let Some(last) = keys.last().cloned() else {
        return Ok(None);
    };
    let (types, ids): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
    let type_names: Vec<&str> = types.iter().map(String::as_str).collect();
    store::batch::lock_keys_of(store::Conn::of_tx(&tx), &type_names, &ids).await?;
    let rows = store::read::lock_rejected(&tx, types, ids, filter).await?;
    let mut summary = Summary {
        checked: rows.len() as u64,
        ..Summary::default()
    };
    let mut valid = Vec::new();
    for row in rows {
        let Some(Value::Object(data)) = row.data else {
            summary.still_invalid += 1;
            continue;
        };
        // With the save's own version: a newer one stored meanwhile makes it stale.
        let prepared = Prepared::new(
            Inbound {
                entity_type: EntityType::stored(row.entity_type),
                id: EntityId::stored(row.id),
                version: row.version,
                action: Action::Save { data },
            },
            None,
            None,
            schemas,
        );
        match &prepared.kind {
            pipeline::PreparedKind::Save { errors: None, .. } => valid.push(prepared),
            _ => summary.still_invalid += 1,
        }
    }
    for outcome in pipeline::process_in_transaction(&tx, &valid).await? {
        match outcome {
            Outcome::Created => summary.created += 1,
            Outcome::Updated => summary.updated += 1,
            _ => summary.unchanged += 1,
        }
    }
    tx.commit().await?;
    Ok(Some((last, summary)))
}
