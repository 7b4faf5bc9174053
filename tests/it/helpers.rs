//! The test harness: every test gets its own database, its own exchange and
//! queue names, and its own schema directory, so tests run in parallel
//! against the real PostgreSQL and RabbitMQ without seeing each other's data.
//! Everything is removed again when the `TestApp` is dropped.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    message::Delivery,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use scramjet::{config::Settings, daemon::App};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The server the tests use; override with SCRAMJET_TEST_POSTGRES (no database part).
pub fn postgres_base() -> String {
    std::env::var("SCRAMJET_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The broker the tests use; override with SCRAMJET_TEST_AMQP.
pub fn amqp_url() -> String {
    std::env::var("SCRAMJET_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// How long to wait for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The person schema the tests validate against.
pub const PERSON_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["name"],
  "properties": {
    "name": {"type": "string", "minLength": 1},
    "age": {"type": "integer", "minimum": 0}
  }
}"#;

/// A received change event.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    /// Parsed body.
    pub body: Value,
    /// Raw body text.
    pub raw: String,
    /// Routing key.
    pub routing_key: String,
    /// AMQP properties.
    pub properties: BasicProperties,
}

impl ReceivedEvent {
    /// `op` of the body.
    pub fn op(&self) -> &str {
        self.body["op"].as_str().expect("op is a string")
    }
    /// `id` of the body.
    pub fn id(&self) -> &str {
        self.body["id"].as_str().expect("id is a string")
    }
}

/// Names unique to one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub database: String,
    pub prefix: String,
}

impl Names {
    pub fn new() -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Names {
            database: format!("scramjet_test_{}", &tag[..16]),
            prefix: format!("test-{}", &tag[..16]),
        }
    }
}

/// Settings for a test: its own names, port 0, its own schema directory.
pub fn test_settings(names: &Names, schema_dir: PathBuf) -> Settings {
    let mut s = Settings::default();
    s.postgres.url = direct_db_url(names);
    s.amqp.url = amqp_url();
    s.amqp.inbound_exchange = format!("{}.inbound", names.prefix);
    s.amqp.inbound_queue = format!("{}.inbound", names.prefix);
    s.amqp.changes_exchange = format!("{}.changes", names.prefix);
    s.amqp.dead_letter_exchange = format!("{}.dead", names.prefix);
    s.amqp.dead_letter_queue = format!("{}.dead", names.prefix);
    s.validation.schema_dir = schema_dir;
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s.startup.connect_attempts = 3;
    s.startup.connect_backoff_ms = 200;
    s
}

/// A daemon running in-process, plus the test's own view of the broker and database.
pub struct TestApp {
    pub settings: Settings,
    pub names: Names,
    pub http: SocketAddr,
    /// Client connected to the test database.
    pub db: tokio_postgres::Client,
    /// The test's broker connection (publishing, watching events and dead letters).
    _amqp: Connection,
    /// Confirm-mode channel for publishing inbound messages.
    pub publisher: Channel,
    /// Change events, from a private queue bound to the changes exchange with `#`.
    pub events: lapin::Consumer,
    /// Dead letters, consumed from the daemon's dead-letter queue.
    pub dead: lapin::Consumer,
    shutdown: CancellationToken,
    running: Option<JoinHandle<anyhow::Result<()>>>,
    /// The daemon's schema directory (holds `person.json`).
    pub schema_dir: tempfile::TempDir,
    /// The daemon's schemas, to reload them as SIGHUP does.
    pub schemas: std::sync::Arc<scramjet::domain::validate::Schemas>,
    /// Declared last, so it drops after the daemon task is stopped.
    _cleanup: Cleanup,
}

/// Removes a test's database, exchanges and queues when dropped — also when
/// the test panics half-way through setting up.
pub struct Cleanup {
    settings: Settings,
    names: Names,
}

