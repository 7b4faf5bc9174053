//! Tests that change the broker as a whole: a memory alarm blocks every
//! publishing connection on it, not only this test's. They live in their own
//! binary so that they never overlap the `it` tests (cargo runs test binaries
//! one after another), run one at a time, and always restore the broker.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lapin::{BasicProperties, Connection, ConnectionProperties, options::BasicPublishOptions};
use tokio::sync::Mutex;

// The `it` harness, shared; this binary uses only part of it.
#[allow(dead_code)]
#[path = "it/helpers.rs"]
mod helpers;

use helpers::*;

/// One broker-wide test at a time: two would clear each other's alarm. An
/// async mutex, since the guard is held across awaits; it does not poison,
/// so a test that panicked still lets the next one run.
static BROKER: Mutex<()> = Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A memory alarm on the broker: every connection that publishes is blocked
/// until it is dropped — also when the test panics, so the broker is always
/// given back to the other tests.
struct MemoryAlarm;

impl MemoryAlarm {
    /// Raises the alarm and waits until the broker reports it.
    fn raise() -> MemoryAlarm {
        let alarm = MemoryAlarm;
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
        let deadline = Instant::now() + PATIENCE;
        while !rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory") {
            assert!(Instant::now() < deadline, "the memory alarm goes on");
            std::thread::sleep(Duration::from_millis(200));
        }
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

/// Messages in `queue`, ready and unacked together (what a passive declare
/// does not tell: it counts only the ready ones).
fn queue_depth(queue: &str) -> u64 {
    rabbitmqctl(&["list_queues", "-q", "name", "messages"])
        .lines()
        .find_map(|line| {
            let (name, n) = line.split_once('\t')?;
            (name == queue).then(|| n.trim().parse().unwrap())
        })
        .expect("the queue exists")
}

/// Waits until `done` holds, checking every 200 ms; false after [`PATIENCE`].
async fn eventually<F: std::future::Future<Output = bool>>(mut done: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn saves(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| save_body("person", &format!("p{i}"), &format!(r#"{{"name":"n{i}"}}"#)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_keeps_the_outbox_waiting_but_not_the_inbound_queue() {
    let _broker = BROKER.lock().await;
    const N: usize = 2000;
    // A prefetch far below N: acks that stop going out stop consumption too.
    let mut app = spawn_app_with(|s| {
        s.amqp.prefetch = 100;
        s.pipeline.batch_size = 50;
    })
    .await;
    app.stop().await;
    // Published before the alarm: the test's own publisher is blocked during it.
    app.publish_many(&saves(N)).await;
    let queue = app.settings.amqp.inbound_queue.clone();

    let alarm = MemoryAlarm::raise();
    app.start().await;
    let drained = eventually(|| async {
        app.count("resources").await == N as i64 && queue_depth(&queue) == 0
    })
    .await;
    assert!(
        drained,
        "during the alarm the daemon drains the queue: {} of {N} saves stored, {} messages left",
        app.count("resources").await,
        queue_depth(&queue)
    );
    assert!(app.count("outbox").await > 0, "events wait in the outbox");
    // An outage of the environment, though consuming goes on: /readyz says so.
    let blocked = eventually(|| async {
        let (status, body) = app.get("/readyz").await;
        status == 503 && body.contains(r#""reason":"blocked""#)
    })
    .await;
    assert!(
        blocked,
        "/readyz reports the blocked publisher: {:?}",
        app.get("/readyz").await
    );
    use futures_util::FutureExt;
    assert!(
        futures_util::StreamExt::next(&mut app.events)
            .now_or_never()
            .is_none(),
        "no event is published during the alarm"
    );

    drop(alarm);
    let events = app.next_events(N).await;
    assert!(events.iter().all(|e| e.op() == "created"));
    assert!(app.wait_outbox_empty().await, "the outbox empties");
    assert_eq!(app.wait_ready().await, 200);
    app.stop().await;
}

/// The real binary, run with the test's names and `settings`.
struct Daemon {
    child: std::process::Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_memory_alarm_exits_zero_within_the_shutdown_timeout() {
    let _broker = BROKER.lock().await;
    const N: usize = 200;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let schemas = tempfile::tempdir().unwrap();
    std::fs::write(schemas.path().join("person.json"), PERSON_SCHEMA).unwrap();
    let names = Names::new();
    let s = test_settings(&names, schemas.path().to_owned());
    let _cleanup = Cleanup::new(&s, &names);

    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    declare_like_the_daemon(&channel, &s).await;
    channel.confirm_select(Default::default()).await.unwrap();
    for body in saves(N) {
        channel
            .basic_publish(
                s.amqp.inbound_exchange.as_str().into(),
                "person.save".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
    }
    assert!(channel.wait_for_confirms().await.unwrap().is_empty());
    let _ = conn.close(200, "bye".into()).await;

    let _alarm = MemoryAlarm::raise();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = Daemon {
        child: Command::new(env!("CARGO_BIN_EXE_scramjet"))
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .envs([
                ("SCRAMJET__POSTGRES__URL", s.postgres.url.clone()),
                ("SCRAMJET__AMQP__URL", s.amqp.url.clone()),
                (
                    "SCRAMJET__AMQP__INBOUND_EXCHANGE",
                    s.amqp.inbound_exchange.clone(),
                ),
                (
                    "SCRAMJET__AMQP__INBOUND_QUEUE",
                    s.amqp.inbound_queue.clone(),
                ),
                (
                    "SCRAMJET__AMQP__CHANGES_EXCHANGE",
                    s.amqp.changes_exchange.clone(),
                ),
                (
                    "SCRAMJET__AMQP__DEAD_LETTER_EXCHANGE",
                    s.amqp.dead_letter_exchange.clone(),
                ),
                (
                    "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
                    s.amqp.dead_letter_queue.clone(),
                ),
                ("SCRAMJET__HTTP__LISTEN", format!("127.0.0.1:{port}")),
                ("SCRAMJET__PIPELINE__BATCH_SIZE", "50".into()),
                ("SCRAMJET__LOG__LEVEL", "warn".into()),
                ("SCRAMJET__SHUTDOWN__TIMEOUT", "3s".into()),
                (
                    "SCRAMJET__VALIDATION__SCHEMA_DIR",
                    schemas.path().to_string_lossy().into_owned(),
                ),
            ])
            .spawn()
            .unwrap(),
    };
    // The daemon creates the database; then its rows tell how far it got.
    let deadline = Instant::now() + PATIENCE;
    let client = loop {
        if let Ok(client) = connect_db(&names).await {
            break client;
        }
        assert!(Instant::now() < deadline, "the daemon creates its database");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let count = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
        }
    };
    let stored =
        eventually(|| async { count("resources").await > 0 && count("outbox").await > 0 }).await;
    assert!(stored, "the daemon stores saves during the alarm");

    let asked = Instant::now();
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let margin = Duration::from_secs(2);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < TIMEOUT + margin,
            "the daemon exits within shutdown.timeout (3 s) and a margin"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the daemon exits 0: {status}");
    assert!(
        count("outbox").await > 0,
        "the events it could not publish stay in the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_told_to_stop_during_a_memory_alarm_stops_within_its_deadlines() {
    let _broker = BROKER.lock().await;
    let app = spawn_app().await;
    let source = SourceDb::create().await;
    source
        .db
        .batch_execute(
            "CREATE TABLE person (person_id text PRIMARY KEY, name text);
             SELECT scramjet.attach('public.person', 'person', 'person_id');",
        )
        .await
        .unwrap();
    let mut s = app.settings.clone();
    s.relay.source_url = Some(scramjet::config::Secret(source.url()));
    s.relay.http_listen = "127.0.0.1:0".parse().unwrap();
    s.relay.poll_interval = Duration::from_millis(200);
    let relay = scramjet::producer::Relay::build(s).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut handle = tokio::spawn(relay.run(shutdown.clone()));
    source
        .db
        .batch_execute("INSERT INTO person VALUES ('p1', 'Ada')")
        .await
        .unwrap();
    let published = eventually(|| async { source.outbox_len().await == 0 }).await;
    assert!(published, "the relay publishes before the alarm");

    let _alarm = MemoryAlarm::raise();
    source
        .db
        .batch_execute("INSERT INTO person VALUES ('p2', 'Bob')")
        .await
        .unwrap();
    // Its publish of p2 is now blocked with the connection.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    shutdown.cancel();
    // A round waits at most CONFIRM_TIMEOUT (30 s) for its confirms, and
    // closing waits at most REPLY_TIMEOUT (10 s) for each answer.
    let stopped = tokio::time::timeout(Duration::from_secs(60), &mut handle).await;
    if stopped.is_err() {
        handle.abort();
    }
    assert!(
        stopped.is_ok(),
        "the relay stops within 60 s of being told to, even on a blocked broker"
    );
    println!(
        "the relay stopped {:?} after being told to",
        asked.elapsed()
    );
    assert_eq!(
        source.outbox_len().await,
        1,
        "the row it could not publish stays in the outbox"
    );
}

/// The consistent-hash plugin disabled until dropped, then enabled again.
struct HashPluginDisabled;

impl HashPluginDisabled {
    fn disable() -> HashPluginDisabled {
        plugins(&["disable", "rabbitmq_consistent_hash_exchange"]);
        HashPluginDisabled
    }
}

impl Drop for HashPluginDisabled {
    fn drop(&mut self) {
        plugins(&["enable", "rabbitmq_consistent_hash_exchange"]);
    }
}

fn plugins(args: &[&str]) {
    let out = Command::new("rabbitmq-plugins")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("rabbitmq-plugins runs");
    assert!(out.success(), "rabbitmq-plugins {args:?} failed");
}

#[tokio::test]
async fn partitions_without_the_consistent_hash_plugin_fail_at_start_with_one_line() {
    let _broker = BROKER.lock().await;
    let names = Names::new();
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(&names, dir.path().to_owned());
    s.amqp.partitions = 4;
    let _cleanup = Cleanup::new(&s, &names);
    let refused = {
        let _disabled = HashPluginDisabled::disable();
        let started = Instant::now();
        let result = scramjet::daemon::App::build(s.clone()).await;
        let error = match result {
            Ok(_) => panic!("a partitioned daemon started without the plugin"),
            Err(e) => format!("{e:#}"),
        };
        // No start-up retries for what retrying cannot change.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        error
    };
    assert!(
        refused.contains("amqp.partitions = 4 needs RabbitMQ's exchange type x-consistent-hash")
            && refused.contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"),
        "{refused}"
    );
    assert!(!refused.contains('\n'), "one line: {refused}");
    // Enabled again, the same settings start.
    let app = scramjet::daemon::App::build(s.clone()).await;
    assert!(app.is_ok(), "starts once the plugin is enabled");
}
