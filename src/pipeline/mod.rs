//! One batch of well-formed messages → per-message outcomes, in one transaction.
//!
//! The batch's effect equals applying its messages one at a time in queue
//! order (CONTRACT §3): [`plan`] walks them in order against the locked
//! current rows, keeping the evolving state of each (type, id) in memory, and
//! yields every message's outcome, the events, and the batch's *net* writes,
//! which [`crate::store::batch::apply`] then performs with one set-based
//! statement each. A stash-then-clear of a staging row inside one transaction
//! is invisible to everyone else, so only the net staging change is written.

use std::{collections::HashMap, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{
    domain::canonical,
    domain::event::{self, Event, EventFields, Op},
    domain::message::{Action, Inbound},
    domain::outcome::Outcome,
    domain::validate::{Rejection, SchemaRegistry},
    store::{
        Cause, StoreError,
        batch::{self, Current, Key, ResourceWrite, StagingInvalid, TransactionStatus, Writes},
    },
    support::panic::panic_text,
};

/// A message made ready for the database: hashed and validated, outside any transaction.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Producer version, if sent.
    pub version: Option<i64>,
    /// The inbound AMQP `correlation_id`, copied onto events.
    pub correlation_id: Option<String>,
    /// The inbound AMQP `message_id`, for duplicate detection.
    pub message_id: Option<String>,
    /// What to do.
    pub kind: PreparedKind,
}

/// The prepared operation.
#[derive(Debug, Clone)]
pub enum PreparedKind {
    /// A save.
    Save {
        /// The document.
        data: Value,
        /// Its canonical text (stored, published, hashed).
        canonical: String,
        /// SHA-256 of `canonical`.
        hash: String,
        /// Why it is invalid; `None` when valid.
        errors: Option<Rejection>,
    },
    /// A delete.
    Delete,
}

impl Prepared {
    /// Hashes and validates a decoded message.
    pub fn new(
        inbound: Inbound,
        correlation_id: Option<String>,
        message_id: Option<String>,
        schemas: &SchemaRegistry,
    ) -> Self {
        let kind = match inbound.action {
            Action::Save { data } => {
                let canonical = canonical::object_to_canonical(&data);
                let hash = canonical::hash(&canonical);
                let data = Value::Object(data);
                let errors = schemas.validate(&inbound.entity_type, &data).err();
                PreparedKind::Save {
                    data,
                    canonical,
                    hash,
                    errors,
                }
            }
            Action::Delete => PreparedKind::Delete,
        };
        Prepared {
            entity_type: inbound.entity_type,
            id: inbound.id,
            version: inbound.version,
            correlation_id,
            message_id,
            kind,
        }
    }

    fn key(&self) -> Key {
        (self.entity_type.clone(), self.id.clone())
    }
}

/// The state of one (type, id) while a batch is planned.
struct KeyState<'a> {
    /// Whether `resources` held the key when the batch started.
    existed: bool,
    /// The row as it stands after the messages planned so far.
    now: Option<Row<'a>>,
    /// The tombstone version when the batch started.
    initial_tombstone: Option<i64>,
    /// The tombstone version after the messages planned so far.
    tombstone: Option<i64>,
    /// Whether `now` differs from the stored row and must be written.
    dirty: bool,
    /// Whether a message of the batch deleted a row that existed at the start.
    deleted_initial: bool,
    /// The rejected save whose staging row must remain, if the key's last message was one.
    staging: Option<&'a Prepared>,
    /// Whether any message of the batch took effect on the key (stale and
    /// duplicate messages leave staging alone).
    touched: bool,
}

impl KeyState<'_> {
    /// The highest version known for the key: the row's, else the tombstone's.
    fn known_version(&self) -> Option<i64> {
        match &self.now {
            Some(row) => row.version,
            None => self.tombstone,
        }
    }
}

/// A `resources` row during planning, borrowed from the stored row or a message.
#[derive(Clone, Copy)]
struct Row<'a> {
    hash: &'a str,
    data: &'a Value,
    /// The canonical text when the row comes from a message (it is written as is).
    canonical: Option<&'a str>,
    version: Option<i64>,
}

