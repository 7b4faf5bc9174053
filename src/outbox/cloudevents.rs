//! Events as CloudEvents 1.0 in structured content mode
//! (`events.format = "cloudevents"`): the attributes, then `data`, the §5
//! body as it is, so that nothing of it is lost; the attributes again as
//! `ce-*` AMQP headers, for routing on headers.

use std::borrow::Cow;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Deserialize;

use crate::config::{EventFormat, Settings};

/// `content_type` of a structured-mode event.
pub(crate) const CONTENT_TYPE: &str = "application/cloudevents+json";

/// How the daemon's events become CloudEvents.
#[derive(Debug, Clone)]
pub(crate) struct CloudEvents {
    /// `source`: `events.source`, or `/scramjet/<amqp.inbound_queue>`.
    source: String,
    /// Put before the op to make `type`.
    type_prefix: String,
}

/// What the attributes are made of, read from a §5 body.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    entity_type: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    occurred_at: Cow<'a, str>,
}

/// The attributes of one event, in the order they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attributes {
    /// `id`: the event's `event_id`.
    pub id: String,
    /// `source`.
    pub source: String,
    /// `type`: the prefix and the op.
    pub event_type: String,
    /// `subject`: `<type>/<id>` of the entity.
    pub subject: String,
    /// `time`: `occurred_at`.
    pub time: String,
}

impl CloudEvents {
    /// The CloudEvents form `settings` ask for; `None` for the §5 body.
    pub(crate) fn from_settings(settings: &Settings) -> Option<CloudEvents> {
        (settings.events.format == EventFormat::Cloudevents).then(|| CloudEvents {
            source: settings
                .events
                .source_or_default(&settings.amqp.inbound_queue),
            type_prefix: settings.events.type_prefix.clone(),
        })
    }

    /// The attributes of the event `event_id` whose §5 body is `body`;
    /// `None` if the body lacks its fields (never so for an event the
    /// daemon wrote, reduced or not).
    pub(crate) fn attributes(&self, event_id: &str, body: &str) -> Option<Attributes> {
        let head: Head<'_> = serde_json::from_str(body).ok()?;
        Some(Attributes {
            id: event_id.to_owned(),
            source: self.source.clone(),
            event_type: format!("{}{}", self.type_prefix, head.op),
            subject: format!("{}/{}", head.entity_type, head.id),
            time: head.occurred_at.into_owned(),
        })
    }
}

impl Attributes {
    /// The structured-mode body: the attributes, then `data`: `body`, which
    /// is JSON, as it is.
    pub(crate) fn wrap(&self, body: &str) -> String {
        let text = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let mut out = String::with_capacity(body.len() + 256);
        out.push_str("{\"specversion\":\"1.0\",\"id\":");
        out.push_str(&text(&self.id));
        out.push_str(",\"source\":");
        out.push_str(&text(&self.source));
        out.push_str(",\"type\":");
        out.push_str(&text(&self.event_type));
        out.push_str(",\"subject\":");
        out.push_str(&text(&self.subject));
        out.push_str(",\"time\":");
        out.push_str(&text(&self.time));
        out.push_str(",\"datacontenttype\":\"application/json\",\"data\":");
        out.push_str(body);
        out.push('}');
        out
    }

    /// Bytes [`Attributes::wrap`] adds to a body.
    pub(crate) fn overhead(&self) -> usize {
        self.wrap("").len()
    }

    /// The attributes as `ce-*` AMQP headers.
    pub(crate) fn headers(&self) -> FieldTable {
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", self.id.as_str()),
            ("ce-source", self.source.as_str()),
            ("ce-type", self.event_type.as_str()),
            ("ce-subject", self.subject.as_str()),
            ("ce-time", self.time.as_str()),
        ] {
            headers.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn ce() -> CloudEvents {
        CloudEvents {
            source: "/scramjet/people".into(),
            type_prefix: "org.example.scramjet.".into(),
        }
    }

    #[test]
    fn the_envelope_carries_the_attributes_and_the_body_unchanged_as_data() {
        // Numbers beyond f64 and key order survive: `data` is the text itself.
        let body = r#"{"event_id":"e","op":"updated","type":"person","id":"a \"b\"","data":{"z":1,"n":12345678901234567890.5},"occurred_at":"2026-12-02T10:00:00.123456Z"}"#;
        let a = ce()
            .attributes("0193e6a8-0000-7000-8000-000000000000", body)
            .unwrap();
        assert_eq!(a.event_type, "org.example.scramjet.updated");
        assert_eq!(a.subject, "person/a \"b\"");
        let wrapped = a.wrap(body);
        let v: Value = serde_json::from_str(&wrapped).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "0193e6a8-0000-7000-8000-000000000000");
        assert_eq!(v["source"], "/scramjet/people");
        assert_eq!(v["subject"], "person/a \"b\"");
        assert_eq!(v["time"], "2026-12-02T10:00:00.123456Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert!(wrapped.ends_with(&format!(",\"data\":{body}}}")));
        assert_eq!(wrapped.len(), body.len() + a.overhead());
        let headers = a.headers();
        let h = headers.inner();
        assert_eq!(h.len(), 6);
        assert_eq!(
            h.get("ce-type"),
            Some(&AMQPValue::LongString(
                "org.example.scramjet.updated".into()
            ))
        );
    }

    #[test]
    fn a_body_without_the_fields_has_no_attributes() {
        assert!(ce().attributes("x", "{}").is_none());
        assert!(ce().attributes("x", "not json").is_none());
    }
}
