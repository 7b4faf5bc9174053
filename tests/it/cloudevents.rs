//! `events.format = "cloudevents"`: every event, of every op, is read by
//! the official CloudEvents SDK (`cloudevents-sdk`), with the attributes
//! CONTRACT §5 maps, `data` the §5 body, and the `ce-*` headers.

use cloudevents::{AttributesReader, Data, Event};
use lapin::types::AMQPValue;
use scramjet::config::EventFormat;
use serde_json::Value;

use crate::helpers::*;

const PREFIX: &str = "org.example.scramjet.";

/// Checks `e` as a CloudEvent of `op` on person `id`; returns its `data`.
fn check(e: &ReceivedEvent, op: &str, id: &str, source: &str) -> Value {
    let props = &e.properties;
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(e.routing_key, format!("person.{op}"), "routing keys stay");
    let event: Event = serde_json::from_str(&e.raw)
        .unwrap_or_else(|err| panic!("the CloudEvents SDK reads the event: {err}: {}", e.raw));
    assert_eq!(event.specversion().to_string(), "1.0");
    assert_eq!(event.ty(), format!("{PREFIX}{op}"));
    assert_eq!(event.source().to_string(), source);
    assert_eq!(event.subject(), Some(format!("person/{id}").as_str()));
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let data = match event.data() {
        Some(Data::Json(v)) => v.clone(),
        other => panic!("data is JSON: {other:?}"),
    };
    assert_eq!(data["op"], op);
    assert_eq!(data["id"], id);
    assert_eq!(event.id(), data["event_id"].as_str().unwrap());
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some(event.id()),
        "message_id stays the event_id"
    );
    let time = event.time().expect("time is set");
    let occurred = time::OffsetDateTime::parse(
        data["occurred_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("occurred_at is RFC 3339");
    assert_eq!(
        i128::from(time.timestamp_micros()),
        occurred.unix_timestamp_nanos() / 1000,
        "time is occurred_at"
    );
    // The key attributes again as headers.
    let headers = props.headers().as_ref().expect("ce-* headers").inner();
    let header = |name: &str| match headers.get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(header("ce-specversion"), "1.0");
    assert_eq!(header("ce-id"), event.id());
    assert_eq!(header("ce-source"), source);
    assert_eq!(header("ce-type"), format!("{PREFIX}{op}"));
    assert_eq!(header("ce-subject"), format!("person/{id}"));
    assert_eq!(header("ce-time"), data["occurred_at"].as_str().unwrap());
    data
}

#[tokio::test]
async fn every_op_is_a_cloudevent_that_the_sdk_reads_with_the_body_as_data() {
    let mut app = spawn_app_with(|s| {
        s.events.format = EventFormat::Cloudevents;
        s.events.type_prefix = PREFIX.into();
    })
    .await;
    let source = format!("/scramjet/{}", app.settings.amqp.inbound_queue);

    app.save(
        "person",
        "a",
        r#"{"name":"Ada","n":12345678901234567890.5}"#,
    )
    .await;
    let data = check(&app.next_event().await, "created", "a", &source);
    assert_eq!(
        data["data"]["n"].to_string(),
        "12345678901234567890.5",
        "numbers are not rounded in data"
    );
    app.save("person", "a", r#"{"name":"Ada Lovelace"}"#).await;
    let data = check(&app.next_event().await, "updated", "a", &source);
    assert!(data["patch"].is_array());
    app.save("person", "b", r#"{"nickname":"no name"}"#).await;
    let data = check(&app.next_event().await, "rejected", "b", &source);
    assert!(data["errors"].is_array());
    app.save("person", "c", r#"{"name":"Cy"}"#).await;
    check(&app.next_event().await, "created", "c", &source);
    app.delete("person", "c").await;
    let data = check(&app.next_event().await, "deleted", "c", &source);
    assert_eq!(data["previous"]["name"], "Cy");

    let replayed = replay_all(&app.settings, "person").await;
    assert_eq!(replayed, 1);
    let data = check(&app.next_event().await, "snapshot", "a", &source);
    assert_eq!(data["data"]["name"], "Ada Lovelace");
}

/// The §5 body inside a CloudEvent's text: what follows `"data":`.
fn inner_body(raw: &str) -> &str {
    let at = raw.find(",\"data\":").expect("a data attribute") + ",\"data\":".len();
    &raw[at..raw.len() - 1]
}

#[tokio::test]
async fn a_cloudevent_over_max_event_bytes_is_reduced_with_its_envelope_inside_the_limit() {
    let limit = scramjet::config::MIN_EVENT_BYTES;
    let mut app = spawn_app_with(|s| {
        s.events.format = EventFormat::Cloudevents;
        s.events.type_prefix = PREFIX.into();
        s.events.source = Some("https://example.org/hr".into());
        s.limits.max_event_bytes = limit;
    })
    .await;
    // How long a created event's §5 body is for a name of one byte.
    app.save("person", "a", r#"{"name":"x"}"#).await;
    let e = app.next_event().await;
    check(&e, "created", "a", "https://example.org/hr");
    let base = inner_body(&e.raw).len() - 1;

    // A body that fits the limit alone, but not with its envelope.
    let name = "x".repeat(limit - 20 - base);
    app.save("person", "b", &format!(r#"{{"name":"{name}"}}"#))
        .await;
    let e = app.next_event().await;
    let data = check(&e, "created", "b", "https://example.org/hr");
    assert_eq!(data["truncated"], "max_event_bytes", "{}", &e.raw[..300]);
    assert!(data["data"].is_null());
    assert!(
        e.raw.len() <= limit,
        "{} bytes, over limits.max_event_bytes {limit}",
        e.raw.len()
    );
    // One that fits with its envelope is published whole.
    let name = "x".repeat(limit - base - 400);
    app.save("person", "c", &format!(r#"{{"name":"{name}"}}"#))
        .await;
    let e = app.next_event().await;
    let data = check(&e, "created", "c", "https://example.org/hr");
    assert!(data["truncated"].is_null());
    assert_eq!(
        data["data"]["name"].as_str().map(str::len),
        Some(name.len())
    );
}
