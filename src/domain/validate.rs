//! JSON Schema validation, one draft 2020-12 schema per entity type, loaded
//! from `<schema_dir>/<type>.json` at start-up.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Serialize;
use serde_json::Value;

use crate::{config::UnknownTypes, domain::entity::EntityType};

/// One reason a document does not satisfy its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationError {
    /// JSON Pointer (RFC 6901) into the data; `""` for the whole document.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

/// Why a document does not satisfy its schema: the first errors found, at
/// most `validation.max_errors` of them, and how many there were in all.
///
/// A 1 MB array of wrong items has half a million errors; listing them all
/// made a 31 MB `rejected` event, more than a broker may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The first errors, in the validator's order.
    pub errors: Vec<ValidationError>,
    /// How many errors the document has in all (at least `errors.len()`).
    pub total: usize,
}

impl Rejection {
    /// The errors as `staging.errors` keeps them: the listed ones, then, if
    /// some were left out, one more entry (path `""`) saying how many, with
    /// the number in `omitted`.
    pub fn staging_json(&self) -> String {
        let mut list = serde_json::to_value(&self.errors).expect("errors serialize");
        let omitted = self.total - self.errors.len();
        if omitted > 0 {
            list.as_array_mut()
                .expect("errors serialize to an array")
                .push(serde_json::json!({
                    "path": "",
                    "message": format!(
                        "{omitted} more errors not listed (validation.max_errors is {})",
                        self.errors.len()
                    ),
                    "omitted": omitted,
                }));
        }
        list.to_string()
    }
}

/// Longest `message` of a [`ValidationError`], in bytes.
pub const MAX_MESSAGE_BYTES: usize = 200;
/// Longest rendering of the offending value inside a message, in bytes.
const MAX_VALUE_BYTES: usize = 40;

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
    /// Most errors listed per rejection (`validation.max_errors`).
    max_errors: usize,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<_> = self.validators.keys().collect();
        types.sort();
        f.debug_struct("SchemaRegistry")
            .field("types", &types)
            .field("unknown_types", &self.unknown_types)
            .field("max_errors", &self.max_errors)
            .finish()
    }
}

impl SchemaRegistry {
    /// Loads every `*.json` file of `dir`. Any broken file is an error naming
    /// it. Rejections list at most `max_errors` errors.
    pub fn load(
        dir: &Path,
        unknown_types: UnknownTypes,
        max_errors: usize,
    ) -> Result<Self, SchemaError> {
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
            if EntityType::parse(stem).is_err() {
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
            max_errors,
        })
    }

    /// The types that have a schema, sorted.
    pub fn types(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.validators.keys().map(String::as_str).collect();
        t.sort_unstable();
        t
    }

    /// Validates `data` for `entity_type`: `Ok`, or the first
    /// `max_errors` errors and their total.
    pub fn validate(&self, entity_type: &str, data: &Value) -> Result<(), Rejection> {
        match self.validators.get(entity_type) {
            Some(validator) => {
                let mut errors = Vec::new();
                let mut total = 0;
                for e in validator.iter_errors(data) {
                    total += 1;
                    if errors.len() < self.max_errors {
                        errors.push(ValidationError {
                            path: e.instance_path().as_str().to_owned(),
                            message: message(&e),
                        });
                    }
                }
                if total == 0 {
                    Ok(())
                } else {
                    Err(Rejection { errors, total })
                }
            }
            None => match self.unknown_types {
                UnknownTypes::Accept => Ok(()),
                UnknownTypes::Reject => Err(Rejection {
                    errors: vec![ValidationError {
                        path: String::new(),
                        message: format!(
                            "no schema for type \"{entity_type}\" and validation.unknown_types is \"reject\""
                        ),
                    }],
                    total: 1,
                }),
            },
        }
    }
}

/// An error's message with the offending value shortened: the validator
/// would embed all of it (a 100 KB string, a whole object), once per error.
fn message(e: &jsonschema::ValidationError<'_>) -> String {
    let text = e.masked_with(short_rendering(e.instance())).to_string();
    // Some messages name things besides the value (unexpected property
    // names, a custom message), which can be long as well.
    truncate(text, MAX_MESSAGE_BYTES)
}

/// The value as JSON, cut after [`MAX_VALUE_BYTES`] bytes with `…`; it is
/// never serialized further than that.
fn short_rendering(value: &Value) -> String {
    /// Keeps the first bytes written, then refuses more, which ends the serialization.
    struct Prefix(Vec<u8>);
    impl std::io::Write for Prefix {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = MAX_VALUE_BYTES + 1 - self.0.len();
            if room == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let n = buf.len().min(room);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut prefix = Prefix(Vec::new());
    // An error only means the prefix is full.
    let _ = serde_json::to_writer(&mut prefix, value);
    let text = match String::from_utf8(prefix.0) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            String::from_utf8(bytes).expect("cut at a character boundary")
        }
    };
    truncate(text, MAX_VALUE_BYTES)
}

