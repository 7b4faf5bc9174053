//! Reading bulk input one record at a time: NDJSON, a JSON array, or CSV
//! with a header row. Memory stays bounded by the largest single record,
//! whatever the size of the input.
//!
//! Every record carries the line it started on, so that a bad one is
//! reported with its line number. A bad record never stops the reading:
//! the reader reports it and goes on with the next one, except where the
//! input's structure itself is broken (an unterminated JSON array), which
//! ends the input with one final error.

use std::io::BufRead;

use serde_json::{Map, Value};

use crate::domain::{
    entity::EntityId,
    message::{self, Limits},
};

/// The shape of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line; blank lines are skipped.
    Ndjson,
    /// One JSON array of objects.
    Array,
    /// CSV with a header row; each row becomes an object of strings.
    Csv,
}

impl Format {
    /// Guesses the format: CSV by a `.csv` file name, a JSON array when the
    /// first non-blank byte is `[`, NDJSON otherwise.
    pub fn detect(file_name: Option<&str>, input: &mut impl BufRead) -> std::io::Result<Format> {
        if file_name.is_some_and(|n| n.to_ascii_lowercase().ends_with(".csv")) {
            return Ok(Format::Csv);
        }
        // Nothing is consumed, so line numbers stay right. Only the first
        // buffer is looked at: an input opening with more blank space than
        // that is read as NDJSON (or name its format).
        let buf = input.fill_buf()?;
        Ok(match buf.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Format::Array,
            _ => Format::Ndjson,
        })
    }
}

/// How records become entities.
#[derive(Debug, Clone)]
pub struct RecordShape {
    /// The field holding the id (a string, or a number taken as written).
    pub id_field: String,
    /// The field holding the producer version, if records carry one.
    pub version_field: Option<String>,
    /// Size and depth limits, as for messages.
    pub limits: Limits,
}

/// One good record.
#[derive(Debug)]
pub struct Record {
    /// The line it starts on (1-based).
    pub line: u64,
    /// The entity id.
    pub id: EntityId,
    /// The producer version, when `version_field` is set and present.
    pub version: Option<i64>,
    /// The entity: the whole record.
    pub data: Map<String, Value>,
}

/// One bad record: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The line it starts on (1-based).
    pub line: u64,
    /// What is wrong, in one line.
    pub reason: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// A reader of records.
pub struct Records<R: BufRead> {
    /// What the records look like.
    shape: RecordShape,
    /// The format-specific reader.
    inner: Inner<R>,
}

enum Inner<R: BufRead> {
    Ndjson {
        input: R,
        line: u64,
        buf: String,
    },
    Array(ArrayScanner<R>),
    Csv {
        rows: csv::Reader<R>,
        header: Vec<String>,
    },
    /// A CSV header that could not be read: reported once.
    Failed(Option<BadRecord>),
}

impl<R: BufRead> Records<R> {
    /// Reads `input` as `format`.
    pub fn new(input: R, format: Format, shape: RecordShape) -> Records<R> {
        let inner = match format {
            Format::Ndjson => Inner::Ndjson {
                input,
                line: 0,
                buf: String::new(),
            },
            Format::Array => Inner::Array(ArrayScanner::new(input, shape.limits.max_bytes)),
            Format::Csv => {
                let mut rows = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(false)
                    .from_reader(input);
                match rows.headers() {
                    Ok(h) => {
                        let header = h.iter().map(str::to_owned).collect();
                        Inner::Csv { rows, header }
                    }
                    Err(e) => Inner::Failed(Some(BadRecord {
                        line: 1,
                        reason: format!("cannot read the CSV header: {e}"),
                    })),
                }
            }
        };
        Records { shape, inner }
    }

