//! AMQP properties that are not UTF-8. Short strings (`message_id`,
//! `content_type`, header names, …) must be UTF-8 by the specification, but
//! RabbitMQ passes on whatever bytes a producer sent. Such a message is
//! dead-lettered, naming the property, and the messages behind it go on.

use lapin::types::AMQPValue;
use scramjet::daemon::ERROR_HEADER;

use crate::{helpers::*, raw_amqp::*};

/// The bytes the issue reproduced with: two that can start no UTF-8
/// sequence, then `bad`.
const NOT_UTF8: &[u8] = b"\xff\xfebad";
/// What the daemon's AMQP client makes of [`NOT_UTF8`].
const AS_RECEIVED: &str = "\u{FFFD}\u{FFFD}bad";

fn bad() -> Option<Vec<u8>> {
    Some(NOT_UTF8.to_vec())
}

fn error_header(d: &lapin::message::Delivery) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ERROR_HEADER))
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("the dead letter has no {ERROR_HEADER} header: {other:?}"),
    }
}

#[tokio::test]
async fn a_property_that_is_not_utf8_dead_letters_its_message_and_the_next_is_processed() {
    let mut app = spawn_app().await;
    let with = |set: fn(&mut RawProperties)| {
        let mut p = RawProperties::default();
        set(&mut p);
        p
    };
    // Not user_id nor expiration: RabbitMQ itself refuses such a publish
    // ("user_id property set to … but authenticated user was 'guest'",
    // "invalid expiration …: no_integer").
    let cases = [
        ("message_id", with(|p| p.message_id = bad())),
        ("correlation_id", with(|p| p.correlation_id = bad())),
        ("content_type", with(|p| p.content_type = bad())),
        ("content_encoding", with(|p| p.content_encoding = bad())),
        ("type", with(|p| p.kind = bad())),
        ("app_id", with(|p| p.app_id = bad())),
        ("reply_to", with(|p| p.reply_to = bad())),
        ("cluster_id", with(|p| p.cluster_id = bad())),
        (
            "header name",
            with(|p| {
                p.headers = Some(vec![
                    (b"x-fine".to_vec(), b"kept".to_vec()),
                    (NOT_UTF8.to_vec(), b"value".to_vec()),
                ])
            }),
        ),
    ];
    for (property, mut properties) in cases {
        let bad_id = format!("bad {property}");
        let good_id = format!("after bad {property}");
        let body = save_body("person", &bad_id, r#"{"name":"Bad"}"#);
        properties.delivery_mode = Some(2);
        publish_raw(
            &app.settings.amqp.inbound_exchange,
            b"test.save",
            body.as_bytes(),
            &properties,
        )
        .await;
        app.save("person", &good_id, r#"{"name":"Good"}"#).await;

        let event = app.next_event().await;
        assert_eq!(
            event.id(),
            good_id,
            "the save behind the bad {property} is processed"
        );
        assert_eq!(event.op(), "created");

        let dead = app.next_dead_letter().await;
        assert_eq!(dead.data, body.as_bytes(), "body unchanged ({property})");
        let reason = error_header(&dead);
        assert!(
            reason.contains(property) && reason.contains("UTF-8"),
            "the reason names the {property}: {reason}"
        );
    }
    let ids: Vec<String> = app.resources().await.into_iter().map(|r| r.1).collect();
    assert!(
        ids.iter().all(|id| id.starts_with("after bad ")),
        "no bad message changed the database: {ids:?}"
    );

    // The counters move just after the ack, so a moment after the dead letter.
    let counted = r#"scramjet_messages_total{outcome="dead_lettered"} 9"#;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = app.get("/metrics").await;
        // Before the fix, each such message killed the connection: about
        // three reconnects a second, forever.
        assert!(
            metrics.contains(r#"scramjet_reconnects_total{service="rabbitmq"} 0"#),
            "no bad message cost the daemon its broker session:\n{metrics}"
        );
        if metrics.contains(counted) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "each bad message is counted as dead-lettered:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dead_letter_carries_the_other_properties_and_headers_as_they_came() {
    let mut app = spawn_app().await;
    let body = save_body("person", "p", r#"{"name":"P"}"#);
    let properties = RawProperties {
        message_id: Some(NOT_UTF8.to_vec()),
        correlation_id: Some(b"corr-1".to_vec()),
        content_type: Some(b"application/json".to_vec()),
        app_id: Some(b"producer".to_vec()),
        headers: Some(vec![(
            b"x-trace".to_vec(),
            b"\xff raw long string".to_vec(),
        )]),
        delivery_mode: Some(2),
        ..Default::default()
    };
    publish_raw(
        &app.settings.amqp.inbound_exchange,
        b"test.save",
        body.as_bytes(),
        &properties,
    )
    .await;

    let dead = app.next_dead_letter().await;
    assert_eq!(dead.data, body.as_bytes());
    let p = &dead.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some(AS_RECEIVED)
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-1")
    );
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("producer"));
    match p.headers().as_ref().and_then(|h| h.inner().get("x-trace")) {
        Some(AMQPValue::LongString(s)) => assert_eq!(s.as_bytes(), b"\xff raw long string"),
        other => panic!("the header x-trace is kept byte for byte: {other:?}"),
    }
    assert!(error_header(&dead).contains("message_id"));
    assert_eq!(app.count("resources").await, 0);
}

#[tokio::test]
async fn a_message_whose_routing_key_is_not_utf8_is_processed_like_any_other() {
    // The routing key is a short string of `basic.deliver`, parsed like the
    // properties; the daemon does not look at it, so the save just applies.
    let mut app = spawn_app().await;
    let body = save_body("person", "p", r#"{"name":"P"}"#);
    publish_raw(
        &app.settings.amqp.inbound_exchange,
        b"test.\xff",
        body.as_bytes(),
        &RawProperties::default(),
    )
    .await;
    let event = app.next_event().await;
    assert_eq!((event.op(), event.id()), ("created", "p"));
}
