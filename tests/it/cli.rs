//! The real binary: help, start-up failures as one line without secrets,
//! `migrate`, and a clean exit on SIGTERM.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::helpers::*;

/// The built binary, with no `SCRAMJET__` setting or `RUST_LOG` inherited.
pub(crate) fn scramjet() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scramjet"));
    cmd.env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("SCRAMJET__") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Points a command at this test's names (database, exchanges, queues).
pub(crate) fn isolated(cmd: &mut Command, names: &Names) {
    let settings = test_settings(names, "config/schemas".into());
    cmd.env("SCRAMJET__POSTGRES__URL", &settings.postgres.url)
        .env("SCRAMJET__AMQP__URL", &settings.amqp.url)
        .env(
            "SCRAMJET__AMQP__INBOUND_EXCHANGE",
            &settings.amqp.inbound_exchange,
        )
        .env(
            "SCRAMJET__AMQP__INBOUND_QUEUE",
            &settings.amqp.inbound_queue,
        )
        .env(
            "SCRAMJET__AMQP__CHANGES_EXCHANGE",
            &settings.amqp.changes_exchange,
        )
        .env(
            "SCRAMJET__AMQP__DEAD_LETTER_EXCHANGE",
            &settings.amqp.dead_letter_exchange,
        )
        .env(
            "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
            &settings.amqp.dead_letter_queue,
        )
        .env("SCRAMJET__HTTP__LISTEN", "127.0.0.1:0")
        .env("SCRAMJET__STARTUP__CONNECT_ATTEMPTS", "2")
        .env("SCRAMJET__STARTUP__CONNECT_BACKOFF_MS", "100");
}

fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {text:?}");
    lines[0].to_owned()
}

/// Drops the test's database and broker objects even when an assertion fails.
fn guard(names: &Names) -> Cleanup {
    Cleanup::new(&test_settings(names, "config/schemas".into()), names)
}

#[test]
fn help_lists_the_commands() {
    let out = scramjet().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("run") && text.contains("migrate") && text.contains("--config"),
        "{text}"
    );
}

#[test]
fn a_bad_configuration_value_exits_non_zero_with_one_line_naming_it() {
    let out = scramjet()
        .env("SCRAMJET__AMQP__PREFETCH", "lots")
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = stderr_line(&out);
    assert!(line.contains("prefetch"), "{line}");

    let out = scramjet()
        .env("SCRAMJET__PIPELINE__BATCH_SIZE", "0")
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("pipeline.batch_size"));
}

#[test]
fn an_unknown_key_in_the_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[amqp]\nprefetchh = 10\n").unwrap();
    let out = scramjet()
        .arg("--config")
        .arg(&file)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("prefetchh"));

    let out = scramjet()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("missing.toml"));
}

#[test]
fn an_unreachable_postgresql_is_named_without_its_password() {
    let names = Names::new();
    let mut cmd = scramjet();
    isolated(&mut cmd, &names);
    let started = Instant::now();
    let out = cmd
        .env(
            "SCRAMJET__POSTGRES__URL",
            "postgres://postgres:hunter2secret@127.0.0.1:9/scramjet",
        )
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = stderr_line(&out);
    assert!(line.contains("PostgreSQL"), "{line}");
    assert!(line.contains("2 attempt"), "{line}");
    assert!(!line.contains("hunter2secret"), "{line}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("hunter2secret"),
        "logs leak the password: {stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn an_unreachable_rabbitmq_is_named_without_its_password() {
    let names = Names::new();
    let _cleanup = guard(&names);
    let mut cmd = scramjet();
    isolated(&mut cmd, &names);
    let out = cmd
        .env(
            "SCRAMJET__AMQP__URL",
            "amqp://guest:hunter2secret@127.0.0.1:9/%2f",
        )
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = stderr_line(&out);
    assert!(line.contains("RabbitMQ"), "{line}");
    assert!(!line.contains("hunter2secret"), "{line}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2secret"));
}

#[test]
fn a_broken_schema_file_stops_start_up_naming_the_file() {
    let names = Names::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("person.json"), "{\"type\": \"object\"").unwrap();
    let mut cmd = scramjet();
    isolated(&mut cmd, &names);
    let out = cmd
        .env("SCRAMJET__VALIDATION__SCHEMA_DIR", dir.path())
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = stderr_line(&out);
    assert!(
        line.contains("person.json") && line.contains("not valid JSON"),
        "{line}"
    );
}

