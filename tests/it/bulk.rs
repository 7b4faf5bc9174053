//! Bulk feeds: `scramjet ingest` (NDJSON, JSON array, CSV; full-set sync
//! and its guards; dry run), `scramjet delete`, and an ingest running
//! beside the daemon on the same ids.

use std::{collections::BTreeMap, io::Write, process::Stdio, time::Duration};

use futures_util::StreamExt;
use scramjet::bulk::{DeleteStep, Format, IngestOptions, Scramjet, Summary};
use serde_json::{Value, json};

use crate::{
    cli::{isolated, scramjet},
    helpers::*,
};

fn ndjson(records: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        writeln!(out, "{r}").unwrap();
    }
    out
}

fn person(id: &str, name: &str) -> Value {
    json!({"id": id, "name": name})
}

async fn ingest(app: &TestApp, records: &[Value], options: &IngestOptions) -> Summary {
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let input = std::io::Cursor::new(ndjson(records));
    scramjet
        .ingest(input, Format::Ndjson, options, |_| {})
        .await
        .unwrap()
}

/// Every event the ingest caused: waits for the outbox to drain, then for
/// a quiet moment, so that an extra event would be caught.
async fn all_events(app: &mut TestApp) -> Vec<(String, String)> {
    assert!(app.wait_outbox_empty().await, "the outbox drains");
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(500), app.events.next()).await
    {
        let e: Value = serde_json::from_slice(&d.data).unwrap();
        out.push((
            e["id"].as_str().unwrap().to_owned(),
            e["op"].as_str().unwrap().to_owned(),
        ));
    }
    out.sort();
    out
}

