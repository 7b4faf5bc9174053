//! The read API cannot starve the pipeline: slow list requests are bounded
//! by `http.max_concurrent_queries` (503 with `Retry-After` beyond it) and
//! `http.statement_timeout`, and run on connections of their own, so a
//! stream of saves keeps its pace while they run.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use scramjet::config::Settings;

use crate::helpers::*;

/// Rows of the type the slow requests scan.
const BIG_ROWS: i64 = 300_000;
/// Saves in each measured stream.
const SAVES: usize = 5_000;
/// Saves before the measured streams (connections, caches, broker warmed up).
const WARM_UP: usize = 2_000;
/// Measured pairs of streams (alone, then with the readers).
const ROUNDS: usize = 2;
/// Clients sending slow list requests at once.
const READERS: usize = 20;
/// Least rate of saves with the readers, against alone. Measured on a
/// 2-core machine: bounded as [`limit_reads`] says, 0.92–1.02 quiet and
/// 0.63 under the rest of the suite's parallel load; unbounded (a pool of
/// 20, no limit, a 5 s timeout), 0.08. The floor sits between the two, far
/// from both, so that it tells a missing bound and not the machine's noise.
const MIN_RATIO: f64 = 0.4;
/// A filter that matches nothing, so that each request reads every row of `big`.
const SLOW_LIST: &str = "/v1/resources/big?limit=10&where=name%20%3D%20%22nobody%22";

/// Inserts `rows` resources of type `big` straight into the table.
async fn preload_big(app: &TestApp, rows: i64) {
    app.db
        .execute(
            "INSERT INTO resources (type, id, hash, data) \
             SELECT 'big', lpad(g::text, 7, '0'), md5(g::text), \
                    jsonb_build_object('n', g, 'name', 'row ' || g) \
             FROM generate_series(1, $1::int8) AS g",
            &[&rows],
        )
        .await
        .unwrap();
    // Vacuumed and flushed now, so that neither autovacuum nor the writing
    // out of these pages happens during a measurement.
    for statement in ["VACUUM ANALYZE resources", "CHECKPOINT"] {
        app.db.batch_execute(statement).await.unwrap();
    }
}

