//! The parser: tokens → a [`Filter`], checking the limits and that `id` is
//! compared only with strings.

use serde_json::Value;

use super::lex::{Kind, Token, lex, position};
use super::{
    Condition, Filter, FilterError, MAX_CONDITIONS, MAX_DEPTH, MAX_IN_VALUES, MAX_TEXT_BYTES, Path,
    Test,
};
use crate::domain::entity::EntityType;

/// Most segments in a field path.
const MAX_PATH_SEGMENTS: usize = 32;

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
                        let entity_type = EntityType::parse(entity_type)
                            .map_err(|m| self.error_at(&type_token, m.0))?
                            .into_string();
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
    use super::super::Op;
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
}
