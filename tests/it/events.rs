//! Each event op and its fields, as a downstream consumer sees them.

use lapin::{BasicProperties, types::ShortString};
use scramjet::domain::canonical;
use serde_json::{Value, json};

use crate::helpers::*;

fn sha256_of_canonical(text: &str) -> String {
    canonical::hash(&canonical::to_canonical(
        &serde_json::from_str(text).unwrap(),
    ))
}

#[tokio::test]
async fn a_save_of_a_new_id_publishes_created_with_every_field_of_the_contract() {
    let mut app = spawn_app().await;
    app.publish_with(
        save_body("person", "p1", r#"{"name":"Ada","age":36}"#),
        BasicProperties::default().with_correlation_id(ShortString::from("corr-42")),
    )
    .await;

    let e = app.next_event().await;
    assert_eq!(e.routing_key, "person.created");
    assert_eq!(e.properties.delivery_mode(), &Some(2));
    assert_eq!(
        e.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(
        e.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-42")
    );
    let event_id = e.body["event_id"].as_str().unwrap();
    assert_eq!(
        e.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(event_id)
    );
    assert_eq!(
        uuid::Uuid::parse_str(event_id).unwrap().get_version_num(),
        7
    );

    let hash = sha256_of_canonical(r#"{"name":"Ada","age":36}"#);
    let expected = json!({
        "event_id": event_id,
        "op": "created",
        "type": "person",
        "id": "p1",
        "data": {"name": "Ada", "age": 36},
        "hash": hash,
        "previous_hash": null,
        "previous": null,
        "patch": null,
        "errors": null,
        "errors_total": null,
        "version": null,
        "truncated": null,
        "occurred_at": e.body["occurred_at"],
    });
    assert_eq!(e.body, expected);
    let at = e.body["occurred_at"].as_str().unwrap();
    assert!(at.ends_with('Z') && at.len() == 27, "{at}");

    let rows = app.resources().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2.as_str()),
        ("person", "p1", hash.as_str())
    );
    assert_eq!(app.count("staging").await, 0);
}

#[tokio::test]
async fn a_save_with_reordered_keys_or_other_whitespace_publishes_no_event() {
    let mut app = spawn_app().await;
    app.save("person", "p1", r#"{"name":"Ada","tags":{"a":1,"b":[1,2]}}"#)
        .await;
    app.save(
        "person",
        "p1",
        "{ \"tags\" : {\"b\":[1, 2],\n\"a\":1},\t\"name\":\"Ada\" }",
    )
    .await;
    app.save("person", "p1", r#"{"tags":{"a":1,"b":[1,2]},"name":"Ada"}"#)
        .await;
    // A later event proves the unchanged saves were processed (one consumer, in order).
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;

    let events = app.events_until("sentinel").await;
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.id().to_owned(), e.op().to_owned()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("p1".into(), "created".into()),
            ("sentinel".into(), "created".into())
        ]
    );
    let rows = app.resources().await;
    let updated_at: Vec<(String, bool)> = app
        .db
        .query(
            "SELECT id, created_at = updated_at FROM resources ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        updated_at,
        vec![("p1".into(), true), ("sentinel".into(), true)],
        "unchanged saves do not touch the row"
    );
}

#[tokio::test]
async fn a_changed_save_publishes_updated_with_a_patch_from_the_old_data_to_the_new() {
    let mut app = spawn_app().await;
    let old = r#"{"name":"Ada","age":36,"tags":["x","y"]}"#;
    let new = r#"{"name":"Ada Lovelace","tags":["x"],"orcid":"0000-0002-1825-0097"}"#;
    app.save("person", "p1", old).await;
    assert_eq!(app.next_event().await.op(), "created");
    // Sent after the create committed, so updated_at must move past created_at.
    app.save("person", "p1", new).await;
    let e = &app.next_event().await;
    assert_eq!(e.routing_key, "person.updated");
    assert_eq!(e.body["data"], serde_json::from_str::<Value>(new).unwrap());
    assert_eq!(e.body["hash"], sha256_of_canonical(new));
    assert_eq!(e.body["previous_hash"], sha256_of_canonical(old));
    assert!(e.body["previous"].is_null());
    assert!(e.body["errors"].is_null());

    // The patch turns the old document into the new one.
    let patch: json_patch::Patch = serde_json::from_str(&e.body["patch"].to_string()).unwrap();
    assert!(!patch.0.is_empty());
    let mut doc: Value = serde_json::from_str(old).unwrap();
    json_patch::patch(&mut doc, &patch).unwrap();
    assert_eq!(doc, serde_json::from_str::<Value>(new).unwrap());

    let (count_changed,): (bool,) = {
        let row = app
            .db
            .query_one(
                "SELECT updated_at > created_at FROM resources WHERE id = 'p1'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0),)
    };
    assert!(count_changed, "updated_at moves on an update");
}

#[tokio::test]
async fn a_delete_publishes_deleted_with_the_last_data_and_a_delete_of_a_missing_id_publishes_nothing()
 {
    let mut app = spawn_app().await;
    let data = r#"{"name":"Ada"}"#;
    app.save("person", "p1", data).await;
    app.delete("person", "p1").await;
    app.delete("person", "p1").await;
    app.delete("person", "never-there").await;
    app.save("person", "sentinel", data).await;

    let events = app.events_until("sentinel").await;
    let ops: Vec<&str> = events.iter().map(|e| e.op()).collect();
    assert_eq!(ops, vec!["created", "deleted", "created"]);
    let d = &events[1];
    assert_eq!(d.routing_key, "person.deleted");
    assert_eq!(d.id(), "p1");
    assert!(d.body["data"].is_null());
    assert!(d.body["hash"].is_null());
    assert!(d.body["patch"].is_null());
    assert_eq!(d.body["previous"], json!({"name": "Ada"}));
    assert_eq!(d.body["previous_hash"], sha256_of_canonical(data));
    let ids: Vec<String> = app.resources().await.into_iter().map(|r| r.1).collect();
    assert_eq!(ids, vec!["sentinel"]);
    assert_eq!(app.count("staging").await, 0, "delete stubs are cleared");
}

#[tokio::test]
async fn an_invalid_save_is_rejected_and_kept_in_staging_until_a_corrected_save_creates_it() {
    let mut app = spawn_app().await;
    app.save("person", "p1", r#"{"name":"","age":-1}"#).await;
    let e = app.next_event().await;
    assert_eq!(e.routing_key, "person.rejected");
    assert_eq!(e.body["data"], json!({"name": "", "age": -1}));
    assert_eq!(
        e.body["hash"],
        sha256_of_canonical(r#"{"name":"","age":-1}"#)
    );
    assert!(
        e.body["previous_hash"].is_null()
            && e.body["previous"].is_null()
            && e.body["patch"].is_null()
    );
    let mut paths: Vec<&str> = e.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|err| {
            assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
            err["path"].as_str().unwrap()
        })
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, vec!["/age", "/name"]);

    assert_eq!(
        app.count("resources").await,
        0,
        "resources untouched by an invalid save"
    );
    let row = app
        .db
        .query_one("SELECT is_valid, to_delete, data, errors FROM staging WHERE type = 'person' AND id = 'p1'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<bool>>(0), Some(false));
    assert!(!row.get::<_, bool>(1));
    assert_eq!(row.get::<_, Value>(2), json!({"name": "", "age": -1}));
    assert_eq!(row.get::<_, Value>(3).as_array().unwrap().len(), 2);

    // A missing required field is reported at the document root.
    app.save("person", "p2", r#"{"age":3}"#).await;
    let e = app.next_event().await;
    assert_eq!(e.body["errors"][0]["path"], "");

    app.save("person", "p1", r#"{"name":"Ada"}"#).await;
    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "p1"));
    let staged: Vec<String> = app
        .db
        .query("SELECT id FROM staging", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        staged,
        vec!["p2"],
        "the corrected save cleared its staging row"
    );
}

#[tokio::test]
async fn big_numbers_are_kept_exactly_in_the_database_the_hash_and_the_event() {
    let mut app = spawn_app().await;
    let data = r#"{"name":"N","big":12345678901234567890123,"f":0.1000000000000000055511151231257827,"scale":1.50}"#;
    app.save("person", "n1", data).await;
    let e = app.next_event().await;
    assert!(
        e.raw.contains(r#""big":12345678901234567890123"#),
        "{}",
        e.raw
    );
    assert!(
        e.raw
            .contains(r#""f":0.1000000000000000055511151231257827"#),
        "{}",
        e.raw
    );
    assert!(e.raw.contains(r#""scale":1.50"#), "{}", e.raw);
    assert_eq!(
        e.body["hash"],
        canonical::hash(
            r#"{"big":12345678901234567890123,"f":0.1000000000000000055511151231257827,"name":"N","scale":1.50}"#
        )
    );
    let row = app
        .db
        .query_one(
            "SELECT data->>'big', data->>'f', data->>'scale', hash FROM resources WHERE id = 'n1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "12345678901234567890123");
    assert_eq!(
        row.get::<_, String>(1),
        "0.1000000000000000055511151231257827"
    );
    assert_eq!(row.get::<_, String>(2), "1.50");
    assert_eq!(row.get::<_, String>(3), e.body["hash"].as_str().unwrap());

    // One digit more is a change.
    app.save("person", "n1", &data.replace("0123,", "0124,"))
        .await;
    let e = app.next_event().await;
    assert_eq!(e.op(), "updated");
    assert_eq!(
        e.body["patch"].to_string(),
        r#"[{"op":"replace","path":"/big","value":12345678901234567890124}]"#
    );
}

#[tokio::test]
async fn ids_with_apostrophes_spaces_and_non_ascii_round_trip() {
    let mut app = spawn_app().await;
    let ids = [
        "O'Brien",
        "a b  c",
        "日本語-ü",
        "emoji 😀",
        "x/y%2F\"q\"",
        "'; DROP TABLE resources; --",
    ];
    for id in ids {
        app.save("person", id, r#"{"name":"X"}"#).await;
    }
    let events = app.next_events(ids.len()).await;
    let got: Vec<&str> = events.iter().map(|e| e.id()).collect();
    assert_eq!(got, ids);
    for id in ids {
        app.delete("person", id).await;
    }
    let events = app.next_events(ids.len()).await;
    assert!(events.iter().all(|e| e.op() == "deleted"));
    let got: Vec<&str> = events.iter().map(|e| e.id()).collect();
    assert_eq!(got, ids);
    assert_eq!(app.count("resources").await, 0);
}

#[tokio::test]
async fn an_unknown_type_is_accepted_by_default() {
    let mut app = spawn_app().await;
    app.save("grant", "g1", r#"{"anything":true}"#).await;
    let e = app.next_event().await;
    assert_eq!(e.routing_key, "grant.created");
}

#[tokio::test]
async fn an_unknown_type_is_rejected_when_configured_so() {
    let mut app =
        spawn_app_with(|s| s.validation.unknown_types = scramjet::config::UnknownTypes::Reject)
            .await;
    app.save("grant", "g1", r#"{"anything":true}"#).await;
    let e = app.next_event().await;
    assert_eq!(e.routing_key, "grant.rejected");
    assert_eq!(e.body["errors"][0]["path"], "");
    assert!(
        e.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no schema")
    );
    assert_eq!(app.count("staging").await, 1);
}

#[tokio::test]
async fn with_queue_type_quorum_the_inbound_queue_is_a_quorum_queue_and_saves_flow() {
    let mut app = spawn_app_with(|s| s.amqp.queue_type = scramjet::config::QueueType::Quorum).await;
    app.save("person", "q1", r#"{"name":"Ada"}"#).await;
    assert_eq!(app.next_event().await.op(), "created");

    // RabbitMQ refuses to redeclare a queue with another type, so a
    // classic declaration of the same name must fail.
    let amqp = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let mut classic = lapin::types::FieldTable::default();
    classic.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("classic".into()),
    );
    classic.insert(
        "x-single-active-consumer".into(),
        lapin::types::AMQPValue::Boolean(true),
    );
    let refused = channel
        .queue_declare(
            app.settings.amqp.inbound_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            classic,
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("quorum"),
        "the broker should name the existing type: {refused}"
    );
    let _ = amqp.close(200, "bye".into()).await;
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_when_connected() {
    let app = spawn_app().await;
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(app.wait_ready().await, 200);
    let (_, body) = app.get("/readyz").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        json!({"ready": true, "postgres": true, "rabbitmq": true, "outages": []})
    );
}

#[tokio::test]
async fn readyz_answers_503_while_postgresql_refuses_connections_and_200_again_after() {
    let app = spawn_app().await;
    let db = &app.names.database;
    let admin = connect_admin().await;
    admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    // A connection that was starting up while the flag flipped can still
    // complete, and pg_terminate_backend only signals: terminate again on
    // every round until no backend is left.
    let mut gone = false;
    for _ in 0..400 {
        let left: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[db],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(gone, "the daemon's connections to {db} did not go away");
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["postgres"], false);
    assert_eq!(body["ready"], false);

    admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    assert_eq!(app.wait_ready().await, 200);
}

#[tokio::test]
async fn a_schema_reload_applies_from_the_next_batch_and_a_broken_schema_keeps_the_old_one() {
    let mut app = spawn_app().await;
    app.save("person", "p1", r#"{"nickname":"Ada"}"#).await;
    assert_eq!(app.next_event().await.op(), "rejected", "name is required");

    // A broken file: the reload fails, naming it, and the old schema stays.
    let file = app.schema_dir.path().join("person.json");
    std::fs::write(&file, "{ not json").unwrap();
    let error = app.schemas.reload().unwrap_err().to_string();
    assert!(error.contains("person.json"), "{error}");
    app.save("person", "p1", r#"{"nickname":"Ada"}"#).await;
    assert_eq!(
        app.next_event().await.op(),
        "rejected",
        "the old schema is still in use"
    );

    // A looser schema: the same save now goes through.
    std::fs::write(&file, r#"{"type":"object"}"#).unwrap();
    assert_eq!(app.schemas.reload().unwrap(), vec!["person".to_owned()]);
    app.save("person", "p1", r#"{"nickname":"Ada"}"#).await;
    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "p1"));
    assert_eq!(
        app.count("staging").await,
        0,
        "the now-valid save cleared its staging row"
    );
}
