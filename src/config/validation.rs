//! `[validation]`: JSON Schema validation.

use std::path::PathBuf;

use serde::Deserialize;

/// What to do with a save whose type has no schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTypes {
    /// Treat it as valid.
    #[default]
    Accept,
    /// Reject it (a `rejected` event, the row kept in staging).
    Reject,
}

/// Validation settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationSettings {
    /// Directory holding `<type>.json` schemas (draft 2020-12).
    pub schema_dir: PathBuf,
    /// Policy for types without a schema.
    pub unknown_types: UnknownTypes,
    /// Most validation errors listed per rejection (in its event and in
    /// staging); the total is kept beside them.
    pub max_errors: usize,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        Self {
            schema_dir: PathBuf::from("config/schemas"),
            unknown_types: UnknownTypes::Accept,
            max_errors: 100,
        }
    }
}