impl Cleanup {
    pub fn new(settings: &Settings, names: &Names) -> Cleanup {
        Cleanup {
            settings: settings.clone(),
            names: names.clone(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let names = self.names.clone();
        // Drop may run inside a test's runtime; clean up from a thread with its own.
        on_own_runtime(move || async move { cleanup(&settings, &names).await })
            .join()
            .expect("cleanup does not panic");
    }
}

/// Runs the future `work` makes on a thread of its own, with a runtime of
/// its own: for async cleanup from `Drop` (which may run inside a test's
/// runtime), and for load that must not share the daemon's runtime.
pub fn on_own_runtime<F>(
    work: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<F::Output>
where
    F: std::future::Future,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work())
    })
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a daemon with settings adjusted by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let schemas = tempfile::tempdir().unwrap();
    std::fs::write(schemas.path().join("person.json"), PERSON_SCHEMA).unwrap();
    let names = Names::new();
    let mut settings = test_settings(&names, schemas.path().to_owned());
    adjust(&mut settings);
    let cleanup_guard = Cleanup::new(&settings, &names);

    // Watch queues exist before the daemon starts, so no event is missed.
    let amqp = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ is reachable");
    let watch = amqp.create_channel().await.unwrap();
    declare_like_the_daemon(&watch, &settings).await;
    let events = watch_changes(&amqp, &settings, &format!("{}.watch", names.prefix)).await;
    let dead_channel = amqp.create_channel().await.unwrap();
    let dead = dead_channel
        .basic_consume(
            settings.amqp.dead_letter_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = amqp.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let (http, shutdown, running, schema_handle) = launch(&settings).await;
    let db = connect_db(&names)
        .await
        .expect("the daemon created the database");
    TestApp {
        db,
        settings,
        names,
        http,
        _amqp: amqp,
        publisher,
        events,
        dead,
        shutdown,
        running: Some(running),
        schema_dir: schemas,
        schemas: schema_handle,
        _cleanup: cleanup_guard,
    }
}

/// Builds the daemon and runs it on a task.
pub async fn launch(
    settings: &Settings,
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<anyhow::Result<()>>,
    std::sync::Arc<scramjet::domain::validate::Schemas>,
) {
    let app = App::build(settings.clone())
        .await
        .expect("the daemon starts");
    let http = app.http_addr();
    let schemas = app.schemas();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    (http, shutdown, running, schemas)
}

