//! Change events (CONTRACT §5), rendered once to the exact bytes that will be
//! published and stored that way in the outbox.
//!
//! The body is written by hand rather than through a serde struct so that
//! `data` and `previous` are embedded as their canonical text: no second
//! serialization on the hot path, numbers exactly as sent, and stable bytes.

use std::fmt::Write as _;

use serde_json::Value;
use uuid::Uuid;

use crate::{domain::canonical, domain::validate::ValidationError};

/// The kind of change an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A new (type, id).
    Created,
    /// Data of an existing (type, id) changed.
    Updated,
    /// An existing (type, id) was removed.
    Deleted,
    /// A save failed validation.
    Rejected,
    /// Current state, replayed on an operator's request.
    Snapshot,
}

impl Op {
    /// The name used in the event body and the routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Created => "created",
            Op::Updated => "updated",
            Op::Deleted => "deleted",
            Op::Rejected => "rejected",
            Op::Snapshot => "snapshot",
        }
    }
}

/// An event ready for the outbox.
#[derive(Debug, Clone)]
pub struct Event {
    /// UUID v7; also the AMQP `message_id`.
    pub event_id: Uuid,
    /// `<type>.<op>`.
    pub routing_key: String,
    /// Copied from the inbound message's AMQP `correlation_id`.
    pub correlation_id: Option<String>,
    /// Copied from the inbound message's `traceparent` and `tracestate`
    /// headers; published as the same headers.
    pub trace: Option<super::trace::TraceContext>,
    /// The JSON body.
    pub payload: String,
    /// The outbox lane it goes to: the partition of the message that
    /// caused it, in partitioned mode.
    pub lane: Option<i32>,
}

/// What an event says; fields absent here are `null` in the body.
#[derive(Debug, Default)]
pub struct EventFields<'a> {
    /// Canonical text of the new (or rejected) data.
    pub data: Option<&'a str>,
    /// Hash of `data`.
    pub hash: Option<&'a str>,
    /// Hash before the change.
    pub previous_hash: Option<&'a str>,
    /// Data before a delete.
    pub previous: Option<&'a Value>,
    /// RFC 6902 operations from the old data to the new.
    pub patch: Option<&'a json_patch::Patch>,
    /// Validation errors of a rejected save (at most `validation.max_errors`).
    pub errors: Option<&'a [ValidationError]>,
    /// How many validation errors the rejected save had in all.
    pub errors_total: Option<usize>,
    /// The producer's version, if it sent one.
    pub version: Option<i64>,
}

impl Event {
    /// Renders an event. `occurred_at` is an RFC 3339 UTC timestamp.
    pub fn new(
        op: Op,
        entity_type: &str,
        id: &str,
        fields: EventFields<'_>,
        occurred_at: &str,
        correlation_id: Option<String>,
    ) -> Event {
        let event_id = Uuid::now_v7();
        let mut out = String::with_capacity(256 + fields.data.map_or(0, str::len));
        out.push_str("{\"event_id\":\"");
        write!(out, "{event_id}").expect("writing to a String cannot fail");
        out.push_str("\",\"op\":\"");
        out.push_str(op.as_str());
        out.push_str("\",\"type\":");
        push_string(&mut out, entity_type);
        out.push_str(",\"id\":");
        push_string(&mut out, id);
        out.push_str(",\"data\":");
        push_raw(&mut out, fields.data);
        out.push_str(",\"hash\":");
        push_opt_string(&mut out, fields.hash);
        out.push_str(",\"previous_hash\":");
        push_opt_string(&mut out, fields.previous_hash);
        out.push_str(",\"previous\":");
        match fields.previous {
            Some(v) => canonical::push_value(&mut out, v),
            None => out.push_str("null"),
        }
        out.push_str(",\"patch\":");
        match fields.patch {
            Some(p) => push_patch(&mut out, p),
            None => out.push_str("null"),
        }
        out.push_str(",\"errors\":");
        match fields.errors {
            Some(e) => out.push_str(&serde_json::to_string(e).expect("errors serialize")),
            None => out.push_str("null"),
        }
        out.push_str(",\"errors_total\":");
        match fields.errors_total {
            Some(n) => write!(out, "{n}").expect("writing to a String cannot fail"),
            None => out.push_str("null"),
        }
        out.push_str(",\"version\":");
        match fields.version {
            Some(v) => write!(out, "{v}").expect("writing to a String cannot fail"),
            None => out.push_str("null"),
        }
        out.push_str(",\"truncated\":null,\"occurred_at\":\"");
        out.push_str(occurred_at);
        out.push_str("\"}");
        Event {
            event_id,
            routing_key: format!("{entity_type}.{}", op.as_str()),
            correlation_id,
            trace: None,
            payload: out,
            lane: None,
        }
    }
}