async fn names_by_id(app: &TestApp) -> BTreeMap<String, Value> {
    app.resources()
        .await
        .into_iter()
        .map(|(_, id, _, data)| (id, data["name"].clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_full_set_ingest_creates_updates_keeps_and_deletes_with_exactly_those_events() {
    let mut app = spawn_app().await;
    let first: Vec<Value> = (1..=5)
        .map(|i| person(&format!("p{i}"), &format!("n{i}")))
        .collect();
    let s = ingest(&app, &first, &IngestOptions::new("person")).await;
    assert_eq!((s.records, s.created), (5, 5));
    assert_eq!(all_events(&mut app).await.len(), 5);

    // p1, p3 the same (p3 with other key order), p2 changed, p6 new; p4, p5 gone.
    let second = vec![
        person("p1", "n1"),
        person("p2", "changed"),
        json!({"name": "n3", "id": "p3"}),
        person("p6", "n6"),
    ];
    let options = IngestOptions {
        full_set: true,
        ..IngestOptions::new("person")
    };
    let s = ingest(&app, &second, &options).await;
    assert_eq!(
        (s.created, s.updated, s.unchanged, s.deleted),
        (1, 1, 2, 2),
        "{s}"
    );
    assert_eq!(s.deletes, Some(DeleteStep::Done(2)));
    assert!(s.is_success());
    assert_eq!(
        all_events(&mut app).await,
        pairs(&[
            ("p2", "updated"),
            ("p4", "deleted"),
            ("p5", "deleted"),
            ("p6", "created")
        ])
    );
    let names = names_by_id(&app).await;
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        ["p1", "p2", "p3", "p6"],
        "p4 and p5 are gone"
    );
    assert_eq!(names["p2"], "changed");
    assert_eq!(app.count("staging").await, 0);
}

#[tokio::test]
async fn every_full_set_guard_refuses_and_deletes_nothing() {
    let app = spawn_app().await;
    let four: Vec<Value> = (1..=4).map(|i| person(&format!("p{i}"), "x")).collect();
    ingest(&app, &four, &IngestOptions::new("person")).await;
    let full = |allow_delete_all, max_delete_ratio| IngestOptions {
        full_set: true,
        allow_delete_all,
        max_delete_ratio,
        ..IngestOptions::new("person")
    };
    let refused = |s: &Summary| match &s.deletes {
        Some(DeleteStep::Refused(why)) => why.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    };

    // An empty input.
    let s = ingest(&app, &[], &full(false, 0.5)).await;
    assert!(refused(&s).contains("empty"), "{}", refused(&s));
    assert!(!s.is_success());
    assert_eq!(app.count("resources").await, 4);

    // More than the allowed share: 3 of 4 would go.
    let s = ingest(&app, &four[..1], &full(false, 0.5)).await;
    let why = refused(&s);
    assert!(why.contains("3 of 4"), "{why}");
    assert_eq!(app.count("resources").await, 4);

    // A bad record: the input may be incomplete.
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let mut text = ndjson(&four[..3]);
    text.extend_from_slice(b"{\"id\": \"p4\", broken\n");
    let s = scramjet
        .ingest(
            std::io::Cursor::new(text),
            Format::Ndjson,
            &full(false, 0.9),
            |_| {},
        )
        .await
        .unwrap();
    assert!(refused(&s).contains("could not be read"), "{}", refused(&s));
    assert_eq!(s.bad[0].line, 4);
    assert_eq!(app.count("resources").await, 4);

    // A ratio within the limit deletes.
    let s = ingest(&app, &four[..3], &full(false, 0.5)).await;
    assert_eq!(s.deletes, Some(DeleteStep::Done(1)));
    assert_eq!(app.count("resources").await, 3);

    // An empty input with --allow-delete-all deletes everything.
    let s = ingest(&app, &[], &full(true, 0.5)).await;
    assert_eq!(s.deletes, Some(DeleteStep::Done(3)));
    assert_eq!(app.count("resources").await, 0);
}

#[tokio::test]
async fn a_dry_run_reports_what_would_happen_and_changes_nothing() {
    let mut app = spawn_app().await;
    let three: Vec<Value> = (1..=3).map(|i| person(&format!("p{i}"), "x")).collect();
    ingest(&app, &three, &IngestOptions::new("person")).await;
    assert_eq!(all_events(&mut app).await.len(), 3);
    let before = app.resources().await;

    let input = vec![
        person("p1", "x"),
        person("p2", "changed"),
        person("p4", "new"),
        json!({"id": "p5"}),
    ];
    let options = IngestOptions {
        full_set: true,
        dry_run: true,
        ..IngestOptions::new("person")
    };
    let s = ingest(&app, &input, &options).await;
    assert_eq!(
        (s.created, s.updated, s.unchanged, s.rejected),
        (1, 1, 1, 1),
        "{s}"
    );
    assert_eq!(s.deletes, Some(DeleteStep::WouldDelete(1)), "p3");
    assert_eq!(app.resources().await, before);
    assert_eq!(app.count("staging").await, 0);
    assert_eq!(app.count("outbox").await, 0);
    assert_eq!(all_events(&mut app).await, vec![]);
}

#[tokio::test]
async fn ndjson_a_json_array_and_csv_load_alike_and_bad_lines_fail_the_command_by_number() {
    let mut app = spawn_app().await;
    let run = |args: &[&str], input: &str| {
        let mut cmd = scramjet();
        isolated(&mut cmd, &app.names);
        cmd.env(
            "SCRAMJET__VALIDATION__SCHEMA_DIR",
            app.schema_dir.path().as_os_str(),
        )
        .args(["ingest", "--type", "person"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, stdout, _) = run(
        &[],
        "{\"id\":\"a1\",\"name\":\"A\"}\n{\"id\":\"a2\",\"name\":\"B\"}\n",
    );
    assert!(ok);
    assert!(stdout.contains("2 records: created 2"), "{stdout}");

    let (ok, stdout, _) = run(
        &["--id-field", "key"],
        "[\n {\"key\": \"b1\", \"name\": \"A\"},\n {\"key\": 2, \"name\": \"B\"}\n]",
    );
    assert!(ok);
    assert!(stdout.contains("created 2"), "{stdout}");

    let (ok, stdout, _) = run(
        &["--format", "csv"],
        "id,name,city\nc1,Ada,\"Oslo, Norway\"\nc2,Bob,Bergen\n",
    );
    assert!(ok);
    assert!(stdout.contains("created 2"), "{stdout}");

    // A bad line in the middle: reported with its number, the others load,
    // and the command fails.
    let (ok, stdout, stderr) = run(
        &[],
        "{\"id\":\"d1\",\"name\":\"A\"}\n{\"id\":\"d2\",\"name\":\n{\"id\":\"d3\",\"name\":\"C\"}\n",
    );
    assert!(!ok, "a bad line fails the command");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stdout.contains("created 2"), "{stdout}");
    let (ok, _, stderr) = run(&["--format", "csv"], "id,name\ne1,A\ne2\n");
    assert!(!ok);
    assert!(stderr.contains("line 3"), "{stderr}");

    // A record the schema rejects is listed on stderr with its line, id and
    // error, and the closing error says what failed instead of pointing at
    // a summary that went to stdout.
    let (ok, stdout, stderr) = run(
        &[],
        "{\"id\":\"r1\",\"name\":\"A\"}\n{\"id\":\"r2\",\"name\":\"\"}\n",
    );
    assert!(!ok, "a rejected record fails the command");
    assert!(stdout.contains("rejected 1"), "{stdout}");
    let listed = stderr
        .lines()
        .find(|l| l.contains("line 2"))
        .unwrap_or_else(|| panic!("the rejected record is listed: {stderr}"));
    assert!(
        listed.contains("\"r2\"") && listed.contains("/name"),
        "{listed}"
    );
    assert!(stderr.contains("1 rejected"), "{stderr}");
    assert!(!stderr.contains("see above)"), "{stderr}");

    let names = names_by_id(&app).await;
    for id in ["a1", "a2", "b1", "2", "c1", "c2", "d1", "d3", "e1", "r1"] {
        assert!(names.contains_key(id), "{id} loaded: {names:?}");
    }
    assert_eq!(names.len(), 10);
    let c1: Value = app
        .db
        .query_one("SELECT data FROM resources WHERE id = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        c1,
        json!({"id": "c1", "name": "Ada", "city": "Oslo, Norway"})
    );
    assert_eq!(
        all_events(&mut app).await.len(),
        11,
        "r2 was rejected with an event"
    );
}

#[tokio::test]
async fn delete_removes_a_group_of_ids_with_deleted_events() {
    let mut app = spawn_app().await;
    let four: Vec<Value> = (1..=4).map(|i| person(&format!("p{i}"), "x")).collect();
    ingest(&app, &four, &IngestOptions::new("person")).await;
    assert_eq!(all_events(&mut app).await.len(), 4);

    let mut cmd = scramjet();
    isolated(&mut cmd, &app.names);
    let mut child = cmd
        .args(["delete", "--type", "person", "--ids", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"p1\n\np3\nnot-there\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("deleted 2, not found 1"), "{stdout}");
    assert_eq!(
        all_events(&mut app).await,
        pairs(&[("p1", "deleted"), ("p3", "deleted")])
    );
    assert_eq!(
        names_by_id(&app).await.keys().collect::<Vec<_>>(),
        ["p2", "p4"]
    );
}

#[tokio::test]
async fn an_ingest_beside_the_daemon_on_the_same_ids_never_loses_the_newer_save() {
    let app = spawn_app().await;
    const N: usize = 2_000;
    // The feed: every id at version 1, plus ids the feed does not hold.
    let feed: Vec<Value> = (0..N)
        .map(|i| json!({"id": format!("p{i:04}"), "name": "feed", "v": 1}))
        .collect();
    let options = IngestOptions {
        version_field: Some("v".into()),
        full_set: true,
        chunk: 100,
        ..IngestOptions::new("person")
    };
    // Meanwhile the daemon gets newer saves (version 2) of the same ids,
    // and saves of new ids that the full set must not delete.
    let live: Vec<String> = (0..N)
        .rev()
        .map(|i| {
            json!({"action": "save", "type": "person", "id": format!("p{i:04}"),
                   "version": 2, "data": {"name": "live"}})
            .to_string()
        })
        .chain((0..200).map(|i| save_body("person", &format!("new{i:03}"), r#"{"name":"live"}"#)))
        .collect();
    // The live saves start once the sync has begun (after its first chunk):
    // new ids saved before a full-set sync begins are rightly deleted by it.
    let begun = std::sync::Arc::new(tokio::sync::Notify::new());
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let syncing = {
        let begun = begun.clone();
        scramjet.ingest(
            std::io::Cursor::new(ndjson(&feed)),
            Format::Ndjson,
            &options,
            move |_| begun.notify_one(),
        )
    };
    let publishing = async {
        begun.notified().await;
        app.publish_many(&live).await;
    };
    let (summary, ()) = tokio::join!(syncing, publishing);
    let summary = summary.unwrap();
    assert!(summary.is_success(), "{summary}");

    // Wait until the daemon has applied all of its messages.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let live_rows: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM resources WHERE data->>'name' = 'live'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if live_rows == (N + 200) as i64 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let odd = app
                .db
                .query(
                    "SELECT id, version, data::text FROM resources WHERE data->>'name' <> 'live' LIMIT 5",
                    &[],
                )
                .await
                .unwrap();
            let odd: Vec<(String, Option<i64>, String)> =
                odd.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
            panic!("only {live_rows} live rows; for example {odd:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = app
        .db
        .query("SELECT id, version, data FROM resources", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), N + 200, "nothing deleted, nothing lost");
    for row in rows {
        let (id, version, data): (String, Option<i64>, Value) =
            (row.get(0), row.get(1), row.get(2));
        if id.starts_with("new") {
            assert_eq!(data["name"], "live", "{id}");
        } else {
            assert_eq!(
                (version, data["name"].clone()),
                (Some(2), json!("live")),
                "{id}"
            );
        }
    }
    // What the ingest did is consistent with that: each of its records
    // either went in first (created or updated later by the daemon) or
    // came after version 2 and was stale.
    assert_eq!(
        summary.created + summary.updated + summary.unchanged + summary.stale,
        N as u64,
        "{summary}"
    );
}

/// Takes (or, with `unlock`, releases) the advisory lock every writer of
/// (person, `id`) takes first, from the test's own session.
async fn hold_key_lock(app: &TestApp, id: &str, unlock: bool) {
    let f = if unlock {
        "pg_advisory_unlock"
    } else {
        "pg_advisory_lock"
    };
    app.db
        .execute(
            &format!("SELECT {f}(hashtextextended('person' || chr(31) || $1, 5930))"),
            &[&id],
        )
        .await
        .unwrap();
}

/// Rewrites the row of (person, `id`) with `{"name": name}` and a hash of
/// its own, as another writer holding the key's lock would.
async fn write_name_under_the_key(app: &TestApp, id: &str, name: &str) {
    app.db
        .execute(
            "UPDATE resources SET data = jsonb_build_object('name', $2::text), \
               hash = 'by-another-writer' WHERE type = 'person' AND id = $1",
            &[&id, &name],
        )
        .await
        .unwrap();
}

/// Waits until `n` transactions of the test's database wait for an advisory lock.
async fn wait_for_lock_waiters(app: &TestApp, n: i64) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let waiting: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE d.datname = current_database() AND l.locktype = 'advisory' \
                   AND NOT l.granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} of {n} waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_full_set_sync_spares_a_save_that_began_before_it_and_committed_after() {
    let mut app = spawn_app().await;
    for id in ["x", "w", "y1", "y2", "y3"] {
        app.save("person", id, r#"{"name":"old"}"#).await;
    }
    assert_eq!(app.next_events(5).await.len(), 5);

    // The daemon's batch saving x begins, then waits for x's key lock.
    hold_key_lock(&app, "x", false).await;
    hold_key_lock(&app, "y1", false).await;
    app.save("person", "x", r#"{"name":"new"}"#).await;
    wait_for_lock_waiters(&app, 1).await;

    // The sync begins meanwhile; its first chunk waits for y1's key lock.
    let feed: Vec<Value> = ["y1", "y2", "y3"]
        .iter()
        .map(|id| person(id, "old"))
        .collect();
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let options = IngestOptions {
        full_set: true,
        ..IngestOptions::new("person")
    };
    let syncing = scramjet.ingest(
        std::io::Cursor::new(ndjson(&feed)),
        Format::Ndjson,
        &options,
        |_| {},
    );
    let meanwhile = async {
        wait_for_lock_waiters(&app, 2).await;
        // The daemon's save commits after the sync began; then the sync goes on.
        hold_key_lock(&app, "x", true).await;
        let e = app.next_event().await;
        assert_eq!((e.op(), e.id()), ("updated", "x"));
        hold_key_lock(&app, "y1", true).await;
    };
    let (summary, ()) = tokio::join!(syncing, meanwhile);
    let summary = summary.unwrap();

    assert_eq!(summary.deletes, Some(DeleteStep::Done(1)), "{summary}");
    let names = names_by_id(&app).await;
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        ["x", "y1", "y2", "y3"],
        "w, unchanged since before the sync, is gone; x, saved during it, stays"
    );
    assert_eq!(names["x"], "new");
}

/// The delete step takes its keys' advisory locks before any row's lock,
/// in the order every writer takes them. Holding the rows of a page while
/// it waited for a key, it deadlocked with a daemon batch that held that key
/// and then wrote the row (PostgreSQL broke it after `deadlock_timeout`).
#[tokio::test]
async fn the_delete_step_holds_no_row_while_it_waits_for_a_key() {
    let mut app = spawn_app().await;
    for id in ["a", "b", "keep"] {
        app.save("person", id, r#"{"name":"old"}"#).await;
    }
    assert_eq!(app.next_events(3).await.len(), 3);

    // A daemon batch holds the key of a.
    hold_key_lock(&app, "a", false).await;
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let options = IngestOptions {
        full_set: true,
        max_delete_ratio: 1.0,
        ..IngestOptions::new("person")
    };
    let feed = ndjson(&[person("keep", "old")]);
    let syncing = scramjet.ingest(std::io::Cursor::new(feed), Format::Ndjson, &options, |_| {});
    let meanwhile = async {
        wait_for_lock_waiters(&app, 1).await;
        // The batch now writes the row of a, as a save does.
        let locked = app
            .db
            .query(
                "SELECT id FROM resources WHERE type = 'person' AND id IN ('a', 'b') \
                 FOR UPDATE NOWAIT",
                &[],
            )
            .await;
        assert!(
            locked.is_ok(),
            "the delete step holds no row lock while it waits for a key: {locked:?}"
        );
        write_name_under_the_key(&app, "a", "new").await;
        hold_key_lock(&app, "a", true).await;
    };
    let (summary, ()) = tokio::join!(syncing, meanwhile);
    let summary = summary.unwrap();

    assert_eq!(summary.deletes, Some(DeleteStep::Done(1)), "{summary}");
    let names = names_by_id(&app).await;
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        ["a", "keep"],
        "b is gone; a, written while the step waited for its key, stays"
    );
    assert_eq!(names["a"], "new");
}

/// `scramjet revalidate` (and its HTTP form) locked a page's staging rows
/// first and took their keys' locks only when it applied them, so it
/// deadlocked with a batch that held one of those keys and then wrote the
/// staging row, as a save does. It must wait for the key holding no row.
#[tokio::test]
async fn a_revalidation_holds_no_staging_row_while_it_waits_for_a_key() {
    let mut app = spawn_app().await;
    app.save("person", "a", r#"{"name":""}"#).await;
    assert_eq!(app.next_event().await.op(), "rejected");
    std::fs::write(
        app.schema_dir.path().join("person.json"),
        r#"{"type":"object","required":["name"]}"#,
    )
    .unwrap();

    // A daemon batch holds the key of a.
    hold_key_lock(&app, "a", false).await;
    let revalidating =
        scramjet::commands::revalidate::revalidate(&app.settings, Some("person"), None);
    let meanwhile = async {
        wait_for_lock_waiters(&app, 1).await;
        // The batch now writes the staging row of a, as a save does.
        let locked = app
            .db
            .query(
                "SELECT id FROM staging WHERE type = 'person' AND id = 'a' FOR UPDATE NOWAIT",
                &[],
            )
            .await;
        assert!(
            locked.is_ok(),
            "the revalidation holds no staging row while it waits for a key: {locked:?}"
        );
        hold_key_lock(&app, "a", true).await;
    };
    let (summary, ()) = tokio::join!(revalidating, meanwhile);
    let summary = summary.unwrap();
    assert_eq!((summary.checked, summary.created), (1, 1), "{summary:?}");
    assert_eq!(app.next_event().await.op(), "created");
}

/// A batch reads its keys' rows in a statement after the one that took
/// their advisory locks; that read must see what the writer it waited for
/// committed, whatever isolation level the database defaults to (under
/// REPEATABLE READ it would read the transaction's first snapshot, from
/// before the wait, and take the save below for an unchanged one).
#[tokio::test]
async fn a_batch_that_waited_for_its_key_sees_what_the_writer_before_it_committed() {
    let mut app = spawn_app().await;
    app.save("person", "a", r#"{"name":"A"}"#).await;
    assert_eq!(app.next_event().await.op(), "created");
    let db = app.names.database.clone();
    let admin = connect_admin().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_isolation = 'repeatable read'"
        ))
        .await
        .unwrap();
    crate::outages::end_daemon_sessions(&admin, &db).await;

    // Another writer holds the key; the daemon's batch of a save of A waits.
    hold_key_lock(&app, "a", false).await;
    app.save("person", "a", r#"{"name":"A"}"#).await;
    wait_for_lock_waiters(&app, 1).await;
    write_name_under_the_key(&app, "a", "B").await;
    hold_key_lock(&app, "a", true).await;

    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("updated", "a"), "{}", e.raw);
    assert_eq!(names_by_id(&app).await["a"], "A", "the later save wins");
}

#[tokio::test]
async fn a_full_set_with_a_scope_deletes_only_inside_it() {
    let mut app = spawn_app().await;
    let people = vec![
        json!({"id": "a1", "name": "x", "dept": "a"}),
        json!({"id": "a2", "name": "x", "dept": "a"}),
        json!({"id": "a3", "name": "x", "dept": "a"}),
        json!({"id": "b1", "name": "x", "dept": "b"}),
        json!({"id": "b2", "name": "x", "dept": "b"}),
    ];
    ingest(&app, &people, &IngestOptions::new("person")).await;
    assert_eq!(all_events(&mut app).await.len(), 5);

    // Department a's feed: a3 is gone; department b is not part of it.
    let options = IngestOptions {
        full_set: true,
        scope: Some(scramjet::api::filter::parse(r#"dept = "a""#).unwrap()),
        ..IngestOptions::new("person")
    };
    let s = ingest(&app, &people[..2], &options).await;
    assert_eq!(s.deletes, Some(DeleteStep::Done(1)), "{s}");
    assert_eq!(all_events(&mut app).await, pairs(&[("a3", "deleted")]));
    assert_eq!(
        names_by_id(&app).await.keys().collect::<Vec<_>>(),
        ["a1", "a2", "b1", "b2"]
    );

    // An injection attempt in the scope is data: it matches nothing, so
    // nothing is deleted.
    let options = IngestOptions {
        full_set: true,
        scope: Some(scramjet::api::filter::parse(r#"dept = "a' OR '1'='1""#).unwrap()),
        ..IngestOptions::new("person")
    };
    let s = ingest(&app, &people[..1], &options).await;
    assert_eq!(s.deletes, Some(DeleteStep::Done(0)), "{s}");
    assert_eq!(app.count("resources").await, 4);
}

#[tokio::test]
async fn each_stage_runs_on_its_own_stash_then_validate_then_traject_by_filter() {
    let mut app = spawn_app().await;
    let scramjet = Scramjet::connect(&app.settings).await.unwrap();
    let record = |id: &str, data: Value| (id.to_owned(), data.as_object().unwrap().clone());
    let stashed = scramjet
        .stash(
            "person",
            &[
                record("p1", json!({"name": "Ada", "dept": "a"})),
                record("p2", json!({"name": "Bob", "dept": "b"})),
                record("p3", json!({"nickname": "no name"})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(stashed, 3);
    let unvalidated: i64 = app
        .db
        .query_one("SELECT count(*) FROM staging WHERE is_valid IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unvalidated, 3);
    assert_eq!(app.count("resources").await, 0);
    assert_eq!(
        all_events(&mut app).await,
        vec![],
        "stashing publishes nothing"
    );

    let s = scramjet.validate("person", None).await.unwrap();
    assert_eq!((s.records, s.rejected), (3, 1), "{s}");
    assert_eq!(all_events(&mut app).await, pairs(&[("p3", "rejected")]));
    let states: Vec<(String, Option<bool>)> = app
        .db
        .query("SELECT id, is_valid FROM staging ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        states,
        vec![
            ("p1".to_owned(), Some(true)),
            ("p2".to_owned(), Some(true)),
            ("p3".to_owned(), Some(false))
        ]
    );

    // Traject one department first, then the rest.
    let dept_b = scramjet::api::filter::parse(r#"dept = "b""#).unwrap();
    let s = scramjet.traject("person", Some(&dept_b)).await.unwrap();
    assert_eq!((s.records, s.created), (1, 1), "{s}");
    assert_eq!(all_events(&mut app).await, pairs(&[("p2", "created")]));
    let s = scramjet.traject("person", None).await.unwrap();
    assert_eq!((s.records, s.created), (1, 1), "{s}");
    assert_eq!(all_events(&mut app).await, pairs(&[("p1", "created")]));
    assert_eq!(app.count("staging").await, 1, "only the rejected p3 stays");

    let listed = scramjet
        .list("person", Some(&dept_b), None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "p2");
}
