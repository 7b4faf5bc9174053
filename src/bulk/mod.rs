//! Bulk operations, for Rust programs and for `scramjet ingest` and
//! `scramjet delete`: what the original Go library did — stash a feed,
//! validate it, traject the valid records, delete what vanished from a
//! full set — on the same tables and with the same change events as the
//! daemon.
//!
//! Every record goes through the daemon's own [`Pipeline`]: the same
//! validation, canonical hash, row locks, `version` rule, staging rows for
//! rejected records, and events written to the outbox in the same
//! transaction. A running daemon's relay publishes those events (within
//! its poll interval, 1 s), in commit order with its own.
//!
//! # Running beside the daemon
//!
//! Records and daemon messages for the same id are applied under the same
//! row locks (taken in key order, so they cannot deadlock), one transaction
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

pub mod input;

use std::{
    fmt,
    io::BufRead,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use input::{BadRecord, Format, Record, RecordShape, Records};

use crate::{
    api::filter::Filter,
    config::Settings,
    domain::message::{Action, Inbound, Limits},
    domain::outcome::Outcome,
    domain::validate::SchemaRegistry,
    pipeline::{self, Pipeline, Prepared, PreparedKind},
    store::{self, StoreError, read, stage::Staged, sync},
    telemetry::health::Health,
    telemetry::metrics::Metrics,
};

/// Records per transaction.
pub const DEFAULT_CHUNK: usize = 500;

/// Bad records kept for the report; the rest are only counted.
const KEEP_BAD: usize = 100;

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

/// What a bulk operation does.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// The entity type of every record.
    pub entity_type: String,
    /// The field holding each record's id.
    pub id_field: String,
    /// The field holding each record's producer version, if any.
    pub version_field: Option<String>,
    /// Delete the resources of the type that are not in the input.
    pub full_set: bool,
    /// Let a full-set sync of an empty input delete everything.
    pub allow_delete_all: bool,
    /// Refuse a full-set sync that would delete more than this share of
    /// the type's resources.
    pub max_delete_ratio: f64,
    /// Report what would happen; change nothing.
    pub dry_run: bool,
    /// Records per transaction.
    pub chunk: usize,
    /// With `full_set`: the input is the full set of only these resources
    /// (e.g. one department's people); resources outside it are never deleted.
    pub scope: Option<Filter>,
}

impl IngestOptions {
    /// Defaults for `entity_type`: id field `id`, no version, not a full
    /// set, at most half deleted, 500 records per transaction.
    pub fn new(entity_type: impl Into<String>) -> IngestOptions {
        IngestOptions {
            entity_type: entity_type.into(),
            id_field: "id".into(),
            version_field: None,
            full_set: false,
            allow_delete_all: false,
            max_delete_ratio: 0.5,
            dry_run: false,
            chunk: DEFAULT_CHUNK,
            scope: None,
        }
    }
}

/// What a bulk operation did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Good records read.
    pub records: u64,
    /// Saves that created a resource.
    pub created: u64,
    /// Saves that changed a resource.
    pub updated: u64,
    /// Saves that matched the stored hash.
    pub unchanged: u64,
    /// Saves that failed validation (kept in staging, `rejected` events).
    pub rejected: u64,
    /// Saves or deletes with a lower version than the stored one.
    pub stale: u64,
    /// Resources deleted (by `remove`, or by a full-set sync).
    pub deleted: u64,
    /// Deletes of ids that were not stored.
    pub absent: u64,
    /// Records that could not be read, with their lines (the first 100).
    pub bad: Vec<BadRecord>,
    /// How many records could not be read.
    pub bad_count: u64,
    /// Records the database refused, with their lines and reasons.
    pub refused: Vec<BadRecord>,
    /// Records that failed validation, with their lines, ids and first
    /// errors (the first 100; `rejected` counts them all).
    pub rejected_records: Vec<BadRecord>,
    /// In a full-set sync: what the delete step did or why it did not run.
    pub deletes: Option<DeleteStep>,
    /// Time taken.
    pub elapsed: Duration,
}

/// The delete step of a full-set sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteStep {
    /// Ran: this many resources were not in the input.
    Done(u64),
    /// A dry run: this many would have been deleted.
    WouldDelete(u64),
    /// Refused by a guard; nothing was deleted.
    Refused(String),
}

impl Summary {
    /// Whether everything went through: no bad or refused record, no
    /// rejected record, no refused delete step.
    pub fn is_success(&self) -> bool {
        self.bad_count == 0
            && self.refused.is_empty()
            && self.rejected == 0
            && !matches!(self.deletes, Some(DeleteStep::Refused(_)))
    }

