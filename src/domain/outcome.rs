//! What one message did to the data: the outcome the pipeline reports for it,
//! counted by the consumer, `scramjet bulk` and `scramjet revalidate`.

use std::fmt;

/// What one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A save created the entity (`created` event).
    Created,
    /// A save changed the entity (`updated` event).
    Updated,
    /// A save matched the stored hash: no change, no event.
    Unchanged,
    /// A delete removed the entity (`deleted` event).
    Deleted,
    /// A delete of an entity that was not there: no event.
    Absent,
    /// A save failed validation (`rejected` event).
    Rejected,
    /// The `version` is lower than the one stored: no change, no event.
    Stale,
    /// The `message_id` was processed before: no change, no event.
    Duplicate,
}

impl Outcome {
    /// Whether the outcome publishes an event.
    pub fn has_event(self) -> bool {
        matches!(
            self,
            Outcome::Created | Outcome::Updated | Outcome::Deleted | Outcome::Rejected
        )
    }

    /// Lowercase name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::Absent => "absent",
            Outcome::Rejected => "rejected",
            Outcome::Stale => "stale",
            Outcome::Duplicate => "duplicate",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
