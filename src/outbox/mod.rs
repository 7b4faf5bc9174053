//! Where events leave. An event is born in the pipeline batch that makes the
//! change it describes: [`crate::store::outbox::append`] writes it to the
//! `outbox` table in that batch's own transaction, so it exists exactly when
//! the change is committed. After such a commit the consumer rings the
//! [`Wake`]; the [`publisher`] waits on it (or polls every second, for events
//! a crash or another daemon left), sends the events to the changes exchange,
//! and deletes only what the broker confirmed.

pub(crate) mod publisher;

pub(crate) use publisher::Publisher;

use std::sync::Arc;

use tokio::sync::{Notify, futures::Notified};

/// The outbox publisher's wake-up: the pipeline (its consumer) rings it
/// after a commit that wrote events; the publisher waits on it or polls
/// every second. Clones ring the same bell.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wake(Arc<Notify>);

impl Wake {
    /// Tells the publisher that the outbox has new rows. A ring while the
    /// publisher is busy is kept (one, however many), so none is lost.
    pub(crate) fn notify(&self) {
        self.0.notify_one();
    }

    /// Resolves at the next ring (or at once, for one kept since the last wait).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.0.notified()
    }
}
