//! JSON Schema validation, one draft 2020-12 schema per entity type, loaded
//! from `<schema_dir>/<type>.json` at start-up.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Serialize;
use serde_json::Value;

use crate::{config::UnknownTypes, message};

/// One reason a document does not satisfy its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationError {
    /// JSON Pointer (RFC 6901) into the data; `""` for the whole document.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

/// A schema file that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema directory is missing or unreadable.
    #[error("cannot read schema directory {}: {source}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("cannot read schema file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not JSON.
    #[error("schema file {} is not valid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A file is JSON but not a valid draft 2020-12 schema.
    #[error("schema file {} is not a valid JSON Schema (draft 2020-12): {reason}", path.display())]
    Schema {
        /// The file.
        path: PathBuf,
        /// Why, as the validator put it.
        reason: String,
    },
}

/// The compiled schemas, by type.
pub struct SchemaRegistry {
    /// Compiled validators keyed by entity type (the file stem).
    validators: HashMap<String, jsonschema::Validator>,
    /// What to do with a type that has no schema.
    unknown_types: UnknownTypes,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<_> = self.validators.keys().collect();
        types.sort();
        f.debug_struct("SchemaRegistry")
            .field("types", &types)
            .field("unknown_types", &self.unknown_types)
            .finish()
    }
}

impl SchemaRegistry {
    /// Loads every `*.json` file of `dir`. Any broken file is an error naming it.
    pub fn load(dir: &Path, unknown_types: UnknownTypes) -> Result<Self, SchemaError> {
        let entries = std::fs::read_dir(dir).map_err(|source| SchemaError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let mut validators = HashMap::new();
        for entry in entries {
            let entry = entry.map_err(|source| SchemaError::Directory {
                path: dir.to_owned(),
                source,
            })?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") || !path.is_file() {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if message::check_type(stem).is_err() {
                tracing::warn!(file = %path.display(), "ignoring a schema file whose name is not a valid type name");
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|source| SchemaError::Read {
                path: path.clone(),
                source,
            })?;
            let schema: Value =
                serde_json::from_str(&text).map_err(|source| SchemaError::Json {
                    path: path.clone(),
                    source,
                })?;
            let validator =
                jsonschema::draft202012::new(&schema).map_err(|e| SchemaError::Schema {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            validators.insert(stem.to_owned(), validator);
        }
        Ok(Self {
            validators,
            unknown_types,
        })
    }

    /// The types that have a schema, sorted.
    pub fn types(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.validators.keys().map(String::as_str).collect();
        t.sort_unstable();
        t
    }

    /// Validates `data` for `entity_type`; `Ok` or every error found.
    pub fn validate(&self, entity_type: &str, data: &Value) -> Result<(), Vec<ValidationError>> {
        match self.validators.get(entity_type) {
            Some(validator) => {
                let errors: Vec<ValidationError> = validator
                    .iter_errors(data)
                    .map(|e| ValidationError {
                        path: e.instance_path().as_str().to_owned(),
                        message: e.to_string(),
                    })
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors)
                }
            }
            None => match self.unknown_types {
                UnknownTypes::Accept => Ok(()),
                UnknownTypes::Reject => Err(vec![ValidationError {
                    path: String::new(),
                    message: format!(
                        "no schema for type \"{entity_type}\" and validation.unknown_types is \"reject\""
                    ),
                }]),
            },
        }
    }
}

/// The schemas in use, replaceable while the daemon runs (SIGHUP).
///
/// Each batch takes the registry current when it starts, so a reload never
/// changes the rules in the middle of a batch.
#[derive(Debug)]
pub struct Schemas {
    /// Where the files are.
    dir: PathBuf,
    /// The policy for types without a schema.
    unknown_types: UnknownTypes,
    /// The registry in use.
    current: std::sync::RwLock<std::sync::Arc<SchemaRegistry>>,
}

impl Schemas {
    /// Loads `dir` for the first time (an error stops start-up).
    pub fn load(dir: &Path, unknown_types: UnknownTypes) -> Result<Schemas, SchemaError> {
        let registry = SchemaRegistry::load(dir, unknown_types)?;
        Ok(Schemas {
            dir: dir.to_owned(),
            unknown_types,
            current: std::sync::RwLock::new(std::sync::Arc::new(registry)),
        })
    }

    /// The registry in use now.
    pub fn current(&self) -> std::sync::Arc<SchemaRegistry> {
        self.current
            .read()
            .expect("never poisoned: no code panics holding it")
            .clone()
    }

    /// Reads the directory again. On success the new schemas apply from the
    /// next batch on; on error the old ones stay and the error says why.
    pub fn reload(&self) -> Result<Vec<String>, SchemaError> {
        let registry = SchemaRegistry::load(&self.dir, self.unknown_types)?;
        let types = registry.types().into_iter().map(str::to_owned).collect();
        *self
            .current
            .write()
            .expect("never poisoned: no code panics holding it") = std::sync::Arc::new(registry);
        Ok(types)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry(
        files: &[(&str, &str)],
        unknown: UnknownTypes,
    ) -> Result<SchemaRegistry, SchemaError> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        SchemaRegistry::load(dir.path(), unknown)
    }

    const PERSON: &str = r#"{
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer"}}
    }"#;

    #[test]
    fn valid_data_passes_and_invalid_data_lists_pointer_paths() {
        let r = registry(&[("person.json", PERSON)], UnknownTypes::Accept).unwrap();
        assert_eq!(r.types(), vec!["person"]);
        assert!(r.validate("person", &json!({"name": "Ada"})).is_ok());
        let errors = r
            .validate("person", &json!({"name": "", "age": "x"}))
            .unwrap_err();
        let mut paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, vec!["/age", "/name"]);
        let errors = r.validate("person", &json!({})).unwrap_err();
        assert_eq!(errors[0].path, "");
        assert!(
            errors[0].message.contains("name"),
            "{:?}",
            errors[0].message
        );
    }

    #[test]
    fn unknown_types_follow_the_policy() {
        let accept = registry(&[], UnknownTypes::Accept).unwrap();
        assert!(accept.validate("thing", &json!({})).is_ok());
        let reject = registry(&[], UnknownTypes::Reject).unwrap();
        let errors = reject.validate("thing", &json!({})).unwrap_err();
        assert_eq!(errors[0].path, "");
        assert!(errors[0].message.contains("no schema for type \"thing\""));
    }

    #[test]
    fn a_broken_schema_file_is_an_error_naming_it() {
        let e = registry(&[("person.json", "{not json")], UnknownTypes::Accept).unwrap_err();
        assert!(e.to_string().contains("person.json"), "{e}");
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = registry(&[("org.json", r#"{"type": 12}"#)], UnknownTypes::Accept).unwrap_err();
        assert!(e.to_string().contains("org.json"), "{e}");
        assert!(e.to_string().contains("not a valid JSON Schema"), "{e}");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let e = SchemaRegistry::load(Path::new("/nonexistent/schemas"), UnknownTypes::Accept)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/schemas"));
    }

    #[test]
    fn big_numbers_validate_without_rounding() {
        let schema = r#"{"type":"object","properties":{"n":{"type":"integer","maximum":12345678901234567890123}}}"#;
        let r = registry(&[("n.json", schema)], UnknownTypes::Accept).unwrap();
        let ok: Value = serde_json::from_str(r#"{"n":12345678901234567890123}"#).unwrap();
        let over: Value = serde_json::from_str(r#"{"n":12345678901234567890124}"#).unwrap();
        assert!(r.validate("n", &ok).is_ok());
        assert!(r.validate("n", &over).is_err());
    }
}
