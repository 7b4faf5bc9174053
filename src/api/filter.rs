//! Filters: a small typed expression language over a resource's `id` and the
//! fields of its JSON `data`, rendered to SQL whose every user-supplied piece
//! (field names included) is a bound parameter.
//!
//! It replaces the Go library's `Filter`, which built SQL by formatting
//! strings and so let a crafted field name or value inject SQL. Here the SQL
//! text is assembled only from constants of this module and placeholder
//! numbers, so nothing a user types can change the statement's shape.
//!
//! # Grammar
//!
//! ```text
//! filter  := cond ( "and" cond )*            (keywords are case-insensitive)
//! cond    := path op value
//!          | path "in" "(" value ( "," value )* ")"
//!          | path "in" TYPE "(" filter ")"     sub-filter: the field's value is the
//!                                              id of a resource of TYPE matching the
//!                                              inner filter
//! path    := "id" | field ( "." field )*      field: [A-Za-z_][A-Za-z0-9_-]* or a
//!                                              "double-quoted" JSON string (any key)
//! op      := "=" | "!=" | ">" | "<" | ">=" | "<="
//! value   := a JSON literal: "string", number, true, false, null
//! ```
//!
//! Examples: `department = "physics"`, `age >= 30 and active = true`,
//! `address.city in ("Oslo", "Bergen")`, `dept_id in department(name = "Physics")`,
//! `id > "p500"`, `"first name" = "Ada"`, `"id" = 7` (a JSON field named `id`).
//!
//! # Semantics
//!
//! - A bare `id` is the resource id (a text column, compared by bytes); its
//!   values must be strings. Quote it (`"id"`) to mean a JSON field named id.
//! - `=` and `!=` use jsonb equality: `5` equals `5.0`, `"5"` does not equal `5`.
//! - `>`, `<`, `>=`, `<=` only match a value of the same JSON type: numbers
//!   numerically, strings by their bytes, `false < true`; never `null`.
//! - `in (…)` is `=` against any of the listed values.
//! - `in TYPE(…)` matches when the field holds a string that is the id of a
//!   resource of TYPE for which the inner filter holds.
//! - **A missing field never matches**, whatever the operator: `x != 1` is
//!   false when there is no `x` (it means "x is present and is not 1"). Every
//!   condition renders to SQL that is strictly true or false, never NULL, so a
//!   caller may also negate a filter safely.
//!
//! Limits: at most [`MAX_CONDITIONS`] conditions in all, sub-filters nested at
//! most [`MAX_DEPTH`] deep, [`MAX_IN_VALUES`] values per list, and
//! [`MAX_TEXT_BYTES`] of text.

use std::fmt;

use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::domain::message;

/// Most conditions in a filter, sub-filters included: a filter comes from a
/// command line or a URL, and a bounded one keeps the query plan bounded.
pub const MAX_CONDITIONS: usize = 32;
/// Deepest nesting of sub-filters; each level is another sub-select.
pub const MAX_DEPTH: usize = 4;
/// Most values in one `in (…)` list.
pub const MAX_IN_VALUES: usize = 1000;
/// Longest filter text accepted.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Most segments in a field path.
const MAX_PATH_SEGMENTS: usize = 32;
/// Largest decimal exponent in a number: PostgreSQL's numeric cannot hold
/// much more, and failing at parse time beats a database error later.
const MAX_EXPONENT: i64 = 1000;

/// A parsed filter: conditions that must all hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The conditions, joined by `and`; never empty.
    pub conditions: Vec<Condition>,
}

/// One condition: a path and what its value must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// What is tested.
    pub path: Path,
    /// The test.
    pub test: Test,
}

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Path {
    /// The row's `id` column.
    Id,
    /// A field of the JSON `data`, as its keys from the top (never empty).
    Data(Vec<String>),
}

