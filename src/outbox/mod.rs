//! Where events leave. An event is born in the pipeline batch that makes the
//! change it describes: [`crate::store::outbox::append`] writes it to the
//! `outbox` table in that batch's own transaction, so it exists exactly when
//! the change is committed. After such a commit the consumer rings the
//! [`Wake`]; the [`publisher`] waits on it (or polls every second, for events
//! a crash or another daemon left), sends the events to the changes exchange,
//! and deletes only what the broker confirmed.

pub(crate) mod cloudevents;
pub(crate) mod feed;
pub(crate) mod publisher;

pub(crate) use publisher::Publisher;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Notify, futures::Notified};

use crate::domain::event::Event;

/// The outbox publisher's wake-up, and the hand-off of what was just
/// committed: the pipeline gives the publisher the events of each outbox row
/// it committed ([`Wake::hand_over`]) and rings; the publisher waits on it
/// or polls every second. The outbox row stays the record that survives a
/// crash: the publisher still takes rows from the table, in commit order,
/// and reads back only the events of rows it was not handed (written
/// before a restart, by another daemon or command, or let go for the
/// bound). Clones ring the same bell and share the hand-off.
#[derive(Debug, Clone)]
pub(crate) struct Wake(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bell: Notify,
    handed: Mutex<Handed>,
    /// The most payload bytes held for the publisher.
    bound: usize,
}

/// Committed rows' events by outbox `seq`, and their payload bytes.
#[derive(Debug, Default)]
struct Handed {
    rows: BTreeMap<i64, Arc<Vec<Event>>>,
    bytes: usize,
}

fn payload_bytes(events: &[Event]) -> usize {
    events.iter().map(|e| e.payload.len()).sum()
}

impl Wake {
    /// A wake-up whose hand-off holds at most `bound` bytes of payloads:
    /// past it the oldest rows are let go, and read back from the table.
    pub(crate) fn holding(bound: usize) -> Self {
        Wake(Arc::new(Inner {
            bell: Notify::new(),
            handed: Mutex::new(Handed::default()),
            bound,
        }))
    }

    /// Tells the publisher that the outbox has new rows. A ring while the
    /// publisher is busy is kept (one, however many), so none is lost.
    pub(crate) fn notify(&self) {
        self.0.bell.notify_one();
    }

    /// Resolves at the next ring (or at once, for one kept since the last wait).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.0.bell.notified()
    }

    /// Gives the publisher the events of outbox rows that have committed
    /// (`seq`, events in order), to publish without reading them back.
    pub(crate) fn hand_over(&self, rows: Vec<(i64, Vec<Event>)>) {
        let mut handed = self.0.handed.lock().expect("never poisoned");
        for (seq, events) in rows {
            handed.bytes += payload_bytes(&events);
            handed.rows.insert(seq, Arc::new(events));
        }
        while handed.bytes > self.0.bound {
            let Some((_, events)) = handed.rows.pop_first() else {
                break;
            };
            handed.bytes -= payload_bytes(&events);
        }
    }

    /// The rows handed over and not yet published, oldest first.
    pub(crate) fn handed(&self) -> Vec<(i64, Arc<Vec<Event>>)> {
        let handed = self.0.handed.lock().expect("never poisoned");
        handed
            .rows
            .iter()
            .map(|(seq, events)| (*seq, events.clone()))
            .collect()
    }

    /// Forgets handed rows: published ones, and any older than `before`
    /// when given (another publisher took them: the outbox is taken in
    /// `seq` order).
    pub(crate) fn forget(&self, published: &[i64], before: Option<i64>) {
        let mut handed = self.0.handed.lock().expect("never poisoned");
        let mut gone: Vec<i64> = published.to_vec();
        if let Some(before) = before {
            gone.extend(handed.rows.range(..before).map(|(seq, _)| *seq));
        }
        for seq in gone {
            if let Some(events) = handed.rows.remove(&seq) {
                handed.bytes -= payload_bytes(&events);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{EventFields, Op};

    fn event(bytes: usize) -> Event {
        let data = format!("{{\"x\":\"{}\"}}", "a".repeat(bytes));
        Event::new(
            Op::Created,
            "t",
            "i",
            EventFields {
                data: Some(&data),
                ..Default::default()
            },
            "2026-12-02T00:00:00.000000Z",
            None,
        )
    }

    #[test]
    fn the_hand_off_lets_the_oldest_rows_go_past_its_bound() {
        let one = event(1000).payload.len();
        let wake = Wake::holding(3 * one);
        wake.hand_over(vec![(1, vec![event(1000)]), (2, vec![event(1000)])]);
        wake.hand_over(vec![(3, vec![event(1000), event(1000)])]);
        let seqs: Vec<i64> = wake.handed().iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![2, 3]);
        wake.forget(&[3], None);
        assert_eq!(wake.handed().len(), 1);
        wake.hand_over(vec![(5, vec![event(10)])]);
        wake.forget(&[], Some(5));
        let seqs: Vec<i64> = wake.handed().iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![5]);
        wake.forget(&[5], None);
        assert_eq!(wake.0.handed.lock().unwrap().bytes, 0);
    }
}