#[tokio::test]
async fn migrate_creates_the_database_and_its_tables_and_can_run_twice() {
    let names = Names::new();
    let _cleanup = guard(&names);
    for _ in 0..2 {
        let mut cmd = scramjet();
        isolated(&mut cmd, &names);
        let out = cmd.arg("migrate").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let db = connect_db(&names).await.unwrap();
    let tables: Vec<String> = db
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name IN ('staging', 'resources', 'outbox') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, vec!["outbox", "resources", "staging"]);
}

#[tokio::test]
async fn the_daemon_keeps_its_schemas_on_a_broken_sighup_reload_and_exits_zero_on_sigterm() {
    let names = Names::new();
    let _cleanup = guard(&names);
    let schemas = tempfile::tempdir().unwrap();
    std::fs::write(schemas.path().join("person.json"), PERSON_SCHEMA).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = scramjet();
    isolated(&mut cmd, &names);
    let mut child = cmd
        .env("SCRAMJET__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("SCRAMJET__VALIDATION__SCHEMA_DIR", schemas.path())
        .env("SCRAMJET__LOG__FORMAT", "json")
        .arg("run")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get(addr, "/readyz").await.0 == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken schema and SIGHUP: the daemon logs why and goes on.
    std::fs::write(schemas.path().join("person.json"), "{ broken").unwrap();
    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop the daemon"
    );
    assert_eq!(http_get(addr, "/readyz").await.0, 200);

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the daemon exits after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut logs).unwrap();
    // log.format = "json": one JSON object per line.
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let reload = lines
        .iter()
        .find(|l| l["message"] == "SIGHUP: schemas not reloaded; the previous ones stay in use")
        .unwrap_or_else(|| panic!("{logs}"));
    assert_eq!(reload["level"], "ERROR");
    assert!(
        reload["error"].as_str().unwrap().contains("person.json"),
        "names the file: {reload}"
    );
}

#[test]
fn the_benchmark_runs_end_to_end_and_checks_its_outcomes() {
    // Not a performance test: a small run proving the command works, cleans
    // up, and would fail on a wrong outcome (it verifies events and rows).
    let out = scramjet()
        .args(["bench", "--messages", "600", "--preload-rows", "2000"])
        .args(["--latency-seconds", "1", "--latency-rate", "200"])
        .env("SCRAMJET__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| 1 KB, 50 % creates / 50 % updates | 600 |"),
        "{stdout}"
    );
    assert!(stdout.contains("Latency at 200 msgs/s"), "{stdout}");
    assert!(
        stdout.contains("AMQP client floor, 1 KB: the ceiling's relay"),
        "{stdout}"
    );
    // The CPU budget names a rate the cores allow, from costs that cannot
    // all be zero: the drain used the daemon, the broker and PostgreSQL.
    let budget = stdout
        .lines()
        .find(|l| l.starts_with("CPU budget, 1 KB 50/50: daemon + broker + PostgreSQL + bench = "))
        .unwrap_or_else(|| panic!("no CPU budget line: {stdout}"));
    assert!(budget.contains("cores allow at most"), "{budget}");
    assert!(!budget.contains("= 0 µs/msg"), "{budget}");
}