/// What a value must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// Compared with one JSON literal (a string when the path is [`Path::Id`]).
    Compare(Op, Value),
    /// Equal to one of these JSON literals (strings when the path is [`Path::Id`]).
    In(Vec<Value>),
    /// The id of a resource of `entity_type` that matches `filter`.
    Sub {
        /// The other resource's type.
        entity_type: String,
        /// What that resource must match.
        filter: Filter,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `>`
    Gt,
    /// `<`
    Lt,
    /// `>=`
    Ge,
    /// `<=`
    Le,
}

impl Op {
    /// The SQL operator; a constant, never user text.
    fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "<>",
            Op::Gt => ">",
            Op::Lt => "<",
            Op::Ge => ">=",
            Op::Le => "<=",
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, Op::Eq | Op::Ne)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Gt => ">",
            Op::Lt => "<",
            Op::Ge => ">=",
            Op::Le => "<=",
        })
    }
}

/// Why a filter text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad filter at character {position}: {message}")]
pub struct FilterError {
    /// 1-based character position of the offending token (the text's
    /// length + 1 for its end).
    pub position: usize,
    /// What was expected or wrong, naming the token found.
    pub message: String,
}

/// Parses a filter text (grammar in the module doc).
pub fn parse(text: &str) -> Result<Filter, FilterError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(FilterError {
            position: 1,
            message: format!("the filter is longer than {MAX_TEXT_BYTES} bytes"),
        });
    }
    let tokens = lex(text)?;
    let mut parser = Parser {
        text,
        tokens,
        next: 0,
        conditions: 0,
    };
    if parser.peek().kind == Kind::End {
        return Err(
            parser.error_here("the filter is empty; expected a condition such as name = \"Ada\"")
        );
    }
    let filter = parser.filter(0)?;
    if parser.peek().kind != Kind::End {
        return Err(parser.error_here(format!(
            "expected `and` or the end, found {}",
            parser.found()
        )));
    }
    Ok(filter)
}

/// Values for the placeholders of a statement built around a filter, in
/// placeholder order (`$1` is the first pushed).
#[derive(Debug, Default)]
pub struct SqlParams {
    /// Boxed so that a statement can mix parameter types; `Send` so that a
    /// future holding them can move between threads.
    values: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl SqlParams {
    /// No parameters yet.
    pub fn new() -> SqlParams {
        SqlParams::default()
    }

    /// Adds a value and returns its placeholder (`$n`).
    pub fn push(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.values.push(Box::new(value));
        format!("${}", self.values.len())
    }

    /// How many values there are.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values as `tokio_postgres` query methods take them.
    pub fn as_refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.values
            .iter()
            .map(|v| &**v as &(dyn ToSql + Sync))
            .collect()
    }
}

impl Filter {
    /// A boolean SQL expression over `alias.data` and `alias.id`, with
    /// placeholders numbered from `params.len() + 1`; pushes their values.
    /// The expression is never NULL. Sub-filters read the `resources` table
    /// under the aliases `sub1`, `sub2`, …
    ///
    /// # Panics
    ///
    /// When `alias` is not `[a-z_]+`: it is a constant chosen by the caller,
    /// never user input, and keeping digits out of it means it cannot clash
    /// with the sub-filter aliases.
    pub fn to_sql(&self, alias: &str, params: &mut SqlParams) -> String {
        assert!(
            !alias.is_empty() && alias.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "a filter alias must be [a-z_]+, got {alias:?}"
        );
        self.render(alias, 0, params)
    }

    fn render(&self, alias: &str, depth: usize, params: &mut SqlParams) -> String {
        let parts: Vec<String> = self
            .conditions
            .iter()
            .map(|c| c.render(alias, depth, params))
            .collect();
        format!("({})", parts.join(" AND "))
    }
}

