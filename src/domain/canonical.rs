//! The canonical form of a JSON document and its SHA-256 hash.
//!
//! Two saves are "the same" exactly when their canonical forms are byte-equal,
//! so key order and whitespace never count as a change. The form (specified
//! for downstream consumers in `docs/canonical-json.md`):
//!
//! - no whitespace outside strings;
//! - object members sorted by key, comparing the keys' UTF-8 bytes (which is
//!   Unicode code point order); duplicate keys cannot occur (the last one in
//!   the input wins when parsing);
//! - numbers exactly as written in the input (`1.0`, `-0`, `1.50` and
//!   `12345678901234567890123` are kept character for character), except
//!   that an exponent is always written as a lowercase `e` followed by its
//!   sign: `1E2` and `1e2` become `1e+2`, `1.5E-02` becomes `1.5e-02`;
//! - strings in double quotes, escaping only `"` → `\"`, `\` → `\\`, the
//!   control characters U+0008 `\b`, U+0009 `\t`, U+000A `\n`, U+000C `\f`,
//!   U+000D `\r`, and every other character below U+0020 as `\u00XX` with
//!   lowercase hex; everything else (including `/`, U+007F and all non-ASCII)
//!   is written as raw UTF-8;
//! - `true`, `false`, `null` as such.
//!
//! The hash is the lowercase hex SHA-256 of those bytes.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The canonical text of `value`.
pub fn to_canonical(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_value(&mut out, value);
    out
}

/// The canonical text of a JSON object.
pub fn object_to_canonical(map: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(256);
    write_object(&mut out, map);
    out
}

/// Appends the canonical text of `value` to `out`.
pub fn push_value(out: &mut String, value: &Value) {
    write_value(out, value);
}

/// Appends `s` as a canonical JSON string (quoted and escaped) to `out`.
pub fn push_string(out: &mut String, s: &str) {
    write_string(out, s);
}

/// Lowercase hex SHA-256 of canonical text.
pub fn hash(canonical: &str) -> String {
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        // With `arbitrary_precision`, a Number is the literal text from the input.
        Value::Number(n) => out.push_str(n.as_str()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

fn write_object(out: &mut String, map: &Map<String, Value>) {
    // Sort explicitly rather than trusting the map's iteration order: another
    // crate in the build enabling serde_json's `preserve_order` must not change hashes.
    let mut members: Vec<(&String, &Value)> = map.iter().collect();
    members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push('{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value);
    }
    out.push('}');
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(i) = find_escape(bytes, start) {
        let b = bytes[i];
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x09 => "\\t",
            0x0A => "\\n",
            0x0C => "\\f",
            0x0D => "\\r",
            _ => "",
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xF) as usize] as char);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Bytes of a word, each `0x01` / `0x80`, for the word-at-a-time scans below.
const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// The high bit of each byte of `word` that is zero. Exact for the lowest
/// flagged byte (a borrow only runs towards higher bytes, from a zero byte),
/// which is the only one the scans read.
const fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// The high bit of each byte of `word` below `0x20` (exact for the lowest
/// flagged byte, as [`zero_bytes`]).
const fn control_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES * 0x20) & !word & HIGHS
}

/// Where the lowest flagged byte of `mask` lies, for a word read with
/// `from_le_bytes` (byte 0 lowest).
fn first_flagged(mask: u64) -> usize {
    (mask.trailing_zeros() / 8) as usize
}

/// The first index at or after `from` of a byte a canonical string escapes
/// (`"`, `\`, or one below `0x20`), eight bytes at a time: documents are
/// mostly long runs of plain text, and this scan was the daemon's largest
/// symbol at 100 KB (BENCHMARKS.md).
fn find_escape(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("eight bytes"));
        let mask = control_bytes(word)
            | zero_bytes(word ^ (ONES * u64::from(b'"')))
            | zero_bytes(word ^ (ONES * u64::from(b'\\')));
        if mask != 0 {
            return Some(i + first_flagged(mask));
        }
        i += 8;
    }
    bytes[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|p| i + p)
}

/// The first index at or after `from` of `"` or `\`, eight bytes at a time
/// (see [`find_escape`]).
fn find_quote_or_backslash(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("eight bytes"));
        let mask = zero_bytes(word ^ (ONES * u64::from(b'"')))
            | zero_bytes(word ^ (ONES * u64::from(b'\\')));
        if mask != 0 {
            return Some(i + first_flagged(mask));
        }
        i += 8;
    }
    bytes[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|p| i + p)
}

