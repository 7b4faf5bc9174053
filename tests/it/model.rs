//! Thousands of mixed messages over a few dozen ids: the final `resources`
//! table equals a model, and each id's events arrive in order — also when the
//! daemon is stopped and restarted while work is in flight.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng, rngs::StdRng};
use scramjet::domain::canonical;
use serde_json::Value;

use crate::helpers::*;

/// The expected state and events, computed the slow and obvious way.
#[derive(Default)]
pub struct Model {
    /// (type, id) → canonical data.
    pub rows: BTreeMap<(String, String), String>,
    /// id → ops expected, in order.
    pub events: BTreeMap<String, Vec<&'static str>>,
    /// Total events expected.
    pub total: usize,
}

impl Model {
    fn apply(&mut self, id: &str, data: Option<&str>, valid: bool) {
        let key = ("person".to_owned(), id.to_owned());
        let mut push = |op| {
            self.events.entry(id.to_owned()).or_default().push(op);
            self.total += 1;
        };
        match data {
            Some(_) if !valid => push("rejected"),
            Some(text) => {
                let canonical = canonical::to_canonical(&serde_json::from_str(text).unwrap());
                match self.rows.get(&key) {
                    None => push("created"),
                    Some(old) if *old == canonical => {}
                    Some(_) => push("updated"),
                }
                self.rows.insert(key, canonical);
            }
            None => {
                if self.rows.remove(&key).is_some() {
                    push("deleted");
                }
            }
        }
    }
}

/// A reproducible stream of saves (some identical, some reordered, some invalid) and deletes.
pub fn workload(seed: u64, messages: usize, ids: usize) -> (Vec<String>, Model) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let mut bodies = Vec::with_capacity(messages);
    for _ in 0..messages {
        let id = format!("id-{:02}", rng.random_range(0..ids));
        let roll = rng.random_range(0..100);
        if roll < 15 {
            bodies.push(delete_body("person", &id));
            model.apply(&id, None, true);
        } else if roll < 20 {
            let data = r#"{"age":"not a number","name":"X"}"#;
            bodies.push(save_body("person", &id, data));
            model.apply(&id, Some(data), false);
        } else {
            // Few variants, so many saves repeat the stored content; the key
            // order varies, which must not count as a change.
            let variant = rng.random_range(0..4);
            let age = rng.random_range(0..3);
            let data = if rng.random_bool(0.5) {
                format!(r#"{{"name":"N{variant}","age":{age},"big":12345678901234567890123}}"#)
            } else {
                format!(
                    r#"{{ "big" : 12345678901234567890123, "age":{age}, "name":"N{variant}" }}"#
                )
            };
            bodies.push(save_body("person", &id, &data));
            model.apply(&id, Some(&data), true);
        }
    }
    (bodies, model)
}

/// `body` with `"version": version` added.
pub fn versioned(body: &str, version: i64) -> String {
    format!("{{\"version\":{version},{}", &body[1..])
}

/// Events with repeats (same `event_id`, as a relay may publish again after a
/// crash) removed; a repeat must be byte-identical to the first copy.
pub fn dedupe(events: Vec<ReceivedEvent>) -> (Vec<ReceivedEvent>, usize) {
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut unique = Vec::with_capacity(events.len());
    let mut repeats = 0;
    for e in events {
        let id = e.body["event_id"].as_str().unwrap().to_owned();
        match seen.get(&id) {
            Some(raw) => {
                assert_eq!(*raw, e.raw, "a repeated event_id carries the same event");
                repeats += 1;
            }
            None => {
                seen.insert(id, e.raw.clone());
                unique.push(e);
            }
        }
    }
    (unique, repeats)
}

