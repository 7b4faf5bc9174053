//! What a bulk operation did: [`Summary`], [`DeleteStep`].

use std::{fmt, time::Duration};

use super::BadRecord;
use crate::{
    domain::outcome::Outcome,
    pipeline::{Prepared, PreparedKind},
};

/// Bad records kept for the report; the rest are only counted.
pub(super) const KEEP_BAD: usize = 100;

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

    pub(super) fn count(&mut self, outcome: Outcome) {
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
    pub(super) fn add(&mut self, other: &Summary) {
        self.records += other.records;
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.rejected += other.rejected;
        self.stale += other.stale;
        self.deleted += other.deleted;
        self.absent += other.absent;
    }

    pub(super) fn bad(&mut self, bad: BadRecord) {
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
pub(super) fn rejection(p: &Prepared) -> String {
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