impl Condition {
    fn render(&self, alias: &str, depth: usize, params: &mut SqlParams) -> String {
        match &self.path {
            Path::Id => {
                let column = format!("{alias}.id");
                match &self.test {
                    Test::Compare(op, value) => {
                        let v = params.push(string_of(value));
                        format!("({column} {} {v})", op.sql())
                    }
                    Test::In(values) => {
                        let list: Vec<String> = values.iter().map(string_of).collect();
                        let v = params.push(list);
                        format!("({column} = ANY({v}::text[]))")
                    }
                    Test::Sub {
                        entity_type,
                        filter,
                    } => {
                        let sub = sub_select(entity_type, filter, depth, params);
                        format!("({column} IN ({sub}))")
                    }
                }
            }
            Path::Data(keys) => {
                let p = params.push(keys.clone());
                // Each value is SQL NULL when the field is missing; COALESCE
                // turns that into false so that no operator, `<>` included,
                // can match a missing field or leave NULL for a NOT above.
                let field = format!("({alias}.data #> {p}::text[])");
                let test = match &self.test {
                    Test::Compare(op, Value::String(s)) if op.is_ordering() => {
                        // Bytes order, like the id column (COLLATE "C"),
                        // rather than the database's default collation.
                        let v = params.push(s.clone());
                        format!(
                            "jsonb_typeof({field}) = 'string' \
                             AND ({field} #>> '{{}}') COLLATE \"C\" {} {v}::text",
                            op.sql()
                        )
                    }
                    Test::Compare(op, value) if op.is_ordering() => {
                        let v = params.push(value.clone());
                        format!(
                            "jsonb_typeof({field}) = jsonb_typeof({v}::jsonb) AND {field} {} {v}::jsonb",
                            op.sql()
                        )
                    }
                    Test::Compare(op, value) => {
                        let v = params.push(value.clone());
                        format!("{field} {} {v}::jsonb", op.sql())
                    }
                    Test::In(values) => {
                        let v = params.push(values.clone());
                        format!("{field} = ANY({v}::jsonb[])")
                    }
                    Test::Sub {
                        entity_type,
                        filter,
                    } => {
                        let sub = sub_select(entity_type, filter, depth, params);
                        format!(
                            "jsonb_typeof({field}) = 'string' AND ({alias}.data #>> {p}::text[]) IN ({sub})"
                        )
                    }
                };
                format!("COALESCE({test}, false)")
            }
        }
    }
}

/// `SELECT subN.id FROM resources subN WHERE …` for a sub-filter one level
/// below `depth`.
fn sub_select(entity_type: &str, filter: &Filter, depth: usize, params: &mut SqlParams) -> String {
    let alias = format!("sub{}", depth + 1);
    let t = params.push(entity_type.to_owned());
    let inner = filter.render(&alias, depth + 1, params);
    format!("SELECT {alias}.id FROM resources {alias} WHERE {alias}.type = {t} AND {inner}")
}

/// The string in a value the parser has checked to be a string.
fn string_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => unreachable!("the parser lets only strings through for id, got {other}"),
    }
}

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, PartialEq)]
enum Kind {
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

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// Byte range in the text, for positions and messages.
    start: usize,
    end: usize,
}

fn position(text: &str, byte: usize) -> usize {
    text[..byte].chars().count() + 1
}

