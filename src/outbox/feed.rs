//! The live feed: every event the broker confirmed, offered to whoever
//! watches (`GET /v1/events/stream`, the console's last events).
//!
//! A watcher can never slow the publisher down: the feed is a broadcast ring
//! of [`CAPACITY`] events, sending never waits, and a watcher that falls
//! more than that behind skips the oldest and is told how many it missed.
//! Each event in the ring is at most [`MAX_EVENT_BYTES`] (larger ones are
//! kept in their reduced form, §5), so the ring holds at most
//! `CAPACITY × MAX_EVENT_BYTES` however many watch. With nobody watching,
//! nothing is copied.

use std::sync::Arc;

use tokio::sync::broadcast;

/// Events the ring holds.
pub(crate) const CAPACITY: usize = 256;

/// Largest body kept whole; a larger event goes into the feed reduced (no
/// `data`, `previous` or `patch`), as the broker would get it past
/// `limits.max_event_bytes`. Whoever wants the data reads the resource.
pub(crate) const MAX_EVENT_BYTES: usize = 16 * 1024;

/// One confirmed event: its id and its §5 body (whatever `events.format`).
#[derive(Debug, Clone)]
pub(crate) struct FeedEvent {
    /// `event_id`.
    pub event_id: uuid::Uuid,
    /// The §5 body, at most [`MAX_EVENT_BYTES`] long but for a reduced form
    /// that still is not.
    pub body: Arc<str>,
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Feed(broadcast::Sender<FeedEvent>);

impl Default for Feed {
    fn default() -> Self {
        Feed(broadcast::Sender::new(CAPACITY))
    }
}

impl Feed {
    /// A new watcher: it sees the events confirmed from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.0.subscribe()
    }

    /// Offers the confirmed events `(event_id, §5 body)`, in order. Never
    /// waits; does nothing while nobody watches.
    pub(crate) fn offer<'a>(&self, events: impl IntoIterator<Item = (uuid::Uuid, &'a str)>) {
        if self.0.receiver_count() == 0 {
            return;
        }
        for (event_id, payload) in events {
            let body: Arc<str> = if payload.len() <= MAX_EVENT_BYTES {
                payload.into()
            } else {
                crate::domain::event::reduce(payload, MAX_EVENT_BYTES).into()
            };
            // An error means the last watcher just left: nothing to do.
            let _ = self.0.send(FeedEvent { event_id, body });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    fn event(n: usize) -> (uuid::Uuid, String) {
        (uuid::Uuid::now_v7(), format!(r#"{{"n":{n}}}"#))
    }

    #[test]
    fn a_watcher_that_falls_behind_skips_the_oldest_and_is_told_how_many() {
        let feed = Feed::default();
        let mut slow = feed.subscribe();
        let events: Vec<_> = (0..CAPACITY + 10).map(event).collect();
        // Sending never waits, however far behind the watcher is.
        feed.offer(events.iter().map(|(id, body)| (*id, body.as_str())));
        assert!(matches!(slow.try_recv(), Err(TryRecvError::Lagged(10))));
        let next = slow.try_recv().expect("the oldest kept");
        assert_eq!(next.event_id, events[10].0);
        let mut rest = 1;
        while slow.try_recv().is_ok() {
            rest += 1;
        }
        assert_eq!(rest, CAPACITY);
    }

    #[test]
    fn a_large_event_goes_into_the_feed_reduced() {
        let feed = Feed::default();
        let mut watcher = feed.subscribe();
        let big = serde_json::json!({
            "event_id": "0190d7a2-0000-7000-8000-000000000000",
            "op": "created", "type": "t", "id": "1",
            "data": {"text": "x".repeat(2 * MAX_EVENT_BYTES)},
            "hash": "h", "previous_hash": null, "previous": null, "patch": null,
            "errors": null, "errors_total": null, "version": null, "truncated": null,
            "occurred_at": "2026-12-02T10:00:00Z"
        })
        .to_string();
        feed.offer([(uuid::Uuid::now_v7(), big.as_str())]);
        let got = watcher.try_recv().unwrap();
        assert!(got.body.len() <= MAX_EVENT_BYTES, "{}", got.body.len());
        let body: serde_json::Value = serde_json::from_str(&got.body).unwrap();
        assert_eq!(body["data"], serde_json::Value::Null);
        assert_eq!(body["id"], "1");
    }
}