/// `resources` (except the sentinel) equals the model, every stored hash
/// matches its data, and the outbox drains.
pub async fn check_final_state(db: &tokio_postgres::Client, model: &Model) {
    let rows: BTreeMap<(String, String), String> = db
        .query(
            "SELECT type, id, hash, data FROM resources ORDER BY type, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, Value>(3),
            )
        })
        .filter(|r| r.1 != "sentinel")
        .map(|(t, i, hash, data)| {
            let canonical = canonical::to_canonical(&data);
            assert_eq!(
                hash,
                canonical::hash(&canonical),
                "stored hash matches stored data"
            );
            ((t, i), canonical)
        })
        .collect();
    assert_eq!(rows, model.rows, "resources equals the model");
    // The relay deletes after the broker's confirm, so the last events may
    // reach a consumer a moment before their outbox rows are gone.
    assert!(wait_outbox_empty(db).await, "every event left the outbox");
}

/// Per id, the events are exactly the model's, in order, and replaying them
/// (patches included) reproduces the data.
pub fn check_events(events: &[ReceivedEvent], model: &Model) {
    let mut per_id: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut last_data: BTreeMap<String, Value> = BTreeMap::new();
    for e in events.iter().filter(|e| e.id() != "sentinel") {
        per_id.entry(e.id().to_owned()).or_default().push(e.op());
        // Replaying events reproduces the data: patches apply to what came before.
        match e.op() {
            "created" => {
                last_data.insert(e.id().to_owned(), e.body["data"].clone());
            }
            "updated" => {
                let doc = last_data
                    .get_mut(e.id())
                    .expect("an update follows a create");
                let patch: json_patch::Patch =
                    serde_json::from_str(&e.body["patch"].to_string()).unwrap();
                json_patch::patch(doc, &patch).unwrap();
                assert_eq!(
                    *doc,
                    e.body["data"],
                    "patch of {} reproduces the new data",
                    e.id()
                );
            }
            "deleted" => {
                let previous = last_data.remove(e.id()).expect("a delete follows a create");
                assert_eq!(previous, e.body["previous"]);
            }
            _ => {}
        }
    }
    // Report where each id's events part from the model, not the whole lists.
    let mut problems = Vec::new();
    let ids: std::collections::BTreeSet<&String> =
        per_id.keys().chain(model.events.keys()).collect();
    for id in ids {
        let got = per_id.get(id).map(Vec::as_slice).unwrap_or_default();
        let want = model.events.get(id).map(Vec::as_slice).unwrap_or_default();
        if got != want {
            let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
            let end = |v: &[&str]| {
                v[at..]
                    .iter()
                    .take(6)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(",")
            };
            problems.push(format!(
                "{id}: {} events, model {}; from #{at} got [{}] want [{}]",
                got.len(),
                want.len(),
                end(got),
                end(want)
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "events differ from the model:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_thousand_mixed_messages_end_in_the_model_state_with_events_in_order_per_id() {
    let mut app = spawn_app().await;
    let (bodies, model) = workload(7, 3000, 40);
    app.publish_many(&bodies).await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;
    let events = app.events_until("sentinel").await;
    assert_eq!(events.len(), model.total + 1);
    check_events(&events, &model);
    check_final_state(&app.db, &model).await;
    let staged: i64 = app
        .db
        .query_one("SELECT count(*) FROM staging WHERE is_valid = false", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        staged,
        app.count("staging").await,
        "only rejected rows stay in staging"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_work_in_flight_loses_nothing() {
    let mut app = spawn_app_with(|s| {
        // Small batches so the stop lands between batches with plenty left.
        s.pipeline.batch_size = 20;
        s.amqp.prefetch = 50;
    })
    .await;
    let (bodies, model) = workload(11, 2000, 30);
    app.publish_many(&bodies).await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;

    // Let it get going, then stop it in the middle of the stream.
    let mut events = app.next_events(100).await;
    app.stop().await;
    app.start().await;
    events.extend(app.events_until("sentinel").await);

    // A graceful stop acks only committed batches and requeues the rest, so
    // every event arrives exactly once.
    let ids: std::collections::HashSet<&str> = events
        .iter()
        .map(|e| e.body["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "no event published twice");
    assert_eq!(events.len(), model.total + 1);
    check_events(&events, &model);
    check_final_state(&app.db, &model).await;
}