/// The value of `truncated` in an event reduced by [`reduce`].
pub const TRUNCATED_MAX_EVENT_BYTES: &str = "max_event_bytes";

/// The reduced form of an event body longer than `max_bytes` (CONTRACT §5):
/// `data`, `previous` and `patch` null — and `errors` too if that is not
/// enough — with `truncated` saying why. Every other field stays, so the
/// hashes still tell what changed and the row can be read over HTTP.
///
/// A broker refuses a message over its `max_message_size`, and the outbox
/// would offer that event again forever; this keeps it moving.
pub fn reduce(payload: &str, max_bytes: usize) -> String {
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_str::<Value>(payload) else {
        // Events are written by `Event::new`; this is never reached, but an
        // unreadable row still must not stop the outbox.
        return format!("{{\"truncated\":\"{TRUNCATED_MAX_EVENT_BYTES}\"}}");
    };
    for field in ["data", "previous", "patch"] {
        fields.insert(field.into(), Value::Null);
    }
    fields.insert("truncated".into(), TRUNCATED_MAX_EVENT_BYTES.into());
    let reduced = canonical::to_canonical(&Value::Object(fields.clone()));
    if reduced.len() <= max_bytes {
        return reduced;
    }
    // Long error paths can still be too much; `errors_total` keeps the count.
    fields.insert("errors".into(), Value::Null);
    canonical::to_canonical(&Value::Object(fields))
}

/// Appends the canonical text of `patch` (RFC 6902 operations, members in
/// canonical order: `from`, `op`, `path`, `value`), written in place rather
/// than through a copy of the patch as a `Value`; numbers inside `value`s
/// keep their literal text.
fn push_patch(out: &mut String, patch: &json_patch::Patch) {
    use json_patch::PatchOperation as P;
    out.push('[');
    for (i, operation) in patch.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let (op, from, path, value) = match operation {
            P::Add(o) => ("add", None, &o.path, Some(&o.value)),
            P::Remove(o) => ("remove", None, &o.path, None),
            P::Replace(o) => ("replace", None, &o.path, Some(&o.value)),
            P::Move(o) => ("move", Some(&o.from), &o.path, None),
            P::Copy(o) => ("copy", Some(&o.from), &o.path, None),
            P::Test(o) => ("test", None, &o.path, Some(&o.value)),
        };
        out.push('{');
        if let Some(from) = from {
            out.push_str("\"from\":");
            push_string(out, from.as_str());
            out.push(',');
        }
        out.push_str("\"op\":\"");
        out.push_str(op);
        out.push_str("\",\"path\":");
        push_string(out, path.as_str());
        if let Some(value) = value {
            out.push_str(",\"value\":");
            canonical::push_value(out, value);
        }
        out.push('}');
    }
    out.push(']');
}

fn push_string(out: &mut String, s: &str) {
    canonical::push_string(out, s);
}

fn push_opt_string(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_string(out, s),
        None => out.push_str("null"),
    }
}

fn push_raw(out: &mut String, raw: Option<&str>) {
    out.push_str(raw.unwrap_or("null"));
}

