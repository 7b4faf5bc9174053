//! What an ingest does: [`IngestOptions`].

use super::DEFAULT_CHUNK;
use crate::api::filter::Filter;

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
