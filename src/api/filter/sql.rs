//! Rendering a [`Filter`] to a boolean SQL expression whose every
//! user-supplied piece (field names included) is a bound parameter.

use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::{Condition, Filter, Op, Path, Test};

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

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

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
