//! W3C trace context: an inbound message's `traceparent` and `tracestate`
//! headers (OpenTelemetry's messaging conventions) are copied onto the
//! events it caused, whether the publisher had them in memory or read them
//! back from the outbox; an invalid `traceparent` is not copied.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};

use crate::{
    api::{metrics_when, sample},
    helpers::*,
};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

fn traced(parent: &str, state: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(parent)),
    );
    if let Some(state) = state {
        headers.insert(
            "tracestate".into(),
            AMQPValue::LongString(LongString::from(state)),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn header(e: &ReceivedEvent, name: &str) -> Option<String> {
    let headers = e.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("{name} is a string: {other:?}"),
    }
}

/// Saves a (traced), b (an invalid traceparent) and c (none); checks their
/// events' headers.
async fn check_propagation(app: &mut TestApp) {
    app.publish_with(
        save_body("person", "a", r#"{"name":"A"}"#),
        traced(PARENT, Some(STATE)),
    )
    .await;
    app.publish_with(
        save_body("person", "b", r#"{"nickname":"no name"}"#),
        traced(PARENT, None),
    )
    .await;
    app.publish_with(
        save_body("person", "b", r#"{"name":"B"}"#),
        traced(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            Some(STATE),
        ),
    )
    .await;
    app.save("person", "c", r#"{"name":"C"}"#).await;

    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "a"));
    assert_eq!(header(&e, "traceparent").as_deref(), Some(PARENT));
    assert_eq!(header(&e, "tracestate").as_deref(), Some(STATE));
    let e = app.next_event().await;
    assert_eq!(
        (e.op(), e.id()),
        ("rejected", "b"),
        "a rejection carries it too"
    );
    assert_eq!(header(&e, "traceparent").as_deref(), Some(PARENT));
    assert_eq!(header(&e, "tracestate"), None, "none was sent");
    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "b"));
    assert_eq!(
        header(&e, "traceparent"),
        None,
        "an invalid traceparent is dropped"
    );
    assert_eq!(header(&e, "tracestate"), None, "and its tracestate with it");
    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "c"));
    assert_eq!(header(&e, "traceparent"), None);
}

#[tokio::test]
async fn the_trace_context_of_a_message_goes_onto_its_events_from_memory() {
    let mut app = spawn_app().await;
    check_propagation(&mut app).await;
    let handed = "scramjet_outbox_rows_published_total{source=\"handed\"}";
    let created = "scramjet_events_published_total{op=\"created\"}";
    let text = metrics_when(&app, created, 3.0).await;
    assert_eq!(sample(&text, created), Some(3.0), "{text}");
    assert!(
        sample(&text, handed).is_some_and(|n| n >= 1.0),
        "handed over in memory:\n{text}"
    );
}

#[tokio::test]
async fn the_trace_context_of_a_message_goes_onto_its_events_read_back_from_the_outbox() {
    // A hand-off bound below any event: every row is read back.
    let mut app = spawn_app_with(|s| s.pipeline.max_batch_bytes = 1).await;
    check_propagation(&mut app).await;
    let handed = "scramjet_outbox_rows_published_total{source=\"handed\"}";
    let read = "scramjet_outbox_rows_published_total{source=\"read\"}";
    let text = metrics_when(&app, read, 4.0).await;
    assert_eq!(
        sample(&text, read),
        Some(4.0),
        "a row per message, read back:\n{text}"
    );
    assert_eq!(sample(&text, handed), None, "nothing handed over:\n{text}");
}

#[tokio::test]
async fn the_per_message_debug_line_names_the_trace_id() {
    let mut app = spawn_app().await;
    app.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = crate::partitions::Daemon::start(
        "traced",
        &app.settings,
        dir.path(),
        &[(
            "SCRAMJET__LOG__LEVEL",
            "info,tokio_postgres=warn,scramjet::daemon::consumer=debug",
        )],
    )
    .await;
    app.publish_with(
        save_body("person", "a", r#"{"name":"A"}"#),
        traced(PARENT, Some(STATE)),
    )
    .await;
    app.save("person", "b", r#"{"name":"B"}"#).await;
    assert_eq!(app.next_events(2).await.len(), 2);
    assert!(daemon.terminate().await.success());
    let lines = daemon.lines("processed");
    let of = |id: &str| {
        lines
            .iter()
            .find(|l| l["id"] == id)
            .unwrap_or_else(|| panic!("a processed line for {id}: {lines:?}"))
    };
    assert_eq!(of("a")["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(of("b").get("trace_id").is_none(), "{:?}", of("b"));
}
