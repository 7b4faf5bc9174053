//! `scramjet relay` against a real source database: a database of the test's
//! own on the local server, with `deploy/triggers/postgresql.sql` installed and
//! attached to a table. Rows written there must come out of the daemon — as
//! `resources` and as change events — complete and, per row, in order; also
//! across a SIGKILLed relay and with two relays on one outbox.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties};
use scramjet::{config::Secret, producer::Relay};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    helpers::*,
    model::dedupe,
    proxy::{Proxy, via},
};

/// A relay running in-process on the daemon's broker names.
struct InProcessRelay {
    http: SocketAddr,
    metrics: scramjet::telemetry::metrics::ProducerMetrics,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcessRelay {
    async fn start(app: &TestApp, source: &SourceDb, batch_size: i64) -> InProcessRelay {
        let mut s = app.settings.clone();
        s.relay.source_url = Some(Secret(source.url()));
        s.relay.batch_size = batch_size;
        InProcessRelay::start_with(s).await
    }

    /// Starts a relay with `s`, on a free port, polling every 200 ms.
    async fn start_with(mut s: scramjet::config::Settings) -> InProcessRelay {
        s.relay.http_listen = "127.0.0.1:0".parse().unwrap();
        s.relay.poll_interval = Duration::from_millis(200);
        let relay = Relay::build(s).await.expect("the relay starts");
        let http = relay.http_addr();
        let metrics = relay.metrics();
        let shutdown = CancellationToken::new();
        let handle = Some(tokio::spawn(relay.run(shutdown.clone())));
        InProcessRelay {
            http,
            metrics,
            shutdown,
            handle,
        }
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(PATIENCE, handle)
            .await
            .expect("the relay stops in time")
            .unwrap()
            .expect("the relay stops cleanly");
    }

    /// `scramjet_relay_messages_total{action}`.
    fn published(&self, action: &str) -> u64 {
        self.metrics.messages.with_label_values(&[action]).get()
    }
}

impl Drop for InProcessRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

async fn wait_status(addr: SocketAddr, path: &str, status: u16) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get(addr, path).await.0 == status
        {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never said {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `resources` of one type as (id, data), sorted by id.
async fn resources_of(app: &TestApp, entity_type: &str) -> Vec<(String, Value)> {
    app.resources()
        .await
        .into_iter()
        .filter(|r| r.0 == entity_type)
        .map(|(_, id, _, data)| (id, data))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_in_a_source_table_arrive_as_resources_and_change_events_in_commit_order() {
    let source = SourceDb::create().await;
    source
        .db
        .batch_execute(
            "CREATE TABLE person (person_id text PRIMARY KEY, name text, age int);
             SELECT scramjet.attach('public.person', 'person', 'person_id');",
        )
        .await
        .unwrap();
    let mut app = spawn_app().await;
    let relay = InProcessRelay::start(&app, &source, 500).await;
    wait_status(relay.http, "/readyz", 200).await;
    let (_, ready) = http_get(relay.http, "/readyz").await;
    assert_eq!(
        serde_json::from_str::<Value>(&ready).unwrap(),
        json!({"ready": true, "source": true, "rabbitmq": true})
    );

    for sql in [
        "INSERT INTO person VALUES ('O''Brien', 'Ada', 36), ('p 2', 'Bob', 40)",
        "UPDATE person SET name = 'Ada Lovelace' WHERE person_id = 'O''Brien'",
        // Changes nothing: a save that publishes no event.
        "UPDATE person SET age = 40 WHERE person_id = 'p 2'",
        "DELETE FROM person WHERE person_id = 'p 2'",
        // Invalid for the person schema (empty name): rejected.
        "INSERT INTO person VALUES ('p3', '', 1)",
    ] {
        source.db.batch_execute(sql).await.unwrap();
    }
    // Several changes in one transaction go out in statement order.
    source
        .db
        .batch_execute(
            "BEGIN;
             INSERT INTO person VALUES ('p4', 'Cy', 1);
             UPDATE person SET age = 2 WHERE person_id = 'p4';
             COMMIT;",
        )
        .await
        .unwrap();

    let events = app.events_until("p4").await;
    let mut events = events;
    events.push(app.next_event().await);
    let seen: Vec<(String, &str)> = events
        .iter()
        .map(|e| (e.routing_key.clone(), e.id()))
        .collect();
    assert_eq!(
        seen,
        [
            ("person.created".to_owned(), "O'Brien"),
            ("person.created".to_owned(), "p 2"),
            ("person.updated".to_owned(), "O'Brien"),
            ("person.deleted".to_owned(), "p 2"),
            ("person.rejected".to_owned(), "p3"),
            ("person.created".to_owned(), "p4"),
            ("person.updated".to_owned(), "p4"),
        ]
    );
    let versions: Vec<i64> = events
        .iter()
        .map(|e| {
            e.body["version"]
                .as_i64()
                .expect("the relay sends a version")
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions rise in commit order: {versions:?}"
    );
    assert_eq!(
        events[2].body["patch"],
        json!([{"op": "replace", "path": "/name", "value": "Ada Lovelace"}])
    );

    // resources = the valid rows of the source table, each as to_jsonb(row).
    let expected = source
        .documents("SELECT person_id, to_jsonb(p) FROM person p WHERE name <> ''")
        .await;
    assert_eq!(resources_of(&app, "person").await, expected);
    assert_eq!(expected.len(), 2);
    assert_eq!(source.outbox_len().await, 0, "the outbox is drained");
    assert_eq!(relay.published("save"), 7);
    assert_eq!(relay.published("delete"), 1);
    let (status, metrics) = http_get(relay.http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("scramjet_relay_active 1"), "{metrics}");
    assert!(
        metrics.contains("scramjet_relay_messages_total{action=\"save\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("scramjet_relay_connected{service=\"source\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_columns_and_views_shape_the_data_and_a_changed_id_or_a_hidden_row_is_a_delete() {
    let source = SourceDb::create().await;
    source
        .db
        .batch_execute(
            "CREATE TABLE account (id bigint PRIMARY KEY, name text, secret text);
             SELECT scramjet.attach('account', 'account', 'id', 'columns:id, name');
             CREATE TABLE doc (id int PRIMARY KEY, title text, published boolean, big numeric);
             CREATE VIEW public_doc AS
                 SELECT id, upper(title) AS title, big FROM doc WHERE published;
             SELECT scramjet.attach('doc', 'doc', 'id', 'view:public_doc');",
        )
        .await
        .unwrap();
    let mut app = spawn_app().await;
    let _relay = InProcessRelay::start(&app, &source, 500).await;

    for sql in [
        "INSERT INTO account VALUES (1, 'ann', 'pw1'), (2, 'ben', 'pw2')",
        // A changed id: the old entity is deleted, the new one created.
        "UPDATE account SET id = 3 WHERE id = 2",
        "INSERT INTO doc VALUES (10, 'hello', true, 12345678901234567890.123456789012345678901)",
        "INSERT INTO doc VALUES (11, 'draft', false, 0)",
        // Leaving the view is leaving Scramjet.
        "UPDATE doc SET published = false WHERE id = 10",
        "UPDATE doc SET published = true WHERE id = 11",
    ] {
        source.db.batch_execute(sql).await.unwrap();
    }
    let events = app.events_until("11").await;
    let seen: Vec<(String, &str)> = events
        .iter()
        .map(|e| (e.routing_key.clone(), e.id()))
        .collect();
    assert_eq!(
        seen,
        [
            ("account.created".to_owned(), "1"),
            ("account.created".to_owned(), "2"),
            ("account.deleted".to_owned(), "2"),
            ("account.created".to_owned(), "3"),
            ("doc.created".to_owned(), "10"),
            ("doc.deleted".to_owned(), "10"),
            ("doc.created".to_owned(), "11"),
        ]
    );
    assert_eq!(events[0].body["data"], json!({"id": 1, "name": "ann"}));
    // Numbers pass through exactly, digit for digit.
    assert!(
        events[4]
            .raw
            .contains("12345678901234567890.123456789012345678901"),
        "{}",
        events[4].raw
    );
    assert_eq!(events[4].body["data"]["title"], json!("HELLO"));
    assert_eq!(
        resources_of(&app, "account").await,
        source
            .documents("SELECT id::text, jsonb_build_object('id', id, 'name', name) FROM account")
            .await
    );
    assert_eq!(
        resources_of(&app, "doc").await,
        source
            .documents("SELECT id::text, to_jsonb(v) FROM public_doc v")
            .await
    );
}

/// Per row id: the `n` of every event's data in receive order, checking that
/// versions strictly rise along the way.
fn n_per_row(events: &[ReceivedEvent]) -> HashMap<String, Vec<i64>> {
    let mut per_row: HashMap<String, Vec<i64>> = HashMap::new();
    let mut last_version: HashMap<String, i64> = HashMap::new();
    for e in events {
        let id = e.id().to_owned();
        let version = e.body["version"].as_i64().expect("a version");
        if let Some(last) = last_version.insert(id.clone(), version) {
            assert!(
                last < version,
                "row {id}: version {version} arrived after {last}"
            );
        }
        per_row
            .entry(id)
            .or_default()
            .push(e.body["data"]["n"].as_i64().expect("data.n"));
    }
    per_row
}

/// Asserts that each of `rows` rows went through n = 0, 1, …, `updates`, in
/// that order, exactly once each.
fn assert_complete_and_in_order(events: &[ReceivedEvent], rows: i64, updates: i64) {
    let per_row = n_per_row(events);
    assert_eq!(per_row.len() as i64, rows, "every row has events");
    let expected: Vec<i64> = (0..=updates).collect();
    for (id, ns) in &per_row {
        assert_eq!(ns, &expected, "row {id}: every state once, in order");
    }
}

/// Collects change events (from a queue of its own) until the one for `until`.
fn collect_until(
    mut stream: lapin::Consumer,
    until: &'static str,
    received: Arc<AtomicUsize>,
) -> JoinHandle<Vec<ReceivedEvent>> {
    tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(Ok(d)) = stream.next().await {
            let raw = String::from_utf8(d.data).unwrap();
            let body: Value = serde_json::from_str(&raw).unwrap();
            let done = body["id"] == until;
            events.push(ReceivedEvent {
                body,
                raw,
                routing_key: d.routing_key.to_string(),
                properties: d.properties,
            });
            received.fetch_add(1, Ordering::Relaxed);
            if done {
                return events;
            }
        }
        panic!("the event stream ended before {until}");
    })
}

/// `scramjet relay` as the real binary, on the daemon's broker names.
struct RelayProcess {
    args: Vec<String>,
    env: Vec<(String, String)>,
    http: SocketAddr,
    child: Option<Child>,
}

impl RelayProcess {
    fn new(app: &TestApp, source: &SourceDb, batch_size: i64) -> RelayProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let a = &app.settings.amqp;
        let env = [
            ("SCRAMJET__AMQP__URL", a.url.clone()),
            (
                "SCRAMJET__AMQP__INBOUND_EXCHANGE",
                a.inbound_exchange.clone(),
            ),
            ("SCRAMJET__AMQP__INBOUND_QUEUE", a.inbound_queue.clone()),
            (
                "SCRAMJET__AMQP__CHANGES_EXCHANGE",
                a.changes_exchange.clone(),
            ),
            (
                "SCRAMJET__AMQP__DEAD_LETTER_EXCHANGE",
                a.dead_letter_exchange.clone(),
            ),
            (
                "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
                a.dead_letter_queue.clone(),
            ),
            ("SCRAMJET__RELAY__HTTP_LISTEN", format!("127.0.0.1:{port}")),
            ("SCRAMJET__RELAY__BATCH_SIZE", batch_size.to_string()),
            ("SCRAMJET__RELAY__POLL_INTERVAL", "200ms".into()),
            ("SCRAMJET__LOG__LEVEL", "warn".into()),
        ];
        RelayProcess {
            args: vec!["relay".into(), "--source-url".into(), source.url()],
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            http: format!("127.0.0.1:{port}").parse().unwrap(),
            child: None,
        }
    }

    async fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scramjet"));
        cmd.args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        wait_status(self.http, "/readyz", 200).await;
    }

    async fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg("-KILL")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
    }

    async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("exits after SIGTERM")
            .unwrap()
            .unwrap()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const ROWS: i64 = 100;
const UPDATES: i64 = 100;

/// Creates `item` with `rows` rows at n = 0, attached as type `item`, and
/// `marker` (type `marker`), whose row `sentinel` ends a test's events.
async fn create_items(source: &SourceDb, rows: i64) {
    source
        .db
        .batch_execute(&format!(
            "CREATE TABLE item (id int PRIMARY KEY, n int NOT NULL);
             SELECT scramjet.attach('item', 'item', 'id');
             CREATE TABLE marker (id text PRIMARY KEY);
             SELECT scramjet.attach('marker', 'marker', 'id');
             INSERT INTO item SELECT i, 0 FROM generate_series(1, {rows}) AS i;"
        ))
        .await
        .unwrap();
}

/// Collects change events (on a queue named after `suffix`) until the
/// sentinel marker; `received` counts them as they come.
async fn watch_until_sentinel(
    watcher: &Connection,
    app: &TestApp,
    suffix: &str,
) -> (Arc<AtomicUsize>, JoinHandle<Vec<ReceivedEvent>>) {
    let received = Arc::new(AtomicUsize::new(0));
    let stream = watch_changes(
        watcher,
        &app.settings,
        &format!("{}.{suffix}", app.names.prefix),
    )
    .await;
    let collector = collect_until(stream, "sentinel", received.clone());
    (received, collector)
}

/// `count` statements, each `n = n + 1` on every row of `item` (one
/// transaction each), `pause` apart.
fn burst(source: &SourceDb, count: i64, pause: Duration) -> JoinHandle<()> {
    let url = source.url();
    tokio::spawn(async move {
        let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        for _ in 0..count {
            db.batch_execute("UPDATE item SET n = n + 1").await.unwrap();
            tokio::time::sleep(pause).await;
        }
    })
}

/// Waits until `received` reaches `at_least`.
async fn wait_received(received: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + PATIENCE;
    while received.load(Ordering::Relaxed) < at_least {
        assert!(Instant::now() < deadline, "{at_least} events arrive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Updates written before the relay is killed (or stopped); the rest of the
/// burst is written while it is gone, so it has that much left to move.
const BEFORE_KILL: i64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_10000_updates_to_100_rows_survives_a_sigkilled_relay_without_loss_or_reordering()
 {
    let started = Instant::now();
    let source = SourceDb::create().await;
    let app = spawn_app().await;
    let watcher = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let (received, collector) = watch_until_sentinel(&watcher, &app, "burst").await;
    create_items(&source, ROWS).await;
    let mut relay = RelayProcess::new(&app, &source, 100);
    relay.start().await;

    // Kill it mid-burst: the first updates are being relayed, the rest not written yet.
    let total = (ROWS * (UPDATES + 1)) as usize;
    let writer = burst(&source, BEFORE_KILL, Duration::from_millis(2));
    wait_received(&received, 1000).await;
    relay.kill9().await;
    let at_kill = received.load(Ordering::Relaxed);
    writer.await.unwrap();
    burst(&source, UPDATES - BEFORE_KILL, Duration::ZERO)
        .await
        .unwrap();
    let left = source.outbox_len().await;
    assert!(
        left >= (UPDATES - BEFORE_KILL) * ROWS,
        "the rest of the burst waits in the outbox: {left}"
    );
    relay.start().await;
    source
        .db
        .batch_execute("INSERT INTO marker VALUES ('sentinel')")
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the sentinel arrives")
        .unwrap();

    let raw = events.len();
    let (events, repeats) = dedupe(events);
    let items: Vec<ReceivedEvent> = events
        .into_iter()
        .filter(|e| e.body["type"] == "item")
        .collect();
    assert_eq!(items.len(), total, "one event per committed change");
    assert_complete_and_in_order(&items, ROWS, UPDATES);
    assert_eq!(
        resources_of(&app, "item").await,
        source
            .documents("SELECT id::text, to_jsonb(i) FROM item i")
            .await
    );
    assert_eq!(source.outbox_len().await, 0);
    let exit = relay.terminate().await;
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    // Rows published again after the kill (confirmed, not yet deleted) show
    // up as duplicates the daemon dropped by message_id, never as events.
    let (_, metrics) = app.get("/metrics").await;
    let duplicates = metrics
        .lines()
        .find_map(|l| l.strip_prefix("scramjet_messages_total{outcome=\"duplicate\"} "))
        .unwrap_or("0");
    println!(
        "source relay burst: {total} changes, SIGKILL after {at_kill} events with {left} rows \
         waiting; {raw} events received ({repeats} repeated event_ids), {duplicates} messages \
         republished and dropped as duplicates, 0 lost, 0 reordered; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_outbox_publish_every_change_in_order_and_one_takes_over_from_the_other()
{
    const SMALL_ROWS: i64 = 20;
    let source = SourceDb::create().await;
    let app = spawn_app().await;
    let watcher = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let (received, collector) = watch_until_sentinel(&watcher, &app, "two").await;
    create_items(&source, SMALL_ROWS).await;
    let mut first = InProcessRelay::start(&app, &source, 20).await;
    let second = InProcessRelay::start(&app, &source, 20).await;
    let total = (SMALL_ROWS * (UPDATES + 1)) as usize;
    let writer = burst(&source, BEFORE_KILL, Duration::from_millis(2));
    wait_received(&received, total / 5).await;
    first.stop().await;
    writer.await.unwrap();
    let by_first = first.published("save");
    // Written after the first relay stopped: the second must publish it all.
    burst(&source, UPDATES - BEFORE_KILL, Duration::ZERO)
        .await
        .unwrap();
    source
        .db
        .batch_execute("INSERT INTO marker VALUES ('sentinel')")
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the sentinel arrives")
        .unwrap();
    let (events, _) = dedupe(events);
    let items: Vec<ReceivedEvent> = events
        .into_iter()
        .filter(|e| e.body["type"] == "item")
        .collect();
    assert_eq!(items.len(), total, "one event per committed change");
    assert_complete_and_in_order(&items, SMALL_ROWS, UPDATES);
    let by_second = second.published("save");
    assert_eq!(
        by_first + by_second,
        total as u64 + 1,
        "each row published once (+ the sentinel)"
    );
    assert!(
        by_second as i64 > (UPDATES - BEFORE_KILL) * SMALL_ROWS,
        "the second relay took over: {by_second}"
    );
    assert_eq!(
        resources_of(&app, "item").await,
        source
            .documents("SELECT id::text, to_jsonb(i) FROM item i")
            .await
    );
}

fn service_addr(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
        .parse()
        .unwrap()
}

/// Polls the relay's `/readyz` until its JSON says `service` is `up`.
async fn wait_service(relay: &InProcessRelay, service: &str, up: bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = http_get(relay.http, "/readyz").await;
        let body: Value = serde_json::from_str(&body).unwrap();
        if body[service] == up {
            assert_eq!(status == 200, body["ready"] == true, "{body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said {service} = {up}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_rides_out_losing_the_source_database_and_rabbitmq_and_loses_nothing() {
    const FEW_ROWS: i64 = 10;
    const ROUNDS: i64 = 10;
    let source = SourceDb::create().await;
    let app = spawn_app().await;
    let pg = Proxy::start(service_addr(&postgres_base())).await;
    let mq = Proxy::start(service_addr(&amqp_url())).await;
    let watcher = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let (received, collector) = watch_until_sentinel(&watcher, &app, "outage").await;
    create_items(&source, FEW_ROWS).await;
    let mut through_proxies = app.settings.clone();
    through_proxies.amqp.url = via(&amqp_url(), mq.addr);
    through_proxies.relay.source_url = Some(Secret(via(&source.url(), pg.addr)));
    let relay = InProcessRelay::start_with(through_proxies).await;
    let states = (FEW_ROWS * (3 * ROUNDS + 1)) as usize;

    burst(&source, ROUNDS, Duration::ZERO).await.unwrap();
    wait_received(&received, FEW_ROWS as usize).await;
    pg.cut();
    wait_service(&relay, "source", false).await;
    // The application goes on writing; its changes wait in the outbox.
    burst(&source, ROUNDS, Duration::ZERO).await.unwrap();
    pg.restore();
    wait_service(&relay, "source", true).await;
    mq.cut();
    wait_service(&relay, "rabbitmq", false).await;
    burst(&source, ROUNDS, Duration::ZERO).await.unwrap();
    mq.restore();
    wait_service(&relay, "rabbitmq", true).await;
    source
        .db
        .batch_execute("INSERT INTO marker VALUES ('sentinel')")
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the sentinel arrives")
        .unwrap();
    let (events, _) = dedupe(events);
    let items: Vec<ReceivedEvent> = events
        .into_iter()
        .filter(|e| e.body["type"] == "item")
        .collect();
    assert_eq!(items.len(), states, "one event per committed change");
    assert_complete_and_in_order(&items, FEW_ROWS, 3 * ROUNDS);
    for service in ["source", "rabbitmq"] {
        assert!(
            relay.metrics.reconnects.with_label_values(&[service]).get() >= 1,
            "a reconnect to {service} is counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_row_over_max_message_bytes_goes_out_without_its_data_and_the_rows_behind_follow()
{
    let source = SourceDb::create().await;
    source
        .db
        .batch_execute(
            "CREATE TABLE person (person_id text PRIMARY KEY, name text);
             SELECT scramjet.attach('public.person', 'person', 'person_id');",
        )
        .await
        .unwrap();
    let mut app = spawn_app_with(|s| s.limits.max_message_bytes = 4096).await;
    let relay = InProcessRelay::start(&app, &source, 500).await;
    source
        .db
        .batch_execute(&format!(
            "INSERT INTO person VALUES ('big', '{}'); INSERT INTO person VALUES ('small', 'S');",
            "n".repeat(10_000)
        ))
        .await
        .unwrap();
    let event = app.next_event().await;
    assert_eq!((event.id(), event.op()), ("small", "created"));
    let dead = app.next_dead_letter().await;
    println!("a row of 10 KB: a dead letter of {} bytes", dead.data.len());
    let body: Value = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(body["id"], "big");
    assert_eq!(body["truncated"], "max_message_bytes");
    assert!(body["bytes"].as_u64().unwrap() > 10_000, "{body}");
    assert!(dead.data.len() < 4096, "{} bytes", dead.data.len());
    assert_eq!(relay.metrics.reduced.get(), 1);
    assert_eq!(source.outbox_len().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_relays_one_holds_the_active_role_until_it_stops_and_the_other_says_it_stands_by() {
    const ROWS: i64 = 20;
    let source = SourceDb::create().await;
    let app = spawn_app().await;
    create_items(&source, ROWS).await;
    let mut first = InProcessRelay::start(&app, &source, 20).await;
    // The first has taken the role (it published the initial rows) before
    // the second starts.
    let deadline = Instant::now() + PATIENCE;
    while first.metrics.active.get() != 1 {
        assert!(Instant::now() < deadline, "the first relay becomes active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = InProcessRelay::start(&app, &source, 20).await;
    let writer = burst(&source, 30, Duration::from_millis(20));
    // Sampled over the burst: one active relay, always the first.
    let mut samples = Vec::new();
    for _ in 0..40 {
        samples.push((first.metrics.active.get(), second.metrics.active.get()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.await.unwrap();
    assert!(
        samples.iter().all(|s| *s == (1, 0)),
        "(first, second) scramjet_relay_active over 2 s: {samples:?}"
    );
    assert_eq!(second.published("save"), 0, "the standby published nothing");

    // The first stops: the second takes the role and the rows.
    first.stop().await;
    burst(&source, 1, Duration::ZERO).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while second.metrics.active.get() != 1 || second.published("save") == 0 {
        assert!(Instant::now() < deadline, "the second relay takes over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