fn lex(text: &str) -> Result<Vec<Token>, FilterError> {
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
            b'(' => {
                i += 1;
                Kind::LParen
            }
            b')' => {
                i += 1;
                Kind::RParen
            }
            b',' => {
                i += 1;
                Kind::Comma
            }
            b'.' => {
                i += 1;
                Kind::Dot
            }
            b'=' => {
                i += 1;
                Kind::Op(Op::Eq)
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

// ---------------------------------------------------------------- parser

struct Parser<'a> {
    text: &'a str,
    tokens: Vec<Token>,
    /// Index of the next token.
    next: usize,
    /// Conditions parsed so far, sub-filters included.
    conditions: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        &self.tokens[self.next]
    }

    fn advance(&mut self) -> Token {
        let token = self.tokens[self.next].clone();
        if token.kind != Kind::End {
            self.next += 1;
        }
        token
    }

    /// The next token as a message shows it.
    fn found(&self) -> String {
        describe(self.text, self.peek())
    }

    fn error_at(&self, token: &Token, message: impl Into<String>) -> FilterError {
        FilterError {
            position: position(self.text, token.start),
            message: message.into(),
        }
    }

    fn error_here(&self, message: impl Into<String>) -> FilterError {
        self.error_at(self.peek(), message)
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(&self.peek().kind, Kind::Word(w) if w.eq_ignore_ascii_case(keyword))
    }

    fn expect(&mut self, kind: Kind, what: &str) -> Result<Token, FilterError> {
        if self.peek().kind == kind {
            Ok(self.advance())
        } else {
            Err(self.error_here(format!("expected {what}, found {}", self.found())))
        }
    }

    fn filter(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut conditions = vec![self.condition(depth)?];
        while self.is_keyword("and") {
            self.advance();
            conditions.push(self.condition(depth)?);
        }
        Ok(Filter { conditions })
    }

    fn condition(&mut self, depth: usize) -> Result<Condition, FilterError> {
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return Err(self.error_here(format!(
                "a filter can have at most {MAX_CONDITIONS} conditions"
            )));
        }
        let path = self.path()?;
        let op_token = self.peek().clone();
        let test = match &op_token.kind {
            Kind::Op(op) => {
                let op = *op;
                self.advance();
                let value_token = self.peek().clone();
                let value = self.value()?;
                if op.is_ordering() && value.is_null() {
                    return Err(self.error_at(
                        &value_token,
                        format!("`{op}` needs a string, number or boolean, not null"),
                    ));
                }
                check_id_value(self, &path, &value_token, &value)?;
                Test::Compare(op, value)
            }
            Kind::Word(w) if w.eq_ignore_ascii_case("in") => {
                self.advance();
                match self.peek().kind.clone() {
                    Kind::LParen => {
                        self.advance();
                        let mut values = Vec::new();
                        loop {
                            if values.len() == MAX_IN_VALUES {
                                return Err(self.error_here(format!(
                                    "an `in` list can have at most {MAX_IN_VALUES} values"
                                )));
                            }
                            let value_token = self.peek().clone();
                            let value = self.value()?;
                            check_id_value(self, &path, &value_token, &value)?;
                            values.push(value);
                            if self.peek().kind == Kind::Comma {
                                self.advance();
                            } else {
                                break;
                            }
                        }
                        self.expect(Kind::RParen, "`,` or `)`")?;
                        Test::In(values)
                    }
                    Kind::Word(entity_type) => {
                        let type_token = self.advance();
                        message::check_type(&entity_type)
                            .map_err(|m| self.error_at(&type_token, m.0))?;
                        if depth + 1 > MAX_DEPTH {
                            return Err(self.error_at(
                                &type_token,
                                format!("sub-filters can be nested at most {MAX_DEPTH} deep"),
                            ));
                        }
                        self.expect(Kind::LParen, &format!("`(` after the type {entity_type}"))?;
                        let filter = self.filter(depth + 1)?;
                        self.expect(Kind::RParen, "`and` or `)`")?;
                        Test::Sub {
                            entity_type,
                            filter,
                        }
                    }
                    _ => {
                        return Err(self.error_here(format!(
                            "expected `(` or a type after `in`, found {}",
                            self.found()
                        )));
                    }
                }
            }
            _ => {
                return Err(self.error_here(format!(
                    "expected an operator (=, !=, >, <, >=, <=) or `in`, found {}",
                    self.found()
                )));
            }
        };
        Ok(Condition { path, test })
    }

    fn path(&mut self) -> Result<Path, FilterError> {
        let first = self.peek().clone();
        if first.kind == Kind::Word("id".into()) {
            self.advance();
            if self.peek().kind == Kind::Dot {
                return Err(self.error_here(
                    "`id` is the resource id, a string without fields; \
                     write \"id\" (quoted) for a JSON field named id",
                ));
            }
            return Ok(Path::Id);
        }
        let mut keys = Vec::new();
        loop {
            let token = self.peek().clone();
            match &token.kind {
                Kind::Word(w) => keys.push(w.clone()),
                Kind::Str(s) => keys.push(s.clone()),
                _ => {
                    let what = if keys.is_empty() {
                        "a field name or id"
                    } else {
                        "a field name after `.`"
                    };
                    return Err(self.error_here(format!("expected {what}, found {}", self.found())));
                }
            }
            self.advance();
            if keys.len() > MAX_PATH_SEGMENTS {
                return Err(self.error_at(
                    &token,
                    format!("a path can have at most {MAX_PATH_SEGMENTS} fields"),
                ));
            }
            if self.peek().kind != Kind::Dot {
                return Ok(Path::Data(keys));
            }
            self.advance();
        }
    }

    fn value(&mut self) -> Result<Value, FilterError> {
        let value = match &self.peek().kind {
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Num(n) => n.clone(),
            Kind::Word(w) if w == "true" => Value::Bool(true),
            Kind::Word(w) if w == "false" => Value::Bool(false),
            Kind::Word(w) if w == "null" => Value::Null,
            _ => {
                return Err(self.error_here(format!(
                    "expected a JSON value (\"string\", number, true, false, null), found {}",
                    self.found()
                )));
            }
        };
        self.advance();
        Ok(value)
    }
}