/// Declares an exclusive queue `queue`, gone with the connection, that
/// receives everything published to `exchange`.
pub async fn bind_private_queue(channel: &Channel, queue: &str, exchange: &str) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// A consumer (no-ack) of everything published to the changes exchange,
/// through an exclusive queue `queue` that goes away with the connection.
pub async fn watch_changes(amqp: &Connection, settings: &Settings, queue: &str) -> lapin::Consumer {
    let channel = amqp.create_channel().await.unwrap();
    bind_private_queue(&channel, queue, &settings.amqp.changes_exchange).await;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Declares the topology exactly as the daemon does (same arguments), so the
/// test can bind and publish before the daemon runs.
pub async fn declare_like_the_daemon(channel: &Channel, settings: &Settings) {
    scramjet::daemon::declare_topology(channel, &settings.amqp)
        .await
        .unwrap();
    // Make sure the exchange kinds are what the contract says (declare is idempotent).
    channel
        .exchange_declare(
            settings.amqp.changes_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// A client on the test database, straight to the server (never through a test proxy).
pub async fn connect_db(names: &Names) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&direct_db_url(names), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The test database's URL, straight to the server.
pub fn direct_db_url(names: &Names) -> String {
    format!("{}/{}", postgres_base(), names.database)
}

impl TestApp {
    /// Builds and runs the daemon (again, after `stop`).
    pub async fn start(&mut self) {
        assert!(self.running.is_none(), "already running");
        let (http, shutdown, running, schemas) = launch(&self.settings).await;
        self.http = http;
        self.schemas = schemas;
        self.shutdown = shutdown;
        self.running = Some(running);
    }

    /// Asks the daemon to shut down and waits until it has.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.running.take() {
            tokio::time::timeout(PATIENCE, handle)
                .await
                .expect("the daemon stops in time")
                .expect("the daemon task does not panic")
                .expect("the daemon stops cleanly");
        }
    }

    /// Publishes a raw body to the inbound exchange and waits for the broker's confirm.
    pub async fn publish(&self, body: impl AsRef<[u8]>) {
        self.publish_with(body, BasicProperties::default()).await;
    }

    /// Publishes with properties.
    pub async fn publish_with(&self, body: impl AsRef<[u8]>, properties: BasicProperties) {
        let confirm = self
            .publisher
            .basic_publish(
                self.settings.amqp.inbound_exchange.as_str().into(),
                "test.save".into(),
                BasicPublishOptions::default(),
                body.as_ref(),
                properties.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// Publishes many bodies, waiting for all confirms at the end.
    pub async fn publish_many(&self, bodies: &[String]) {
        for body in bodies {
            self.publisher
                .basic_publish(
                    self.settings.amqp.inbound_exchange.as_str().into(),
                    "test.bulk".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
        }
        let returned = self.publisher.wait_for_confirms().await.unwrap();
        assert!(returned.is_empty());
    }

    /// Publishes a save of `data` (raw JSON text, so tests control key order and numbers).
    pub async fn save(&self, entity_type: &str, id: &str, data: &str) {
        self.publish(save_body(entity_type, id, data)).await;
    }

    /// Publishes a delete.
    pub async fn delete(&self, entity_type: &str, id: &str) {
        self.publish(delete_body(entity_type, id)).await;
    }

    /// The next change event; panics if none comes in time.
    pub async fn next_event(&mut self) -> ReceivedEvent {
        let delivery = tokio::time::timeout(PATIENCE, self.events.next())
            .await
            .expect("an event arrives in time")
            .expect("the event stream is open")
            .expect("the event is delivered");
        to_event(delivery)
    }

    /// The next `n` events.
    pub async fn next_events(&mut self, n: usize) -> Vec<ReceivedEvent> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_event().await);
        }
        out
    }

    /// Events until (and including) the first one for `id`.
    pub async fn events_until(&mut self, id: &str) -> Vec<ReceivedEvent> {
        let mut out = Vec::new();
        loop {
            let e = self.next_event().await;
            let done = e.id() == id;
            out.push(e);
            if done {
                return out;
            }
        }
    }

    /// The next dead-lettered message.
    pub async fn next_dead_letter(&mut self) -> Delivery {
        tokio::time::timeout(PATIENCE, self.dead.next())
            .await
            .expect("a dead letter arrives in time")
            .expect("the dead-letter stream is open")
            .expect("the dead letter is delivered")
    }

    /// `resources` as (type, id, hash, data text), ordered.
    pub async fn resources(&self) -> Vec<(String, String, String, Value)> {
        self.db
            .query(
                "SELECT type, id, hash, data FROM resources ORDER BY type, id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    /// Number of rows of a table of this test's database.
    pub async fn count(&self, table: &str) -> i64 {
        assert!(["staging", "resources", "outbox"].contains(&table));
        self.db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Polls `/readyz` until 200 or [`PATIENCE`] runs out; returns the last status.
    pub async fn wait_ready(&self) -> u16 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, _) = self.get("/readyz").await;
            if status == 200 || tokio::time::Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the outbox is empty; false if it is not within [`PATIENCE`].
    pub async fn wait_outbox_empty(&self) -> bool {
        wait_outbox_empty(&self.db).await
    }

    /// GET on the daemon's HTTP port: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }
}

/// Waits until the outbox is empty; false if it is not within [`PATIENCE`].
pub async fn wait_outbox_empty(db: &tokio_postgres::Client) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let left: i64 = db
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A minimal HTTP/1.1 GET (the harness needs no HTTP client crate).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_with(addr, path, &[]).await
}

/// GET with extra request headers: (status, body).
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let response = http_get_response(addr, path, headers).await;
    (response.status, response.body)
}

/// A response as [`http_get_response`] reads it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Response headers, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// GET with extra request headers, keeping the response headers.
pub async fn http_get_response(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    http_request(addr, "GET", path, headers).await
}

/// A request without a body (GET, POST, …), the response read to its end.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    // Bodies come chunked from the server; undo that for the tests.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

pub fn save_body(entity_type: &str, id: &str, data: &str) -> String {
    format!(
        r#"{{"action":"save","type":{},"id":{},"data":{data}}}"#,
        serde_json::to_string(entity_type).unwrap(),
        serde_json::to_string(id).unwrap()
    )
}

pub fn delete_body(entity_type: &str, id: &str) -> String {
    format!(
        r#"{{"action":"delete","type":{},"id":{}}}"#,
        serde_json::to_string(entity_type).unwrap(),
        serde_json::to_string(id).unwrap()
    )
}

fn to_event(d: Delivery) -> ReceivedEvent {
    let raw = String::from_utf8(d.data).expect("events are UTF-8");
    ReceivedEvent {
        body: serde_json::from_str(&raw).expect("events are JSON"),
        raw,
        routing_key: d.routing_key.to_string(),
        properties: d.properties,
    }
}

/// A client on the server's `postgres` database, for administrative statements.
pub async fn connect_admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!("{}/postgres", postgres_base()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("PostgreSQL is reachable");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.running.take() {
            handle.abort();
        }
    }
}