/// Plans a batch: outcomes per message (same order), and the net writes.
///
/// `duplicate[i]` says that message `i` carries a `message_id` already
/// processed; it is skipped. A message whose `version` is lower than the
/// key's known version (row or tombstone) is stale and skipped too.
pub fn plan(
    prepared: &[Prepared],
    duplicate: &[bool],
    current: &Current,
    occurred_at: &str,
) -> (Writes, Vec<Outcome>) {
    let mut order: Vec<Key> = Vec::new();
    let mut states: HashMap<Key, KeyState<'_>> = HashMap::new();
    let mut writes = Writes::default();
    let mut outcomes = Vec::with_capacity(prepared.len());

    for (p, &is_duplicate) in prepared.iter().zip(duplicate) {
        if is_duplicate {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        let key = p.key();
        let state = states.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            let now = current.rows.get(&key).map(|c| Row {
                hash: &c.hash,
                data: &c.data,
                canonical: None,
                version: c.version,
            });
            let tombstone = current.tombstones.get(&key).copied();
            KeyState {
                existed: now.is_some(),
                now,
                initial_tombstone: tombstone,
                tombstone,
                dirty: false,
                deleted_initial: false,
                staging: None,
                touched: false,
            }
        });
        if let (Some(v), Some(known)) = (p.version, state.known_version())
            && v < known
        {
            outcomes.push(Outcome::Stale);
            continue;
        }
        state.touched = true;
        let event = |op, fields| {
            Event::new(
                op,
                &p.entity_type,
                &p.id,
                fields,
                occurred_at,
                p.correlation_id.clone(),
            )
        };
        let outcome = match &p.kind {
            PreparedKind::Save {
                canonical,
                hash,
                errors: Some(errors),
                ..
            } => {
                writes.events.push(event(
                    Op::Rejected,
                    EventFields {
                        data: Some(canonical),
                        hash: Some(hash),
                        errors: Some(&errors.errors),
                        errors_total: Some(errors.total),
                        version: p.version,
                        ..Default::default()
                    },
                ));
                state.staging = Some(p);
                Outcome::Rejected
            }
            PreparedKind::Save {
                data,
                canonical,
                hash,
                errors: None,
            } => {
                state.staging = None;
                // A message without a version keeps the version already known.
                let version = p.version.or(state.known_version());
                let new = Row {
                    hash,
                    data,
                    canonical: Some(canonical),
                    version,
                };
                let outcome = match state.now {
                    None => {
                        writes.events.push(event(
                            Op::Created,
                            EventFields {
                                data: Some(canonical),
                                hash: Some(hash),
                                version: p.version,
                                ..Default::default()
                            },
                        ));
                        state.dirty = true;
                        state.tombstone = None;
                        Outcome::Created
                    }
                    Some(old) if old.hash == hash.as_str() => {
                        // Same content: the row stays as it is (data, hash,
                        // updated_at), but a higher version is still kept,
                        // so that a later stale message stays stale. The
                        // version alone is written at the end, unless the
                        // row is written whole anyway.
                        Outcome::Unchanged
                    }
                    Some(old) => {
                        let patch = json_patch::diff(old.data, data);
                        writes.events.push(event(
                            Op::Updated,
                            EventFields {
                                data: Some(canonical),
                                hash: Some(hash),
                                previous_hash: Some(old.hash),
                                patch: Some(&patch),
                                version: p.version,
                                ..Default::default()
                            },
                        ));
                        state.dirty = true;
                        Outcome::Updated
                    }
                };
                state.now = Some(new);
                outcome
            }
            PreparedKind::Delete => {
                state.staging = None;
                // Remember the highest version seen, so a stale save cannot revive the entity.
                let known = state.known_version();
                let tombstone = match (p.version, known) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                state.tombstone = tombstone;
                match state.now.take() {
                    Some(old) => {
                        writes.events.push(event(
                            Op::Deleted,
                            EventFields {
                                previous_hash: Some(old.hash),
                                previous: Some(old.data),
                                version: p.version,
                                ..Default::default()
                            },
                        ));
                        state.deleted_initial |= state.existed;
                        state.dirty = false;
                        Outcome::Deleted
                    }
                    None => Outcome::Absent,
                }
            }
        };
        outcomes.push(outcome);
    }

    for key in order {
        let state = states.remove(&key).expect("every ordered key has a state");
        if !state.touched {
            continue;
        }
        if state.existed && (state.now.is_none() || state.deleted_initial) {
            writes.resource_deletes.push(key.clone());
        }
        if let Some(row) = state.now
            && !state.dirty
            && !state.deleted_initial
            && let Some(version) = row.version
            && current
                .rows
                .get(&key)
                .is_some_and(|c| c.version != row.version)
        {
            writes.version_updates.push((key.clone(), version));
        }
        if let Some(row) = state.now
            && (state.dirty || state.deleted_initial)
        {
            writes.resource_upserts.push(ResourceWrite {
                entity_type: key.0.clone(),
                id: key.1.clone(),
                hash: row.hash.to_owned(),
                canonical: row
                    .canonical
                    .map_or_else(|| canonical::to_canonical(row.data), str::to_owned),
                version: row.version,
            });
        }
        match (
            state.now.is_some(),
            state.initial_tombstone,
            state.tombstone,
        ) {
            (true, Some(_), _) => writes.tombstone_deletes.push(key.clone()),
            (false, initial, Some(v)) if initial != Some(v) => {
                writes.tombstone_upserts.push((key.clone(), v));
            }
            _ => {}
        }
        match state.staging {
            Some(p) => {
                let PreparedKind::Save {
                    canonical,
                    errors: Some(errors),
                    ..
                } = &p.kind
                else {
                    unreachable!("only rejected saves leave a staging row");
                };
                writes.staging_invalid.push(StagingInvalid {
                    entity_type: key.0,
                    id: key.1,
                    canonical: canonical.clone(),
                    errors: errors.staging_json(),
                    version: p.version,
                });
            }
            None => writes.staging_clears.push(key),
        }
    }
    (writes, outcomes)
}

/// The pipeline was asked to stop while a batch waited for the database;
/// the batch was not committed and must not be acked.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by shutdown before the batch was committed")]
pub struct Interrupted;

/// What happened to each message of a batch: an outcome, or the database's
/// reason for refusing it (the message is then dead-lettered).
pub type Results = Vec<Result<Outcome, String>>;

/// Applies batches to PostgreSQL.
#[derive(Clone)]
pub struct Pipeline {
    /// Connections for batch transactions.
    pool: Pool,
    /// Set false while the database is failing, for `/readyz`.
    health: Arc<crate::telemetry::health::Health>,
    /// Counts database reconnections.
    metrics: crate::telemetry::metrics::Metrics,
    /// The broker session whose deliveries this pipeline commits, if any.
    session: Option<Arc<Session>>,
}

