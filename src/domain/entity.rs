//! The two names every entity has: its type and its id, parsed once where
//! they enter (a message, a URL, a command line, a file) and carried as these
//! types afterwards, so nothing downstream checks them again.

use std::{borrow::Borrow, fmt, ops::Deref};

use super::message::{MAX_ID_BYTES, MAX_TYPE_BYTES, Malformed, quote};

/// The AMQP header of an inbound message that holds its `<type>/<id>`: the
/// key a partitioned deployment hashes on to pick the queue (CONTRACT §4).
/// A type holds no `/`, so the key is unambiguous.
pub const KEY_HEADER: &str = "scramjet-key";

/// The value of [`KEY_HEADER`] for `(entity_type, id)`.
pub fn key_of(entity_type: &str, id: &str) -> String {
    format!("{entity_type}/{id}")
}

/// An entity type: `^[A-Za-z][A-Za-z0-9_-]{0,63}$` (CONTRACT §2). It holds
/// no `/`, so `<type>/<id>` is an unambiguous key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntityType(String);

/// An entity id: non-empty, at most 512 bytes, no NUL (CONTRACT §2).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntityId(String);

impl EntityType {
    /// A type name read back from the database: the store holds only names
    /// that were parsed on their way in, so it is not checked again.
    pub(crate) fn stored(value: String) -> EntityType {
        EntityType(value)
    }

    /// Parses a type name, with the reason it is not one.
    pub fn parse(name: impl Into<String>) -> Result<EntityType, Malformed> {
        let name = name.into();
        let mut chars = name.chars();
        let valid = match chars.next() {
            None => false,
            Some(first) => {
                first.is_ascii_alphabetic()
                    && name.len() <= MAX_TYPE_BYTES
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            }
        };
        if valid {
            Ok(EntityType(name))
        } else {
            Err(Malformed(format!(
                "field \"type\" must match ^[A-Za-z][A-Za-z0-9_-]{{0,63}}$, got {}",
                quote(&name)
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl EntityId {
    /// A id read back from the database: the store holds only names
    /// that were parsed on their way in, so it is not checked again.
    pub(crate) fn stored(value: String) -> EntityId {
        EntityId(value)
    }

    /// Parses an id, with the reason it is not one.
    pub fn parse(id: impl Into<String>) -> Result<EntityId, Malformed> {
        let id = id.into();
        if id.is_empty() {
            return Err(Malformed("field \"id\" must not be empty".into()));
        }
        if id.len() > MAX_ID_BYTES {
            return Err(Malformed(format!(
                "field \"id\" is {} bytes long; the limit is {MAX_ID_BYTES}",
                id.len()
            )));
        }
        if id.contains('\0') {
            return Err(Malformed("field \"id\" contains a NUL character".into()));
        }
        Ok(EntityId(id))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

macro_rules! string_like {
    ($name:ident) => {
        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                $name::parse(raw).map_err(|m| serde::de::Error::custom(m.0))
            }
        }
    };
}

string_like!(EntityType);
string_like!(EntityId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_checked_at_the_edges_of_the_pattern() {
        assert!(EntityType::parse("a").is_ok());
        assert!(EntityType::parse("A_b-9").is_ok());
        assert!(EntityType::parse(format!("a{}", "b".repeat(63))).is_ok());
        assert!(EntityType::parse(format!("a{}", "b".repeat(64))).is_err());
        assert!(EntityType::parse("é").is_err());
        assert!(EntityType::parse("a*").is_err());
        assert!(EntityType::parse("a/b").is_err());
        assert!(EntityType::parse("").is_err());
    }

    #[test]
    fn ids_are_checked_at_the_edges_of_the_limit() {
        assert!(EntityId::parse("x".repeat(512)).is_ok());
        assert!(EntityId::parse("x".repeat(513)).is_err());
        // 256 two-byte characters are exactly 512 bytes.
        assert!(EntityId::parse("é".repeat(256)).is_ok());
        assert!(EntityId::parse("é".repeat(257)).is_err());
        assert!(EntityId::parse("").is_err());
        assert!(EntityId::parse("a\0b").is_err());
    }

    #[test]
    fn a_parsed_name_reads_and_serializes_as_its_text() {
        let t = EntityType::parse("person").unwrap();
        assert_eq!(&*t, "person");
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"person\"");
        let bad: Result<EntityType, _> = serde_json::from_str("\"a b\"");
        assert!(bad.unwrap_err().to_string().contains("must match"));
    }
}