    /// Turns a parsed value into a record.
    fn record(&self, line: u64, value: Value) -> Result<Record, BadRecord> {
        let bad = |reason: String| BadRecord { line, reason };
        let Value::Object(data) = value else {
            return Err(bad(format!("expected a JSON object, got {}", kind(&value))));
        };
        let id_field = &self.shape.id_field;
        let id = match data.get(id_field) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            None | Some(Value::Null) => return Err(bad(format!("no id field \"{id_field}\""))),
            Some(other) => {
                return Err(bad(format!(
                    "the id field \"{id_field}\" must be a string or a number, got {}",
                    kind(other)
                )));
            }
        };
        let id = EntityId::parse(id).map_err(|e| bad(e.0))?;
        let version = match &self.shape.version_field {
            None => None,
            Some(field) => match data.get(field) {
                None | Some(Value::Null) => None,
                Some(v) => match version_of(v) {
                    Some(v) => Some(v),
                    None => {
                        return Err(bad(format!(
                            "the version field \"{field}\" must be an integer from 0 to {}, got {v}",
                            i64::MAX
                        )));
                    }
                },
            },
        };
        message::check_data(&data, self.shape.limits).map_err(|e| bad(e.0))?;
        Ok(Record {
            line,
            id,
            version,
            data,
        })
    }
}

/// A version from a JSON number or a numeric string (CSV fields are strings).
fn version_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|v| *v >= 0)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<R: BufRead> Iterator for Records<R> {
    type Item = Result<Record, BadRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        let max_bytes = self.shape.limits.max_bytes;
        let (line, parsed) = match &mut self.inner {
            Inner::Failed(error) => return error.take().map(Err),
            Inner::Ndjson { input, line, buf } => loop {
                buf.clear();
                *line += 1;
                match input.read_line(buf) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => {
                        let bad = BadRecord {
                            line: *line,
                            reason: format!("cannot read the input: {e}"),
                        };
                        self.inner = Inner::Failed(None);
                        return Some(Err(bad));
                    }
                }
                let text = buf.trim();
                if text.is_empty() {
                    continue;
                }
                if text.len() > max_bytes {
                    break (
                        *line,
                        Err(format!(
                            "the record is {} bytes long; the limit is {max_bytes}",
                            text.len()
                        )),
                    );
                }
                break (
                    *line,
                    serde_json::from_str::<Value>(text).map_err(|e| format!("invalid JSON: {e}")),
                );
            },
            Inner::Array(scanner) => match scanner.next_element() {
                Ok(None) => return None,
                Ok(Some((line, Ok(bytes)))) => (
                    line,
                    serde_json::from_slice::<Value>(&bytes)
                        .map_err(|e| format!("invalid JSON: {e}")),
                ),
                Ok(Some((line, Err(reason)))) => (line, Err(reason)),
                Err(bad) => {
                    self.inner = Inner::Failed(None);
                    return Some(Err(bad));
                }
            },
            Inner::Csv { rows, header } => {
                let mut row = csv::StringRecord::new();
                match rows.read_record(&mut row) {
                    Ok(false) => return None,
                    Ok(true) => {
                        let line = row.position().map_or(0, |p| p.line());
                        let object: Map<String, Value> = header
                            .iter()
                            .zip(row.iter())
                            .map(|(k, v)| (k.clone(), Value::String(v.to_owned())))
                            .collect();
                        (line, Ok(Value::Object(object)))
                    }
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line());
                        let fatal = !matches!(
                            e.kind(),
                            csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                        );
                        let bad = BadRecord {
                            line,
                            reason: format!("bad CSV row: {e}"),
                        };
                        if fatal {
                            self.inner = Inner::Failed(None);
                        }
                        return Some(Err(bad));
                    }
                }
            }
        };
        Some(match parsed {
            Ok(value) => self.record(line, value),
            Err(reason) => Err(BadRecord { line, reason }),
        })
    }
}

/// Finds the elements of one top-level JSON array without holding more
/// than one element: it tracks strings, escapes and nesting to find the
/// commas between elements, and leaves the parsing of each to serde_json.
struct ArrayScanner<R: BufRead> {
    input: R,
    /// The current line (1-based).
    line: u64,
    /// Where the scanner is in the array.
    state: ArrayState,
    /// Elements longer than this are reported, not kept.
    max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    /// Before the opening `[`.
    Start,
    /// After `[` or a `,`: an element (or `]`) comes next.
    Element,
    /// After the closing `]`.
    Done,
}

