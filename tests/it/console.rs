//! The console's endpoints and the OpenAPI description: `/openapi.json`,
//! `/ui`, `/v1/status`, `POST /v1/staging/{type}/revalidate` and the live
//! feed `/v1/events/stream`. (The page itself is tested in a browser by
//! tests/browser/run.sh; the API against its description by
//! tests/openapi/run.sh.)

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

const TOKEN: &str = "console-test-token";
const AUTH: [(&str, &str); 1] = [("Authorization", "Bearer console-test-token")];

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn spawn_guarded(adjust: impl FnOnce(&mut scramjet::config::Settings)) -> TestApp {
    spawn_app_with(|s| {
        s.http.bearer_token = Some(scramjet::config::Secret(TOKEN.into()));
        adjust(s);
    })
    .await
}

#[tokio::test]
async fn every_documented_operation_is_routed_guarded_as_documented_and_answers_a_documented_status()
 {
    let mut app = spawn_guarded(|_| {}).await;
    app.save("person", "p1", r#"{"name":"Ada"}"#).await;
    app.next_event().await;
    let (status, body) = app.get("/openapi.json").await;
    assert_eq!(status, 200, "{body}");
    let spec = parse(&body);
    assert!(
        spec["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        spec["openapi"]
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let paths = spec["paths"].as_object().unwrap();
    let mut listed: Vec<&str> = paths.keys().map(String::as_str).collect();
    listed.sort_unstable();
    assert_eq!(
        listed,
        [
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/ui",
            "/v1/events/stream",
            "/v1/resources/{type}",
            "/v1/resources/{type}/{id}",
            "/v1/staging/{type}",
            "/v1/staging/{type}/revalidate",
            "/v1/status",
            "/v1/types",
        ]
    );
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            if path == "/v1/events/stream" {
                continue; // never ends: see the feed's own test below
            }
            let method = method.to_uppercase();
            let concrete = path.replace("{type}", "person").replace("{id}", "p1");
            let guarded = operation.get("security").is_some();
            let without = http_request(app.http, &method, &concrete, &[]).await;
            if guarded {
                assert_eq!(without.status, 401, "{method} {path} without a token");
                assert_eq!(without.header("www-authenticate"), Some("Bearer"));
            }
            let with = http_request(app.http, &method, &concrete, &AUTH).await;
            let documented = operation["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&with.status.to_string()),
                "{method} {path} answered {} ({}), documented: {:?}",
                with.status,
                with.body,
                documented.keys().collect::<Vec<_>>()
            );
            assert!(
                !with.body.contains("no such endpoint"),
                "{method} {path} is not routed"
            );
            assert_eq!(with.status / 100, 2, "{method} {path}: {}", with.body);
        }
    }
}

#[tokio::test]
async fn the_console_page_is_served_without_a_token_and_builds_its_urls_from_its_own() {
    let app = spawn_guarded(|_| {}).await;
    for path in ["/ui", "/ui/"] {
        let page = http_get_response(app.http, path, &[]).await;
        assert_eq!(page.status, 200, "{path}");
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html")
        );
        let csp = page.header("content-security-policy").unwrap();
        assert!(csp.contains("connect-src 'self'") && csp.contains("frame-ancestors 'none'"));
        // Behind a path prefix, an absolute "/v1/..." would leave it.
        assert!(!page.body.contains("\"/v1/") && !page.body.contains("'/v1/"));
        assert!(page.body.contains("sessionStorage"));
    }
}

#[tokio::test]
async fn status_says_what_is_connected_and_what_is_backing_up() {
    let app = spawn_guarded(|_| {}).await;
    app.wait_ready().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        let (code, body) = http_get_with(app.http, "/v1/status", &AUTH).await;
        assert_eq!(code, 200, "{body}");
        let status = parse(&body);
        if status["inbound_queue_depth"].is_i64() || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["postgres"], true);
    assert_eq!(status["rabbitmq"], true);
    assert_eq!(status["outages"], serde_json::json!([]));
    assert_eq!(status["outbox_pending"], 0);
    assert_eq!(status["inbound_queue_depth"], 0, "{status}");
    let (_, metrics) = http_get_with(app.http, "/metrics", &AUTH).await;
    assert!(
        metrics.contains("scramjet_inbound_queue_depth 0"),
        "{metrics}"
    );
}

async fn post(app: &TestApp, path: &str) -> (u16, Value) {
    let response = http_request(app.http, "POST", path, &AUTH).await;
    let body = parse(&response.body);
    (response.status, body)
}

