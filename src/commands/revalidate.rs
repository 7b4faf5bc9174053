//! `scramjet revalidate`: after a schema change, validate the rejected rows
//! kept in staging again and traject the ones that now pass, with the same
//! events the daemon publishes.
//!
//! Each page runs in one transaction that first locks its staging rows
//! (`FOR UPDATE`). A newer message for the same id either committed before
//! (it replaced or removed the staging row, which this run then does not
//! see) or waits for this transaction and applies after it, so an old
//! rejected document can never overwrite a newer save. A deadlock with the
//! live pipeline is retried.

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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Rejected rows looked at.
    pub checked: u64,
    /// Rows that now pass, by what trajecting them did.
    pub created: u64,
    /// …
    pub updated: u64,
    /// …
    pub unchanged: u64,
    /// Rows that still fail; they stay in staging as they were.
    pub still_invalid: u64,
}

/// Revalidates the rejected rows of `entity_type` (all types when `None`)
/// whose `id` and `data` match `filter` (all when `None`).
pub async fn revalidate(
    settings: &Settings,
    entity_type: Option<&str>,
    filter: Option<&Filter>,
) -> anyhow::Result<Summary> {
    let schemas = crate::bulk::load_schemas(settings)?;
    let pool = store::connect(settings).await?;
    let mut summary = Summary::default();
    let mut after: Option<(String, String)> = None;
    let mut retry = Retry::new(Backoff::starting_at(
        Duration::from_millis(200),
        Duration::from_secs(5),
    ));
    loop {
        let page = loop {
            match page(&pool, &schemas, entity_type, filter, after.as_ref()).await {
                Err(e @ StoreError::Unavailable { .. }) => {
                    retry
                        .failed(|pause| tracing::warn!(error = %e, retry_in_ms = pause.retry_in_ms(), "revalidation page failed; retrying"))
                        .await;
                }
                other => break other.context("revalidation failed")?,
            }
        };
        let Some((last, s)) = page else { break };
        summary.checked += s.checked;
        summary.created += s.created;
        summary.updated += s.updated;
        summary.unchanged += s.unchanged;
        summary.still_invalid += s.still_invalid;
        println!(
            "checked {}: {} now valid, {} still invalid",
            summary.checked,
            summary.created + summary.updated + summary.unchanged,
            summary.still_invalid
        );
        after = Some(last);
    }
    println!(
        "done: {} rejected row(s) checked; created {}, updated {}, unchanged {}; {} still invalid",
        summary.checked, summary.created, summary.updated, summary.unchanged, summary.still_invalid
    );
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
    let rows = store::read::lock_rejected(&tx, entity_type, after, filter, PAGE).await?;
    let Some(last) = rows.last().map(|r| (r.entity_type.clone(), r.id.clone())) else {
        return Ok(None);
    };
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