/// The current time as RFC 3339 UTC with microseconds, e.g. `2026-11-23T10:00:00.123456Z`.
pub fn now_rfc3339() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .expect("the format is valid for any UTC time")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_present_and_null_where_unset() {
        let e = Event::new(
            Op::Created,
            "person",
            "it's \"p\"",
            EventFields {
                data: Some(r#"{"n":12345678901234567890123}"#),
                hash: Some("ab"),
                ..Default::default()
            },
            "2026-11-23T10:00:00.123456Z",
            Some("c-1".into()),
        );
        assert_eq!(e.routing_key, "person.created");
        let v: Value = serde_json::from_str(&e.payload).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                "data",
                "errors",
                "errors_total",
                "event_id",
                "hash",
                "id",
                "occurred_at",
                "op",
                "patch",
                "previous",
                "previous_hash",
                "truncated",
                "type",
                "version"
            ]
        );
        assert_eq!(obj["event_id"], e.event_id.to_string());
        assert_eq!(e.event_id.get_version_num(), 7);
        assert_eq!(obj["id"], "it's \"p\"");
        assert_eq!(obj["data"]["n"].to_string(), "12345678901234567890123");
        for null in [
            "previous_hash",
            "previous",
            "patch",
            "errors",
            "errors_total",
            "version",
            "truncated",
        ] {
            assert!(obj[null].is_null(), "{null}");
        }
    }

    #[test]
    fn a_reduced_event_keeps_everything_but_the_documents() {
        let data = format!(r#"{{"name":"{}","n":1e+400}}"#, "x".repeat(1000));
        let e = Event::new(
            Op::Rejected,
            "person",
            "p1",
            EventFields {
                data: Some(&data),
                hash: Some("ab"),
                errors: Some(&[ValidationError {
                    path: format!("/{}", "k".repeat(2000)),
                    message: "m".into(),
                }]),
                errors_total: Some(7),
                version: Some(3),
                ..Default::default()
            },
            "2026-11-23T10:00:00.123456Z",
            None,
        );
        let reduced: Value = serde_json::from_str(&reduce(&e.payload, 2500)).unwrap();
        let original: Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(reduced["truncated"], "max_event_bytes");
        assert!(reduced["data"].is_null());
        assert_eq!(reduced["errors"], original["errors"]);
        for kept in [
            "event_id",
            "op",
            "type",
            "id",
            "hash",
            "errors_total",
            "version",
            "occurred_at",
        ] {
            assert_eq!(reduced[kept], original[kept], "{kept}");
        }
        let reduced: Value = serde_json::from_str(&reduce(&e.payload, 1000)).unwrap();
        assert!(reduced["errors"].is_null());
        assert_eq!(reduced["errors_total"], 7);
    }

    #[test]
    fn a_patch_is_written_as_its_canonical_serialization() {
        let before: Value = serde_json::from_str(
            r#"{"a":1,"b":[1,2,{"x":"q\"\u0001"}],"c":{"d":1.50,"e":12345678901234567890123},"gone":true,"k/~":"v"}"#,
        )
        .unwrap();
        let after: Value = serde_json::from_str(
            r#"{"a":2,"b":[1,{"x":"é"}],"c":{"d":1.5e+400,"f":null},"k/~":["w"],"new":{"z":1,"y":[]}}"#,
        )
        .unwrap();
        let mut patch = json_patch::diff(&before, &after);
        // Operations diff never makes, built by hand.
        let more: json_patch::Patch = serde_json::from_str(
            r#"[{"op":"move","from":"/a","path":"/m"},{"op":"copy","from":"/b/0","path":"/c2"},{"op":"test","path":"/n","value":-0.0}]"#,
        )
        .unwrap();
        patch.0.extend(more.0);
        let through_value = canonical::to_canonical(&serde_json::to_value(&patch).unwrap());
        let mut written = String::new();
        push_patch(&mut written, &patch);
        assert_eq!(written, through_value);
        let mut empty = String::new();
        push_patch(&mut empty, &json_patch::Patch(vec![]));
        assert_eq!(empty, "[]");
    }

    #[test]
    fn timestamps_have_microseconds_and_z() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-11-23T10:00:00.123456Z".len(), "{t}");
        assert!(t.ends_with('Z'));
    }
}