/// An element's bytes, or why it was refused (too long).
type Element = (u64, Result<Vec<u8>, String>);

impl<R: BufRead> ArrayScanner<R> {
    fn new(input: R, max_bytes: usize) -> Self {
        ArrayScanner {
            input,
            line: 1,
            state: ArrayState::Start,
            max_bytes,
        }
    }

    fn read_byte(&mut self) -> Result<Option<u8>, BadRecord> {
        let buf = self.input.fill_buf().map_err(|e| BadRecord {
            line: self.line,
            reason: format!("cannot read the input: {e}"),
        })?;
        let Some(&b) = buf.first() else {
            return Ok(None);
        };
        self.input.consume(1);
        if b == b'\n' {
            self.line += 1;
        }
        Ok(Some(b))
    }

    fn skip_blank(&mut self) -> Result<Option<u8>, BadRecord> {
        loop {
            match self.read_byte()? {
                Some(b) if b.is_ascii_whitespace() => {}
                other => return Ok(other),
            }
        }
    }

    fn broken(&self, reason: &str) -> BadRecord {
        BadRecord {
            line: self.line,
            reason: reason.to_owned(),
        }
    }

    /// The next element, `None` after the closing bracket, or an error that
    /// ends the input (the array's own structure is broken).
    fn next_element(&mut self) -> Result<Option<Element>, BadRecord> {
        if self.state == ArrayState::Start {
            match self.skip_blank()? {
                Some(b'[') => self.state = ArrayState::Element,
                None => {
                    self.state = ArrayState::Done;
                    return Ok(None);
                }
                Some(_) => {
                    self.state = ArrayState::Done;
                    return Err(self.broken("the input does not start with '['"));
                }
            }
        }
        if self.state == ArrayState::Done {
            return match self.skip_blank()? {
                None => Ok(None),
                Some(_) => Err(self.broken("text after the closing ']'")),
            };
        }
        let first = match self.skip_blank()? {
            None => {
                self.state = ArrayState::Done;
                return Err(self.broken("the array is not closed with ']'"));
            }
            Some(b']') => {
                self.state = ArrayState::Done;
                return self.next_element();
            }
            Some(b) => b,
        };
        let start_line = self.line;
        let mut element = vec![first];
        let mut too_long = false;
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        let mut b = first;
        loop {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
            } else {
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            let next = match self.read_byte()? {
                Some(next) => next,
                None => {
                    self.state = ArrayState::Done;
                    return Err(BadRecord {
                        line: start_line,
                        reason: "the input ends inside this element (the array is not closed)"
                            .into(),
                    });
                }
            };
            if !in_string && depth == 0 && (next == b',' || next == b']') {
                if next == b']' {
                    self.state = ArrayState::Done;
                }
                let result = if too_long {
                    Err(format!(
                        "the record is longer than the limit of {} bytes",
                        self.max_bytes
                    ))
                } else {
                    // Trailing blanks before the comma are harmless to serde_json.
                    Ok(element)
                };
                return Ok(Some((start_line, result)));
            }
            if !too_long {
                element.push(next);
                if element.len() > self.max_bytes {
                    too_long = true;
                    element = Vec::new();
                }
            }
            b = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> RecordShape {
        RecordShape {
            id_field: "id".into(),
            version_field: None,
            limits: Limits::default(),
        }
    }

    fn read(text: &str, format: Format) -> Vec<Result<(u64, String), BadRecord>> {
        Records::new(text.as_bytes(), format, shape())
            .map(|r| r.map(|r| (r.line, r.id.into_string())))
            .collect()
    }

    #[test]
    fn ndjson_gives_one_record_per_line_and_reports_bad_lines_by_number() {
        let text =
            "{\"id\":\"a\"}\n\n{\"id\": 7, \"n\": 1.50}\nnot json\n[1]\n{\"x\":1}\n{\"id\":\"b\"}";
        let got = read(text, Format::Ndjson);
        assert_eq!(got[0], Ok((1, "a".into())));
        assert_eq!(got[1], Ok((3, "7".into())));
        assert_eq!(got[2].as_ref().unwrap_err().line, 4);
        assert!(got[2].as_ref().unwrap_err().reason.contains("invalid JSON"));
        assert_eq!(got[3].as_ref().unwrap_err().line, 5);
        assert!(got[3].as_ref().unwrap_err().reason.contains("an array"));
        assert_eq!(got[4].as_ref().unwrap_err().line, 6);
        assert!(got[4].as_ref().unwrap_err().reason.contains("no id field"));
        assert_eq!(got[5], Ok((7, "b".into())));
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn a_json_array_is_split_into_elements_with_their_lines() {
        let text = "[\n {\"id\":\"a\",\"s\":\"],{\\\"\"},\n {\"id\":\"b\",\"n\":[1,{\"c\":2}]},\n 3,\n {\"id\":\"c\"}\n]\n";
        let got = read(text, Format::Array);
        assert_eq!(got[0], Ok((2, "a".into())));
        assert_eq!(got[1], Ok((3, "b".into())));
        assert_eq!(got[2].as_ref().unwrap_err().line, 4);
        assert_eq!(got[3], Ok((5, "c".into())));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn an_unclosed_array_ends_with_an_error() {
        let got = read("[{\"id\":\"a\"},\n{\"id\":\"b\"", Format::Array);
        assert_eq!(got[0], Ok((1, "a".into())));
        assert!(got[1].as_ref().unwrap_err().reason.contains("not closed"));
        assert_eq!(got.len(), 2);
        assert_eq!(read("[]", Format::Array), vec![]);
        assert_eq!(read("  ", Format::Array), vec![]);
    }

    #[test]
    fn csv_rows_become_objects_of_strings() {
        let text = "id,name,age\np1,Ada,36\np2,\"Grace, H\",85\np3,short\np4,Bob,1\n";
        let records: Vec<_> = Records::new(text.as_bytes(), Format::Csv, shape()).collect();
        let first = records[0].as_ref().unwrap();
        assert_eq!(first.line, 2);
        assert_eq!(first.data["age"], Value::String("36".into()));
        assert_eq!(records[1].as_ref().unwrap().data["name"], "Grace, H");
        let bad = records[2].as_ref().unwrap_err();
        assert_eq!(bad.line, 4, "{bad}");
        assert_eq!(records[3].as_ref().unwrap().id, "p4");
        assert_eq!(records.len(), 4);
    }

    #[test]
    fn the_format_is_detected_from_the_name_or_the_first_byte() {
        let mut array = "\n  [{}]".as_bytes();
        assert_eq!(Format::detect(None, &mut array).unwrap(), Format::Array);
        assert_eq!(array, b"\n  [{}]", "nothing was consumed");
        let mut nd = "{}\n{}".as_bytes();
        assert_eq!(Format::detect(None, &mut nd).unwrap(), Format::Ndjson);
        let mut csv = "id\n1".as_bytes();
        assert_eq!(
            Format::detect(Some("people.CSV"), &mut csv).unwrap(),
            Format::Csv
        );
    }

    #[test]
    fn versions_come_from_numbers_or_numeric_strings() {
        let shape = RecordShape {
            version_field: Some("v".into()),
            ..shape()
        };
        let text = "{\"id\":\"a\",\"v\":5}\n{\"id\":\"b\",\"v\":\"6\"}\n{\"id\":\"c\",\"v\":-1}\n";
        let got: Vec<_> = Records::new(text.as_bytes(), Format::Ndjson, shape).collect();
        assert_eq!(got[0].as_ref().unwrap().version, Some(5));
        assert_eq!(got[1].as_ref().unwrap().version, Some(6));
        assert!(got[2].as_ref().unwrap_err().reason.contains("version"));
    }

    #[test]
    fn data_postgresql_cannot_store_is_a_bad_record() {
        let got = read("{\"id\":\"a\",\"s\":\"nul\\u0000\"}", Format::Ndjson);
        assert!(got[0].as_ref().unwrap_err().reason.contains("NUL"));
    }
}
