//! Duplicates (`message_id`) and order (`version`), CONTRACT §4.

use std::time::Duration;

use lapin::{BasicProperties, types::ShortString};

use crate::helpers::*;

fn with_message_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(ShortString::from(id))
}

fn save_v(id: &str, version: i64, data: &str) -> String {
    format!(r#"{{"action":"save","type":"person","id":"{id}","version":{version},"data":{data}}}"#)
}

fn delete_v(id: &str, version: i64) -> String {
    format!(r#"{{"action":"delete","type":"person","id":"{id}","version":{version}}}"#)
}

#[tokio::test]
async fn a_message_id_seen_before_is_acked_with_no_effect_and_no_event() {
    let mut app = spawn_app().await;
    app.publish_with(
        save_body("person", "p1", r#"{"name":"A"}"#),
        with_message_id("m-1"),
    )
    .await;
    // Same message_id, other content: a duplicate all the same.
    app.publish_with(
        save_body("person", "p1", r#"{"name":"B"}"#),
        with_message_id("m-1"),
    )
    .await;
    app.publish_with(delete_body("person", "p1"), with_message_id("m-1"))
        .await;
    app.publish_with(
        save_body("person", "p1", r#"{"name":"C"}"#),
        with_message_id("m-2"),
    )
    .await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;

    let events = app.events_until("sentinel").await;
    let seen: Vec<(&str, &str)> = events.iter().map(|e| (e.id(), e.op())).collect();
    assert_eq!(
        seen,
        vec![
            ("p1", "created"),
            ("p1", "updated"),
            ("sentinel", "created")
        ]
    );
    assert_eq!(events[1].body["data"]["name"], "C");
    let remembered: i64 = app
        .db
        .query_one("SELECT count(*) FROM inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(remembered, 2);
}

#[tokio::test]
async fn duplicates_inside_one_batch_are_skipped_too() {
    let mut app = spawn_app_with(|s| s.pipeline.linger_ms = 300).await;
    for data in [r#"{"name":"A"}"#, r#"{"name":"B"}"#] {
        app.publisher
            .basic_publish(
                app.settings.amqp.inbound_exchange.as_str().into(),
                "x".into(),
                Default::default(),
                save_body("person", "p1", data).as_bytes(),
                with_message_id("same"),
            )
            .await
            .unwrap();
    }
    app.publisher.wait_for_confirms().await.unwrap();
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;
    let events = app.events_until("sentinel").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].body["data"]["name"], "A");
}

#[tokio::test]
async fn a_lower_version_is_stale_and_a_deleted_entity_stays_deleted() {
    let mut app = spawn_app().await;
    app.publish(save_v("p1", 10, r#"{"name":"v10"}"#)).await;
    app.publish(save_v("p1", 9, r#"{"name":"v9"}"#)).await; // stale
    app.publish(save_v("p1", 11, r#"{"name":"v11"}"#)).await;
    app.publish(delete_v("p1", 8)).await; // stale
    app.publish(delete_v("p1", 12)).await;
    app.publish(save_v("p1", 11, r#"{"name":"zombie"}"#)).await; // stale: tombstone 12
    app.publish(delete_v("p2", 5)).await; // nothing to delete, but remembered
    app.publish(save_v("p2", 4, r#"{"name":"late"}"#)).await; // stale
    app.publish(save_v("p2", 6, r#"{"name":"new"}"#)).await;
    // Without a version, today's behaviour: applied.
    app.save("person", "p3", r#"{"name":"x"}"#).await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;

    let events = app.events_until("sentinel").await;
    let seen: Vec<(&str, &str, Option<i64>)> = events
        .iter()
        .map(|e| (e.id(), e.op(), e.body["version"].as_i64()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("p1", "created", Some(10)),
            ("p1", "updated", Some(11)),
            ("p1", "deleted", Some(12)),
            ("p2", "created", Some(6)),
            ("p3", "created", None),
            ("sentinel", "created", None),
        ]
    );
    let rows: Vec<(String, Option<i64>)> = app
        .db
        .query("SELECT id, version FROM resources ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("p2".into(), Some(6)),
            ("p3".into(), None),
            ("sentinel".into(), None)
        ]
    );
    let graves: Vec<(String, i64)> = app
        .db
        .query("SELECT id, version FROM tombstones ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        graves,
        vec![("p1".into(), 12)],
        "p2's tombstone went when it was created"
    );
}

#[tokio::test]
async fn expired_message_ids_and_tombstones_are_pruned_and_fresh_ones_kept() {
    let app = spawn_app_with(|s| {
        s.retention.prune_interval = Duration::from_millis(100);
        s.retention.message_ids = Duration::from_secs(3600);
        s.retention.tombstones = Duration::from_secs(7200);
    })
    .await;
    app.db
        .batch_execute(
            "INSERT INTO inbox (message_id, processed_at) \
               SELECT 'old-' || g, now() - interval '2 hours' FROM generate_series(1, 12000) g; \
             INSERT INTO inbox (message_id) VALUES ('fresh'); \
             INSERT INTO tombstones (type, id, version, deleted_at) VALUES \
               ('person', 'old', 1, now() - interval '3 hours'), \
               ('person', 'recent', 1, now() - interval '1 hour');",
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left: i64 = app
            .db
            .query_one("SELECT count(*) FROM inbox", &[])
            .await
            .unwrap()
            .get(0);
        let graves: i64 = app
            .db
            .query_one("SELECT count(*) FROM tombstones", &[])
            .await
            .unwrap()
            .get(0);
        if left == 1 && graves == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pruned in time ({left} ids, {graves} tombstones left)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: String = app
        .db
        .query_one("SELECT message_id FROM inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "fresh");
    let grave: String = app
        .db
        .query_one("SELECT id FROM tombstones", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(grave, "recent");
}

/// The publisher hands a batch's events to the connection all at once;
/// they must still leave in the order their messages were applied — here,
/// with one consumer and distinct ids, the order the messages were sent.
#[tokio::test]
async fn events_leave_in_the_order_their_messages_were_applied_also_within_a_batch() {
    let mut app = spawn_app().await;
    app.stop().await;
    let ids: Vec<String> = (0..1000).map(|i| format!("o{i:04}")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| save_body("person", id, r#"{"name":"A"}"#))
        .collect();
    // Queued before the daemon starts: it takes them in large batches.
    app.publish_many(&bodies).await;
    app.start().await;
    let events = app.next_events(ids.len()).await;
    let got: Vec<&str> = events.iter().map(|e| e.id()).collect();
    assert_eq!(got, ids, "events in the order of their messages");
}