/// A consumer's broker session, as the pipeline needs to know it: a batch
/// whose session has ended must not commit, since the broker redelivers its
/// messages to another consumer, which may already have applied them and
/// newer ones.
#[derive(Debug)]
pub struct Session {
    /// The queue consumed; `consumer_epochs` is keyed by it.
    queue: String,
    /// The epoch registered by the session's first committed batch.
    epoch: std::sync::Mutex<Option<i64>>,
    /// Cancelled when the broker connection or channel of the session is lost.
    lost: CancellationToken,
}

impl Session {
    /// A session on `queue` that ends when `lost` is cancelled.
    pub fn new(queue: &str, lost: CancellationToken) -> Session {
        Session {
            queue: queue.to_owned(),
            epoch: std::sync::Mutex::new(None),
            lost,
        }
    }

    fn epoch(&self) -> Option<i64> {
        *self.epoch.lock().expect("never poisoned")
    }

    fn registered(&self, epoch: Option<i64>) {
        *self.epoch.lock().expect("never poisoned") = epoch;
    }

    /// What the next batch does at the fence.
    fn fence(&self) -> batch::Fence<'_> {
        match self.epoch() {
            None => batch::Fence::Register(&self.queue),
            Some(_) => batch::Fence::Check(&self.queue),
        }
    }
}

/// The name under which the pipeline reports its outages to [`crate::telemetry::health::Health`].
const WORKER: &str = "pipeline";

/// Longest pause between two attempts at a batch during an outage.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// How one call of [`Pipeline::apply_retrying`] ended.
enum Applied {
    /// Committed, with each message's outcome (or, applied
    /// [`Mode::EachAlone`], the refusal of the ones that were rolled back).
    Done(Vec<Result<Outcome, Refusal>>),
    /// Refused for its data, as a whole ([`Mode::Together`]).
    Refused(Refusal),
    /// Too big to go through now (a statement timeout): try halves.
    TooBig,
}

/// How a batch's messages share its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Set-based statements for the whole batch: the fast path.
    Together,
    /// One message at a time, each in a savepoint, in one transaction: a
    /// message the database refuses is rolled back alone. One transaction,
    /// so that the environment cannot change half-way (a dropped constraint
    /// waits for it), and the batch commits once.
    EachAlone,
}

/// The database's reason for refusing a message, and its SQLSTATE.
#[derive(Debug)]
struct Refusal {
    sqlstate: Option<String>,
    reason: String,
}

impl Pipeline {
    /// A pipeline over `pool`.
    pub fn new(
        pool: Pool,
        health: Arc<crate::telemetry::health::Health>,
        metrics: crate::telemetry::metrics::Metrics,
    ) -> Self {
        Self {
            pool,
            health,
            metrics,
            session: None,
        }
    }

    /// The pipeline of a consumer's broker `session`: its batches pass the
    /// fence of `consumer_epochs`, and none commits once the session is lost.
    pub fn for_session(mut self, session: Session) -> Self {
        self.session = Some(Arc::new(session));
        self
    }

