//! Bulk operations, for Rust programs and for `scramjet ingest` and
//! `scramjet delete`: what the original Go library did — stash a feed,
//! validate it, traject the valid records, delete what vanished from a
//! full set — on the same tables and with the same change events as the
//! daemon.
//!
//! Every record goes through the daemon's own [`Pipeline`]: the same
//! validation, canonical hash, key locks, `version` rule, staging rows for
//! rejected records, and events written to the outbox in the same
//! transaction. A running daemon's relay publishes those events (within
//! its poll interval, 1 s), in commit order with its own.
//!
//! # Running beside the daemon
//!
//! Records and daemon messages for the same id are applied under the same
//! advisory key locks (taken in key order, before any row lock, so they
//! cannot deadlock), one transaction
//! after the other: whichever commits last wins, and with versions
//! (`version_field`) the higher version wins whatever the order, exactly as
//! for messages (CONTRACT §4). A full-set sync deletes only resources that
//! were neither in the input nor written by a transaction that committed
//! after the sync began: a save the daemon commits during the sync is never
//! deleted by it, even when its transaction started before the sync.
//!
//! # Example
//!
//! ```no_run
//! use scramjet::bulk::{Format, IngestOptions, Scramjet};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let settings = scramjet::config::Settings::load(None)?;
//! let scramjet = Scramjet::connect(&settings).await?;
//!
//! // A nightly full set, scoped to one department.
//! let feed = std::io::BufReader::new(std::fs::File::open("physics.csv")?);
//! let options = IngestOptions {
//!     full_set: true,
//!     scope: Some(scramjet::api::filter::parse(r#"dept = "physics""#)?),
//!     ..IngestOptions::new("person")
//! };
//! let summary = scramjet.ingest(feed, Format::Csv, &options, |_| {}).await?;
//! println!("{summary}");
//!
//! // The stages one by one, as the original library allowed.
//! let record = serde_json::json!({"name": "Ada"}).as_object().unwrap().clone();
//! scramjet.stash("person", &[("p1".to_owned(), record)]).await?;
//! scramjet.validate("person", None).await?;
//! let physics = scramjet::api::filter::parse(r#"dept = "physics""#)?;
//! scramjet.traject("person", Some(&physics)).await?;
//! for resource in scramjet.list("person", Some(&physics), None, 100).await? {
//!     println!("{} {}", resource.id, resource.hash);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The guide, with the guards and the rule for running beside the daemon,
//! is `docs/bulk.md`.

mod chunks;
mod ingest;
pub mod input;
mod options;
mod remove;
mod stages;
mod summary;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use crate::store::read::Resource;
pub use input::{BadRecord, Format, Record, RecordShape, Records};
pub use options::IngestOptions;
pub use summary::{DeleteStep, Summary};

use crate::{
    config::Settings,
    domain::entity::{EntityId, EntityType},
    domain::message::{Action, Inbound, Limits},
    domain::validate::SchemaRegistry,
    pipeline::{self, Pipeline, Prepared},
    store::{self, StoreError},
    support::{backoff::Backoff, retry::Retry},
    telemetry::health::Health,
    telemetry::metrics::Metrics,
};

/// Records per transaction.
pub const DEFAULT_CHUNK: usize = 500;

/// A handle on a Scramjet database: the operations of the original
/// library, as a Rust API.
#[derive(Clone)]
pub struct Scramjet {
    /// Connections (created and migrated on connect).
    pool: Pool,
    /// The daemon's pipeline, used for every write.
    pipeline: Pipeline,
    /// Schemas from `validation.schema_dir`.
    schemas: Arc<SchemaRegistry>,
    /// Size and depth limits for records.
    limits: Limits,
}

impl Scramjet {
    /// Connects to PostgreSQL (creating and migrating the database when
    /// needed) and loads the schemas.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Scramjet> {
        let schemas = load_schemas(settings)?;
        let pool = store::connect(settings).await?;
        let metrics = Metrics::new();
        let health = Arc::new(Health::new(&metrics));
        Ok(Scramjet {
            pipeline: Pipeline::new(pool.clone(), health, metrics),
            pool,
            schemas: Arc::new(schemas),
            limits: settings.limits.decoder_limits(),
        })
    }

    /// The connection pool, for callers that need more.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Validates and hashes a save, ready for [`Scramjet::apply`].
    pub fn prepare_save(
        &self,
        entity_type: &EntityType,
        id: &EntityId,
        data: Map<String, Value>,
        version: Option<i64>,
    ) -> Prepared {
        Prepared::new(
            Inbound {
                entity_type: entity_type.clone(),
                id: id.clone(),
                version,
                action: Action::Save { data },
            },
            None,
            None,
            &self.schemas,
        )
    }

    /// A delete, ready for [`Scramjet::apply`].
    pub fn prepare_delete(&self, entity_type: &EntityType, id: &EntityId) -> Prepared {
        Prepared::new(
            Inbound {
                entity_type: entity_type.clone(),
                id: id.clone(),
                version: None,
                action: Action::Delete,
            },
            None,
            None,
            &self.schemas,
        )
    }

    /// Stashes, validates and trajects `prepared` in one transaction, in
    /// order, exactly as the daemon does a batch of messages: one outcome
    /// per record, or the database's reason for refusing it.
    pub async fn apply(&self, prepared: &[Prepared]) -> anyhow::Result<pipeline::Results> {
        self.pipeline
            .process(prepared, &CancellationToken::new())
            .await
            .context("interrupted")
    }
}

/// Runs `attempt` until it succeeds or fails for good: a transient database
/// error (a lost connection, a deadlock broken by PostgreSQL) is retried
/// with a growing, jittered pause.
async fn retry_transient<T>(
    what: &str,
    mut attempt: impl AsyncFnMut() -> Result<T, StoreError>,
) -> anyhow::Result<T> {
    let mut retry = Retry::new(Backoff::starting_at(
        Duration::from_millis(100),
        Duration::from_secs(5),
    ));
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(reason @ StoreError::Unavailable { .. }) => {
                retry
                    .failed(|_| tracing::warn!(%reason, "{what} failed for a moment; retrying"))
                    .await;
            }
            Err(StoreError::Refused { detail, .. }) => anyhow::bail!("{what} failed: {detail}"),
        }
    }
}

/// The schemas of `validation.schema_dir`, loaded with the other
/// `validation` settings (also for `scramjet revalidate`).
pub(crate) fn load_schemas(settings: &Settings) -> anyhow::Result<SchemaRegistry> {
    Ok(SchemaRegistry::load(
        &settings.validation.schema_dir,
        settings.validation.unknown_types,
        settings.validation.max_errors,
    )?)
}
