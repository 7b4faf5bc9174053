//! Inbound messages: bytes → a typed [`Inbound`] command, or a [`Malformed`]
//! reason to dead-letter. Nothing downstream looks at raw JSON again.

use std::fmt;

use serde_json::{Map, Value};

use crate::domain::{
    canonical,
    entity::{EntityId, EntityType},
};

/// Longest accepted entity id, in bytes (CONTRACT §2).
pub const MAX_ID_BYTES: usize = 512;
/// Longest accepted type name, in bytes (CONTRACT §2).
pub const MAX_TYPE_BYTES: usize = 64;

/// The deepest `limits.max_depth` may be: serde_json stops parsing at 128
/// levels of the whole body, and `data` sits one level down.
pub const MAX_DEPTH: usize = 120;

/// Limits an inbound message must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of `data` (`{}` is 1).
    pub max_depth: usize,
    /// Largest magnitude of a number's decimal exponent in `data`.
    pub max_exponent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1024 * 1024,
            max_depth: 64,
            max_exponent: DEFAULT_MAX_EXPONENT,
        }
    }
}

/// The default `limits.max_exponent`, the bound the filter language has
/// always had. `jsonb` stores numbers as `numeric`, which writes every digit
/// out on each read: `1e131071` is 8 bytes in a message and 131,072 in
/// every read of the row. With this bound a number grows at most about a
/// thousand digits.
pub const DEFAULT_MAX_EXPONENT: u64 = 1000;

/// PostgreSQL's `numeric` (and so `jsonb`) holds at most this many digits
/// before the decimal point…
const PG_MAX_INTEGER_DIGITS: i64 = 131_072;
/// …and at most this many after it.
const PG_MAX_FRACTION_DIGITS: i64 = 16_383;

/// Why a message cannot be processed; it goes to the dead-letter exchange
/// with this text in `x-scramjet-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::error::Error for Malformed {}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! malformed {
    ($($arg:tt)*) => { Malformed(format!($($arg)*)) };
}

/// A well-formed inbound message.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Entity type.
    pub entity_type: EntityType,
    /// Entity id.
    pub id: EntityId,
    /// Optional producer version (CONTRACT §4), ≥ 0.
    pub version: Option<i64>,
    /// What to do.
    pub action: Action,
}

/// The operation an inbound message asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Store `data` (after validation).
    Save {
        /// The entity, a JSON object with numbers exactly as sent.
        data: Map<String, Value>,
    },
    /// Remove the entity.
    Delete,
}

/// Parses one message body within `limits`.
pub fn decode(body: &[u8], limits: Limits) -> Result<Inbound, Malformed> {
    let max_bytes = limits.max_bytes;
    if body.len() > max_bytes {
        return Err(malformed!(
            "message body of {} bytes exceeds the limit of {max_bytes} bytes",
            body.len()
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| malformed!("body is not valid UTF-8: {e}"))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| malformed!("body is not valid JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err(malformed!(
            "body is a JSON {}, not an object",
            kind_of(&value)
        ));
    };

    let action = required_string(&fields, "action")?.to_owned();
    let entity_type = EntityType::parse(required_string(&fields, "type")?)?;
    let id = EntityId::parse(required_string(&fields, "id")?)?;
    let version = match fields.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if v >= 0 => Some(v),
            _ => {
                return Err(malformed!(
                    "field \"version\" must be an integer from 0 to {}, got {n}",
                    i64::MAX
                ));
            }
        },
        Some(other) => {
            return Err(malformed!(
                "field \"version\" must be an integer, got a {}",
                kind_of(other)
            ));
        }
    };

    let action = match action.as_str() {
        "save" => {
            let data = match fields.remove("data") {
                Some(Value::Object(data)) => data,
                None | Some(Value::Null) => {
                    return Err(malformed!(
                        "a save needs a field \"data\" holding an object"
                    ));
                }
                Some(other) => {
                    return Err(malformed!(
                        "field \"data\" must be an object, got a {}",
                        kind_of(&other)
                    ));
                }
            };
            let mut path = String::new();
            check_storable_object(&data, &mut path, 1, limits)?;
            Action::Save { data }
        }
        "delete" => Action::Delete,
        other => {
            return Err(malformed!(
                "unknown action {} (expected \"save\" or \"delete\")",
                quote(other)
            ));
        }
    };
    Ok(Inbound {
        entity_type,
        id,
        version,
        action,
    })
}