/// `id` is a text column: only strings can equal it.
fn check_id_value(
    parser: &Parser<'_>,
    path: &Path,
    token: &Token,
    value: &Value,
) -> Result<(), FilterError> {
    if *path == Path::Id && !value.is_string() {
        return Err(parser.error_at(
            token,
            format!(
                "`id` is compared with strings, found {}",
                describe(parser.text, token)
            ),
        ));
    }
    Ok(())
}

/// A token as an error message names it: its text (shortened), or "the end".
fn describe(text: &str, token: &Token) -> String {
    if token.kind == Kind::End {
        return "the end of the filter".into();
    }
    let shown: String = text[token.start..token.end].chars().take(40).collect();
    let more = if shown.len() < token.end - token.start {
        "…"
    } else {
        ""
    };
    format!("`{shown}{more}`")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(keys: &[&str]) -> Path {
        Path::Data(keys.iter().map(|k| (*k).to_owned()).collect())
    }

    fn one(text: &str) -> Condition {
        let mut f = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(f.conditions.len(), 1, "{text}");
        f.conditions.remove(0)
    }

    fn error(text: &str) -> FilterError {
        match parse(text) {
            Ok(f) => panic!("{text} parsed as {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn each_operator_parses_to_its_comparison() {
        for (text, op) in [
            ("n = 1", Op::Eq),
            ("n != 1", Op::Ne),
            ("n > 1", Op::Gt),
            ("n < 1", Op::Lt),
            ("n >= 1", Op::Ge),
            ("n <= 1", Op::Le),
            ("n>=1", Op::Ge),
        ] {
            assert_eq!(
                one(text),
                Condition {
                    path: data(&["n"]),
                    test: Test::Compare(op, json!(1))
                },
                "{text}"
            );
        }
    }

    #[test]
    fn values_are_json_literals_and_numbers_keep_their_text() {
        assert_eq!(
            one(r#"a = "x\"y\u00e9""#).test,
            Test::Compare(Op::Eq, json!("x\"yé"))
        );
        assert_eq!(one("a = true").test, Test::Compare(Op::Eq, json!(true)));
        assert_eq!(one("a = false").test, Test::Compare(Op::Eq, json!(false)));
        assert_eq!(one("a = null").test, Test::Compare(Op::Eq, Value::Null));
        let Test::Compare(_, exp) = one("a = -2.5e3").test else {
            panic!("a comparison")
        };
        assert_eq!(exp.as_f64(), Some(-2500.0));
        let Test::Compare(_, big) = one("n = 12345678901234567890123").test else {
            panic!("a comparison")
        };
        assert_eq!(big.to_string(), "12345678901234567890123");
    }

    #[test]
    fn keywords_are_case_insensitive_and_and_joins_conditions() {
        let f = parse("age >= 30 AND active = true and x In (1)").unwrap();
        assert_eq!(
            f.conditions,
            vec![
                Condition {
                    path: data(&["age"]),
                    test: Test::Compare(Op::Ge, json!(30))
                },
                Condition {
                    path: data(&["active"]),
                    test: Test::Compare(Op::Eq, json!(true))
                },
                Condition {
                    path: data(&["x"]),
                    test: Test::In(vec![json!(1)])
                },
            ]
        );
    }

    #[test]
    fn an_in_list_holds_every_value_in_order() {
        assert_eq!(
            one(r#"address.city in ("Oslo", "Bergen", 3, null)"#),
            Condition {
                path: data(&["address", "city"]),
                test: Test::In(vec![json!("Oslo"), json!("Bergen"), json!(3), Value::Null])
            }
        );
    }

    #[test]
    fn a_sub_filter_names_its_type_and_nests() {
        assert_eq!(
            one(r#"dept_id in department(name = "Physics" and site in campus(city = "Oslo"))"#),
            Condition {
                path: data(&["dept_id"]),
                test: Test::Sub {
                    entity_type: "department".into(),
                    filter: Filter {
                        conditions: vec![
                            Condition {
                                path: data(&["name"]),
                                test: Test::Compare(Op::Eq, json!("Physics"))
                            },
                            Condition {
                                path: data(&["site"]),
                                test: Test::Sub {
                                    entity_type: "campus".into(),
                                    filter: parse(r#"city = "Oslo""#).unwrap(),
                                }
                            },
                        ]
                    }
                }
            }
        );
    }

    #[test]
    fn a_bare_id_is_the_id_column_and_a_quoted_one_a_json_field() {
        assert_eq!(
            one(r#"id > "p500""#),
            Condition {
                path: Path::Id,
                test: Test::Compare(Op::Gt, json!("p500"))
            }
        );
        assert_eq!(one(r#"id in ("a", "b")"#).path, Path::Id);
        assert_eq!(one(r#""id" = 7"#).path, data(&["id"]));
        assert_eq!(
            one(r#""first name"."a.b" = 1"#).path,
            data(&["first name", "a.b"])
        );
        assert_eq!(
            one("and = 1").path,
            data(&["and"]),
            "a keyword can name a field"
        );
    }

    #[test]
    fn errors_name_the_position_and_the_token() {
        for (text, position, needle) in [
            ("", 1, "empty"),
            ("name", 5, "expected an operator"),
            ("name ~ 1", 6, "unexpected character '~'"),
            ("name = ", 8, "the end of the filter"),
            ("name = Ada", 8, "`Ada`"),
            ("name = \"Ada", 8, "not closed"),
            ("a = 1 b = 2", 7, "expected `and` or the end, found `b`"),
            ("a = 1 and", 10, "expected a field name"),
            ("a. = 1", 4, "a field name after `.`"),
            ("a in ()", 7, "expected a JSON value"),
            ("a in (1, 2", 11, "`,` or `)`"),
            ("a in per.son(x = 1)", 9, "`(` after the type per"),
            ("a in 5", 6, "expected `(` or a type"),
            ("id = 5", 6, "`id` is compared with strings, found `5`"),
            ("id in (\"a\", true)", 13, "`id` is compared with strings"),
            ("id.x = \"a\"", 3, "quoted"),
            ("a > null", 5, "not null"),
            ("a = 01", 5, "bad number `01`"),
            ("a = 1e99999", 5, "out of range"),
            ("a = \"\\u0000\"", 5, "\\u0000"),
            ("é = 1", 1, "unexpected character 'é'"),
            ("a = 1 and é = 2", 11, "'é'"),
        ] {
            let e = error(text);
            assert_eq!(e.position, position, "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn filters_beyond_the_limits_are_refused() {
        let many = vec!["a = 1"; MAX_CONDITIONS].join(" and ");
        assert!(parse(&many).is_ok());
        assert!(
            error(&format!("{many} and a = 1"))
                .message
                .contains("at most 32 conditions")
        );

        let nested = |depth: usize| {
            let mut text = "x = 1".to_owned();
            for _ in 0..depth {
                text = format!("r in t({text})");
            }
            text
        };
        assert!(parse(&nested(MAX_DEPTH)).is_ok());
        assert!(
            error(&nested(MAX_DEPTH + 1))
                .message
                .contains("nested at most 4")
        );

        let list = vec!["1"; MAX_IN_VALUES + 1].join(",");
        assert!(
            error(&format!("a in ({list})"))
                .message
                .contains("at most 1000 values")
        );
        assert!(
            error(&" ".repeat(MAX_TEXT_BYTES + 1))
                .message
                .contains("longer")
        );
    }

    #[test]
    fn sql_numbers_placeholders_after_the_existing_parameters() {
        let f = parse(r#"age >= 30 and id = "p1" and tag in ("a", "b")"#).unwrap();
        let mut params = SqlParams::new();
        assert_eq!(params.push("person".to_owned()), "$1");
        let sql = f.to_sql("r", &mut params);
        assert_eq!(
            sql,
            "(COALESCE(jsonb_typeof((r.data #> $2::text[])) = jsonb_typeof($3::jsonb) \
             AND (r.data #> $2::text[]) >= $3::jsonb, false) \
             AND (r.id = $4) \
             AND COALESCE((r.data #> $5::text[]) = ANY($6::jsonb[]), false))"
        );
        assert_eq!(params.len(), 6);
        assert_eq!(params.as_refs().len(), 6);
    }

    #[test]
    fn a_sub_filter_gets_a_fresh_alias_per_depth() {
        let f = parse(r#"d in department(s in site(city = "Oslo"))"#).unwrap();
        let mut params = SqlParams::new();
        let sql = f.to_sql("r", &mut params);
        assert!(
            sql.contains("SELECT sub1.id FROM resources sub1 WHERE sub1.type = $2"),
            "{sql}"
        );
        assert!(
            sql.contains("SELECT sub2.id FROM resources sub2 WHERE sub2.type = $4"),
            "{sql}"
        );
        assert!(sql.contains("(sub2.data #> $5::text[])"), "{sql}");
        assert_eq!(params.len(), 6);
    }

    #[test]
    fn field_names_and_values_reach_the_sql_only_as_parameters() {
        let attacks = [
            r#""name'; DROP TABLE resources; --" = "x""#,
            r#"name = "x' OR '1'='1""#,
            r#"id = "'; DROP TABLE resources; --""#,
            r#"a in ("'); DELETE FROM resources; --") and b > "x' OR 1=1 --""#,
            r#"d in department("'; DROP TABLE staging; --" = "$1")"#,
        ];
        for text in attacks {
            let f = parse(text).unwrap();
            let mut params = SqlParams::new();
            let sql = f.to_sql("r", &mut params);
            // Our own constants are the only quoted text the SQL may hold.
            let without_constants = sql
                .replace("'string'", "")
                .replace("'{}'", "")
                .replace("COLLATE \"C\"", "");
            for needle in ["DROP", "DELETE", "OR", "--", ";", "\"", "'"] {
                assert!(
                    !without_constants.contains(needle),
                    "{needle:?} in the SQL of {text}: {sql}"
                );
            }
            let shown = format!("{params:?}");
            assert!(
                shown.contains("DROP") || shown.contains("OR") || shown.contains("DELETE"),
                "the text is in the parameters: {shown}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "a filter alias must be [a-z_]+")]
    fn an_alias_that_is_not_a_plain_name_is_a_bug() {
        parse("a = 1")
            .unwrap()
            .to_sql("r; DROP TABLE x", &mut SqlParams::new());
    }
}
