//! The pure planner: a batch's messages, in queue order, against the locked
//! current rows → each message's outcome, the events, and the batch's net
//! writes. No I/O, so that it is tested without a database.

use std::collections::HashMap;

use serde_json::Value;

use super::prepare::{Prepared, PreparedKind};
use crate::{
    domain::canonical,
    domain::event::{Event, EventFields, Op},
    domain::outcome::Outcome,
    store::batch::{Current, Key, ResourceWrite, StagingInvalid, Writes},
};

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
    /// `None` for a stored row whose document was left unread: the batch's
    /// saves of the key carry its hash, so nothing compares against it.
    data: Option<&'a Value>,
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
    // Each distinct key is copied once, when first seen: `keys` owns the
    // copies (they end in `writes`), in the order first seen, and `index`
    // finds them by the message's own names, so a key seen again costs no
    // allocation.
    let mut keys: Vec<(Key, KeyState<'_>)> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut writes = Writes::default();
    let mut outcomes = Vec::with_capacity(prepared.len());

    for (p, &is_duplicate) in prepared.iter().zip(duplicate) {
        if is_duplicate {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        let at = *index.entry(p.key_ref()).or_insert_with(|| {
            let key = p.key();
            let now = current.rows.get(&key).map(|c| Row {
                hash: &c.hash,
                data: c.data.as_ref(),
                canonical: None,
                version: c.version,
            });
            let tombstone = current.tombstones.get(&key).copied();
            let state = KeyState {
                existed: now.is_some(),
                now,
                initial_tombstone: tombstone,
                tombstone,
                dirty: false,
                deleted_initial: false,
                staging: None,
                touched: false,
            };
            keys.push((key, state));
            keys.len() - 1
        });
        let state = &mut keys[at].1;
        if let (Some(v), Some(known)) = (p.version, state.known_version())
            && v < known
        {
            outcomes.push(Outcome::Stale);
            continue;
        }
        state.touched = true;
        let event = |op, fields| Event {
            lane: p.lane,
            trace: p.trace.clone(),
            ..Event::new(
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
                    data: Some(data),
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
                        let patch = patch_between(old.data, data);
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
                                previous: old.data,
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

    for (key, state) in keys {
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
                canonical: match (row.canonical, row.data) {
                    (Some(text), _) => text.to_owned(),
                    (None, Some(data)) => canonical::to_canonical(data),
                    (None, None) => unreachable!("only a row from a message is written"),
                },
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

/// The RFC 6902 operations from `old` to `new`. `old` is always read when a
/// patch is due ([`crate::store::batch::Need`]); were it not, the patch
/// replaces the whole document, which is still correct.
fn patch_between(old: Option<&Value>, new: &Value) -> json_patch::Patch {
    match old {
        Some(old) => json_patch::diff(old, new),
        None => {
            debug_assert!(false, "a patch against a document left unread");
            json_patch::Patch(vec![json_patch::PatchOperation::Replace(
                json_patch::ReplaceOperation {
                    path: json_patch::jsonptr::PointerBuf::new(),
                    value: new.clone(),
                },
            )])
        }
    }
}

#[cfg(test)]
mod tests;