    fn count(&mut self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Created => &mut self.created,
            Outcome::Updated => &mut self.updated,
            Outcome::Unchanged => &mut self.unchanged,
            Outcome::Deleted => &mut self.deleted,
            Outcome::Absent => &mut self.absent,
            Outcome::Rejected => &mut self.rejected,
            // Records carry no message id, so no duplicate is possible.
            Outcome::Stale | Outcome::Duplicate => &mut self.stale,
        };
        *counter += 1;
    }

    /// Adds the counts of `other` (a page of a stage).
    fn add(&mut self, other: &Summary) {
        self.records += other.records;
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.rejected += other.rejected;
        self.stale += other.stale;
        self.deleted += other.deleted;
        self.absent += other.absent;
    }

    fn bad(&mut self, bad: BadRecord) {
        self.bad_count += 1;
        if self.bad.len() < KEEP_BAD {
            self.bad.push(bad);
        }
    }

    /// Records (and deletes) handled per second.
    pub fn rate(&self) -> f64 {
        let handled = self.records + self.bad_count + self.deleted + self.absent;
        handled as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One line saying why the save `p` was rejected: its id and first error.
fn rejection(p: &Prepared) -> String {
    let (errors, total) = match &p.kind {
        PreparedKind::Save {
            errors: Some(rejection),
            ..
        } => (rejection.errors.as_slice(), rejection.total),
        _ => (&[][..], 0),
    };
    match errors.first() {
        Some(first) => {
            let path = if first.path.is_empty() {
                "(the document)"
            } else {
                first.path.as_str()
            };
            let more = match total {
                0 | 1 => String::new(),
                n => format!(" (and {} more error(s))", n - 1),
            };
            format!("id {:?} rejected: {path}: {}{more}", p.id, first.message)
        }
        None => format!("id {:?} rejected", p.id),
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records: created {}, updated {}, unchanged {}, rejected {}, stale {}, deleted {}",
            self.records,
            self.created,
            self.updated,
            self.unchanged,
            self.rejected,
            self.stale,
            self.deleted
        )?;
        if self.absent > 0 {
            write!(f, ", not found {}", self.absent)?;
        }
        if self.bad_count > 0 {
            write!(f, "; {} bad record(s)", self.bad_count)?;
        }
        if !self.refused.is_empty() {
            write!(f, "; {} refused by the database", self.refused.len())?;
        }
        match &self.deletes {
            Some(DeleteStep::WouldDelete(n)) => write!(f, "; would delete {n}")?,
            Some(DeleteStep::Refused(why)) => write!(f, "; deletes refused: {why}")?,
            _ => {}
        }
        write!(
            f,
            "; {:.1} s, {:.0} records/s",
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// One chunk from the reader thread: prepared records (with their lines)
/// and the bad ones among them.
struct Chunk {
    prepared: Vec<Prepared>,
    lines: Vec<u64>,
    bad: Vec<BadRecord>,
}

impl Scramjet {
    /// Connects to PostgreSQL (creating and migrating the database when
    /// needed) and loads the schemas.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Scramjet> {
        let schemas = SchemaRegistry::load(
            &settings.validation.schema_dir,
            settings.validation.unknown_types,
            settings.validation.max_errors,
        )?;
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
        entity_type: &str,
        id: &str,
        data: Map<String, Value>,
        version: Option<i64>,
    ) -> Prepared {
        Prepared::new(
            Inbound {
                entity_type: entity_type.to_owned(),
                id: id.to_owned(),
                version,
                action: Action::Save { data },
            },
            None,
            None,
            &self.schemas,
        )
    }

    /// A delete, ready for [`Scramjet::apply`].
    pub fn prepare_delete(&self, entity_type: &str, id: &str) -> Prepared {
        Prepared::new(
            Inbound {
                entity_type: entity_type.to_owned(),
                id: id.to_owned(),
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

    /// Stage 1 on its own (the original's stash): writes `records` (id,
    /// entity) of `entity_type` into `staging`, not yet validated
    /// (`is_valid` NULL). Nothing else changes until [`Scramjet::validate`]
    /// and [`Scramjet::traject`] run. Returns how many rows were written.
    pub async fn stash(
        &self,
        entity_type: &str,
        records: &[(String, Map<String, Value>)],
    ) -> anyhow::Result<u64> {
        crate::domain::message::check_type(entity_type).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut written = 0;
        for chunk in records.chunks(DEFAULT_CHUNK) {
            let mut ids = Vec::with_capacity(chunk.len());
            let mut data = Vec::with_capacity(chunk.len());
            for (id, entity) in chunk {
                crate::domain::message::check_id(id)
                    .map_err(|e| anyhow::anyhow!("id {id:?}: {e}"))?;
                crate::domain::message::check_data(entity, self.limits)
                    .map_err(|e| anyhow::anyhow!("id {id:?}: {e}"))?;
                ids.push(id.as_str());
                data.push(crate::domain::canonical::object_to_canonical(entity));
            }
            let data: Vec<&str> = data.iter().map(String::as_str).collect();
            let client = self.pool.get().await.map_err(StoreError::from)?;
            written += store::stage::stash(&client, entity_type, &ids, &data).await?;
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
        crate::domain::message::check_type(entity_type).map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let mut summary = Summary::default();
        let mut after = String::new();
        loop {
            let page = retry_transient("a stage page", async || {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let limit = DEFAULT_CHUNK as i64;
                let ids =
                    store::stage::page_ids(&tx, entity_type, state, filter, &after, limit).await?;
                let Some(last) = ids.last().cloned() else {
                    return Ok(None);
                };
                let keys: Vec<(String, String)> = ids
                    .iter()
                    .map(|id| (entity_type.to_owned(), id.clone()))
                    .collect();
                store::batch::lock_keys(&tx, &keys).await?;
                let rows = store::stage::lock(&tx, entity_type, &ids, state).await?;
                let mut page = Summary::default();
                let prepared = rows
                    .into_iter()
                    .filter_map(|(id, data)| match data {
                        Value::Object(data) => {
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
    ) -> anyhow::Result<Vec<read::Resource>> {
        Ok(read::resources_page(&self.pool, entity_type, after, None, filter, limit).await?)
    }

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
        crate::domain::message::check_type(entity_type).map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let mut summary = Summary::default();
        let this = self.clone();
        let entity_type_owned = entity_type.to_owned();
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
                    Some(match crate::domain::message::check_id(&id) {
                        Ok(()) => Ok((line_number, this.prepare_delete(&entity_type_owned, &id))),
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
        crate::domain::message::check_type(&options.entity_type)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
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
        let entity_type = options.entity_type.clone();
        // Reading, parsing, validating and hashing run on their own thread,
        // overlapping with the database work of the chunk before.
        let (reader, mut rx) = chunks_on_a_thread(options.chunk, move || {
            Records::new(input, format, shape).map(move |record| {
                record.map(|r| {
                    let inbound = Inbound {
                        entity_type: entity_type.clone(),
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
                .delete_unseen(&mut client, options, &began, &mut summary)
                .await;
            // Back to the pool without the table, whatever happened.
            let ended = sync::end_seen(&client).await;
            summary.deletes = Some(step?);
            ended?;
        }
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// Applies one chunk (or, in a dry run, applies and rolls back) and
    /// counts the outcomes.
    async fn apply_chunk(
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
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let outcomes = pipeline::process_in_transaction(&tx, prepared).await?;
        tx.rollback().await.map_err(StoreError::from)?;
        Ok(outcomes)
    }

    /// The delete step of a full-set sync, guards first.
    async fn delete_unseen(
        &self,
        client: &mut deadpool_postgres::Client,
        options: &IngestOptions,
        began: &sync::Began,
        summary: &mut Summary,
    ) -> anyhow::Result<DeleteStep> {
        let entity_type = options.entity_type.as_str();
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
            let (ids, outcomes) = self.delete_page(client, options, began, &after).await?;
            let Some(last) = ids.last() else { break };
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

    /// One page of the delete step in one transaction: lock the rows, then
    /// delete them through the pipeline (events, tombstones). Retried when
    /// the database fails for a moment or a deadlock with the daemon is
    /// broken.
    async fn delete_page(
        &self,
        client: &mut deadpool_postgres::Client,
        options: &IngestOptions,
        began: &sync::Began,
        after: &str,
    ) -> anyhow::Result<(Vec<String>, Vec<Outcome>)> {
        let entity_type = options.entity_type.as_str();
        let (scope, limit) = (options.scope.as_ref(), options.chunk as i64);
        retry_transient("the delete step", async || {
            let tx = client.transaction().await?;
            let ids = sync::lock_unseen_page(&tx, entity_type, scope, began, after, limit).await?;
            let prepared: Vec<Prepared> = ids
                .iter()
                .map(|id| self.prepare_delete(entity_type, id))
                .collect();
            let outcomes = pipeline::process_in_transaction(&tx, &prepared).await?;
            tx.commit().await?;
            Ok((ids, outcomes))
        })
        .await
    }
}

/// Runs `attempt` until it succeeds or fails for good: a transient database
/// error (a lost connection, a deadlock broken by PostgreSQL) is retried
/// with a growing, jittered pause.
async fn retry_transient<T>(
    what: &str,
    mut attempt: impl AsyncFnMut() -> Result<T, StoreError>,
) -> anyhow::Result<T> {
    let mut delay = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(reason @ StoreError::Unavailable { .. }) => {
                tracing::warn!(%reason, "{what} failed for a moment; retrying");
                tokio::time::sleep(crate::support::backoff::jitter(delay)).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(StoreError::Refused { detail, .. }) => anyhow::bail!("{what} failed: {detail}"),
        }
    }
}

/// Runs `records` (made on the thread, where the reading happens) on a
/// blocking thread and hands them over in chunks of `size` good records.
/// At most two chunks wait, so a fast reader never runs far ahead.
fn chunks_on_a_thread<I>(
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
