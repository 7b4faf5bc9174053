//! The read API, bearer-token auth, and the metrics endpoint.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn a_resource_is_served_with_its_hash_and_timestamps_and_a_missing_one_is_404() {
    let mut app = spawn_app().await;
    app.save(
        "person",
        "a/b c",
        r#"{"name":"Ada","n":12345678901234567890123}"#,
    )
    .await;
    let created = app.next_event().await;

    let (status, body) = app.get("/v1/resources/person/a%2Fb%20c").await;
    assert_eq!(status, 200, "{body}");
    let r = parse(&body);
    assert_eq!(r["type"], "person");
    assert_eq!(r["id"], "a/b c");
    assert_eq!(r["hash"], created.body["hash"]);
    assert_eq!(r["data"]["n"].to_string(), "12345678901234567890123");
    assert!(r["version"].is_null());
    for t in ["created_at", "updated_at"] {
        assert!(
            r[t].as_str()
                .is_some_and(|s| s.ends_with('Z') || s.contains('+')),
            "{r}"
        );
    }

    let (status, body) = app.get("/v1/resources/person/nobody").await;
    assert_eq!(status, 404);
    assert!(parse(&body)["error"].is_string());
    let (status, body) = app.get("/v1/resources/per.son/x").await;
    assert_eq!(status, 400);
    assert!(parse(&body)["error"].as_str().unwrap().contains("type"));
}

