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

mod lex;
mod parse;
mod sql;

use std::fmt;

use serde_json::Value;

pub use parse::parse;
pub use sql::SqlParams;

/// Most conditions in a filter, sub-filters included: a filter comes from a
/// command line or a URL, and a bounded one keeps the query plan bounded.
pub const MAX_CONDITIONS: usize = 32;
/// Deepest nesting of sub-filters; each level is another sub-select.
pub const MAX_DEPTH: usize = 4;
/// Most values in one `in (…)` list.
pub const MAX_IN_VALUES: usize = 1000;
/// Longest filter text accepted.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

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
    /// `>`, `<`, `>=` or `<=`: the operators that order, and so match only a
    /// value of the same JSON type (and never null).
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
