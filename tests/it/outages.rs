//! Database errors the environment causes are outages, not the message's
//! fault (issue: failover, rotated passwords, revoked rights, migrations,
//! timeouts): the batch waits and retries in place, `/readyz` says 503 and
//! why, `scramjet_outages_total` counts it, nothing is dead-lettered, and
//! every message is applied once the database takes writes again.
//!
//! Each test changes only its own database or a role of its own.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::helpers::*;

/// A login role of the test's own, dropped (after the test's database) when
/// the guard goes: declare it before the `TestApp`, so it drops after it.
struct Role {
    name: String,
}

impl Role {
    /// Creates `LOGIN CREATEDB` role with `extra` options (e.g. a password).
    async fn create(extra: &str) -> Role {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("scramjet_test_role_{}", &tag[..12]);
        connect_admin()
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN CREATEDB {extra}"))
            .await
            .unwrap();
        Role { name }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = self.name.clone();
        on_own_runtime(move || async move {
            let admin = connect_admin().await;
            // The test's database (owned by the role) is gone by now,
            // unless its cleanup failed: then take it down here too.
            let _ = admin
                .batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}"))
                .await;
        })
        .join()
        .unwrap();
    }
}

/// `url` with `user[:password]` in place of its user.
fn as_user(url: &str, userinfo: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    match userinfo.split_once(':') {
        Some((user, password)) => {
            url.set_username(user).unwrap();
            url.set_password(Some(password)).unwrap();
        }
        None => url.set_username(userinfo).unwrap(),
    }
    url.to_string()
}

