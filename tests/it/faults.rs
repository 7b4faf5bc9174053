//! Correct under faults: connections cut under the daemon (through a proxy of
//! the test's own, so the shared services are never disturbed), and the real
//! binary killed with SIGKILL mid-stream. At the end `resources` equals the
//! model, and the events (after dropping repeats of one `event_id`) are
//! exactly the model's, per id, in order.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties, options::BasicPublishOptions,
    types::ShortString,
};

use crate::{helpers::*, model::*, proxy::*};

pub fn postgres_addr() -> std::net::SocketAddr {
    let url = url::Url::parse(&postgres_base()).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

pub fn amqp_addr() -> std::net::SocketAddr {
    let url = url::Url::parse(&amqp_url()).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672))
        .parse()
        .unwrap()
}

/// Every message carries a unique `message_id` and a `version` rising in
/// publish order: what a producer sends to get exactly-once effects.
fn exactly_once(bodies: &[String]) -> Vec<(String, BasicProperties)> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                versioned(b, i as i64 + 1),
                BasicProperties::default()
                    .with_message_id(ShortString::from(format!("msg-{i}")))
                    .with_delivery_mode(2),
            )
        })
        .collect()
}

async fn publish_all(app: &TestApp, messages: &[(String, BasicProperties)]) {
    for (body, properties) in messages {
        app.publisher
            .basic_publish(
                app.settings.amqp.inbound_exchange.as_str().into(),
                "x".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties.clone(),
            )
            .await
            .unwrap();
    }
    assert!(app.publisher.wait_for_confirms().await.unwrap().is_empty());
}

