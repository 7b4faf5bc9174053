//! Malformed input is dead-lettered unchanged with a reason, never changes the
//! database, and never blocks the messages behind it.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use scramjet::daemon::ERROR_HEADER;

use crate::helpers::*;

fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .map(|v| match v {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => format!("{other:?}"),
        })
}

#[tokio::test]
async fn every_malformed_message_is_dead_lettered_unchanged_and_the_next_one_is_processed() {
    let mut app = spawn_app_with(|s| s.limits.max_message_bytes = 4096).await;
    let long_id = "x".repeat(513);
    let long_type = format!("t{}", "y".repeat(64));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not valid JSON"),
        (b"".to_vec(), "not valid JSON"),
        (
            b"{\"action\":\"save\",\"type\":\"person\",\"id\":\"\xff\"}".to_vec(),
            "not valid UTF-8",
        ),
        (b"[1,2,3]".to_vec(), "not an object"),
        (b"42".to_vec(), "not an object"),
        (
            br#"{"type":"person","id":"p","data":{}}"#.to_vec(),
            "missing required field \"action\"",
        ),
        (
            br#"{"action":"save","id":"p","data":{}}"#.to_vec(),
            "missing required field \"type\"",
        ),
        (
            br#"{"action":"save","type":"person","data":{}}"#.to_vec(),
            "missing required field \"id\"",
        ),
        (
            br#"{"action":true,"type":"person","id":"p"}"#.to_vec(),
            "\"action\" must be a string",
        ),
        (
            br#"{"action":"save","type":7,"id":"p","data":{}}"#.to_vec(),
            "\"type\" must be a string",
        ),
        (
            br#"{"action":"save","type":"person","id":["p"],"data":{}}"#.to_vec(),
            "\"id\" must be a string",
        ),
        (
            br#"{"action":"merge","type":"person","id":"p"}"#.to_vec(),
            "unknown action",
        ),
        (
            br#"{"action":"save","type":"per.son","id":"p","data":{}}"#.to_vec(),
            "\"type\" must match",
        ),
        (
            br#"{"action":"save","type":"","id":"p","data":{}}"#.to_vec(),
            "\"type\" must match",
        ),
        (
            save_body(&long_type, "p", "{}").into_bytes(),
            "\"type\" must match",
        ),
        (
            br#"{"action":"save","type":"person","id":"","data":{}}"#.to_vec(),
            "\"id\" must not be empty",
        ),
        (
            save_body("person", &long_id, "{}").into_bytes(),
            "the limit is 512",
        ),
        (
            br#"{"action":"save","type":"person","id":"p"}"#.to_vec(),
            "needs a field \"data\"",
        ),
        (
            br#"{"action":"save","type":"person","id":"p","data":[]}"#.to_vec(),
            "\"data\" must be an object",
        ),
        (
            br#"{"action":"save","type":"person","id":"p","data":"{}"}"#.to_vec(),
            "\"data\" must be an object",
        ),
        (
            br#"{"action":"save","type":"person","id":"p","data":{"name":"a\u0000b"}}"#.to_vec(),
            "NUL",
        ),
        (
            br#"{"action":"save","type":"person","id":"p","data":{"name":"A","n":{"k\u0000":1}}}"#
                .to_vec(),
            "NUL",
        ),
        (
            br#"{"action":"save","type":"person","id":"p\u0000","data":{"name":"A"}}"#.to_vec(),
            "NUL",
        ),
        (
            br#"{"action":"save","type":"person","id":"p","data":{"name":"A","n":1e999999}}"#
                .to_vec(),
            "outside what PostgreSQL can store",
        ),
        (
            br#"{"action":"save","type":"person","id":"p","version":-3,"data":{"name":"A"}}"#
                .to_vec(),
            "\"version\"",
        ),
        (
            save_body(
                "person",
                "p",
                &format!(r#"{{"name":"{}"}}"#, "z".repeat(5000)),
            )
            .into_bytes(),
            "exceeds the limit of 4096 bytes",
        ),
    ];
    for (i, (body, _)) in cases.iter().enumerate() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-test-case".into(),
            AMQPValue::LongString(i.to_string().into()),
        );
        app.publish_with(
            body,
            BasicProperties::default()
                .with_headers(headers)
                .with_correlation_id(ShortString::from(format!("case-{i}")))
                .with_content_type("application/json".into()),
        )
        .await;
    }
    app.save("person", "good", r#"{"name":"Good"}"#).await;

    for (i, (body, reason)) in cases.iter().enumerate() {
        let d = app.next_dead_letter().await;
        assert_eq!(&d.data, body, "case {i}: body unchanged");
        assert_eq!(
            header(&d, "x-test-case").as_deref(),
            Some(i.to_string().as_str()),
            "case {i}: headers kept"
        );
        assert_eq!(
            d.properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string()),
            Some(format!("case-{i}")),
            "case {i}: properties kept"
        );
        let error =
            header(&d, ERROR_HEADER).unwrap_or_else(|| panic!("case {i}: no {ERROR_HEADER}"));
        assert!(
            error.contains(reason),
            "case {i}: {error:?} should mention {reason:?}"
        );
        assert!(!error.contains('\n'), "case {i}: one line");
    }

    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "good"));
    assert_eq!(
        app.count("resources").await,
        1,
        "nothing malformed reached resources"
    );
    assert_eq!(
        app.count("staging").await,
        0,
        "nothing malformed reached staging"
    );
    assert!(app.wait_outbox_empty().await);
}

#[tokio::test]
async fn a_message_the_database_refuses_is_dead_lettered_and_its_batch_mates_are_processed() {
    // Linger so the messages share one batch (and one transaction).
    let mut app = spawn_app_with(|s| s.pipeline.linger_ms = 300).await;
    // A rule the daemon does not know about makes one id poison for the database.
    app.db
        .batch_execute("ALTER TABLE resources ADD CONSTRAINT no_poison CHECK (id <> 'poison')")
        .await
        .unwrap();
    let bodies = vec![
        save_body("person", "a", r#"{"name":"A"}"#),
        save_body("person", "poison", r#"{"name":"P"}"#),
        save_body("person", "b", r#"{"name":"B"}"#),
        save_body("person", "a", r#"{"name":"A2"}"#),
    ];
    app.publish_many(&bodies).await;

    let d = app.next_dead_letter().await;
    assert_eq!(d.data, bodies[1].as_bytes());
    let error = header(&d, ERROR_HEADER).unwrap();
    assert!(error.contains("no_poison"), "{error}");
    assert!(error.contains("database refused"), "{error}");

    let events = app.next_events(3).await;
    let seen: Vec<(&str, &str)> = events.iter().map(|e| (e.id(), e.op())).collect();
    assert_eq!(
        seen,
        vec![("a", "created"), ("b", "created"), ("a", "updated")]
    );
    let ids: Vec<String> = app.resources().await.into_iter().map(|r| r.1).collect();
    assert_eq!(ids, vec!["a", "b"]);
}