#[tokio::test]
async fn a_revalidation_over_http_reloads_the_schemas_and_trajects_what_now_passes() {
    let mut app = spawn_guarded(|_| {}).await;
    app.save("person", "r1", r#"{"name":""}"#).await;
    assert_eq!(app.next_event().await.op(), "rejected");

    let (status, summary) = post(&app, "/v1/staging/person/revalidate").await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["checked"], 1);
    assert_eq!(summary["still_invalid"], 1);

    // A broken file: nothing revalidated, the schemas in force stay.
    let broken = app.schema_dir.path().join("zz.json");
    std::fs::write(&broken, "{ not json").unwrap();
    let (status, error) = post(&app, "/v1/staging/person/revalidate").await;
    assert_eq!(status, 422, "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("zz.json"),
        "{error}"
    );
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(app.count("resources").await, 0);

    // The schema fixed: the record passes, with its event.
    let relaxed = PERSON_SCHEMA.replace(r#", "minLength": 1"#, "");
    assert_ne!(relaxed, PERSON_SCHEMA);
    std::fs::write(app.schema_dir.path().join("person.json"), relaxed).unwrap();
    let (status, summary) = post(&app, "/v1/staging/person/revalidate").await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(
        (
            &summary["checked"],
            &summary["created"],
            &summary["still_invalid"]
        ),
        (&1.into(), &1.into(), &0.into()),
        "{summary}"
    );
    let created = app.next_event().await;
    assert_eq!((created.op(), created.id()), ("created", "r1"));
    let (_, body) = http_get_with(app.http, "/v1/staging/person", &AUTH).await;
    assert_eq!(parse(&body)["items"], serde_json::json!([]));

    // The daemon's own validation took the reloaded schemas too.
    app.save("person", "r2", r#"{"name":""}"#).await;
    assert_eq!(app.next_event().await.op(), "created");

    let (status, _) = post(&app, "/v1/staging/per.son/revalidate").await;
    assert_eq!(status, 400);
}

/// An open `GET /v1/events/stream`: its response head, then its events.
struct Feed {
    stream: tokio::net::TcpStream,
    head: String,
    text: String,
}

impl Feed {
    async fn open(app: &TestApp) -> Feed {
        let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
        let request = format!(
            "GET /v1/events/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
            app.http
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut feed = Feed {
            stream,
            head: String::new(),
            text: String::new(),
        };
        feed.read_until(|t| t.contains("\r\n\r\n")).await;
        let (head, rest) = feed.text.split_once("\r\n\r\n").unwrap();
        (feed.head, feed.text) = (head.to_owned(), rest.to_owned());
        feed
    }

    /// Reads until `done` holds for what was read, or the connection ends.
    async fn read_until(&mut self, done: impl Fn(&str) -> bool) -> bool {
        let mut buffer = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(&self.text) {
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut buffer))
                .await
                .expect("the feed sends within PATIENCE")
                .unwrap();
            if read == 0 {
                return false;
            }
            self.text
                .push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
        true
    }

    /// The `data` of the next `event: change`, parsed.
    async fn next_change(&mut self) -> (String, Value) {
        let complete = |t: &str| {
            t.find("event: change\n")
                .is_some_and(|at| t[at..].contains("\n\n"))
        };
        assert!(
            self.read_until(complete).await,
            "the feed ended: {}",
            self.text
        );
        let at = self.text.find("event: change\n").unwrap();
        let end = at + self.text[at..].find("\n\n").unwrap();
        let event = self.text[at..end].to_owned();
        self.text.drain(..end + 2);
        let field = |name: &str| {
            event
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {event}"))
                .to_owned()
        };
        (field("id: "), parse(&field("data: ")))
    }
}

#[tokio::test]
async fn the_live_feed_streams_each_confirmed_event_refuses_one_feed_too_many_and_ends_at_shutdown()
{
    let mut app = spawn_guarded(|s| s.http.max_event_streams = 1).await;
    let mut feed = Feed::open(&app).await;
    assert!(feed.head.starts_with("HTTP/1.1 200"), "{}", feed.head);
    assert!(
        feed.head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream")
    );

    let refused = http_get_response(app.http, "/v1/events/stream", &AUTH).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.body.contains("http.max_event_streams"));

    app.save("person", "f1", r#"{"name":"Ada"}"#).await;
    app.save("person", "f1", r#"{"name":""}"#).await;
    let published = app.next_events(2).await;
    for event in &published {
        let (id, data) = feed.next_change().await;
        assert_eq!(id, event.body["event_id"].as_str().unwrap());
        assert_eq!(data, event.body, "the §5 body, as published");
    }

    // An open feed does not hold the shutdown up; it ends with the daemon.
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the daemon stops with a feed open");
    assert!(!feed.read_until(|_| false).await, "the feed ended");
}
