//! One batch of well-formed messages → per-message outcomes, in one transaction.
//!
//! The batch's effect equals applying its messages one at a time in queue
//! order (CONTRACT §3): [`plan`](fn@plan) walks them in order against the locked
//! current rows, keeping the evolving state of each (type, id) in memory, and
//! yields every message's outcome, the events, and the batch's *net* writes,
//! which `crate::store::batch::write` then performs with one set-based
//! statement each. A stash-then-clear of a staging row inside one transaction
//! is invisible to everyone else, so only the net staging change is written.
//!
//! The flow, file by file:
//!
//! 1. `prepare`: the consumer makes each decoded message a [`Prepared`] —
//!    canonical text, hash, validation — before any transaction begins.
//! 2. `retry`: [`Pipeline::process`] commits the batch whatever the database
//!    does: it waits outages out, settles a COMMIT that went unanswered,
//!    splits a batch a statement timeout stops, and applies one the
//!    database refuses message by message.
//! 3. `transaction`: each attempt claims the message ids, locks the keys
//!    and reads their rows, plans, then writes in one round trip: the net
//!    writes (`crate::store::batch::write`) and the events appended to the
//!    outbox (`crate::store::outbox::append`), where an event is born.
//! 4. `plan`: the pure planner that step 3 calls.
//!
//! After the commit the consumer rings `crate::outbox::Wake`, and the
//! publisher sends the new events (see `crate::outbox`).

mod plan;
mod prepare;
mod retry;
mod transaction;

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

pub use plan::plan;
pub use prepare::{Prepared, PreparedKind};
pub use transaction::process_in_transaction;

use crate::{domain::outcome::Outcome, store::batch};

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
    /// The outbox publisher of this process, handed the events of each
    /// committed batch so that it need not read them back.
    publisher: Option<crate::outbox::Wake>,
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
    /// In partitioned mode, the partition queues consumed and the epochs
    /// of their leases, in queue-name order: every batch checks them all.
    leases: Option<Vec<(String, i64)>>,
}

impl Session {
    /// A session on the single inbound `queue` that ends when `lost` is
    /// cancelled: its first batch registers a new epoch.
    pub fn new(queue: &str, lost: CancellationToken) -> Session {
        Session {
            queue: queue.to_owned(),
            epoch: std::sync::Mutex::new(None),
            lost,
            leases: None,
        }
    }

    /// A session on the partition queues of `leases` (queue name, epoch of
    /// the lease this daemon took): every batch checks, under a share lock,
    /// that each lease's epoch is still the one taken.
    pub fn leased(mut leases: Vec<(String, i64)>, lost: CancellationToken) -> Session {
        leases.sort();
        Session {
            queue: "the partitions".to_owned(),
            epoch: std::sync::Mutex::new(None),
            lost,
            leases: Some(leases),
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
        if let Some(leases) = &self.leases {
            return batch::Fence::Leases(leases);
        }
        match self.epoch() {
            None => batch::Fence::Register(&self.queue),
            Some(_) => batch::Fence::Check(&self.queue),
        }
    }
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
            publisher: None,
        }
    }

    /// Hands the events of every committed batch to the publisher that
    /// `wake` rings ([`crate::outbox::Wake::hand_over`]).
    pub(crate) fn handing_over(mut self, wake: crate::outbox::Wake) -> Self {
        self.publisher = Some(wake);
        self
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
}