/// Publishes `count` creates of `person` with ids `<tag>-<n>`, waits until
/// every one is in `resources`, and returns the rate (saves per second).
async fn stream(app: &TestApp, tag: &str, count: usize) -> f64 {
    let bodies: Vec<String> = (0..count)
        .map(|i| {
            save_body(
                "person",
                &format!("{tag}-{i:05}"),
                &format!(r#"{{"name":"p{i}"}}"#),
            )
        })
        .collect();
    let pattern = format!("{tag}-%");
    let started = Instant::now();
    app.publish_many(&bodies).await;
    let deadline = started + Duration::from_secs(180);
    loop {
        let applied: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM resources WHERE type = 'person' AND id LIKE $1",
                &[&pattern],
            )
            .await
            .unwrap()
            .get(0);
        if applied as usize == count {
            return count as f64 / started.elapsed().as_secs_f64();
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: only {applied} of {count} saves applied in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the slow list requests got.
#[derive(Default)]
struct Tally {
    /// 200s.
    ok: AtomicUsize,
    /// 503s of the concurrency limit, with `Retry-After`.
    refused: AtomicUsize,
    /// 503s of the statement timeout.
    timed_out: AtomicUsize,
    /// Anything else: status and body.
    other: Mutex<Vec<String>>,
}

/// Sends slow list requests back to back until `stop`, like a client that
/// backs off after a 503: as `Retry-After` says, or a second without one.
async fn read_until(app: std::net::SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        let r = http_get_response(app, SLOW_LIST, &[]).await;
        match r.status {
            200 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            503 if r.body.contains("http.statement_timeout") => {
                tally.timed_out.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            503 if r.header("retry-after").is_some() => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                let secs = r.header("retry-after").unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            _ => tally
                .other
                .lock()
                .unwrap()
                .push(format!("{} {}", r.status, r.body)),
        }
    }
}

/// Runs [`READERS`] clients of [`read_until`] on a thread of their own, as
/// clients elsewhere would be, rather than on the daemon's runtime.
fn spawn_readers(
    app: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::thread::JoinHandle<()> {
    on_own_runtime(move || async move {
        let readers: Vec<_> = (0..READERS)
            .map(|_| tokio::spawn(read_until(app, stop.clone(), tally.clone())))
            .collect();
        for reader in readers {
            reader.await.unwrap();
        }
    })
}

/// The read-API settings of the ratio test. On two cores every scan takes a
/// core from the pipeline while it runs, so the design must bound them: one
/// at a time (the limit), each cut off after 50 ms (the timeout, shorter
/// than a scan of `big`), and clients told to come back later (Retry-After).
fn limit_reads(s: &mut Settings) {
    s.http.pool_size = 1;
    s.http.max_concurrent_queries = Some(1);
    s.http.statement_timeout = Duration::from_millis(50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_list_requests_leave_the_stream_of_saves_at_speed() {
    let app = spawn_app_with(limit_reads).await;
    preload_big(&app, BIG_ROWS).await;
    // Warm up connections, statement caches and the broker before measuring.
    stream(&app, "warm", WARM_UP).await;

    // Alone, then with the readers, ROUNDS times; the best of each is
    // compared, so that a burst of other work on the machine during one
    // stream does not decide the outcome.
    let tally = Arc::new(Tally::default());
    let (mut alone, mut busy) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        alone.push(stream(&app, &format!("alone{round}"), SAVES).await);
        let stop = Arc::new(AtomicBool::new(false));
        let readers = spawn_readers(app.http, stop.clone(), tally.clone());
        // Let the requests pile up before the stream starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        busy.push(stream(&app, &format!("busy{round}"), SAVES).await);
        stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || readers.join())
            .await
            .unwrap()
            .expect("no reader panicked");
    }

    let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
    let (alone_best, busy_best) = (best(&alone), best(&busy));
    let ratio = busy_best / alone_best;
    let other = tally.other.lock().unwrap().clone();
    let shown = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "saves/s alone [{}], with {READERS} slow readers [{}]; best {alone_best:.0} and \
         {busy_best:.0}, ratio {ratio:.2}; list requests: {} ok, {} refused \
         (503 + Retry-After), {} timed out, {} other",
        shown(&alone),
        shown(&busy),
        tally.ok.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.timed_out.load(Ordering::Relaxed),
        other.len(),
    );
    let people: i64 = app
        .db
        .query_one("SELECT count(*) FROM resources WHERE type = 'person'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        people as usize,
        WARM_UP + 2 * ROUNDS * SAVES,
        "every save is applied"
    );
    assert!(
        other.is_empty(),
        "unexpected answers: {:?}",
        &other[..other.len().min(5)]
    );
    assert!(
        tally.refused.load(Ordering::Relaxed) > 0,
        "the concurrency limit never answered 503 with Retry-After"
    );
    assert!(
        tally.ok.load(Ordering::Relaxed) + tally.timed_out.load(Ordering::Relaxed) > 0,
        "no list request ran"
    );
    assert!(
        ratio >= MIN_RATIO,
        "the stream slowed from {alone_best:.0} to {busy_best:.0} saves/s ({ratio:.2} < {MIN_RATIO})"
    );
}

/// Takes an exclusive lock on `resources` in a transaction on a connection
/// of its own, so that any read of the table waits inside PostgreSQL until
/// the returned client rolls back (or drops).
async fn lock_resources(app: &TestApp) -> tokio_postgres::Client {
    let locker = connect_db(&app.names).await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    locker
}

/// Waits until a session of the test's database waits for a lock.
async fn wait_for_a_blocked_query(app: &TestApp) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let waiting: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no query blocked on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_read_request_beyond_the_concurrency_limit_is_answered_503_with_retry_after() {
    let app = spawn_app_with(|s| s.http.max_concurrent_queries = Some(1)).await;
    assert_eq!(app.wait_ready().await, 200);
    let locker = lock_resources(&app).await;
    let first = tokio::spawn(http_get_response(app.http, "/v1/resources/person", &[]));
    wait_for_a_blocked_query(&app).await;

    let refused = tokio::time::timeout(
        PATIENCE,
        http_get_response(app.http, "/v1/resources/person/p1", &[]),
    )
    .await
    .expect("the request is answered without waiting for the first");
    assert_eq!(refused.status, 503, "{}", refused.body);
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("a Retry-After header")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    let body: serde_json::Value = serde_json::from_str(&refused.body).unwrap();
    let error = body["error"].as_str().expect("a JSON error");
    assert!(error.contains("http.max_concurrent_queries"), "{error}");
    // Probes and metrics are never limited.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.get(path).await.0, 200, "{path}");
    }

    locker.batch_execute("ROLLBACK").await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    // The permit came back with the answer.
    assert_eq!(app.get("/v1/resources/person/p1").await.0, 404);
}

#[tokio::test]
async fn a_read_query_over_the_statement_timeout_is_answered_503_saying_so() {
    let app = spawn_app_with(|s| s.http.statement_timeout = Duration::from_millis(200)).await;
    let locker = lock_resources(&app).await;

    let (status, body) = tokio::time::timeout(
        PATIENCE,
        app.get("/v1/resources/person?where=age%20%3E%201"),
    )
    .await
    .expect("the statement is cancelled in time");
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let error = body["error"].as_str().expect("a JSON error");
    assert!(
        error.contains("took longer than http.statement_timeout (200ms)"),
        "{error}"
    );

    locker.batch_execute("ROLLBACK").await.unwrap();
    // The cancelled statement left its connection usable.
    let (status, body) = app.get("/v1/resources/person").await;
    assert_eq!(status, 200, "{body}");
}