/// Checks that an entity document is storable within `limits`: nesting
/// depth, no NUL in strings or keys, numbers within `numeric`'s range and
/// `max_exponent` (what the decoder checks in a message's `data`; `scramjet
/// ingest` checks its records with it too).
pub fn check_data(data: &Map<String, Value>, limits: Limits) -> Result<(), Malformed> {
    let mut path = String::new();
    check_storable_object(data, &mut path, 1, limits)
}

fn required_string<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, Malformed> {
    match fields.get(name) {
        Some(Value::String(s)) => Ok(s),
        None => Err(malformed!("missing required field \"{name}\"")),
        Some(other) => Err(malformed!(
            "field \"{name}\" must be a string, got a {}",
            kind_of(other)
        )),
    }
}

/// Rejects what PostgreSQL's `jsonb` cannot store: NUL in a string or key,
/// and numbers beyond `numeric`'s range; and numbers with an exponent beyond
/// `limits.max_exponent`. `path` is the JSON Pointer so far.
fn check_storable_object(
    map: &Map<String, Value>,
    path: &mut String,
    depth: usize,
    limits: Limits,
) -> Result<(), Malformed> {
    check_depth(path, depth, limits.max_depth)?;
    for (key, value) in map {
        let len = path.len();
        path.push('/');
        canonical::push_pointer_token(path, key);
        if key.contains('\0') {
            return Err(malformed!(
                "data has a key with a NUL character (\\u0000) at {}, which PostgreSQL cannot store",
                quote(path)
            ));
        }
        check_storable(value, path, depth + 1, limits)?;
        path.truncate(len);
    }
    Ok(())
}

fn check_depth(path: &str, depth: usize, max_depth: usize) -> Result<(), Malformed> {
    if depth > max_depth {
        return Err(malformed!(
            "data nests deeper than the limit of {max_depth} levels at {}",
            quote(path)
        ));
    }
    Ok(())
}