/// Ends every session the daemon has on `database` (its connections carry
/// `application_name` scramjet), terminating again until none is left: a
/// connection being set up at that moment can survive one round.
pub(crate) async fn end_daemon_sessions(admin: &tokio_postgres::Client, database: &str) {
    for _ in 0..400 {
        let left: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'scramjet'",
                &[&database],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the daemon's sessions on {database} did not go away");
}

/// Polls `/readyz` until it answers 503 naming an outage whose reason
/// contains `reason`; returns the body.
async fn wait_outage(app: &TestApp, reason: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = app.get("/readyz").await;
        if status == 503 && body.contains(reason) {
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["ready"], false, "{body}");
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported an outage with {reason:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails if anything is dead-lettered within `window`.
async fn assert_no_dead_letter_within(app: &mut TestApp, window: Duration) {
    if let Ok(Some(Ok(d))) = tokio::time::timeout(window, app.dead.next()).await {
        let reason = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-scramjet-error").cloned());
        panic!(
            "dead-lettered {:?}: {reason:?}",
            String::from_utf8_lossy(&d.data)
        );
    }
}

/// The value of `scramjet_outages_total` for `reason` (0 when absent).
async fn outages(app: &TestApp, reason: &str) -> u64 {
    let (_, metrics) = app.get("/metrics").await;
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("scramjet_outages_total{")
                && l.contains(&format!("reason=\"{reason}\""))
                && l.contains("service=\"postgres\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn saves(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| save_body("person", &format!("{prefix}{i}"), r#"{"name":"N"}"#))
        .collect()
}

/// Waits for `n` events and checks each is a `created` of a distinct id.
async fn expect_created(app: &mut TestApp, n: usize) {
    let events = app.next_events(n).await;
    let mut ids: Vec<&str> = events.iter().map(|e| e.id()).collect();
    assert!(events.iter().all(|e| e.op() == "created"));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "each message applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_turned_read_only_is_an_outage_and_every_save_is_applied_once_writes_return() {
    let mut app = spawn_app().await;
    assert_eq!(app.wait_ready().await, 200);
    let db = app.names.database.clone();
    let admin = connect_admin().await;
    // What a failover to a standby looks like from the daemon's side.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_read_only = on"
        ))
        .await
        .unwrap();
    end_daemon_sessions(&admin, &db).await;

    app.publish_many(&saves("p", 200)).await;
    let body = wait_outage(&app, "read_only").await;
    assert_eq!(body["postgres"], true, "the server answers: {body}");
    assert_no_dead_letter_within(&mut app, Duration::from_secs(1)).await;
    assert_eq!(app.count("resources").await, 0);
    assert!(outages(&app, "read_only").await >= 1);

    // Writes come back. The daemon's sessions were opened read-only: it
    // must give up a connection that failed like this, not keep retrying on it.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    expect_created(&mut app, 200).await;
    assert_eq!(app.wait_ready().await, 200);
    assert_eq!(app.count("resources").await, 200);
    assert_no_dead_letter_within(&mut app, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_under_the_daemon_is_an_outage_until_it_is_restored() {
    // deploy/dev-services.sh lets members of scramjet_password_auth in with
    // a password over loopback (everyone else is trusted there).
    let role = Role::create("PASSWORD 'first' IN ROLE scramjet_password_auth").await;
    let probe = as_user(
        &format!("{}/postgres", postgres_base()),
        &format!("{}:wrong", role.name),
    );
    assert!(
        tokio_postgres::connect(&probe, tokio_postgres::NoTls)
            .await
            .is_err(),
        "PostgreSQL must check this role's password (run deploy/dev-services.sh)"
    );
    let user = format!("{}:first", role.name);
    let mut app = spawn_app_with(|s| s.postgres.url = as_user(&s.postgres.url, &user)).await;
    app.publish_many(&saves("a", 10)).await;
    expect_created(&mut app, 10).await;

    let admin = connect_admin().await;
    admin
        .batch_execute(&format!("ALTER ROLE {} PASSWORD 'second'", role.name))
        .await
        .unwrap();
    end_daemon_sessions(&admin, &app.names.database).await;
    app.publish_many(&saves("b", 100)).await;
    wait_outage(&app, "authentication").await;
    assert_no_dead_letter_within(&mut app, Duration::from_secs(1)).await;

    admin
        .batch_execute(&format!("ALTER ROLE {} PASSWORD 'first'", role.name))
        .await
        .unwrap();
    expect_created(&mut app, 100).await;
    assert_eq!(app.wait_ready().await, 200);
    assert_eq!(app.count("resources").await, 110);
    assert_no_dead_letter_within(&mut app, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_table_privileges_are_an_outage_until_granted_again() {
    let role = Role::create("").await;
    let user = role.name.clone();
    let mut app = spawn_app_with(|s| s.postgres.url = as_user(&s.postgres.url, &user)).await;
    app.publish_many(&saves("a", 10)).await;
    expect_created(&mut app, 10).await;

    let (client, connection) =
        tokio_postgres::connect(&direct_db_url(&app.names), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}",
            role.name
        ))
        .await
        .unwrap();
    app.publish_many(&saves("b", 100)).await;
    wait_outage(&app, "privilege").await;
    assert_no_dead_letter_within(&mut app, Duration::from_secs(1)).await;

    client
        .batch_execute(&format!(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {}",
            role.name
        ))
        .await
        .unwrap();
    expect_created(&mut app, 100).await;
    assert_eq!(app.wait_ready().await, 200);
    assert_no_dead_letter_within(&mut app, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_changes_a_column_the_cached_statements_read_dead_letters_nothing() {
    let mut app = spawn_app().await;
    // Warm up: the pipeline's connection has its statements prepared.
    app.publish_many(&saves("a", 20)).await;
    expect_created(&mut app, 20).await;

    // The statement that reads the current rows now returns another type:
    // PostgreSQL answers "cached plan must not change result type" (0A000).
    app.db
        .batch_execute("ALTER TABLE resources ALTER COLUMN hash TYPE varchar(64)")
        .await
        .unwrap();
    let updates: Vec<String> = (0..20)
        .map(|i| save_body("person", &format!("a{i}"), r#"{"name":"changed"}"#))
        .collect();
    app.publish_many(&updates).await;
    let events = app.next_events(20).await;
    assert!(events.iter().all(|e| e.op() == "updated"), "{events:?}");
    assert_no_dead_letter_within(&mut app, Duration::from_millis(500)).await;
    // The pipeline's pool hands it the one connection it used for the
    // warm-up, so the stale statement really was hit (and healed).
    assert!(outages(&app, "schema").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_that_fires_for_a_big_batch_shrinks_it_until_it_goes_through() {
    // All 500 messages in one first batch: they wait in the queue before
    // the daemon starts, it lingers to gather them, and its prefetch is not
    // lowered below 500 for memory (small messages).
    let mut app = spawn_app_with(|s| {
        s.pipeline.linger_ms = 500;
        s.limits.max_message_bytes = 64 * 1024;
    })
    .await;
    let db = app.names.database.clone();
    // Inserting more than 300 rows in one transaction takes a minute; fewer
    // take no time. (Counted over the transaction: the daemon may write a
    // batch's rows with several statements.) Every session has a 3 s
    // statement timeout.
    app.db
        .batch_execute(
            "CREATE FUNCTION slow_when_big() RETURNS trigger LANGUAGE plpgsql AS $$ \
             DECLARE n int := coalesce(nullif(current_setting('scramjet_test.inserted', true), ''), '0')::int \
               + (SELECT count(*) FROM inserted); \
             BEGIN PERFORM set_config('scramjet_test.inserted', n::text, true); \
             IF n > 300 THEN PERFORM pg_sleep(60); END IF; \
             RETURN NULL; END $$; \
             CREATE TRIGGER slow_when_big AFTER INSERT ON resources \
             REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT \
             EXECUTE FUNCTION slow_when_big()",
        )
        .await
        .unwrap();
    app.db
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET statement_timeout = '3s'"
        ))
        .await
        .unwrap();
    app.stop().await;
    app.publish_many(&saves("p", 500)).await;
    app.start().await;

    expect_created(&mut app, 500).await;
    assert_eq!(app.count("resources").await, 500);
    assert!(outages(&app, "statement_timeout").await >= 1);
    assert_no_dead_letter_within(&mut app, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_every_message_is_refused_with_one_sqlstate_is_an_outage_not_dead_letters() {
    let mut app = spawn_app_with(|s| s.pipeline.linger_ms = 300).await;
    // A migration gone wrong: no row can be written any more.
    app.db
        .batch_execute("ALTER TABLE resources ADD CONSTRAINT broken CHECK (false) NOT VALID")
        .await
        .unwrap();
    app.publish_many(&saves("p", 50)).await;
    let body = wait_outage(&app, "23514").await;
    assert_eq!(body["postgres"], true, "{body}");
    assert_no_dead_letter_within(&mut app, Duration::from_secs(1)).await;

    app.db
        .batch_execute("ALTER TABLE resources DROP CONSTRAINT broken")
        .await
        .unwrap();
    expect_created(&mut app, 50).await;
    assert_eq!(app.wait_ready().await, 200);
}

/// The events of `id` as (op, data.name), in arrival order.
fn history(events: &[ReceivedEvent], id: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e.id() == id)
        .map(|e| {
            (
                e.op().to_owned(),
                e.body["data"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_lost_its_broker_while_waiting_for_postgresql_never_commits_its_old_batch() {
    use crate::{faults::*, proxy::*};
    // Daemon 1 reaches both services through proxies of the test's own;
    // daemon 2, a standby on the same queue, reaches them directly.
    let pg = Proxy::start(postgres_addr()).await;
    let mq = Proxy::start(amqp_addr()).await;
    let mut app = spawn_app_with(|s| {
        s.postgres.url = via(&s.postgres.url, pg.addr);
        s.amqp.url = via(&s.amqp.url, mq.addr);
    })
    .await;
    let mut standby = app.settings.clone();
    standby.postgres.url = direct_db_url(&app.names);
    standby.amqp.url = amqp_url();
    let (_, stop_standby, standby_task, _) = launch(&standby).await;
    // Stopped before the test's cleanup also when an assertion fails, so a
    // standby left running cannot declare the test's exchanges again.
    let _standby_stops = stop_standby.clone().drop_guard();
    let ids: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    // No version, no message_id: only the order of commits protects them.
    let round = |name: &str| -> Vec<String> {
        ids.iter()
            .map(|id| save_body("person", id, &format!(r#"{{"name":"{name}"}}"#)))
            .collect()
    };

    app.publish_many(&round("one")).await;
    let mut events = app.next_events(10).await;
    // 1. PostgreSQL unreachable for daemon 1, which takes the next batch and waits.
    pg.cut();
    app.publish_many(&round("two")).await;
    wait_outage(&app, r#""worker":"pipeline""#).await;
    // 2. Its broker connection closes; 3. the standby takes over and applies
    // the redelivered batch and a newer one.
    mq.cut();
    app.publish_many(&round("three")).await;
    // 4. PostgreSQL comes back for daemon 1, which retried within 5 s
    // before: collect for twice that. An event may come twice (same
    // event_id): daemon 1 may have lost the outbox delete of the events it
    // had published, which the standby then publishes again.
    pg.restore();
    let until = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(until.into(), app.events.next()).await {
        let raw = String::from_utf8(d.data).unwrap();
        events.push(ReceivedEvent {
            body: serde_json::from_str(&raw).unwrap(),
            raw,
            routing_key: d.routing_key.to_string(),
            properties: d.properties,
        });
    }
    let (events, _repeats) = crate::model::dedupe(events);

    for id in &ids {
        assert_eq!(
            history(&events, id),
            [
                ("created".to_owned(), "one".to_owned()),
                ("updated".to_owned(), "two".to_owned()),
                ("updated".to_owned(), "three".to_owned()),
            ],
            "{id}"
        );
    }
    for row in app.resources().await {
        assert_eq!(row.3, serde_json::json!({"name": "three"}), "{}", row.1);
    }
    stop_standby.cancel();
    standby_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_another_consumer_took_over_from_cannot_commit_even_unaware_of_it() {
    use scramjet::{
        config::UnknownTypes,
        domain::validate::SchemaRegistry,
        pipeline::{Pipeline, Prepared, Session},
        telemetry::health::Health,
        telemetry::metrics::Metrics,
    };
    use tokio_util::sync::CancellationToken;
    let app = spawn_app().await;
    let pool = scramjet::bulk::Scramjet::connect(&app.settings)
        .await
        .unwrap()
        .pool()
        .clone();
    let schemas = SchemaRegistry::load(app.schema_dir.path(), UnknownTypes::Accept, 100).unwrap();
    let metrics = Metrics::new();
    let health = std::sync::Arc::new(Health::new(&metrics));
    // Two sessions of one queue whose broker connections never report a loss.
    let session = || {
        Pipeline::new(pool.clone(), health.clone(), metrics.clone())
            .for_session(Session::new("fenced.queue", CancellationToken::new()))
    };
    let (first, second) = (session(), session());
    let save = |name: &str| {
        let body = save_body("person", "f1", &format!(r#"{{"name":"{name}"}}"#));
        let inbound = scramjet::domain::message::decode(
            body.as_bytes(),
            app.settings.limits.decoder_limits(),
        )
        .unwrap();
        vec![Prepared::new(inbound, None, None, &schemas)]
    };
    let never = CancellationToken::new();
    assert!(first.process(&save("old"), &never).await.is_ok());
    // The broker moved the queue to the second session, which registers a newer epoch.
    assert!(second.process(&save("new"), &never).await.is_ok());
    assert!(
        first.process(&save("stale"), &never).await.is_err(),
        "the replaced session's batch is abandoned"
    );
    let rows = app.resources().await;
    assert_eq!(rows[0].3, serde_json::json!({"name": "new"}));
    assert!(second.process(&save("newer"), &never).await.is_ok());
    pool.close();
}