/// `text` if it has at most `max` bytes, else its start (at a character
/// boundary) and `…`, `max` bytes in all at most.
fn truncate(mut text: String, max: usize) -> String {
    const ELLIPSIS: &str = "…";
    if text.len() <= max {
        return text;
    }
    let mut end = max - ELLIPSIS.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(ELLIPSIS);
    text
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
    /// Most errors listed per rejection.
    max_errors: usize,
    /// The registry in use.
    current: std::sync::RwLock<std::sync::Arc<SchemaRegistry>>,
}

impl Schemas {
    /// Loads `dir` for the first time (an error stops start-up).
    pub fn load(
        dir: &Path,
        unknown_types: UnknownTypes,
        max_errors: usize,
    ) -> Result<Schemas, SchemaError> {
        let registry = SchemaRegistry::load(dir, unknown_types, max_errors)?;
        Ok(Schemas {
            dir: dir.to_owned(),
            unknown_types,
            max_errors,
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
        let registry = SchemaRegistry::load(&self.dir, self.unknown_types, self.max_errors)?;
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
        SchemaRegistry::load(dir.path(), unknown, 100)
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
        assert_eq!(errors.total, 2);
        let mut paths: Vec<_> = errors.errors.iter().map(|e| e.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, vec!["/age", "/name"]);
        let errors = r.validate("person", &json!({})).unwrap_err().errors;
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
        let errors = reject.validate("thing", &json!({})).unwrap_err().errors;
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
        let e = SchemaRegistry::load(Path::new("/nonexistent/schemas"), UnknownTypes::Accept, 100)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/schemas"));
    }

    #[test]
    fn a_rejection_lists_max_errors_and_counts_the_rest_for_staging() {
        let schema =
            r#"{"type":"object","properties":{"a":{"type":"array","items":{"type":"string"}}}}"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("l.json"), schema).unwrap();
        let r = SchemaRegistry::load(dir.path(), UnknownTypes::Accept, 3).unwrap();
        let rejection = r.validate("l", &json!({"a": [1, 2, 3, 4, 5]})).unwrap_err();
        assert_eq!(rejection.total, 5);
        let paths: Vec<_> = rejection.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/a/0", "/a/1", "/a/2"]);
        let staged: Value = serde_json::from_str(&rejection.staging_json()).unwrap();
        assert_eq!(staged.as_array().unwrap().len(), 4);
        assert_eq!(staged[3]["omitted"], 2);
        assert_eq!(
            staged[3]["message"],
            "2 more errors not listed (validation.max_errors is 3)"
        );
        let one = r.validate("l", &json!({"a": [1]})).unwrap_err();
        let staged: Value = serde_json::from_str(&one.staging_json()).unwrap();
        assert_eq!(
            staged,
            json!([{"path": "/a/0", "message": "1 is not of type \"string\""}])
        );
    }

    #[test]
    fn messages_show_a_short_rendering_of_the_value() {
        let schema = r#"{"type":"object","properties":{"s":{"type":"integer"},"o":{"type":"string"},"e":{"type":"object","propertyNames":{"maxLength":3}}}}"#;
        let r = registry(&[("t.json", schema)], UnknownTypes::Accept).unwrap();
        let long = "é".repeat(50_000);
        // The validator names a bad property name in full, unmasked.
        let mut e = serde_json::Map::new();
        e.insert("k".repeat(10_000), json!(1));
        let data = json!({"s": long, "o": {"k": long}, "e": e});
        let errors = r.validate("t", &data).unwrap_err().errors;
        let by_path = |p: &str| {
            errors
                .iter()
                .find(|e| e.path == p)
                .unwrap_or_else(|| panic!("no error at {p}: {errors:?}"))
                .message
                .clone()
        };
        let s = by_path("/s");
        assert!(
            s.starts_with("\"éé") && s.ends_with("… is not of type \"integer\""),
            "{s}"
        );
        assert!(s.len() <= MAX_MESSAGE_BYTES, "{s}");
        let o = by_path("/o");
        assert!(
            o.starts_with("{\"k\":\"é") && o.ends_with("is not of type \"string\""),
            "{o}"
        );
        let e = by_path("/e");
        assert!(e.len() <= MAX_MESSAGE_BYTES && e.ends_with('…'), "{e}");
        assert!(e.starts_with("\"kkkk"), "{e}");
        assert_eq!(truncate("abc".into(), 3), "abc");
        assert_eq!(truncate("abcdef".into(), 5), "ab…");
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