fn check_storable(
    value: &Value,
    path: &mut String,
    depth: usize,
    limits: Limits,
) -> Result<(), Malformed> {
    match value {
        Value::String(s) if s.contains('\0') => Err(malformed!(
            "data has a NUL character (\\u0000) in the string at {}, which PostgreSQL cannot store",
            quote(path)
        )),
        Value::Number(n) if !numeric_fits(n.as_str()) => Err(malformed!(
            "data has the number at {} outside what PostgreSQL can store",
            quote(path)
        )),
        Value::Number(n) if exponent_magnitude(n.as_str()) > limits.max_exponent => {
            Err(malformed!(
                "data has the number at {} with an exponent beyond limits.max_exponent ({}), \
                 which PostgreSQL would write out digit by digit on every read",
                quote(path),
                limits.max_exponent
            ))
        }
        Value::Array(items) => {
            check_depth(path, depth, limits.max_depth)?;
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                check_storable(item, path, depth + 1, limits)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => check_storable_object(map, path, depth, limits),
        _ => Ok(()),
    }
}

/// Whether a JSON number literal fits PostgreSQL's `numeric`: at most 131072
/// digits before the decimal point and 16383 after it, once the exponent is applied.
fn numeric_fits(literal: &str) -> bool {
    let unsigned = literal.strip_prefix('-').unwrap_or(literal);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => {
            let exp = &unsigned[at + 1..];
            let exp = exp.strip_prefix('+').unwrap_or(exp);
            // An exponent too long for i64 is far out of range either way;
            // saturate so the comparisons below reject it.
            let parsed = exp.parse::<i64>().unwrap_or(if exp.starts_with('-') {
                i64::MIN / 2
            } else {
                i64::MAX / 2
            });
            (&unsigned[..at], parsed.clamp(i64::MIN / 2, i64::MAX / 2))
        }
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let frac_digits = frac_part.len() as i64;
    let significant_int = int_part.trim_start_matches('0').len() as i64;
    let all_zero = significant_int == 0 && frac_part.bytes().all(|b| b == b'0');
    if all_zero {
        // Zero has no magnitude; only the scale can overflow.
        return frac_digits - exponent <= PG_MAX_FRACTION_DIGITS || exponent > 0;
    }
    let integer_digits = if significant_int > 0 {
        significant_int + exponent
    } else {
        // 0.000123e5: the first significant digit sits after the zeros.
        let leading_zeros = frac_part.bytes().take_while(|&b| b == b'0').count() as i64;
        exponent - leading_zeros
    };
    let scale = frac_digits - exponent;
    integer_digits <= PG_MAX_INTEGER_DIGITS && scale <= PG_MAX_FRACTION_DIGITS
}

/// The magnitude of a JSON number literal's exponent as written (`0` when it
/// has none); `u64::MAX` when it is too long to count.
fn exponent_magnitude(literal: &str) -> u64 {
    let Some((_, exponent)) = literal.split_once(['e', 'E']) else {
        return 0;
    };
    let digits = exponent
        .trim_start_matches(['+', '-'])
        .trim_start_matches('0');
    digits
        .parse()
        .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Quotes a value for an error message, shortened so the reason stays one short line.
pub(crate) fn quote(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return serde_json::to_string(s).expect("a string serializes");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let head = serde_json::to_string(&s[..end]).expect("a string serializes");
    format!("{head}… ({} bytes)", s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        decode(body.as_bytes(), Limits::default()).unwrap_err().0
    }

    #[test]
    fn a_save_decodes_with_numbers_exactly_as_sent() {
        let m = decode(
            br#"{"action":"save","type":"person","id":"p1","version":7,
                "data":{"big":12345678901234567890123,"f":0.1000000000000000055511151231257827}}"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(m.entity_type, "person");
        assert_eq!(m.id, "p1");
        assert_eq!(m.version, Some(7));
        let Action::Save { data } = m.action else {
            panic!("expected a save")
        };
        assert_eq!(data["big"].to_string(), "12345678901234567890123");
        assert_eq!(
            data["f"].to_string(),
            "0.1000000000000000055511151231257827"
        );
    }

    #[test]
    fn a_delete_needs_no_data_and_ignores_unknown_fields() {
        let m = decode(
            br#"{"action":"delete","type":"person","id":"it's a k\u00e9y","extra":1}"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(m.action, Action::Delete);
        assert_eq!(m.id, "it's a kéy");
        assert_eq!(m.version, None);
    }

    #[test]
    fn every_malformed_case_has_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (b"", "not valid JSON"),
            (b"\xff\xfe{}", "not valid UTF-8"),
            (b"[1,2]", "JSON array, not an object"),
            (b"\"s\"", "JSON string, not an object"),
            (br#"{"type":"a","id":"b"}"#, "missing required field \"action\""),
            (br#"{"action":"save","id":"b","data":{}}"#, "missing required field \"type\""),
            (br#"{"action":"save","type":"a","data":{}}"#, "missing required field \"id\""),
            (br#"{"action":1,"type":"a","id":"b"}"#, "\"action\" must be a string, got a number"),
            (br#"{"action":"save","type":["a"],"id":"b","data":{}}"#, "\"type\" must be a string"),
            (br#"{"action":"save","type":"a","id":5,"data":{}}"#, "\"id\" must be a string"),
            (br#"{"action":"upsert","type":"a","id":"b"}"#, "unknown action \"upsert\""),
            (br#"{"action":"save","type":"per.son","id":"b","data":{}}"#, "\"type\" must match"),
            (br#"{"action":"save","type":"","id":"b","data":{}}"#, "\"type\" must match"),
            (br#"{"action":"save","type":"1abc","id":"b","data":{}}"#, "\"type\" must match"),
            (br#"{"action":"save","type":"a#b","id":"b","data":{}}"#, "\"type\" must match"),
            (br#"{"action":"save","type":"a","id":"","data":{}}"#, "\"id\" must not be empty"),
            (br#"{"action":"save","type":"a","id":"x\u0000y","data":{}}"#, "NUL"),
            (br#"{"action":"save","type":"a","id":"b"}"#, "needs a field \"data\""),
            (br#"{"action":"save","type":"a","id":"b","data":null}"#, "needs a field \"data\""),
            (br#"{"action":"save","type":"a","id":"b","data":[1]}"#, "\"data\" must be an object, got a array"),
            (br#"{"action":"save","type":"a","id":"b","data":"{}"}"#, "\"data\" must be an object, got a string"),
            (br#"{"action":"save","type":"a","id":"b","data":{"x":"a\u0000"}}"#, "NUL character (\\u0000) in the string at \"/x\""),
            (br#"{"action":"save","type":"a","id":"b","data":{"x":[{"y~/":"\u0000"}]}}"#, "at \"/x/0/y~0~1\""),
            (br#"{"action":"save","type":"a","id":"b","data":{"k\u0000":1}}"#, "key with a NUL"),
            (br#"{"action":"save","type":"a","id":"b","data":{"n":1e200000}}"#, "outside what PostgreSQL can store"),
            (br#"{"action":"save","type":"a","id":"b","data":{"n":1e-20000}}"#, "outside what PostgreSQL can store"),
            (br#"{"action":"save","type":"a","id":"b","version":-1,"data":{}}"#, "\"version\" must be an integer from 0"),
            (br#"{"action":"save","type":"a","id":"b","version":1.5,"data":{}}"#, "\"version\" must be an integer from 0"),
            (br#"{"action":"save","type":"a","id":"b","version":"1","data":{}}"#, "\"version\" must be an integer, got a string"),
            (br#"{"action":"save","type":"a","id":"b","version":99999999999999999999,"data":{}}"#, "\"version\" must be an integer from 0"),
        ];
        for (body, expected) in cases {
            let reason = decode(body, Limits::default()).unwrap_err().0;
            assert!(
                reason.contains(expected),
                "body {:?}: reason {reason:?} lacks {expected:?}",
                String::from_utf8_lossy(body)
            );
            assert!(
                !reason.contains('\n'),
                "reason must be one line: {reason:?}"
            );
        }
    }

    #[test]
    fn a_body_over_the_limit_is_malformed_before_parsing() {
        let limits = Limits {
            max_bytes: 64,
            ..Limits::default()
        };
        let reason = decode(&[b' '; 100], limits).unwrap_err().0;
        assert_eq!(
            reason,
            "message body of 100 bytes exceeds the limit of 64 bytes"
        );
    }

    #[test]
    fn nesting_is_limited_with_the_data_object_at_depth_one() {
        let nested = |levels: usize| {
            let mut data = String::from("1");
            for _ in 1..levels {
                data = format!("[{data}]");
            }
            format!(r#"{{"action":"save","type":"a","id":"b","data":{{"x":{data}}}}}"#)
        };
        let limits = Limits {
            max_depth: 5,
            ..Limits::default()
        };
        // data {} = 1, then 4 arrays = 5 levels; one more array is 6.
        assert!(decode(nested(5).as_bytes(), limits).is_ok());
        let reason = decode(nested(6).as_bytes(), limits).unwrap_err().0;
        assert!(
            reason.contains("deeper than the limit of 5 levels"),
            "{reason}"
        );
        assert!(reason.contains("\"/x/0/0/0/0\""), "{reason}");
        // Past serde_json's own recursion limit the body is not JSON at all.
        let reason = err(&nested(200));
        assert!(reason.contains("not valid JSON"), "{reason}");
    }

    #[test]
    fn a_lone_surrogate_is_not_json() {
        assert!(
            err(r#"{"action":"save","type":"a","id":"b","data":{"x":"\ud800"}}"#)
                .contains("not valid JSON")
        );
    }

    #[test]
    fn numbers_at_the_edges_of_numeric_fit_or_not() {
        assert!(numeric_fits("1e131071"));
        assert!(!numeric_fits("1e131072"));
        assert!(numeric_fits("1e-16383"));
        assert!(!numeric_fits("1e-16384"));
        assert!(numeric_fits("0.0001e131075"));
        assert!(numeric_fits("-0"));
        assert!(numeric_fits("0e99999999999999999999999"));
        assert!(!numeric_fits("1e99999999999999999999999"));
        assert!(!numeric_fits("1e-99999999999999999999999"));
        assert!(numeric_fits("12345678901234567890123"));
    }

    #[test]
    fn exponents_beyond_max_exponent_are_malformed_whatever_their_sign() {
        let save = |n: &str| {
            decode(
                format!(r#"{{"action":"save","type":"a","id":"b","data":{{"n":[{n}]}}}}"#)
                    .as_bytes(),
                Limits::default(),
            )
        };
        for fits in ["1e400", "1e-400", "1E+1000", "-2.5e-1000", "1e0001000", "7"] {
            assert!(save(fits).is_ok(), "{fits}");
        }
        for expands in ["1e1001", "1E-1001", "-1e+131071", "0e5000"] {
            let reason = save(expands).unwrap_err().0;
            assert!(reason.contains("limits.max_exponent (1000)"), "{reason}");
            assert!(reason.contains("\"/n/0\""), "{reason}");
        }
        let limits = Limits {
            max_exponent: 10,
            ..Limits::default()
        };
        let data = serde_json::from_str(r#"{"n":1e11}"#).unwrap();
        assert!(check_data(&data, limits).is_err());
    }

    #[test]
    fn long_values_are_shortened_in_reasons() {
        let long = "x".repeat(600);
        let reason = err(&format!(r#"{{"action":"{long}","type":"a","id":"b"}}"#));
        assert!(reason.len() < 200, "{reason}");
        assert!(reason.contains("(600 bytes)"));
    }
}