#[tokio::test]
async fn a_type_is_listed_page_by_page_with_a_stable_cursor() {
    let mut app = spawn_app().await;
    let ids: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| save_body("person", id, r#"{"name":"X"}"#))
        .collect();
    app.publish_many(&bodies).await;
    app.next_events(25).await;

    let mut seen = Vec::new();
    let mut path = "/v1/resources/person?limit=10".to_owned();
    let mut pages = 0;
    loop {
        let (status, body) = app.get(&path).await;
        assert_eq!(status, 200, "{body}");
        let page = parse(&body);
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(cursor) => path = format!("/v1/resources/person?limit=10&after={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "every id once, in order");

    // A limit that divides the rows: the last full page says it is the
    // last (`next` null) instead of pointing at an empty one.
    let mut pages = Vec::new();
    let mut path = "/v1/resources/person?limit=5".to_owned();
    loop {
        let (_, body) = app.get(&path).await;
        let page = parse(&body);
        pages.push(page["items"].as_array().unwrap().len());
        match page["next"].as_str() {
            Some(cursor) => path = format!("/v1/resources/person?limit=5&after={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, [5, 5, 5, 5, 5]);

    let (status, body) = app
        .get("/v1/resources/person?updated_since=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(
        (status, parse(&body)["items"].as_array().unwrap().len()),
        (200, 0)
    );
    let (_, body) = app
        .get("/v1/resources/person?updated_since=2000-01-01T00:00:00Z&limit=1000")
        .await;
    assert_eq!(parse(&body)["items"].as_array().unwrap().len(), 25);
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "updated_since=yesterday",
        "colour=red",
    ] {
        let (status, body) = app.get(&format!("/v1/resources/person?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(parse(&body)["error"].is_string());
    }
}

#[tokio::test]
async fn rejected_records_are_listed_with_their_errors_and_types_are_counted() {
    let mut app = spawn_app().await;
    app.save("person", "bad", r#"{"name":""}"#).await;
    app.save("person", "good", r#"{"name":"G"}"#).await;
    app.save("grant", "g1", r#"{"x":1}"#).await;
    app.next_events(3).await;

    let (status, body) = app.get("/v1/staging/person?invalid=true").await;
    assert_eq!(status, 200, "{body}");
    let page = parse(&body);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], "bad");
    assert_eq!(items[0]["data"], json!({"name": ""}));
    assert_eq!(items[0]["errors"][0]["path"], "/name");
    let (status, _) = app.get("/v1/staging/person?invalid=false").await;
    assert_eq!(status, 400);

    let (status, body) = app.get("/v1/types").await;
    assert_eq!(status, 200);
    assert_eq!(
        parse(&body)["items"],
        json!([
            {"type": "grant", "resources": 1, "staging_invalid": 0},
            {"type": "person", "resources": 1, "staging_invalid": 1},
        ])
    );
}

#[tokio::test]
async fn a_configured_bearer_token_guards_everything_but_the_health_checks() {
    let app = spawn_app_with(|s| {
        s.http.bearer_token = Some(scramjet::config::Secret("s3cret-token".into()));
    })
    .await;
    for path in ["/v1/types", "/metrics", "/v1/resources/person/x"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        let (status, _) = http_get_with(app.http, path, &[("Authorization", "Bearer wrong")]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let auth = [("Authorization", "Bearer s3cret-token")];
    assert_eq!(http_get_with(app.http, "/v1/types", &auth).await.0, 200);
    assert_eq!(http_get_with(app.http, "/metrics", &auth).await.0, 200);
    assert_eq!(
        http_get_with(app.http, "/v1/resources/person/x", &auth)
            .await
            .0,
        404
    );
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.wait_ready().await, 200);
}

/// The value of one sample in the Prometheus text format.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_move_when_messages_flow() {
    let mut app = spawn_app().await;
    app.save("person", "a", r#"{"name":"A"}"#).await;
    app.save("person", "b", r#"{"name":"B"}"#).await;
    app.save("person", "a", r#"{ "name" : "A" }"#).await;
    app.save("person", "bad", r#"{"name":""}"#).await;
    app.publish("not json").await;
    app.next_events(3).await;
    app.next_dead_letter().await;

    // The relay counts an event once the broker confirmed it, a moment
    // after a consumer may have it; gauges refresh every few seconds.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let text = loop {
        let (status, text) = app.get("/metrics").await;
        assert_eq!(status, 200);
        let done = sample(&text, "scramjet_events_published_total{op=\"created\"}") == Some(2.0)
            && sample(&text, "scramjet_staging_invalid{type=\"person\"}") == Some(1.0);
        if done || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (series, value) in [
        ("scramjet_messages_total{outcome=\"created\"}", 2.0),
        ("scramjet_messages_total{outcome=\"unchanged\"}", 1.0),
        ("scramjet_messages_total{outcome=\"rejected\"}", 1.0),
        ("scramjet_messages_total{outcome=\"dead_lettered\"}", 1.0),
        ("scramjet_events_published_total{op=\"created\"}", 2.0),
        ("scramjet_events_published_total{op=\"rejected\"}", 1.0),
        ("scramjet_staging_invalid{type=\"person\"}", 1.0),
        ("scramjet_connected{service=\"postgres\"}", 1.0),
        ("scramjet_connected{service=\"rabbitmq\"}", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(
        sample(&text, "scramjet_batch_size_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(sample(&text, "scramjet_batch_duration_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(
        sample(&text, "scramjet_event_delay_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(sample(&text, "scramjet_outbox_pending").is_some());
}

/// Polls `/metrics` until `series` reads `value` (or the patience runs out)
/// and returns the last text.
pub(crate) async fn metrics_when(app: &TestApp, series: &str, value: f64) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, text) = app.get("/metrics").await;
        if sample(&text, series) == Some(value) || tokio::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn committed_events_are_published_from_memory_and_rows_of_an_earlier_run_from_the_table() {
    let mut app = spawn_app().await;
    app.save("person", "a", r#"{"name":"A"}"#).await;
    app.save("person", "a", r#"{"name":"B"}"#).await;
    let ops: Vec<String> = app
        .next_events(2)
        .await
        .iter()
        .map(|e| e.op().to_owned())
        .collect();
    assert_eq!(ops, ["created", "updated"]);
    let handed = "scramjet_outbox_rows_published_total{source=\"handed\"}";
    let read = "scramjet_outbox_rows_published_total{source=\"read\"}";
    let text = metrics_when(&app, "scramjet_events_published_total{op=\"updated\"}", 1.0).await;
    assert!(
        sample(&text, handed).is_some_and(|n| n >= 1.0),
        "the pipeline handed its rows over:\n{text}"
    );
    assert_eq!(sample(&text, read), None, "nothing was read back:\n{text}");

    // A row no process holds in memory (as a crash leaves it): read back,
    // and published byte for byte.
    app.stop().await;
    let payload = r#"{"event_id":"0190b2a0-0000-7000-8000-000000000001","op":"created","type":"person","id":"left","data":{"name":"Left, 1e400"},"hash":"h","previous_hash":null,"previous":null,"patch":null,"errors":null,"errors_total":null,"version":null,"truncated":null,"occurred_at":"2026-12-02T00:00:00.000000Z"}"#;
    app.db
        .execute(
            "INSERT INTO outbox (event_ids, routing_keys, payloads, correlation_ids) \
             VALUES (ARRAY['0190b2a0-0000-7000-8000-000000000001'::uuid], \
                     ARRAY['person.created'], ARRAY[$1::text], ARRAY[NULL::text])",
            &[&payload],
        )
        .await
        .unwrap();
    app.start().await;
    let event = app.next_event().await;
    assert_eq!(event.raw, payload);
    let text = metrics_when(&app, read, 1.0).await;
    assert_eq!(sample(&text, read), Some(1.0), "{text}");
    assert!(app.wait_outbox_empty().await);
}

/// Found by schemathesis (tests/openapi): a cursor with a NUL byte reached
/// PostgreSQL, which refuses NUL in text, and the refusal was answered 503
/// "the database is not available", as if the database were down. The
/// request's own input is at fault: 400, saying why.
#[tokio::test]
async fn input_the_database_refuses_is_a_bad_request_not_an_outage() {
    let app = spawn_app().await;
    for path in [
        "/v1/resources/person?after=a%00b",
        "/v1/staging/person?after=%00",
        "/v1/resources/person?where=name%20%3D%20%22a%00b%22",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let error = parse(&body)["error"].as_str().unwrap().to_owned();
        assert!(error.contains("NUL"), "{path}: {error}");
    }
    assert_eq!(app.wait_ready().await, 200);
}
