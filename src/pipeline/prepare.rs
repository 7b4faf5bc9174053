//! A message made ready for the database, outside any transaction: its
//! canonical form hashed and its data validated, so that the transaction
//! spends no time on either.

use serde_json::Value;

use crate::{
    domain::canonical,
    domain::entity::{EntityId, EntityType},
    domain::message::{Action, Inbound},
    domain::validate::{Rejection, SchemaRegistry},
    store::batch::{Key, Need},
};

/// A message made ready for the database: hashed and validated, outside any transaction.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Entity type.
    pub entity_type: EntityType,
    /// Entity id.
    pub id: EntityId,
    /// Producer version, if sent.
    pub version: Option<i64>,
    /// The inbound AMQP `correlation_id`, copied onto events.
    pub correlation_id: Option<String>,
    /// The inbound AMQP `message_id`, for duplicate detection.
    pub message_id: Option<String>,
    /// The inbound message's W3C trace context, copied onto its events.
    pub trace: Option<crate::domain::trace::TraceContext>,
    /// What to do.
    pub kind: PreparedKind,
    /// The partition it came from, in partitioned mode: its events go to
    /// that partition's outbox lane.
    pub lane: Option<i32>,
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
            trace: None,
            kind,
            lane: None,
        }
    }

    /// The (type, id) the message is about, borrowed.
    pub(super) fn key_ref(&self) -> (&str, &str) {
        (self.entity_type.as_str(), self.id.as_str())
    }

    /// The (type, id) the message is about.
    pub(super) fn key(&self) -> Key {
        (
            self.entity_type.as_str().to_owned(),
            self.id.as_str().to_owned(),
        )
    }
}

/// The distinct keys of `prepared`, sorted: a batch locks them in this order.
pub(super) fn sorted_keys(prepared: &[Prepared]) -> Vec<Key> {
    let mut keys: Vec<Key> = prepared.iter().map(Prepared::key).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// For each of `keys` (as [`sorted_keys`] returns them), whether planning
/// needs the stored document: not when the batch's messages for the key are
/// all saves and its valid ones carry the same hash, unless the stored hash
/// differs from that one (a patch); a delete always needs it (`previous`).
/// Counts every message, duplicates and stale ones too: it may read more
/// than planning uses, never less.
pub(super) fn documents_needed<'a>(prepared: &'a [Prepared], keys: &[Key]) -> Vec<Need<'a>> {
    let mut needs = vec![Need::Nothing; keys.len()];
    for p in prepared {
        let Ok(at) = keys.binary_search_by(|(t, i)| {
            (t.as_str(), i.as_str()).cmp(&(p.entity_type.as_str(), p.id.as_str()))
        }) else {
            continue;
        };
        needs[at] = match (&p.kind, needs[at]) {
            (_, Need::Document) | (PreparedKind::Delete, _) => Need::Document,
            (
                PreparedKind::Save {
                    errors: Some(_), ..
                },
                need,
            ) => need,
            (PreparedKind::Save { hash, .. }, Need::Nothing) => Need::UnlessHashIs(hash),
            (PreparedKind::Save { hash, .. }, Need::UnlessHashIs(h)) if h == hash => {
                Need::UnlessHashIs(h)
            }
            (PreparedKind::Save { .. }, Need::UnlessHashIs(_)) => Need::Document,
        };
    }
    needs
}