#[test]
fn the_ingest_benchmark_runs_both_paths_and_checks_their_outcomes() {
    // A small run: the command works, cleans up, and checks rows and events.
    let out = scramjet()
        .args(["bench", "--ingest", "1000", "--through-daemon"])
        .env("SCRAMJET__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("100 changed, 10 new, 10 gone (120 events)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| `scramjet ingest --full-set` | 1000 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| daemon (the same changes as messages) | 1010 |"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_counts_per_type_the_outbox_and_queue_depths() {
    let mut app = spawn_app().await;
    app.save("person", "a", r#"{"name":"A"}"#).await;
    app.save("person", "b", r#"{"name":"B"}"#).await;
    app.save("person", "bad", r#"{"name":""}"#).await;
    app.next_events(3).await;
    let s = &app.settings;
    let out = scramjet()
        .arg("status")
        .env("SCRAMJET__POSTGRES__URL", &s.postgres.url)
        .env("SCRAMJET__AMQP__URL", &s.amqp.url)
        .env("SCRAMJET__AMQP__INBOUND_QUEUE", &s.amqp.inbound_queue)
        .env(
            "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
            &s.amqp.dead_letter_queue,
        )
        .env("SCRAMJET__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let person: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("person"))
        .unwrap_or_else(|| panic!("{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(person, vec!["person", "2", "1"], "{text}");
    assert!(
        text.contains(&format!(
            "queue {}: 0 message(s) ready",
            s.amqp.inbound_queue
        )),
        "{text}"
    );
    assert!(text.contains("outbox: "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_publishes_one_snapshot_per_resource_and_resumes_after_an_id() {
    let mut app = spawn_app().await;
    for id in ["p0", "p1", "p2", "p3"] {
        app.save("person", id, &format!(r#"{{"name":"{id}"}}"#))
            .await;
    }
    app.save("grant", "g0", r#"{"x":1}"#).await;
    app.next_events(5).await;
    let s = app.settings.clone();
    let replay = |args: &[&str]| {
        scramjet()
            .arg("replay")
            .args(args)
            .env("SCRAMJET__POSTGRES__URL", &s.postgres.url)
            .env("SCRAMJET__LOG__LEVEL", "warn")
            .output()
            .unwrap()
    };

    let out = replay(&[
        "--type",
        "person",
        "--routing-prefix",
        "replay.",
        "--page",
        "3",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("done: 4 snapshot(s) of person"), "{text}");
    assert!(text.contains("resume with --after \"p2\""), "{text}");
    // The running daemon's relay publishes them, in id order.
    let events = app.next_events(4).await;
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.routing_key.as_str(), e.id()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("replay.person.snapshot", "p0"),
            ("replay.person.snapshot", "p1"),
            ("replay.person.snapshot", "p2"),
            ("replay.person.snapshot", "p3"),
        ]
    );
    for e in &events {
        assert_eq!(e.op(), "snapshot");
        assert_eq!(e.body["data"]["name"], e.id());
        assert!(
            e.body["previous"].is_null() && e.body["patch"].is_null() && e.body["errors"].is_null()
        );
        assert_eq!(e.body["hash"].as_str().unwrap().len(), 64);
    }

    let out = replay(&["--type", "person", "--after", "p2"]);
    assert!(out.status.success());
    let e = app.next_event().await;
    assert_eq!((e.routing_key.as_str(), e.id()), ("person.snapshot", "p3"));

    let out = replay(&["--type", "per.son"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidate_trajects_rows_a_fixed_schema_now_accepts_and_keeps_the_rest() {
    let mut app = spawn_app().await;
    app.save("person", "p1", r#"{"name":""}"#).await;
    app.save("person", "p2", r#"{"nickname":"x"}"#).await;
    assert!(
        app.next_events(2)
            .await
            .iter()
            .all(|e| e.op() == "rejected")
    );

    // The schema is fixed: empty names are fine now; a name is still required.
    std::fs::write(
        app.schema_dir.path().join("person.json"),
        r#"{"type":"object","required":["name"]}"#,
    )
    .unwrap();
    let out = scramjet()
        .args(["revalidate", "--type", "person"])
        .env("SCRAMJET__POSTGRES__URL", &app.settings.postgres.url)
        .env("SCRAMJET__VALIDATION__SCHEMA_DIR", app.schema_dir.path())
        .env("SCRAMJET__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "done: 2 rejected row(s) checked; created 1, updated 0, unchanged 0; 1 still invalid"
        ),
        "{text}"
    );

    // The running daemon publishes the event revalidation wrote to the outbox.
    let e = app.next_event().await;
    assert_eq!((e.op(), e.id()), ("created", "p1"));
    assert_eq!(e.body["data"]["name"], "");
    let staged: Vec<String> = app
        .db
        .query("SELECT id FROM staging", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(staged, vec!["p2"]);
    let ids: Vec<String> = app.resources().await.into_iter().map(|r| r.1).collect();
    assert_eq!(ids, vec!["p1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_publishes_a_message_that_tail_then_prints_as_an_event() {
    let app = spawn_app().await;
    let s = &app.settings;
    let with_names = |cmd: &mut Command| {
        cmd.env("SCRAMJET__AMQP__URL", &s.amqp.url)
            .env("SCRAMJET__AMQP__INBOUND_EXCHANGE", &s.amqp.inbound_exchange)
            .env("SCRAMJET__AMQP__INBOUND_QUEUE", &s.amqp.inbound_queue)
            .env("SCRAMJET__AMQP__CHANGES_EXCHANGE", &s.amqp.changes_exchange)
            .env(
                "SCRAMJET__AMQP__DEAD_LETTER_EXCHANGE",
                &s.amqp.dead_letter_exchange,
            )
            .env(
                "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
                &s.amqp.dead_letter_queue,
            )
            .env("SCRAMJET__LOG__LEVEL", "warn");
    };
    let mut tail = scramjet();
    with_names(&mut tail);
    let mut tail = tail
        .args(["tail", "--pattern", "person.*", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tail says on stderr once its queue is bound; send only then.
    let stderr = tail.stderr.take().unwrap();
    let listening = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line).unwrap();
        line
    });
    let listening = tokio::time::timeout(PATIENCE, listening)
        .await
        .unwrap()
        .unwrap();
    assert!(listening.contains("waiting for events"), "{listening}");

    let mut send = scramjet();
    with_names(&mut send);
    let out = send
        .args(["send", "save", "--type", "person", "--id", "O'Brien"])
        .args([
            "--data",
            r#"{"name":"Ada","n":12345678901234567890123}"#,
            "--version",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let printed = tokio::task::spawn_blocking(move || tail.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(printed.status.success());
    let line = String::from_utf8_lossy(&printed.stdout).into_owned();
    let (routing_key, body) = line.trim_end().split_once(' ').unwrap();
    assert_eq!(routing_key, "person.created");
    let event: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["id"], "O'Brien");
    assert_eq!(event["version"], 3);
    assert!(body.contains("12345678901234567890123"));

    // What the daemon would dead-letter, send refuses before publishing.
    let mut bad = scramjet();
    with_names(&mut bad);
    let out = bad
        .args(["send", "save", "--type", "person", "--id", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"data\""));
}

#[tokio::test]
async fn send_sets_the_key_header_a_partitioned_exchange_hashes_on() {
    use lapin::{options::BasicGetOptions, types::AMQPValue};
    let app = spawn_app().await;
    let s = &app.settings;
    // A queue of the test's own sees what the daemon's queue sees.
    let queue = format!("{}.copy", app.names.prefix);
    let channel = &app.publisher;
    bind_private_queue(channel, &queue, &s.amqp.inbound_exchange).await;
    let out = scramjet()
        .env("SCRAMJET__AMQP__URL", &s.amqp.url)
        .env("SCRAMJET__AMQP__INBOUND_EXCHANGE", &s.amqp.inbound_exchange)
        .env("SCRAMJET__LOG__LEVEL", "warn")
        .args(["send", "delete", "--type", "person", "--id", "a/b c"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message reached the queue");
    let headers = got.properties.headers().as_ref().expect("headers are set");
    assert_eq!(
        headers.inner().get("scramjet-key"),
        Some(&AMQPValue::LongString("person/a/b c".into())),
        "the key is <type>/<id>, a long string; the id may hold a /"
    );
}

#[tokio::test]
async fn status_and_replay_refuse_an_unmigrated_database_and_change_nothing() {
    let names = Names::new();
    let settings = test_settings(&names, "config/schemas".into());
    let _cleanup = Cleanup::new(&settings, &names);
    // An empty database, as a role without DDL rights would find it.
    connect_admin()
        .await
        .batch_execute(&format!("CREATE DATABASE \"{}\"", names.database))
        .await
        .unwrap();
    for args in [&["status"][..], &["replay", "--type", "person"][..]] {
        let mut cmd = scramjet();
        isolated(&mut cmd, &names);
        let out = cmd.args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("scramjet migrate"), "{args:?}: {stderr}");
    }
    let db = connect_db(&names).await.unwrap();
    let tables: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "nothing was created");
}