/// Removes the test's database, exchanges and queues.
pub async fn cleanup(settings: &Settings, names: &Names) {
    if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let a = &settings.amqp;
            let mut queues = vec![a.inbound_queue.clone(), a.dead_letter_queue.clone()];
            queues.extend((0..a.partitions).map(|p| a.partition_queue(p)));
            for q in &queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for x in [
                &a.inbound_exchange,
                &a.changes_exchange,
                &a.dead_letter_exchange,
                &a.partition_exchange(),
            ] {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    }
    let admin = format!("{}/postgres", postgres_base());
    if let Ok((client, connection)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let _ = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                names.database
            ))
            .await;
    }
}

/// A source database of the test's own with the trigger kit installed;
/// dropped (with any connection left to it) when the test ends, also on panic.
pub struct SourceDb {
    /// Its name.
    name: String,
    /// A client on it (the "application" writing rows).
    pub db: tokio_postgres::Client,
}

impl SourceDb {
    pub async fn create() -> SourceDb {
        let name = format!(
            "scramjet_src_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        connect_admin()
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let (db, connection) = tokio_postgres::connect(
            &format!("{}/{name}", postgres_base()),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let kit =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/triggers/postgresql.sql");
        db.batch_execute(&std::fs::read_to_string(kit).unwrap())
            .await
            .expect("the trigger kit installs");
        SourceDb { name, db }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", postgres_base(), self.name)
    }

    pub async fn outbox_len(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM scramjet.outbox", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Rows of `sql` as (id, document) pairs, sorted by id.
    pub async fn documents(&self, sql: &str) -> Vec<(String, Value)> {
        let mut rows: Vec<(String, Value)> = self
            .db
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }
}

impl Drop for SourceDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        on_own_runtime(move || async move {
            connect_admin()
                .await
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await
                .unwrap();
        })
        .join()
        .expect("the source database is dropped");
    }
}

/// Runs `command` to completion off the test's runtime thread. A
/// `#[tokio::test]` runs the in-process daemon on that one thread: a
/// blocking wait there stops its tasks, its lease heartbeats among them
/// (a slow `rabbitmq-diagnostics` let 2 s leases expire).
pub async fn output_of(mut command: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("the command runs"))
        .await
        .expect("the command's thread does not panic")
}

/// Writes `snapshot` events of every resource of `entity_type` to the
/// outbox, as `scramjet replay --type` does; returns how many.
pub async fn replay_all(settings: &Settings, entity_type: &str) -> u64 {
    scramjet::commands::replay::replay(
        settings,
        &scramjet::commands::replay::ReplayRequest {
            entity_type: entity_type.into(),
            since: None,
            filter: None,
            routing_prefix: String::new(),
            after: None,
            page: 100,
            rate: 0,
        },
    )
    .await
    .unwrap()
}