/// Whether PostgreSQL's jsonb would print `canonical` (canonical text, as
/// [`to_canonical`] writes it) differently, so that the stored row must keep
/// the text beside the jsonb to give it back exactly. jsonb keeps strings,
/// key sets and every digit, but prints numbers its own way in two cases: a
/// number with an exponent (`1e+2` as `100`, `1e-7` as `0.0000001`), and a
/// negative zero (`-0.0` as `0.0`). Key order does not count: it is restored
/// by writing the canonical form again.
pub fn jsonb_rewrites(canonical: &str) -> bool {
    let bytes = canonical.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string; canonical text escapes only with `\`.
                i += 1;
                loop {
                    let at = find_quote_or_backslash(bytes, i).expect("canonical strings end");
                    if bytes[at] == b'"' {
                        i = at + 1;
                        break;
                    }
                    i = at + 2;
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'0'..=b'9')
                {
                    i += 1;
                }
                let number = &bytes[start..i];
                let negative_zero =
                    number[0] == b'-' && number[1..].iter().all(|&b| b == b'0' || b == b'.');
                if negative_zero || number.contains(&b'e') {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// Appends `token` to a JSON Pointer (RFC 6901), escaping `~` and `/`.
pub fn push_pointer_token(pointer: &mut String, token: &str) {
    for c in token.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> String {
        to_canonical(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn key_order_and_whitespace_do_not_change_the_form() {
        let a = canon(r#"{"b": 1, "a": {"y": [1, 2], "x": null}}"#);
        let b = canon("{\n  \"a\":{\"x\":null,\"y\":[1,2]},\n\t\"b\":1}");
        assert_eq!(a, r#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
    }

    #[test]
    fn numbers_are_kept_exactly_as_written() {
        let text = r#"{"a":12345678901234567890123,"b":0.1000000000000000055511151231257827,"c":1.0,"d":1e+2,"e":-0,"f":1.50e-03}"#;
        assert_eq!(canon(text), text);
        // The exponent marker is the one thing normalized.
        assert_eq!(
            canon("[1E2,1e2,1E+2,2E-1,0e0]"),
            "[1e+2,1e+2,1e+2,2e-1,0e+0]"
        );
        assert_ne!(hash(&canon(r#"{"a":1.0}"#)), hash(&canon(r#"{"a":1}"#)));
    }

    #[test]
    fn keys_sort_by_code_point_not_by_utf16() {
        // U+FF61 sorts before U+1F600 by code point, after it by UTF-16 units.
        let text = "{\"\u{1F600}\":1,\"\u{FF61}\":2,\"Z\":3,\"a\":4}";
        assert_eq!(
            canon(text),
            "{\"Z\":3,\"a\":4,\"\u{FF61}\":2,\"\u{1F600}\":1}"
        );
    }

    #[test]
    fn strings_escape_only_what_json_requires() {
        let v = Value::String("q\"b\\s/\u{7f}é\u{8}\u{9}\n\u{c}\r\u{1}\u{1f}😀".into());
        assert_eq!(
            to_canonical(&v),
            "\"q\\\"b\\\\s/\u{7f}é\\b\\t\\n\\f\\r\\u0001\\u001f😀\""
        );
        // Escapes in the input do not survive: "\u00e9" and "é" are one string.
        assert_eq!(canon(r#""\u00e9\/""#), "\"é/\"");
    }

    #[test]
    fn the_hash_is_lowercase_hex_sha256() {
        assert_eq!(
            hash("{}"),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    /// The worked example of `docs/canonical-json.md`.
    #[test]
    fn the_documented_example_holds() {
        let input = r#"{ "tags": ["b", "a"], "name": "Ada Lovelace", "big": 1E2,
                         "age": 36, "note": "line\nbreak \"quoted\" \u00fc" }"#;
        let text = canon(input);
        assert_eq!(
            text,
            r#"{"age":36,"big":1e+2,"name":"Ada Lovelace","note":"line\nbreak \"quoted\" ü","tags":["b","a"]}"#
        );
        assert_eq!(
            hash(&text),
            "e306582b29e48327454cf8d47783aea9a24a6075afe2a62e623472b2bcf38a2b"
        );
    }

    #[test]
    fn only_exponents_and_negative_zeros_are_rewritten_by_jsonb() {
        // What `SELECT '…'::jsonb` prints differently (checked against PostgreSQL 15).
        for rewritten in [
            "[1E2]",
            r#"{"a":1e-7}"#,
            "[-0]",
            r#"{"z":-0.0}"#,
            "[1,[2,{\"b\":0e0}]]",
        ] {
            assert!(jsonb_rewrites(&canon(rewritten)), "{rewritten}");
        }
        for kept in [
            r#"{"t":1.50,"big":12345678901234567890123,"n":-1.0,"z":0.0,"h":-0.5}"#,
            r#"{"s":"1e2 -0 \"1E2\" \\","e":"-0.0"}"#,
            "[0,100,-10,0.1000000000000000055511151231257827]",
            "{}",
        ] {
            assert!(!jsonb_rewrites(&canon(kept)), "{kept}");
        }
    }

    /// The byte-at-a-time writer the word-at-a-time scan replaced.
    fn write_string_bytewise(s: &str) -> String {
        let mut out = String::from('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\u{8}' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\u{c}' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    #[test]
    fn the_word_scan_finds_every_escape_at_every_offset() {
        // Each byte that needs an escape, and its neighbours that do not
        // (0x1f/0x20, 0x21/0x23, 0x5b/0x5d, high bytes of UTF-8), at each
        // position of a word and across word boundaries.
        for special in [
            "\"", "\\", "\u{0}", "\u{1f}", "\n", " ", "!", "#", "[", "]", "é", "\u{7f}", "😀",
        ] {
            for len in 0..20 {
                for at in 0..=len {
                    let mut s = "a".repeat(at);
                    s.push_str(special);
                    s.push_str(&"b".repeat(len - at));
                    let mut written = String::new();
                    write_string(&mut written, &s);
                    assert_eq!(written, write_string_bytewise(&s), "{s:?}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_word_scan_writes_what_the_byte_scan_wrote(s in "(?s).{0,80}", noise in "[\\x00-\\x7f]{0,40}") {
            let s = format!("{s}{noise}{s}");
            let mut written = String::new();
            write_string(&mut written, &s);
            proptest::prop_assert_eq!(&written, &write_string_bytewise(&s));
            // And the skip of strings in `jsonb_rewrites` lands after each one.
            let doc = format!("[{written},-0,{written}]");
            proptest::prop_assert!(jsonb_rewrites(&doc));
            let doc = format!("[{written},1,{written}]");
            proptest::prop_assert!(!jsonb_rewrites(&doc));
        }
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        let mut p = String::from("/a");
        push_pointer_token(&mut p, "b/c~d");
        assert_eq!(p, "/ab~1c~0d");
    }
}
