//! Bounded outputs: one input never produces an output many times its size —
//! not a rejection with every error of a huge document, not an event the
//! broker would refuse, not a number PostgreSQL expands into digits on
//! every read.

use lapin::types::AMQPValue;
use scramjet::bulk::{Format, IngestOptions, Scramjet};
use serde_json::Value;

use crate::helpers::*;

/// A schema whose array items must be strings, for documents with many errors.
const LIST_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "a": {"type": "array", "items": {"type": "string"}},
    "s": {"type": "integer"}
  }
}"#;

/// The `x-scramjet-error` header of a dead letter.
fn dead_letter_reason(d: &lapin::message::Delivery) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(scramjet::daemon::ERROR_HEADER).cloned())
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("no error header: {other:?}"),
    }
}

/// `{"name":"x","n":[1e131071, …]}` with `count` numbers.
fn huge_exponents(count: usize) -> String {
    let numbers = vec!["1e131071"; count].join(",");
    format!(r#"{{"name":"x","n":[{numbers}]}}"#)
}

#[tokio::test]
async fn a_number_whose_exponent_exceeds_max_exponent_is_dead_lettered_and_1e400_still_passes() {
    let mut app = spawn_app().await;
    let data = huge_exponents(100);
    app.save("person", "expands", &data).await;
    app.save(
        "person",
        "fits",
        r#"{"name":"y","a":1e400,"b":1e-400,"c":-2.5E+1000}"#,
    )
    .await;
    let event = app.next_event().await;
    let (status, body) = app.get("/v1/resources/person/expands").await;
    println!(
        "a save of {} bytes: GET answered {status} with {} bytes",
        data.len(),
        body.len()
    );
    assert_eq!(event.id(), "fits", "the expanding save made no event");
    assert_eq!(event.op(), "created");
    // The canonical form writes the exponent's sign.
    assert!(
        event.raw.contains(r#""a":1e+400,"b":1e-400"#),
        "{}",
        event.raw
    );
    assert_eq!(status, 404);
    let dead = app.next_dead_letter().await;
    let reason = dead_letter_reason(&dead);
    assert!(reason.contains("limits.max_exponent"), "{reason}");
    assert!(reason.contains("/n/0"), "{reason}");
    assert_eq!(
        dead.data,
        save_body("person", "expands", &data).into_bytes()
    );
}

#[tokio::test]
async fn an_ingested_record_whose_exponent_exceeds_max_exponent_is_a_bad_record() {
    let app = spawn_app().await;
    let feed = format!(
        "{{\"id\":\"fits\",\"name\":\"y\",\"a\":1e400}}\n{}\n",
        huge_exponents(3).replacen('{', r#"{"id":"expands","#, 1)
    );
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let summary = scramjet
        .ingest(
            std::io::Cursor::new(feed.into_bytes()),
            Format::Ndjson,
            &IngestOptions::new("person"),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!((summary.records, summary.created), (1, 1), "{summary:?}");
    assert_eq!(summary.bad_count, 1, "{summary:?}");
    assert_eq!(summary.bad[0].line, 2);
    assert!(
        summary.bad[0].reason.contains("limits.max_exponent"),
        "{}",
        summary.bad[0].reason
    );
}
#[tokio::test]
async fn a_rejection_lists_at_most_max_errors_errors_and_keeps_their_total() {
    let mut app = spawn_app().await;
    std::fs::write(app.schema_dir.path().join("list.json"), LIST_SCHEMA).unwrap();
    app.schemas.reload().unwrap();
    // About 200 KB and 100,000 errors (the issue's 1 MB made 500,000).
    let items = 100_000;
    let data = format!(r#"{{"a":[{}]}}"#, vec!["1"; items].join(","));
    app.save("list", "many", &data).await;
    let event = app.next_event().await;
    println!(
        "a save of {} bytes with {items} errors: a rejected event of {} bytes",
        data.len(),
        event.raw.len()
    );
    assert_eq!(event.op(), "rejected");
    let errors = event.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 100, "validation.max_errors by default");
    assert_eq!(errors[0]["path"], "/a/0");
    assert_eq!(event.body["errors_total"], items);
    assert!(event.raw.len() < data.len() + 20_000, "{}", event.raw.len());

    // Staging keeps the same errors, and says how many were left out.
    let (_, page) = app.get("/v1/staging/list?invalid=true").await;
    let page: Value = serde_json::from_str(&page).unwrap();
    let kept = page["items"][0]["errors"].as_array().unwrap();
    assert_eq!(kept.len(), 101, "100 errors and one saying how many more");
    assert_eq!(kept[..100], errors[..]);
    assert_eq!(kept[100]["omitted"], items - 100);
    assert_eq!(kept[100]["path"], "");
    assert!(
        kept[100]["message"]
            .as_str()
            .unwrap()
            .contains("99900 more errors"),
        "{}",
        kept[100]
    );
}

#[tokio::test]
async fn a_validation_message_embeds_only_a_short_rendering_of_the_value() {
    let mut app = spawn_app().await;
    std::fs::write(app.schema_dir.path().join("list.json"), LIST_SCHEMA).unwrap();
    app.schemas.reload().unwrap();
    let long = "x".repeat(100_000);
    app.save("list", "long", &format!(r#"{{"s":"{long}"}}"#))
        .await;
    let event = app.next_event().await;
    println!(
        "a 100 KB string: a rejected event of {} bytes",
        event.raw.len()
    );
    let errors = event.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(event.body["errors_total"], 1);
    let message = errors[0]["message"].as_str().unwrap();
    assert!(
        message.len() <= 200,
        "{} bytes: {message:.300}",
        message.len()
    );
    assert!(message.contains("\"xxxx"), "{message}");
    assert!(message.contains("is not of type \"integer\""), "{message}");
}

#[tokio::test]
async fn an_event_over_max_event_bytes_is_published_reduced_and_the_events_behind_it_follow() {
    let mut app = spawn_app_with(|s| s.limits.max_event_bytes = 64 * 1024).await;
    let name = "n".repeat(100_000);
    let data = format!(r#"{{"name":"{name}","age":1}}"#);
    app.save("person", "big", &data).await;
    app.save("person", "small", r#"{"name":"s"}"#).await;
    app.save("person", "big", &format!(r#"{{"name":"{name}","age":2}}"#))
        .await;
    app.delete("person", "big").await;
    let events = app.next_events(4).await;
    for e in &events {
        println!("{} {}: {} bytes", e.id(), e.op(), e.raw.len());
    }
    let seen: Vec<(&str, &str)> = events.iter().map(|e| (e.id(), e.op())).collect();
    assert_eq!(
        seen,
        [
            ("big", "created"),
            ("small", "created"),
            ("big", "updated"),
            ("big", "deleted")
        ]
    );
    let small = &events[1].body;
    assert_eq!(small["data"]["name"], "s");
    assert!(small["truncated"].is_null(), "{small}");
    for e in [&events[0], &events[2], &events[3]] {
        assert!(e.raw.len() <= 64 * 1024, "{} bytes", e.raw.len());
        assert_eq!(e.body["truncated"], "max_event_bytes", "{}", e.raw);
        for reduced in ["data", "previous", "patch"] {
            assert!(e.body[reduced].is_null(), "{reduced}: {}", e.raw);
        }
        assert_eq!(
            e.properties.message_id().as_ref().unwrap().as_str(),
            e.body["event_id"].as_str().unwrap()
        );
    }
    // What was left out is still told by the hashes, and readable over HTTP.
    let created = &events[0].body;
    let canonical =
        scramjet::domain::canonical::to_canonical(&serde_json::from_str(&data).unwrap());
    assert_eq!(
        created["hash"],
        scramjet::domain::canonical::hash(&canonical)
    );
    assert_eq!(events[2].body["previous_hash"], created["hash"]);
    assert_eq!(events[3].body["previous_hash"], events[2].body["hash"]);
    app.save("person", "big", &data).await;
    let _ = app.next_event().await;
    let (status, body) = app.get("/v1/resources/person/big").await;
    assert_eq!(status, 200);
    let resource: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resource["data"]["name"].as_str().unwrap().len(), 100_000);
    assert_eq!(app.count("outbox").await, 0);
}

#[tokio::test]
async fn a_max_event_bytes_the_broker_would_refuse_stops_the_start() {
    let names = Names::new();
    let mut settings = test_settings(&names, "config/schemas".into());
    let _cleanup = Cleanup::new(&settings, &names);
    // RabbitMQ's default max_message_size is 128 MiB (16 MiB from 4.0).
    settings.limits.max_event_bytes = 128 * 1024 * 1024 + 1;
    let started = std::time::Instant::now();
    let error = match scramjet::daemon::App::build(settings).await {
        Ok(_) => panic!("started with events the broker would refuse"),
        Err(e) => format!("{e:#}"),
    };
    println!("refused in {:?}: {error}", started.elapsed());
    assert!(error.contains("limits.max_event_bytes"), "{error}");
    assert!(error.contains("max_message_size"), "{error}");
}