async fn wait_readyz(app: &TestApp, status: u16) {
    let deadline = Instant::now() + PATIENCE;
    while app.get("/readyz").await.0 != status {
        assert!(Instant::now() < deadline, "/readyz never said {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which service a test cuts off.
#[derive(Clone, Copy)]
enum Service {
    Postgres,
    Rabbitmq,
}

/// Streams a workload through a daemon whose `service` sits behind a proxy,
/// cuts the proxy mid-stream while producers go on publishing, restores it,
/// and checks readiness, the events and the final rows.
async fn survive_an_outage(service: Service, seed: u64, outage: Duration) {
    let (target, name) = match service {
        Service::Postgres => (postgres_addr(), "postgres"),
        Service::Rabbitmq => (amqp_addr(), "rabbitmq"),
    };
    let proxy = Proxy::start(target).await;
    let mut app = spawn_app_with(|s| {
        match service {
            Service::Postgres => s.postgres.url = via(&s.postgres.url, proxy.addr),
            Service::Rabbitmq => s.amqp.url = via(&s.amqp.url, proxy.addr),
        }
        s.pipeline.batch_size = 50;
    })
    .await;
    let (bodies, model) = workload(seed, 1500, 25);
    let messages = exactly_once(&bodies);
    let (first, second) = messages.split_at(700);

    publish_all(&app, first).await;
    let mut events = app.next_events(50).await;
    proxy.cut();
    // 503 may come first from another worker's outage (the publisher's,
    // on the same broker): wait for the service itself to be reported down.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = app.get("/readyz").await;
        if status == 503 && body.contains(&format!("\"{name}\":false")) {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Producers go on publishing while the daemon is cut off.
    publish_all(&app, second).await;
    tokio::time::sleep(outage).await;
    proxy.restore();
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;
    events.extend(app.events_until("sentinel").await);
    wait_readyz(&app, 200).await;

    let (events, _repeats) = dedupe(events);
    check_events(&events, &model);
    check_final_state(&app.db, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_rabbitmq_mid_stream_loses_nothing_and_readyz_says_503_meanwhile() {
    survive_an_outage(Service::Rabbitmq, 21, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_postgresql_mid_stream_loses_nothing_and_readyz_says_503_meanwhile() {
    survive_an_outage(Service::Postgres, 22, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_went_through_but_whose_reply_was_lost_is_not_applied_again() {
    let proxy = Proxy::start(postgres_addr()).await;
    let mut app = spawn_app_with(|s| {
        s.postgres.url = via(&s.postgres.url, proxy.addr);
        // Both saves of p1 in one batch.
        s.pipeline.linger_ms = 300;
    })
    .await;
    assert_eq!(app.wait_ready().await, 200);
    proxy.lose_the_next_commit_reply();
    app.save("person", "p1", r#"{"name":"A"}"#).await;
    app.save("person", "p1", r#"{"name":"B"}"#).await;
    app.save("person", "sentinel", r#"{"name":"S"}"#).await;
    let events = app.events_until("sentinel").await;

    // Applying the batch again over B would have published B→A→B as well.
    let p1: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.id() == "p1")
        .map(|e| {
            (
                e.op().to_owned(),
                e.body["data"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        p1,
        [
            ("created".to_owned(), "A".to_owned()),
            ("updated".to_owned(), "B".to_owned())
        ]
    );
    // The commit's reply really was lost: the pipeline saw the database fail.
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("scramjet_reconnects_total{service=\"postgres\"}")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    let extra = tokio::time::timeout(Duration::from_millis(1500), app.events.next()).await;
    assert!(extra.is_err(), "no event more: {extra:?}");
    let rows = app.resources().await;
    assert_eq!(rows[0].3, serde_json::json!({"name": "B"}));
}

/// A batch's transaction and a publisher's round send `BEGIN` with their
/// first statements instead of waiting for its answer alone: one round trip
/// less each. The fault tests beside this one (a lost COMMIT reply, a cut
/// connection) run on the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_publisher_rounds_send_begin_with_their_first_statements() {
    let proxy = Proxy::start(postgres_addr()).await;
    let mut app = spawn_app_with(|s| {
        s.postgres.url = via(&s.postgres.url, proxy.addr);
    })
    .await;
    assert_eq!(app.wait_ready().await, 200);
    proxy.take_begins();
    // One at a time: each save is a batch of its own, and a publisher round.
    for i in 0..10 {
        app.save("person", &format!("p{i}"), r#"{"name":"A"}"#)
            .await;
        let event = app.next_event().await;
        assert_eq!(
            (event.op(), event.id()),
            ("created", format!("p{i}").as_str())
        );
    }
    let (pipelined, alone) = proxy.take_begins();
    assert!(
        pipelined >= 20,
        "10 batches and 10 rounds, each with BEGIN sent ahead: {pipelined} pipelined, {alone} alone"
    );
    assert_eq!(
        alone, 0,
        "no transaction waits for BEGIN's answer alone ({pipelined} pipelined)"
    );
}

/// The real binary, with its PostgreSQL and RabbitMQ behind the test's proxies.
struct Daemon {
    _schemas: tempfile::TempDir,
    /// Declared last: drops after the child is killed.
    _cleanup: Cleanup,
    env: Vec<(String, String)>,
    port: u16,
    child: Option<Child>,
}

impl Daemon {
    fn new(names: &Names, pg: &Proxy, amqp: &Proxy) -> Daemon {
        let schemas = tempfile::tempdir().unwrap();
        std::fs::write(schemas.path().join("person.json"), PERSON_SCHEMA).unwrap();
        let s = test_settings(names, schemas.path().to_owned());
        let s_for_cleanup = s.clone();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = vec![
            ("SCRAMJET__POSTGRES__URL", via(&s.postgres.url, pg.addr)),
            ("SCRAMJET__AMQP__URL", via(&s.amqp.url, amqp.addr)),
            ("SCRAMJET__AMQP__INBOUND_EXCHANGE", s.amqp.inbound_exchange),
            ("SCRAMJET__AMQP__INBOUND_QUEUE", s.amqp.inbound_queue),
            ("SCRAMJET__AMQP__CHANGES_EXCHANGE", s.amqp.changes_exchange),
            (
                "SCRAMJET__AMQP__DEAD_LETTER_EXCHANGE",
                s.amqp.dead_letter_exchange,
            ),
            (
                "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
                s.amqp.dead_letter_queue,
            ),
            ("SCRAMJET__HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("SCRAMJET__PIPELINE__BATCH_SIZE", "50".into()),
            ("SCRAMJET__LOG__LEVEL", "warn".into()),
            (
                "SCRAMJET__VALIDATION__SCHEMA_DIR",
                schemas.path().to_string_lossy().into_owned(),
            ),
        ];
        let cleanup = Cleanup::new(&s_for_cleanup, names);
        Daemon {
            _schemas: schemas,
            _cleanup: cleanup,
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            port,
            child: None,
        }
    }

    async fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scramjet"));
        cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/readyz").await.0 == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "the daemon became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&mut self, signal: &str) -> Child {
        let child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        child
    }

    async fn kill9(&mut self) {
        let mut child = self.signal("-KILL");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
    }

    async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.signal("-TERM");
        tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("exits after SIGTERM")
            .unwrap()
            .unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_sigkills_and_service_outages_without_losing_or_repeating_an_effect() {
    let names = Names::new();
    let pg = Proxy::start(postgres_addr()).await;
    let mq = Proxy::start(amqp_addr()).await;
    let mut daemon = Daemon::new(&names, &pg, &mq);
    let settings = test_settings(&names, "config/schemas".into());

    // The test's own broker view: straight to RabbitMQ.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    declare_like_the_daemon(&channel, &settings).await;
    channel.confirm_select(Default::default()).await.unwrap();
    let mut stream = watch_changes(&conn, &settings, &format!("{}.watch", names.prefix)).await;
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(Ok(d)) = stream.next().await {
            let raw = String::from_utf8(d.data).unwrap();
            let done = raw.contains("\"id\":\"sentinel\"");
            events.push(ReceivedEvent {
                body: serde_json::from_str(&raw).unwrap(),
                raw,
                routing_key: d.routing_key.to_string(),
                properties: d.properties,
            });
            if done {
                return events;
            }
        }
        panic!("the event stream ended before the sentinel");
    });

    daemon.start().await;

    let (bodies, model) = workload(33, 4000, 40);
    let messages = exactly_once(&bodies);
    let exchange = settings.amqp.inbound_exchange.clone();
    let publisher = tokio::spawn({
        let channel = channel.clone();
        async move {
            // About 1,000 messages a second, so the faults land mid-stream.
            for chunk in messages.chunks(100) {
                for (body, properties) in chunk {
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "x".into(),
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

    let mut kills = 0;
    let mut outages = 0;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        daemon.kill9().await;
        kills += 1;
        daemon.start().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        if round == 0 {
            mq.cut();
        } else if round == 1 {
            pg.cut();
        } else {
            mq.cut();
            pg.cut();
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        mq.restore();
        pg.restore();
        outages += 1;
    }
    publisher.await.unwrap();
    let sentinel = save_body("person", "sentinel", r#"{"name":"S"}"#);
    channel
        .basic_publish(
            settings.amqp.inbound_exchange.as_str().into(),
            "x".into(),
            BasicPublishOptions::default(),
            sentinel.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(90), collector)
        .await
        .expect("the sentinel's event arrives")
        .unwrap();

    let received = events.len();
    let (events, repeats) = dedupe(events);
    check_events(&events, &model);
    let db = connect_db(&names).await.unwrap();
    check_final_state(&db, &model).await;
    let exit = daemon.terminate().await;
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    println!(
        "faults: {} messages, {kills} SIGKILLs and restarts, {outages} broker/database outages; \
         {received} events received, {repeats} repeats of an event_id, 0 lost, 0 wrong rows",
        bodies.len()
    );
}