    /// Whether the broker session (if any) has ended.
    fn session_lost(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.lost.is_cancelled())
    }

    /// Applies `prepared` in one transaction. What the environment causes —
    /// a lost connection, a read-only database, a revoked privilege, … — is
    /// an outage: the batch waits and retries in place (never by
    /// requeueing, which would break per-id order), with `/readyz` 503 and
    /// the outage counted. A batch a statement timeout stops is applied in
    /// halves, in order. If the database refuses the batch for its data,
    /// the messages are applied one by one so that only the offending ones
    /// fail — unless every one fails with the same SQLSTATE, which says the
    /// cause is not in the messages: an outage too.
    pub async fn process(
        &self,
        prepared: &[Prepared],
        shutdown: &CancellationToken,
    ) -> Result<Results, Interrupted> {
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let mut backoff = crate::support::backoff::Backoff::new(RETRY_CAP);
        loop {
            let refusal = match self
                .apply_retrying(prepared, Mode::Together, shutdown)
                .await?
            {
                Applied::Done(results) => return Ok(results_of(results)),
                Applied::TooBig => {
                    let (first, second) = prepared.split_at(prepared.len() / 2);
                    tracing::warn!(
                        size = prepared.len(),
                        "a statement timeout stopped the batch; applying it in two halves"
                    );
                    let mut results = Box::pin(self.process(first, shutdown)).await?;
                    results.extend(Box::pin(self.process(second, shutdown)).await?);
                    return Ok(results);
                }
                Applied::Refused(refusal) if prepared.len() == 1 => {
                    return Ok(vec![Err(refusal.reason)]);
                }
                Applied::Refused(refusal) => refusal,
            };
            tracing::warn!(
                size = prepared.len(),
                reason = %refusal.reason,
                "database refused a batch; applying its messages one by one"
            );
            let results = match self
                .apply_retrying(prepared, Mode::EachAlone, shutdown)
                .await?
            {
                Applied::Done(results) => results,
                Applied::Refused(_) | Applied::TooBig => {
                    unreachable!("applied one by one, refusals are per message")
                }
            };
            let first = results.iter().find_map(|r| r.as_ref().err());
            let all_alike = first.is_some_and(|first| {
                first.sqlstate.is_some()
                    && results
                        .iter()
                        .all(|r| r.as_ref().is_err_and(|e| e.sqlstate == first.sqlstate))
            });
            let Some(first) = first.filter(|_| all_alike) else {
                return Ok(results_of(results));
            };
            // Nothing was committed but the (empty) transaction: every
            // message was refused, so the cause is not in the messages.
            let detail = format!(
                "every message of a batch of {} was refused with SQLSTATE {}: {}",
                prepared.len(),
                first.sqlstate.as_deref().unwrap_or_default(),
                first.reason
            );
            self.wait_out(
                &StoreError::unavailable(Cause::RefusedAll, detail),
                &mut backoff,
                shutdown,
            )
            .await?;
        }
    }

    /// Applies `prepared` in one transaction, waiting out outages. Returns
    /// the outcomes, the data's refusal, or — for a batch of several
    /// messages that a statement timeout stopped — that it is too big.
    async fn apply_retrying(
        &self,
        prepared: &[Prepared],
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> Result<Applied, Interrupted> {
        let mut backoff = crate::support::backoff::Backoff::new(RETRY_CAP);
        // A transaction whose COMMIT was sent but not answered: it may have
        // committed. Applying the batch again would then repeat its changes
        // as events (a save A then B replayed over B publishes B→A→B), so
        // its fate is looked up first — on the same server, the only one
        // whose answer about that transaction id means anything.
        let mut unsettled: Option<Unsettled> = None;
        loop {
            let attempt = match unsettled.take() {
                Some(u) => match self.settle(&u).await {
                    Ok(TransactionStatus::Committed) => {
                        tracing::info!(
                            xid = u.xid,
                            "the batch's COMMIT had gone through; not applying it again"
                        );
                        if let (Some(session), Some(epoch)) = (&self.session, u.registered) {
                            session.registered(Some(epoch));
                        }
                        Ok(u.outcomes)
                    }
                    Ok(TransactionStatus::Aborted) => self.apply_once(prepared, mode).await,
                    Ok(TransactionStatus::InProgress) => {
                        let xid = u.xid;
                        unsettled = Some(u);
                        Err(Attempt::Failed(StoreError::unavailable(
                            Cause::CommitUnknown,
                            format!("transaction {xid} is still finishing"),
                        )))
                    }
                    Err(e) => {
                        unsettled = Some(u);
                        Err(Attempt::Failed(e))
                    }
                },
                None => self.apply_once(prepared, mode).await,
            };
            let error = match attempt {
                Ok(outcomes) => {
                    self.health.set_postgres(true);
                    self.health.recovered(WORKER);
                    return Ok(Applied::Done(outcomes));
                }
                Err(Attempt::Failed(e)) => e,
                Err(Attempt::Abandoned(why)) => {
                    tracing::warn!(%why, "batch abandoned, not committed; the broker redelivers it");
                    return Err(Interrupted);
                }
                Err(Attempt::CommitUnknown(u, reason)) => {
                    unsettled = Some(u);
                    StoreError::unavailable(Cause::CommitUnknown, reason)
                }
            };
            match error {
                StoreError::Refused { sqlstate, detail } if mode == Mode::Together => {
                    return Ok(Applied::Refused(Refusal {
                        sqlstate,
                        reason: detail,
                    }));
                }
                // Applied one by one, a refusal belongs to no message (a
                // deferred constraint at COMMIT, say): wait it out.
                StoreError::Refused { detail, .. } => {
                    let outage = StoreError::unavailable(Cause::RefusedAll, detail);
                    self.wait_out(&outage, &mut backoff, shutdown).await?
                }
                StoreError::Unavailable { cause, detail }
                    if cause.shrinks()
                        && mode == Mode::Together
                        && prepared.len() > 1
                        && unsettled.is_none() =>
                {
                    self.health
                        .outage(WORKER, "postgres", cause.as_str(), &detail);
                    return Ok(Applied::TooBig);
                }
                outage => self.wait_out(&outage, &mut backoff, shutdown).await?,
            }
        }
    }

    /// Reports `error` (an outage, or a conflict worth no report) and
    /// sleeps before the next attempt, unless shutdown comes first.
    async fn wait_out(
        &self,
        error: &StoreError,
        backoff: &mut crate::support::backoff::Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let delay = backoff.next_delay();
        if let StoreError::Unavailable { cause, detail } = error
            && cause.is_outage()
        {
            // The connection is gone (a COMMIT goes unanswered when it drops).
            if matches!(cause, Cause::Connection | Cause::CommitUnknown) {
                self.health.set_postgres(false);
                self.metrics
                    .reconnects
                    .with_label_values(&["postgres"])
                    .inc();
            }
            self.health
                .outage(WORKER, "postgres", cause.as_str(), detail);
        }
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "database unavailable; the batch waits and retries");
        let lost = async {
            match &self.session {
                Some(s) => s.lost.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => Err(Interrupted),
            _ = lost => {
                tracing::warn!("the broker session ended while the batch waited; abandoning it (the broker redelivers it)");
                Err(Interrupted)
            }
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// What became of the transaction of `u`. Never the data's fault: any
    /// error here is an outage, and an answer from another server (a
    /// failover) is no answer.
    async fn settle(&self, u: &Unsettled) -> Result<TransactionStatus, StoreError> {
        let client = self.pool.get().await?;
        let answer = settled(u, batch::transaction_status(&client, u.xid).await);
        if answer
            .as_ref()
            .err()
            .is_some_and(StoreError::retires_connection)
        {
            drop(deadpool_postgres::Object::take(client));
        }
        answer
    }

    async fn apply_once(
        &self,
        prepared: &[Prepared],
        mode: Mode,
    ) -> Result<Vec<Result<Outcome, Refusal>>, Attempt> {
        let started = std::time::Instant::now();
        let mut client = self.pool.get().await?;
        let fence = self.session.as_deref().map(Session::fence);
        let result = async {
            let mut tx = client.transaction().await?;
            let (results, current) = match mode {
                Mode::Together => {
                    let mut keys: Vec<Key> = prepared.iter().map(Prepared::key).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    let (outcomes, current) = apply_in(&tx, fence, prepared, &keys).await?;
                    (outcomes.into_iter().map(Ok).collect(), current)
                }
                Mode::EachAlone => each_alone(&mut tx, fence, prepared).await?,
            };
            // A registration's epoch becomes the session's once committed.
            let mut registered = None;
            if let Some(session) = &self.session {
                match session.epoch() {
                    None => registered = current.epoch,
                    Some(mine) if current.epoch != Some(mine) => {
                        return Err(Attempt::Abandoned(format!(
                            "another consumer of {} took over (epoch {:?}, this session's {mine})",
                            session.queue, current.epoch
                        )));
                    }
                    Some(_) => {}
                }
            }
            // The last moment to learn that the broker session is gone; past
            // it, the fence's share lock keeps a successor from committing first.
            if self.session_lost() {
                return Err(Attempt::Abandoned(
                    "the broker session ended before the batch committed".into(),
                ));
            }
            let written = started.elapsed();
            if let Err(e) = tx.commit().await {
                return Err(match StoreError::from(e) {
                    // No answer: the server may or may not have committed.
                    StoreError::Unavailable {
                        cause: Cause::Connection,
                        detail,
                    } => Attempt::CommitUnknown(
                        Unsettled {
                            xid: current.xid,
                            server: current.server,
                            registered,
                            outcomes: results,
                        },
                        detail,
                    ),
                    refused => Attempt::Failed(refused),
                });
            }
            if let (Some(session), Some(epoch)) = (&self.session, registered) {
                session.registered(Some(epoch));
            }
            Ok((results, written))
        }
        .await;
        let (results, written) = match result {
            Ok(done) => done,
            Err(attempt) => {
                let retire = match &attempt {
                    Attempt::Failed(e) => e.retires_connection(),
                    Attempt::CommitUnknown(..) => true,
                    Attempt::Abandoned(_) => false,
                };
                if retire {
                    drop(deadpool_postgres::Object::take(client));
                }
                return Err(attempt);
            }
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            size = prepared.len(),
            ?mode,
            write_ms = ms(written),
            commit_ms = ms(started.elapsed() - written),
            "batch transaction"
        );
        Ok(results)
    }
}

/// Applies `prepared` in `tx` as if one message at a time, leaving out the
/// ones the database refuses; passes the fence once, first.
///
/// Each message is first tried in a savepoint of its own, inside an outer
/// one, to find which the database refuses; the outer savepoint is then
/// rolled back and the others are applied together at the top level. So
/// every row is written by the top-level transaction, never a
/// subtransaction: a full-set sync tells rows committed after it began by
/// their `xmin` against its snapshot, which lists top-level transactions only.
async fn each_alone(
    tx: &mut deadpool_postgres::Transaction<'_>,
    fence: Option<batch::Fence<'_>>,
    prepared: &[Prepared],
) -> Result<(Vec<Result<Outcome, Refusal>>, Current), StoreError> {
    let current = batch::pass_fence(tx, fence).await?;
    let mut refusals: Vec<Option<Refusal>> = Vec::with_capacity(prepared.len());
    {
        let mut probe = tx.savepoint("scramjet_probe").await?;
        for p in prepared {
            let savepoint = probe.savepoint("scramjet_message").await?;
            match apply_in(&savepoint, None, std::slice::from_ref(p), &[p.key()]).await {
                Ok(_) => {
                    savepoint.commit().await?;
                    refusals.push(None);
                }
                Err(StoreError::Refused { sqlstate, detail }) => {
                    savepoint.rollback().await?;
                    refusals.push(Some(Refusal {
                        sqlstate,
                        reason: detail,
                    }));
                }
                Err(outage) => return Err(outage),
            }
        }
        probe.rollback().await?;
    }
    let accepted: Vec<&Prepared> = prepared
        .iter()
        .zip(&refusals)
        .filter(|(_, r)| r.is_none())
        .map(|(p, _)| p)
        .collect();
    let mut outcomes = Vec::new().into_iter();
    if !accepted.is_empty() {
        // Cloned: a refused batch is the rare path.
        let accepted: Vec<Prepared> = accepted.into_iter().cloned().collect();
        let mut keys: Vec<Key> = accepted.iter().map(Prepared::key).collect();
        keys.sort_unstable();
        keys.dedup();
        // Refused now, after the probe let these through, the refusal
        // belongs to no one message: the caller waits it out.
        let (applied, _) = apply_in(tx, None, &accepted, &keys).await?;
        outcomes = applied.into_iter();
    }
    let results = refusals
        .into_iter()
        .map(|r| match r {
            Some(refusal) => Err(refusal),
            None => Ok(outcomes.next().expect("one outcome per accepted message")),
        })
        .collect();
    Ok((results, current))
}

/// A batch's results as the consumer takes them: an outcome, or the
/// database's reason for refusing the message.
fn results_of(results: Vec<Result<Outcome, Refusal>>) -> Results {
    results
        .into_iter()
        .map(|r| r.map_err(|refusal| refusal.reason))
        .collect()
}

/// What `txid_status` said of the transaction of `u`, as the pipeline may
/// take it: only from the server the transaction ran on, and never as the
/// data's fault.
fn settled(
    u: &Unsettled,
    answer: Result<(TransactionStatus, batch::ServerId), StoreError>,
) -> Result<TransactionStatus, StoreError> {
    match answer {
        Ok((status, server)) if server == u.server => Ok(status),
        Ok((_, server)) => Err(StoreError::unavailable(
            Cause::CommitUnknown,
            format!(
                "a COMMIT went unanswered on server {}/{} and the database now answers from \
                 {}/{} (a failover?): the batch stays unacked until that server can say \
                 what became of transaction {}",
                u.server.system, u.server.timeline, server.system, server.timeline, u.xid
            ),
        )),
        Err(StoreError::Refused { detail, .. }) => {
            Err(StoreError::unavailable(Cause::CommitUnknown, detail))
        }
        Err(e) => Err(e),
    }
}

/// A batch whose COMMIT was sent and not answered.
#[derive(Debug)]
struct Unsettled {
    /// Its transaction id.
    xid: i64,
    /// The server it ran on.
    server: batch::ServerId,
    /// The epoch it registered for the session, if it did commit.
    registered: Option<i64>,
    /// Its results, if it did commit.
    outcomes: Vec<Result<Outcome, Refusal>>,
}

/// Applies `prepared` inside `tx` (which the caller commits): claim message
/// ids, lock the keys, plan, write. Returns the outcomes and what the
/// locking statement read (the transaction's id, its server, the fence).
async fn apply_in(
    tx: &deadpool_postgres::Transaction<'_>,
    fence: Option<batch::Fence<'_>>,
    prepared: &[Prepared],
    keys: &[Key],
) -> Result<(Vec<Outcome>, Current), StoreError> {
    let (duplicate, current) = claim_and_lock(tx, fence, prepared, keys).await?;
    // A bug in planning (patch computation, say) must not take the daemon
    // down: report it like a refused batch, so the messages are retried
    // one by one and only the one that triggers it is dead-lettered.
    let now = event::now_rfc3339();
    let (writes, outcomes) = std::panic::catch_unwind(AssertUnwindSafe(|| {
        plan(prepared, &duplicate, &current, &now)
    }))
    .map_err(|panic| StoreError::Refused {
        sqlstate: None,
        detail: format!("internal error: {}", panic_text(&*panic)),
    })?;
    batch::apply(tx, &writes).await?;
    Ok((outcomes, current))
}

/// Applies `prepared` inside `tx`, for callers that lock more rows in the
/// same transaction first (`scramjet revalidate` locks the staging rows).
pub async fn apply_in_transaction(
    tx: &deadpool_postgres::Transaction<'_>,
    prepared: &[Prepared],
) -> Result<Vec<Outcome>, StoreError> {
    let mut keys: Vec<Key> = prepared.iter().map(Prepared::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let (outcomes, _) = apply_in(tx, None, prepared, &keys).await?;
    Ok(outcomes)
}

/// Claims the batch's message ids and locks its keys; returns, per message,
/// whether it is a duplicate (claimed before, or earlier in the same batch).
async fn claim_and_lock(
    tx: &deadpool_postgres::Transaction<'_>,
    fence: Option<batch::Fence<'_>>,
    prepared: &[Prepared],
    keys: &[Key],
) -> Result<(Vec<bool>, Current), StoreError> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (i, p) in prepared.iter().enumerate() {
        if let Some(m) = &p.message_id {
            first_seen.entry(m.as_str()).or_insert(i);
        }
    }
    let ids: Vec<&str> = first_seen.keys().copied().collect();
    let (fresh, current) = batch::claim_and_lock(tx, fence, &ids, keys).await?;
    let duplicate = prepared
        .iter()
        .enumerate()
        .map(|(i, p)| match &p.message_id {
            None => false,
            Some(m) => !(fresh.contains(m.as_str()) && first_seen[m.as_str()] == i),
        })
        .collect();
    Ok((duplicate, current))
}

/// How one attempt at a batch failed.
#[derive(Debug)]
enum Attempt {
    /// Nothing was committed.
    Failed(StoreError),
    /// COMMIT was sent and no answer came (the driver's words): the
    /// transaction may have committed.
    CommitUnknown(Unsettled, String),
    /// Not committed, and must not be: the broker session ended, or
    /// another consumer took the queue over (why).
    Abandoned(String),
}

impl<E: Into<StoreError>> From<E> for Attempt {
    fn from(e: E) -> Attempt {
        Attempt::Failed(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::UnknownTypes, store::batch::Stored};

    fn registry() -> SchemaRegistry {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("person.json"),
            r#"{"type":"object","required":["name"]}"#,
        )
        .unwrap();
        SchemaRegistry::load(dir.path(), UnknownTypes::Accept, 100).unwrap()
    }

    fn message(body: String, r: &SchemaRegistry) -> Prepared {
        let inbound = crate::domain::message::decode(body.as_bytes(), Default::default()).unwrap();
        Prepared::new(inbound, None, None, r)
    }

    fn save(id: &str, data: &str, r: &SchemaRegistry) -> Prepared {
        message(
            format!(r#"{{"action":"save","type":"person","id":"{id}","data":{data}}}"#),
            r,
        )
    }

    fn save_v(id: &str, version: i64, data: &str, r: &SchemaRegistry) -> Prepared {
        message(
            format!(
                r#"{{"action":"save","type":"person","id":"{id}","version":{version},"data":{data}}}"#
            ),
            r,
        )
    }

    fn delete(id: &str, r: &SchemaRegistry) -> Prepared {
        message(
            format!(r#"{{"action":"delete","type":"person","id":"{id}"}}"#),
            r,
        )
    }

    fn delete_v(id: &str, version: i64, r: &SchemaRegistry) -> Prepared {
        message(
            format!(r#"{{"action":"delete","type":"person","id":"{id}","version":{version}}}"#),
            r,
        )
    }

    fn run(batch: &[Prepared], current: &Current) -> (Writes, Vec<Outcome>) {
        plan(batch, &vec![false; batch.len()], current, "t")
    }

    fn stored(id: &str, data: &str, version: Option<i64>) -> Current {
        let data: Value = serde_json::from_str(data).unwrap();
        let mut current = Current::default();
        current.rows.insert(
            ("person".to_owned(), id.to_owned()),
            Stored {
                hash: canonical::hash(&canonical::to_canonical(&data)),
                data,
                version,
            },
        );
        current
    }

    fn ops(w: &Writes) -> Vec<String> {
        w.events.iter().map(|e| e.routing_key.clone()).collect()
    }

    #[test]
    fn a_batch_plans_like_messages_applied_one_at_a_time() {
        let r = registry();
        let batch = vec![
            save("a", r#"{"name":"A"}"#, &r),
            save("a", r#"{ "name" : "A" }"#, &r),
            save("a", r#"{"name":"B"}"#, &r),
            save("a", r#"{"nope":1}"#, &r),
            delete("a", &r),
            delete("a", &r),
            save("b", r#"{"name":"x"}"#, &r),
        ];
        let (w, outcomes) = run(&batch, &Current::default());
        assert_eq!(
            outcomes,
            vec![
                Outcome::Created,
                Outcome::Unchanged,
                Outcome::Updated,
                Outcome::Rejected,
                Outcome::Deleted,
                Outcome::Absent,
                Outcome::Created
            ]
        );
        assert_eq!(
            ops(&w),
            vec![
                "person.created",
                "person.updated",
                "person.rejected",
                "person.deleted",
                "person.created"
            ]
        );
        // "a" never existed before the batch and is gone after it: nothing to write.
        assert!(w.resource_deletes.is_empty());
        assert_eq!(w.resource_upserts.len(), 1);
        assert_eq!(w.resource_upserts[0].id, "b");
        // The delete after the rejection clears staging for "a".
        assert_eq!(w.staging_clears.len(), 2);
        assert!(w.staging_invalid.is_empty());
        assert!(w.tombstone_upserts.is_empty(), "no version, no tombstone");
    }

    #[test]
    fn delete_then_recreate_of_a_stored_row_deletes_before_inserting() {
        let r = registry();
        let current = stored("a", r#"{"name":"A"}"#, None);
        let batch = vec![delete("a", &r), save("a", r#"{"name":"A"}"#, &r)];
        let (w, outcomes) = run(&batch, &current);
        assert_eq!(outcomes, vec![Outcome::Deleted, Outcome::Created]);
        assert_eq!(w.resource_deletes.len(), 1);
        assert_eq!(w.resource_upserts.len(), 1);
    }

    #[test]
    fn an_updated_event_carries_a_patch_from_old_to_new() {
        let r = registry();
        let current = stored("a", r#"{"name":"A","n":1}"#, None);
        let batch = vec![save("a", r#"{"name":"A","n":12345678901234567890123}"#, &r)];
        let (w, outcomes) = run(&batch, &current);
        assert_eq!(outcomes, vec![Outcome::Updated]);
        let body: Value = serde_json::from_str(&w.events[0].payload).unwrap();
        assert_eq!(
            body["patch"].to_string(),
            r#"[{"op":"replace","path":"/n","value":12345678901234567890123}]"#
        );
        assert_eq!(body["previous"], Value::Null);
        assert_eq!(
            body["previous_hash"].as_str().unwrap(),
            canonical::hash(r#"{"n":1,"name":"A"}"#)
        );
    }

    #[test]
    fn a_rejected_last_save_keeps_its_staging_row() {
        let r = registry();
        let batch = vec![
            save("a", r#"{"name":"A"}"#, &r),
            save("a", r#"{"x":1}"#, &r),
        ];
        let (w, outcomes) = run(&batch, &Current::default());
        assert_eq!(outcomes, vec![Outcome::Created, Outcome::Rejected]);
        assert_eq!(w.staging_invalid.len(), 1);
        assert!(w.staging_invalid[0].errors.contains("\"path\":\"\""));
        assert!(w.staging_clears.is_empty());
        // The valid save before the rejection still lands.
        assert_eq!(w.resource_upserts.len(), 1);
    }

    #[test]
    fn a_lower_version_is_stale_and_changes_nothing() {
        let r = registry();
        let current = stored("a", r#"{"name":"A"}"#, Some(5));
        let batch = vec![
            save_v("a", 4, r#"{"name":"old"}"#, &r),
            delete_v("a", 3, &r),
            save_v("a", 5, r#"{"name":"A"}"#, &r),
            save_v("a", 6, r#"{"name":"B"}"#, &r),
            save_v("a", 5, r#"{"name":"C"}"#, &r),
        ];
        let (w, outcomes) = run(&batch, &current);
        assert_eq!(
            outcomes,
            vec![
                Outcome::Stale,
                Outcome::Stale,
                Outcome::Unchanged,
                Outcome::Updated,
                Outcome::Stale
            ]
        );
        assert_eq!(ops(&w), vec!["person.updated"]);
        assert_eq!(w.resource_upserts[0].version, Some(6));
    }

    #[test]
    fn an_unchanged_save_with_a_higher_version_writes_only_the_version() {
        let r = registry();
        let current = stored("a", r#"{"name":"A"}"#, Some(1));
        let (w, outcomes) = run(&[save_v("a", 5, r#"{ "name": "A" }"#, &r)], &current);
        assert_eq!(outcomes, vec![Outcome::Unchanged]);
        assert!(w.events.is_empty() && w.resource_upserts.is_empty());
        assert_eq!(w.version_updates, vec![(("person".into(), "a".into()), 5)]);

        // The same version, or a change after it in the batch, needs no
        // version update of its own.
        let (w, _) = run(&[save_v("a", 1, r#"{"name":"A"}"#, &r)], &current);
        assert!(w.version_updates.is_empty() && w.resource_upserts.is_empty());
        let batch = vec![
            save_v("a", 5, r#"{"name":"A"}"#, &r),
            save_v("a", 6, r#"{"name":"B"}"#, &r),
        ];
        let (w, _) = run(&batch, &current);
        assert!(w.version_updates.is_empty());
        assert_eq!(w.resource_upserts[0].version, Some(6));
    }

    #[test]
    fn a_stale_key_alone_writes_nothing_at_all() {
        let r = registry();
        let current = stored("a", r#"{"name":"A"}"#, Some(5));
        let (w, outcomes) = run(&[save_v("a", 1, r#"{"x":1}"#, &r)], &current);
        assert_eq!(outcomes, vec![Outcome::Stale]);
        assert!(w.events.is_empty() && w.staging_clears.is_empty() && w.staging_invalid.is_empty());
        assert!(w.resource_upserts.is_empty() && w.resource_deletes.is_empty());
        assert!(w.version_updates.is_empty());
    }

    #[test]
    fn a_delete_leaves_a_tombstone_that_stops_a_stale_save() {
        let r = registry();
        let current = stored("a", r#"{"name":"A"}"#, Some(5));
        let batch = vec![
            delete_v("a", 7, &r),
            save_v("a", 6, r#"{"name":"zombie"}"#, &r),
        ];
        let (w, outcomes) = run(&batch, &current);
        assert_eq!(outcomes, vec![Outcome::Deleted, Outcome::Stale]);
        assert_eq!(
            w.tombstone_upserts,
            vec![(("person".into(), "a".into()), 7)]
        );

        // In a later batch, the tombstone is what the database returns.
        let mut later = Current::default();
        later.tombstones.insert(("person".into(), "a".into()), 7);
        let (w, outcomes) = run(&[save_v("a", 6, r#"{"name":"zombie"}"#, &r)], &later);
        assert_eq!(outcomes, vec![Outcome::Stale]);
        assert!(w.events.is_empty());
        let (w, outcomes) = run(&[save_v("a", 8, r#"{"name":"back"}"#, &r)], &later);
        assert_eq!(outcomes, vec![Outcome::Created]);
        assert_eq!(
            w.tombstone_deletes,
            vec![("person".to_owned(), "a".to_owned())]
        );
    }

    #[test]
    fn a_delete_without_version_keeps_the_rows_version_as_its_tombstone() {
        let r = registry();
        let current = stored("a", r#"{"name":"A"}"#, Some(5));
        let (w, _) = run(&[delete("a", &r)], &current);
        assert_eq!(
            w.tombstone_upserts,
            vec![(("person".into(), "a".into()), 5)]
        );
    }

    #[test]
    fn a_lost_commit_is_settled_only_by_the_server_it_ran_on() {
        let ran_on = batch::ServerId {
            system: 7,
            timeline: "00000001".into(),
        };
        let u = Unsettled {
            xid: 42,
            server: ran_on.clone(),
            registered: None,
            outcomes: vec![Ok(Outcome::Created)],
        };
        assert_eq!(
            settled(&u, Ok((TransactionStatus::Committed, ran_on.clone()))).unwrap(),
            TransactionStatus::Committed
        );
        // A promoted standby: same cluster, new timeline, where 42 may name
        // another transaction. Its "aborted" must not make the batch run again.
        let promoted = batch::ServerId {
            timeline: "00000002".into(),
            ..ran_on
        };
        for status in [TransactionStatus::Aborted, TransactionStatus::Committed] {
            match settled(&u, Ok((status, promoted.clone()))) {
                Err(StoreError::Unavailable { cause, detail }) => {
                    assert_eq!(cause, Cause::CommitUnknown);
                    assert!(detail.contains("failover"), "{detail}");
                }
                other => panic!("{other:?}"),
            }
        }
        // txid_status refusing the id (22023 after a failover) is no data fault.
        let refused = StoreError::Refused {
            sqlstate: Some("22023".into()),
            detail: "transaction ID 42 is in the future".into(),
        };
        assert!(matches!(
            settled(&u, Err(refused)),
            Err(StoreError::Unavailable {
                cause: Cause::CommitUnknown,
                ..
            })
        ));
    }

    #[test]
    fn duplicates_are_skipped() {
        let r = registry();
        let batch = vec![save("a", r#"{"name":"A"}"#, &r), delete("a", &r)];
        let (w, outcomes) = plan(&batch, &[false, true], &Current::default(), "t");
        assert_eq!(outcomes, vec![Outcome::Created, Outcome::Duplicate]);
        assert_eq!(ops(&w), vec!["person.created"]);
    }
}
