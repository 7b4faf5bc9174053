//! The lexer: filter text → tokens, each with its byte range for positions
//! and error messages.

use serde_json::Value;

use super::{FilterError, Op};

/// Largest decimal exponent in a number: PostgreSQL's numeric cannot hold
/// much more, and failing at parse time beats a database error later.
const MAX_EXPONENT: i64 = 1000;

/// What a token is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Kind {
    /// A bare word: a field name, a keyword, a type, true/false/null.
    Word(String),
    /// A decoded JSON string.
    Str(String),
    /// A JSON number (its text kept exactly: serde_json's arbitrary precision).
    Num(Value),
    LParen,
    RParen,
    Comma,
    Dot,
    Op(Op),
    End,
}

/// One token and where it stands.
#[derive(Debug, Clone)]
pub(super) struct Token {
    /// What it is.
    pub(super) kind: Kind,
    /// Byte range in the text, for positions and messages.
    pub(super) start: usize,
    /// Where the range ends (exclusive).
    pub(super) end: usize,
}

/// The 1-based character position of a byte offset, as error messages give it.
pub(super) fn position(text: &str, byte: usize) -> usize {
    text[..byte].chars().count() + 1
}

/// The tokens of `text`, ending with [`Kind::End`].
pub(super) fn lex(text: &str) -> Result<Vec<Token>, FilterError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let err = |at: usize, message: String| FilterError {
        position: position(text, at),
        message,
    };
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let kind = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' | b')' | b',' | b'.' | b'=' => {
                i += 1;
                match c {
                    b'(' => Kind::LParen,
                    b')' => Kind::RParen,
                    b',' => Kind::Comma,
                    b'.' => Kind::Dot,
                    _ => Kind::Op(Op::Eq),
                }
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Kind::Op(Op::Ne)
            }
            b'>' | b'<' => {
                let or_equal = bytes.get(i + 1) == Some(&b'=');
                i += if or_equal { 2 } else { 1 };
                Kind::Op(match (c, or_equal) {
                    (b'>', false) => Op::Gt,
                    (b'>', true) => Op::Ge,
                    (_, false) => Op::Lt,
                    (_, true) => Op::Le,
                })
            }
            b'"' => {
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err(err(start, "a string is not closed".into())),
                        Some(b'\\') => i += 2,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                let s: String = serde_json::from_str(&text[start..i])
                    .map_err(|e| err(start, format!("bad string literal: {e}")))?;
                if s.contains('\0') {
                    // PostgreSQL text and jsonb cannot hold U+0000.
                    return Err(err(start, "a string cannot contain \\u0000".into()));
                }
                Kind::Str(s)
            }
            b'-' | b'0'..=b'9' => {
                i += 1;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                Kind::Num(number(&text[start..i]).map_err(|m| err(start, m))?)
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'_' => {
                i += 1;
                while i < bytes.len()
                    && matches!(bytes[i], b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')
                {
                    i += 1;
                }
                Kind::Word(text[start..i].to_owned())
            }
            _ => {
                let ch = text[i..].chars().next().expect("i is on a char boundary");
                return Err(err(start, format!("unexpected character {ch:?}")));
            }
        };
        tokens.push(Token {
            kind,
            start,
            end: i,
        });
    }
    tokens.push(Token {
        kind: Kind::End,
        start: text.len(),
        end: text.len(),
    });
    Ok(tokens)
}

/// A JSON number from its text, kept exact, with an exponent PostgreSQL's
/// numeric can hold.
fn number(text: &str) -> Result<Value, String> {
    let bad = || format!("bad number `{text}`");
    let value: Value = serde_json::from_str(text).map_err(|_| bad())?;
    if !value.is_number() {
        return Err(bad());
    }
    if let Some((_, exponent)) = text.split_once(['e', 'E']) {
        let digits = exponent
            .trim_start_matches(['+', '-'])
            .trim_start_matches('0');
        if digits.len() > 6 || digits.parse::<i64>().unwrap_or(0) > MAX_EXPONENT {
            return Err(format!(
                "number `{text}` is out of range (exponent beyond {MAX_EXPONENT})"
            ));
        }
    }
    Ok(value)
}
