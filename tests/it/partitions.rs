//! Partitioned mode (`amqp.partitions` > 1): several daemons, real
//! processes, share the partition queues by leases; each (type, id) is
//! handled by one daemon at a time, in order, across SIGKILLs, new members
//! and a daemon paused with SIGSTOP.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use scramjet::config::Settings;
use serde_json::Value;

use crate::{helpers::*, model::*};

/// Settings of a partitioned test: `partitions` queues, short leases.
fn partitioned(names: &Names, schemas: PathBuf, partitions: u16) -> Settings {
    let mut s = test_settings(names, schemas);
    s.amqp.partitions = partitions;
    s.partitioning.lease_ttl = Duration::from_secs(2);
    s
}

/// A `scramjet run` process whose JSON log goes to a file.
pub(crate) struct Daemon {
    name: &'static str,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Daemon {
    pub(crate) async fn start(
        name: &'static str,
        s: &Settings,
        dir: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scramjet"));
        cmd.arg("run").stdout(file).stderr(Stdio::null());
        let a = &s.amqp;
        let lease = format!("{}ms", s.partitioning.lease_ttl.as_millis());
        let env = [
            ("SCRAMJET__POSTGRES__URL", s.postgres.url.clone()),
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
            ("SCRAMJET__AMQP__PARTITIONS", a.partitions.to_string()),
            ("SCRAMJET__PARTITIONING__LEASE_TTL", lease),
            ("SCRAMJET__HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("SCRAMJET__PIPELINE__BATCH_SIZE", "50".into()),
            ("SCRAMJET__LOG__FORMAT", "json".into()),
            ("SCRAMJET__LOG__LEVEL", "info,tokio_postgres=warn".into()),
            (
                "SCRAMJET__VALIDATION__SCHEMA_DIR",
                s.validation.schema_dir.to_string_lossy().into_owned(),
            ),
        ];
        for (k, v) in env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut daemon = Daemon {
            name,
            log,
            port,
            child: Some(cmd.spawn().unwrap()),
        };
        daemon.wait_ready().await;
        daemon
    }

    async fn wait_ready(&mut self) {
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/readyz").await.0 == 200
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited at start ({status}): {}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(Instant::now() < deadline, "{} became ready", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    async fn kill9(&mut self) {
        self.signal("-KILL");
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
    }

    pub(crate) async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().unwrap();
        tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("exits after SIGTERM")
            .unwrap()
            .unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose message is `message`.
    pub(crate) fn lines(&self, message: &str) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// Messages this daemon committed, from its "batch committed" lines.
    fn processed(&self) -> u64 {
        self.lines("batch committed")
            .iter()
            .map(|f| f["size"].as_u64().unwrap_or(0))
            .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The properties a producer sends: `message_id`, persistent, and the key.
fn keyed(i: usize, body: &str) -> BasicProperties {
    let v: Value = serde_json::from_str(body).unwrap();
    let key = format!(
        "{}/{}",
        v["type"].as_str().unwrap(),
        v["id"].as_str().unwrap()
    );
    let mut headers = FieldTable::default();
    headers.insert("scramjet-key".into(), AMQPValue::LongString(key.into()));
    BasicProperties::default()
        .with_message_id(ShortString::from(format!("msg-{i}")))
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// A process test's surroundings: names, settings with `partitions`, a
/// schema directory, the test's own broker view (a confirm channel, the
/// topology declared) and every event collected until [`Stage::events`].
struct Stage {
    names: Names,
    settings: Settings,
    dir: tempfile::TempDir,
    _connection: Connection,
    channel: Channel,
    done: tokio_util::sync::CancellationToken,
    collector: std::sync::Mutex<Option<tokio::task::JoinHandle<Vec<ReceivedEvent>>>>,
    /// Declared last: drops after the rest.
    _cleanup: Cleanup,
}

impl Stage {
    async fn new(partitions: u16) -> Stage {
        let names = Names::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("person.json"), PERSON_SCHEMA).unwrap();
        let settings = partitioned(&names, dir.path().to_owned(), partitions);
        let cleanup = Cleanup::new(&settings, &names);
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        declare_like_the_daemon(&channel, &settings).await;
        channel.confirm_select(Default::default()).await.unwrap();
        let stream =
            watch_changes(&connection, &settings, &format!("{}.watch", names.prefix)).await;
        let done = tokio_util::sync::CancellationToken::new();
        let collector = collect(stream, done.clone());
        Stage {
            names,
            settings,
            dir,
            _connection: connection,
            channel,
            done,
            collector: std::sync::Mutex::new(Some(collector)),
            _cleanup: cleanup,
        }
    }

    /// Stops collecting (once); the events received, and how many repeats
    /// of an `event_id` were removed.
    async fn events(&self) -> (Vec<ReceivedEvent>, usize) {
        self.done.cancel();
        let collector = self
            .collector
            .lock()
            .unwrap()
            .take()
            .expect("collected once");
        dedupe(collector.await.unwrap())
    }
}

/// Collects every event from `stream` until `done` is cancelled.
fn collect(
    mut stream: lapin::Consumer,
    done: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<ReceivedEvent>> {
    tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            tokio::select! {
                _ = done.cancelled() => return events,
                next = stream.next() => {
                    let Some(Ok(d)) = next else { return events };
                    let raw = String::from_utf8(d.data).unwrap();
                    events.push(ReceivedEvent {
                        body: serde_json::from_str(&raw).unwrap(),
                        raw,
                        routing_key: d.routing_key.to_string(),
                        properties: d.properties,
                    });
                }
            }
        }
    })
}

/// Ready messages in every partition queue of `s`.
async fn depth(channel: &Channel, s: &Settings) -> u32 {
    let mut total = 0;
    for p in 0..s.amqp.partitions {
        let q = channel
            .queue_declare(
                s.amqp.partition_queue(p).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        total += q.message_count();
    }
    total
}

/// Waits until the partition queues and the outbox are empty, staging holds
/// only rejected rows, and no event arrived for a while.
async fn wait_drained(channel: &Channel, s: &Settings, db: &tokio_postgres::Client) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let busy = depth(channel, s).await > 0
            || count(db, "SELECT count(*) FROM outbox").await > 0
            || count(
                db,
                "SELECT count(*) FROM staging WHERE is_valid IS DISTINCT FROM false",
            )
            .await
                > 0;
        match (busy, quiet_since) {
            (true, _) => quiet_since = None,
            (false, None) => quiet_since = Some(Instant::now()),
            (false, Some(t)) if t.elapsed() > Duration::from_secs(3) => return,
            _ => {}
        }
        if Instant::now() > deadline {
            panic!(
                "the daemons did not drain the partitions: {} ready, outbox {}, staging {}",
                depth(channel, s).await,
                count(db, "SELECT count(*) FROM outbox").await,
                count(
                    db,
                    "SELECT count(*) FROM staging WHERE is_valid IS DISTINCT FROM false"
                )
                .await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// No (partition, epoch) was ever taken by two daemons: from every
/// daemon's "took a partition" lines.
fn one_owner_per_epoch(daemons: &[&Daemon]) -> usize {
    let mut owners: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    for d in daemons {
        for f in d.lines("took a partition") {
            owners
                .entry((
                    f["partition"].as_u64().unwrap(),
                    f["epoch"].as_u64().unwrap(),
                ))
                .or_default()
                .insert(f["member"].as_str().unwrap().to_owned());
        }
    }
    for ((p, e), who) in &owners {
        assert_eq!(who.len(), 1, "partition {p} epoch {e} had owners {who:?}");
    }
    owners.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_share_partitions_through_a_sigkill_and_a_new_member_keeping_per_id_order() {
    let stage = Stage::new(8).await;
    let (names, s, channel) = (&stage.names, &stage.settings, &stage.channel);
    let dir = stage.dir.path();

    let mut a = Daemon::start("a", s, dir, &[]).await;
    let b = Daemon::start("b", s, dir, &[]).await;
    let c = Daemon::start("c", s, dir, &[]).await;

    let (bodies, model) = workload(13, 20_000, 300);
    let messages: Vec<(String, BasicProperties)> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let body = versioned(b, i as i64 + 1);
            let properties = keyed(i, &body);
            (body, properties)
        })
        .collect();
    let exchange = s.amqp.inbound_exchange.clone();
    let publisher = tokio::spawn({
        let channel = channel.clone();
        async move {
            // About 2,000 a second: the SIGKILL and the new member land mid-stream.
            for chunk in messages.chunks(200) {
                for (body, properties) in chunk {
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "person.save".into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            properties.clone(),
                        )
                        .await
                        .unwrap();
                }
                assert!(channel.wait_for_confirms().await.unwrap().is_empty());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    tokio::time::sleep(Duration::from_secs(3)).await;
    a.kill9().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = Daemon::start("d", s, dir, &[]).await;
    publisher.await.unwrap();

    let db = connect_db(names).await.unwrap();
    wait_drained(channel, s, &db).await;
    let (events, repeats) = stage.events().await;
    check_events(&events, &model);
    check_final_state(&db, &model).await;
    assert!(
        count(&db, "SELECT count(*) FROM staging").await
            == count(&db, "SELECT count(*) FROM staging WHERE is_valid = false").await,
        "staging holds only rejected rows"
    );

    let processed: Vec<(&str, u64)> = [&a, &b, &c, &d]
        .iter()
        .map(|x| (x.name, x.processed()))
        .collect();
    for (name, n) in &processed {
        assert!(
            *n > 0,
            "daemon {name} processed messages: {processed:?}; log of a: {}",
            a.log_text().lines().take(40).collect::<Vec<_>>().join("\n")
        );
    }
    let epochs = one_owner_per_epoch(&[&a, &b, &c, &d]);
    for x in [&b, &c, &d] {
        assert!(!x.lines("took a partition").is_empty());
    }
    let mut b = b;
    let mut c = c;
    let mut d = d;
    for x in [&mut b, &mut c, &mut d] {
        let exit = x.terminate().await;
        assert!(exit.success(), "{} exits cleanly: {exit:?}", x.name);
    }
    println!(
        "partitions: 8 partitions, {} messages, 3 daemons, 1 SIGKILLed, 1 joined; processed \
         {processed:?}; {epochs} lease epochs, each with one owner; {} events, {repeats} repeats",
        bodies.len(),
        events.len()
    );
}

fn error_of(d: &lapin::message::Delivery) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(scramjet::daemon::ERROR_HEADER))
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("no reason header: {other:?}"),
    }
}

fn with_key(key: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("scramjet-key".into(), AMQPValue::LongString(key.into()));
    BasicProperties::default().with_headers(headers)
}

#[tokio::test]
async fn a_message_in_a_partition_queue_with_a_missing_or_wrong_key_is_dead_lettered() {
    let mut app = spawn_app_with(|s| {
        s.amqp.partitions = 2;
        s.partitioning.lease_ttl = Duration::from_secs(2);
    })
    .await;
    // A keyed save goes through once the daemon holds its partitions.
    app.publish_with(
        save_body("person", "ok", r#"{"name":"A"}"#),
        with_key("person/ok"),
    )
    .await;
    assert_eq!(app.next_event().await.id(), "ok");

    app.publish(save_body("person", "bare", r#"{"name":"B"}"#))
        .await;
    let missing = error_of(&app.next_dead_letter().await);
    assert!(missing.contains("no scramjet-key header"), "{missing}");
    assert!(missing.contains("\"person/bare\""), "{missing}");

    app.publish_with(
        save_body("person", "wrong", r#"{"name":"C"}"#),
        with_key("person/other"),
    )
    .await;
    let wrong = error_of(&app.next_dead_letter().await);
    assert!(
        wrong.contains("\"person/other\" is not this message's <type>/<id> \"person/wrong\""),
        "{wrong}"
    );

    // Straight into a partition queue through the default exchange.
    app.publisher
        .basic_publish(
            "".into(),
            app.settings.amqp.partition_queue(1).as_str().into(),
            BasicPublishOptions::default(),
            delete_body("person", "ok").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let direct = error_of(&app.next_dead_letter().await);
    assert!(direct.contains("no scramjet-key header"), "{direct}");

    let ids: Vec<String> = app.resources().await.into_iter().map(|r| r.1).collect();
    assert_eq!(ids, ["ok"], "no dead-lettered message changed anything");

    // Operations: the ring in partition order, the status table, the metrics.
    let exchange = app.settings.amqp.partition_exchange();
    let mut ring = Command::new("rabbitmq-diagnostics");
    ring.args(["consistent_hash_exchange_ring_state", &exchange]);
    let ring = output_of(ring).await;
    let ring = String::from_utf8_lossy(&ring.stdout);
    for p in 0..2 {
        let line = format!(
            "Ring index: {p}, queue: '{}'",
            app.settings.amqp.partition_queue(p)
        );
        assert!(ring.contains(&line), "{ring}");
    }
    let s = &app.settings;
    let mut status = crate::cli::scramjet();
    status
        .arg("status")
        .env("SCRAMJET__POSTGRES__URL", &s.postgres.url)
        .env("SCRAMJET__AMQP__URL", &s.amqp.url)
        .env("SCRAMJET__AMQP__INBOUND_QUEUE", &s.amqp.inbound_queue)
        .env(
            "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
            &s.amqp.dead_letter_queue,
        )
        .env("SCRAMJET__AMQP__PARTITIONS", "2")
        .env("SCRAMJET__LOG__LEVEL", "warn");
    let out = output_of(status).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("partitions: 2, 1 live daemon(s)"), "{text}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 5 && (w[0] == "0" || w[0] == "1"))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for r in &rows {
        // partition, epoch 1, 0 ready, 0 outbox rows, this daemon's name.
        assert_eq!(&r[1..4], ["1", "0", "0"], "{text}");
        assert!(text.contains(&format!("member {}", r[4])), "{text}");
    }
    // Refreshed at every lease tick (400 ms here).
    let deadline = Instant::now() + PATIENCE;
    let metrics = loop {
        let (_, metrics) = app.get("/metrics").await;
        if metrics.contains(r#"scramjet_partition_queue_depth{partition="0"} 0"#)
            || Instant::now() > deadline
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metrics.contains("scramjet_partitions_owned 2"), "{metrics}");
    assert!(
        metrics.contains(r#"scramjet_partition_handovers_total{kind="taken"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"scramjet_partition_queue_depth{partition="0"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn partitioned_start_up_refuses_a_single_inbound_queue_that_still_holds_messages() {
    let names = Names::new();
    let dir = tempfile::tempdir().unwrap();
    let single = test_settings(&names, dir.path().to_owned());
    let s = partitioned(&names, dir.path().to_owned(), 4);
    let _cleanup = Cleanup::new(&s, &names);
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    // Left by single-queue daemons: two messages nobody consumed.
    declare_like_the_daemon(&channel, &single).await;
    for id in ["a", "b"] {
        channel
            .basic_publish(
                single.amqp.inbound_exchange.as_str().into(),
                "person.save".into(),
                BasicPublishOptions::default(),
                save_body("person", id, r#"{"name":"A"}"#).as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let refused = match scramjet::daemon::App::build(s.clone()).await {
        Ok(_) => panic!("a partitioned daemon started over a full single queue"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("still holds 2 message(s) from single-queue mode"),
        "{refused}"
    );
    assert!(!refused.contains('\n'), "one line: {refused}");

    // Once drained, it starts, and the single queue no longer collects messages.
    channel
        .queue_purge(
            single.amqp.inbound_queue.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    let (_http, shutdown, running, _) = launch(&s).await;
    channel
        .basic_publish(
            s.amqp.inbound_exchange.as_str().into(),
            "person.save".into(),
            BasicPublishOptions::default(),
            save_body("person", "c", r#"{"name":"C"}"#).as_bytes(),
            with_key("person/c"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let left = channel
        .queue_declare(
            single.amqp.inbound_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(left.message_count(), 0, "the single queue was unbound");
    let db = connect_db(&names).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while count(&db, "SELECT count(*) FROM resources WHERE id = 'c'").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the save went through the partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_daemon_that_lost_its_leases_never_commits_its_batch_in_hand() {
    let stage = Stage::new(4).await;
    let (names, s, channel) = (&stage.names, &stage.settings, &stage.channel);
    let dir = stage.dir.path();

    // The paused one lingers on each batch, so that it has one in hand.
    let mut paused = Daemon::start(
        "paused",
        s,
        dir,
        &[
            ("SCRAMJET__PIPELINE__LINGER_MS", "1500"),
            ("SCRAMJET__PIPELINE__BATCH_SIZE", "500"),
        ],
    )
    .await;
    let mut other = Daemon::start("other", s, dir, &[]).await;

    let (bodies, model) = workload(29, 3000, 60);
    let exchange = s.amqp.inbound_exchange.clone();
    let publisher = tokio::spawn({
        let channel = channel.clone();
        async move {
            for (i, b) in bodies.iter().enumerate() {
                let body = versioned(b, i as i64 + 1);
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "person.save".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        keyed(i, &body),
                    )
                    .await
                    .unwrap();
                if i % 20 == 19 {
                    assert!(channel.wait_for_confirms().await.unwrap().is_empty());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            assert!(channel.wait_for_confirms().await.unwrap().is_empty());
        }
    });

    // Paused inside a linger: shortly after a batch committed, while the
    // next one gathers. A fixed delay could land between two batches, with
    // none in hand, or on the batch the paused daemon finishes when it hands
    // partitions over to the other: so, a batch committed once the other
    // took its share (which the paused one released first).
    let deadline = Instant::now() + Duration::from_secs(20);
    while other.lines("took a partition").is_empty() {
        assert!(Instant::now() < deadline, "the other daemon took its share");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let committed = paused.lines("batch committed").len();
    while paused.lines("batch committed").len() <= committed {
        assert!(
            Instant::now() < deadline,
            "the paused daemon committed a batch after sharing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = paused.lines("took a partition").len();
    assert!(before > 0, "the paused daemon held partitions");
    paused.signal("-STOP");
    // Its leases (2 s) expire and the other daemon takes them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while other.lines("took a partition").len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the other daemon took every partition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    paused.signal("-CONT");
    publisher.await.unwrap();

    let db = connect_db(names).await.unwrap();
    wait_drained(channel, s, &db).await;
    let (events, _) = stage.events().await;
    check_events(&events, &model);
    check_final_state(&db, &model).await;
    let lost = paused.lines(
        "lost the lease on a partition (it expired and another daemon took it); dropping its \
         consumer, whose batch in hand cannot commit",
    );
    let abandoned = paused.lines("batch abandoned, not committed; the broker redelivers it");
    assert!(!lost.is_empty(), "the paused daemon saw it lost its leases");
    assert!(
        !abandoned.is_empty(),
        "its batch in hand was abandoned, not committed; its log:\n{}",
        paused.log_text()
    );
    one_owner_per_epoch(&[&paused, &other]);
    for d in [&mut paused, &mut other] {
        assert!(d.terminate().await.success());
    }
    println!(
        "fencing: {} leases lost, {} batches abandoned after SIGCONT; {} events right",
        lost.len(),
        abandoned.len(),
        events.len()
    );
}

/// Publishes `body` straight into `queue` through the default exchange.
async fn into_queue(channel: &Channel, queue: &str, body: &str) {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Starts an in-process daemon on `s`, publishes `n` keyed saves of type
/// `t`, waits until `resources` holds them, and stops it.
async fn run_and_save(s: &Settings, channel: &Channel, db_names: &Names, t: &str, n: usize) {
    let (_http, shutdown, running, _) = launch(s).await;
    for i in 0..n {
        let id = format!("{t}-{i}");
        channel
            .basic_publish(
                s.amqp.inbound_exchange.as_str().into(),
                "person.save".into(),
                BasicPublishOptions::default(),
                save_body("person", &id, r#"{"name":"A"}"#).as_bytes(),
                with_key(&format!("person/{id}")),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let db = connect_db(db_names).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    let like = format!("{t}-%");
    while count_like(&db, &like).await < n as i64 {
        assert!(Instant::now() < deadline, "{n} saves of {t} were stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

async fn count_like(db: &tokio_postgres::Client, like: &str) -> i64 {
    db.query_one("SELECT count(*) FROM resources WHERE id LIKE $1", &[&like])
        .await
        .unwrap()
        .get(0)
}

async fn refused(s: &Settings) -> String {
    match scramjet::daemon::App::build(s.clone()).await {
        Ok(_) => panic!("the daemon started"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_partitions_or_the_single_queue_again_leave_no_queue_bound_that_nobody_consumes() {
    let names = Names::new();
    let dir = tempfile::tempdir().unwrap();
    let four = partitioned(&names, dir.path().to_owned(), 4);
    let two = partitioned(&names, dir.path().to_owned(), 2);
    let single = test_settings(&names, dir.path().to_owned());
    let _cleanup = Cleanup::new(&four, &names);
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    declare_like_the_daemon(&channel, &four).await;
    run_and_save(&four, &channel, &names, "four", 40).await;

    // A message left in a partition that 2 partitions no longer have.
    let p3 = four.amqp.partition_queue(3);
    into_queue(&channel, &p3, &save_body("person", "left", "{}")).await;
    let why = refused(&two).await;
    assert!(
        why.contains(&format!(
            "{p3} still holds 1 message(s) from amqp.partitions = 4"
        )),
        "{why}"
    );
    channel
        .queue_purge(p3.as_str().into(), Default::default())
        .await
        .unwrap();

    // Drained, 2 partitions start and p2, p3 receive nothing any more.
    run_and_save(&two, &channel, &names, "two", 40).await;
    for p in [2, 3] {
        assert_eq!(depth_of(&channel, &four.amqp.partition_queue(p)).await, 0);
    }

    // Back to the single queue: likewise refused while a partition holds one.
    let p1 = four.amqp.partition_queue(1);
    into_queue(&channel, &p1, &save_body("person", "left", "{}")).await;
    let why = refused(&single).await;
    assert!(
        why.contains(&format!("{p1} still holds 1 message(s)")),
        "{why}"
    );
    channel
        .queue_purge(p1.as_str().into(), Default::default())
        .await
        .unwrap();
    // Refused before the single queue was bound: a message published now
    // still goes to the partitions only.
    channel
        .basic_publish(
            single.amqp.inbound_exchange.as_str().into(),
            "person.save".into(),
            BasicPublishOptions::default(),
            save_body("person", "probe", "{}").as_bytes(),
            with_key("person/probe"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(depth_of(&channel, &single.amqp.inbound_queue).await, 0);
    for p in 0..2 {
        let q = four.amqp.partition_queue(p);
        channel
            .queue_purge(q.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    run_and_save(&single, &channel, &names, "one", 40).await;
    for p in 0..4 {
        assert_eq!(
            depth_of(&channel, &four.amqp.partition_queue(p)).await,
            0,
            "partition {p} receives nothing in single-queue mode"
        );
    }
}

async fn depth_of(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

#[tokio::test]
async fn status_reports_a_missing_queue_without_hiding_the_ones_after_it() {
    let app = spawn_app_with(|s| {
        s.amqp.partitions = 2;
        s.partitioning.lease_ttl = Duration::from_secs(2);
    })
    .await;
    let s = &app.settings;
    // Asked about 3 partitions where 2 exist: .p2 is missing, the
    // dead-letter queue listed after it is not.
    let mut status = crate::cli::scramjet();
    status
        .arg("status")
        .env("SCRAMJET__POSTGRES__URL", &s.postgres.url)
        .env("SCRAMJET__AMQP__URL", &s.amqp.url)
        .env("SCRAMJET__AMQP__INBOUND_QUEUE", &s.amqp.inbound_queue)
        .env(
            "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
            &s.amqp.dead_letter_queue,
        )
        .env("SCRAMJET__AMQP__PARTITIONS", "3")
        .env("SCRAMJET__LOG__LEVEL", "warn");
    let out = output_of(status).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |queue: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("queue {queue}:")))
            .unwrap_or_else(|| panic!("{text}"))
            .to_owned()
    };
    assert!(
        line(&s.amqp.partition_queue(2)).ends_with("missing message(s) ready"),
        "{text}"
    );
    assert!(
        line(&s.amqp.dead_letter_queue).ends_with(": 0 message(s) ready"),
        "{text}"
    );
}
