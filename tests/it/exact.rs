//! Data read back from the tables is the data as sent (issue 11 §3 and §4):
//! events built from stored rows (`deleted.previous`, `updated.patch`,
//! `snapshot`), the read API and staging keep numbers that jsonb would
//! rewrite; an unchanged save with a higher version raises only the
//! version; revalidation keeps a staged save's version.

use scramjet::domain::canonical;
use serde_json::{Value, json};

use crate::helpers::*;

/// Numbers PostgreSQL's jsonb rewrites (`1E2` → `100`, `-0.0` → `0.0`,
/// `1e-7` → `0.0000001`) beside ones it keeps.
const NUMBERS: &str =
    r#"{"name":"n","e":1E2,"z":-0.0,"t":1.50,"big":12345678901234567890123,"tiny":1e-7}"#;

/// The hash a consumer computes from an event's or a response's own bytes.
fn hash_of(data: &Value) -> String {
    canonical::hash(&canonical::to_canonical(data))
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn save_with_version(id: &str, version: i64, data: &str) -> String {
    format!(r#"{{"action":"save","type":"person","id":"{id}","version":{version},"data":{data}}}"#)
}

#[tokio::test]
async fn events_and_the_api_built_from_stored_rows_hash_to_their_hashes() {
    let mut app = spawn_app().await;
    app.save("person", "p1", NUMBERS).await;
    let created = app.next_event().await;
    assert_eq!(created.op(), "created");
    let hash = created.body["hash"].as_str().unwrap().to_owned();
    assert_eq!(hash_of(&created.body["data"]), hash);

    // The API answers the data as sent.
    let (status, body) = app.get("/v1/resources/person/p1").await;
    assert_eq!(status, 200, "{body}");
    let r = parse(&body);
    assert_eq!(hash_of(&r["data"]), hash, "{body}");
    assert_eq!(r["data"], created.body["data"]);
    let (_, body) = app.get("/v1/resources/person").await;
    assert_eq!(hash_of(&parse(&body)["items"][0]["data"]), hash, "{body}");

    // A snapshot carries it too.
    let replayed = replay_all(&app.settings, "person").await;
    assert_eq!(replayed, 1);
    let snapshot = app.next_event().await;
    assert_eq!(snapshot.op(), "snapshot");
    assert_eq!(hash_of(&snapshot.body["data"]), hash, "{}", snapshot.raw);

    // Only the name changes: the patch, made from the stored row, says so.
    let renamed = NUMBERS.replace(r#""name":"n""#, r#""name":"m""#);
    app.save("person", "p1", &renamed).await;
    let updated = app.next_event().await;
    assert_eq!(updated.op(), "updated");
    assert_eq!(
        updated.body["patch"],
        json!([{"op": "replace", "path": "/name", "value": "m"}]),
        "{}",
        updated.raw
    );

    // The last data of a deleted event hashes to its previous_hash.
    app.delete("person", "p1").await;
    let deleted = app.next_event().await;
    assert_eq!(deleted.op(), "deleted");
    assert_eq!(
        hash_of(&deleted.body["previous"]),
        deleted.body["previous_hash"].as_str().unwrap(),
        "{}",
        deleted.raw
    );
    assert_eq!(deleted.body["previous"], updated.body["data"]);
}

#[tokio::test]
async fn a_rejected_record_is_served_with_its_numbers_as_sent() {
    let mut app = spawn_app().await;
    let invalid = NUMBERS.replace(r#""name":"n""#, r#""name":"""#);
    app.save("person", "r1", &invalid).await;
    let rejected = app.next_event().await;
    assert_eq!(rejected.op(), "rejected");

    let (status, body) = app.get("/v1/staging/person?invalid=true").await;
    assert_eq!(status, 200, "{body}");
    let item = &parse(&body)["items"][0];
    assert_eq!(item["data"], rejected.body["data"], "{body}");
    assert_eq!(
        hash_of(&item["data"]),
        rejected.body["hash"].as_str().unwrap()
    );
}

/// hash, data, version and updated_at of the only `resources` row.
async fn stored_row(
    db: &tokio_postgres::Client,
) -> (String, String, Option<i64>, time::OffsetDateTime) {
    let r = db
        .query_one(
            "SELECT hash, data::text, version, updated_at FROM resources WHERE id = 'p1'",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[tokio::test]
async fn an_unchanged_save_with_a_higher_version_raises_only_the_version() {
    let mut app = spawn_app().await;
    app.publish(save_with_version("p1", 1, r#"{"name":"Ada"}"#))
        .await;
    assert_eq!(app.next_event().await.op(), "created");
    let before = stored_row(&app.db).await;

    // The same data in another key order, at version 5: no event, and
    // nothing visible changes but the version.
    app.publish(save_with_version("p1", 5, r#"{ "name" : "Ada" }"#))
        .await;
    // A stale save (version 3) after it proves version 5 was stored, and a
    // sentinel of another id proves both were processed.
    app.publish(save_with_version("p1", 3, r#"{"name":"Old"}"#))
        .await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;
    let events = app.events_until("sentinel").await;
    assert_eq!(events.len(), 1, "only the sentinel's event: {events:?}");

    let after = stored_row(&app.db).await;
    assert_eq!(after.2, Some(5));
    assert_eq!(
        (&after.0, &after.1, after.3),
        (&before.0, &before.1, before.3),
        "hash, data and updated_at stay"
    );
}

#[tokio::test]
async fn revalidate_applies_a_staged_save_with_its_version() {
    let mut app = spawn_app().await;
    app.publish(save_with_version("p1", 7, r#"{"name":""}"#))
        .await;
    assert_eq!(app.next_event().await.op(), "rejected");

    std::fs::write(
        app.schema_dir.path().join("person.json"),
        r#"{"type":"object","required":["name"]}"#,
    )
    .unwrap();
    let mut settings = app.settings.clone();
    settings.validation.schema_dir = app.schema_dir.path().to_owned();
    let summary = scramjet::commands::revalidate::revalidate(&settings, Some("person"), None)
        .await
        .unwrap();
    assert_eq!(summary.created, 1);
    let created = app.next_event().await;
    assert_eq!(
        (created.op(), &created.body["version"]),
        ("created", &json!(7))
    );
    let version: Option<i64> = app
        .db
        .query_one("SELECT version FROM resources WHERE id = 'p1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, Some(7));

    // So an older save stays stale.
    app.publish(save_with_version("p1", 6, r#"{"name":"Older"}"#))
        .await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;
    let events = app.events_until("sentinel").await;
    assert_eq!(events.len(), 1, "only the sentinel's event: {events:?}");
}

/// A batch of hundreds of saves writes its `resources` rows with several
/// statements, one parameter per document (`store::batch::upsert_chunks`):
/// every row is stored, created and then updated, with its hash, its
/// version and, where jsonb would rewrite the text, the text itself.
#[tokio::test]
async fn batches_of_hundreds_of_saves_store_every_row_exactly() {
    let n = 301;
    let mut app = spawn_app_with(|s| {
        s.amqp.prefetch = 1000;
        s.pipeline.batch_size = 500;
    })
    .await;
    app.stop().await;
    for round in 1..=2_i64 {
        let name = |k: usize| format!(r#""name":"{k}-{round}""#);
        let bodies: Vec<String> = (0..n)
            .map(|k| {
                let data = if k % 3 == 0 {
                    NUMBERS.replace(r#""name":"n""#, &name(k))
                } else {
                    format!("{{{}}}", name(k))
                };
                save_with_version(&format!("p{k:03}"), round, &data)
            })
            .collect();
        // Queued while the daemon is down, so that it finds them all at once.
        app.publish_many(&bodies).await;
        app.start().await;
        let events = app.next_events(n).await;
        let want = if round == 1 { "created" } else { "updated" };
        let hashes: std::collections::HashMap<String, String> = events
            .iter()
            .map(|e| {
                assert_eq!(e.op(), want, "{}", e.raw);
                (
                    e.id().to_owned(),
                    e.body["hash"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(hashes.len(), n, "one event per id");

        let rows = app
            .db
            .query(
                "SELECT id, hash, version, data::text, canonical FROM resources ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), n);
        for (k, row) in rows.iter().enumerate() {
            let id: String = row.get(0);
            let hash: String = row.get(1);
            let version: Option<i64> = row.get(2);
            let data: String = row.get(3);
            let exact: Option<String> = row.get(4);
            assert_eq!(id, format!("p{k:03}"));
            assert_eq!(version, Some(round), "{id}");
            assert_eq!(hashes[&id], hash, "{id}: the event's hash is the row's");
            assert_eq!(exact.is_some(), k % 3 == 0, "{id}: {exact:?}");
            match exact {
                Some(text) => {
                    assert_eq!(canonical::hash(&text), hash, "{id}: {text}");
                    assert!(text.contains(&name(k)), "{id}: {text}");
                }
                None => assert_eq!(hash_of(&parse(&data)), hash, "{id}: {data}"),
            }
        }
        let (_, text) = app.get("/metrics").await;
        let small = crate::api::sample(&text, "scramjet_batch_size_bucket{le=\"100\"}");
        let all = crate::api::sample(&text, "scramjet_batch_size_count");
        assert!(
            small.unwrap_or(0.0) < all.unwrap_or(0.0),
            "a batch of more than 100 messages, more rows than one statement holds:\n{text}"
        );
        app.stop().await;
    }
}
