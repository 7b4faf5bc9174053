"""Every status code /openapi.json documents must be reachable.

Run by tests/openapi/check.sh after schemathesis, with the HAR file of that
run as its argument and the variables of tests/support/with-daemon.sh in
the environment. It takes the (method, path, status) triples schemathesis
saw, then provokes, against the same daemon, each documented status it did
not see:

- 401: every protected operation without a token;
- 400 and 404: a type that is not a type name, an id that is not stored;
- 422: a revalidation while the schema directory holds a broken file;
- 503 from the read API: its tables locked by another session, so that each
  query runs past http.statement_timeout (tests/openapi/run.sh sets it to 1 s);
- 503 from /v1/events/stream: one feed more than http.max_event_streams
  (tests/openapi/run.sh sets 2);
- 503 from /readyz: the daemon's database made read-only, so the pipeline
  waits out an outage when a message arrives; then made writable again.

Each provoked response is checked against the spec by schemathesis'
`validate_response` (status, content type, headers, body). The run fails if
a documented status was reached neither way, or a response does not conform.
"""

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from urllib.parse import quote, urlsplit

import requests
import schemathesis

BASE = os.environ["SCRAMJET_URL"]
TOKEN = os.environ["SCRAMJET_TOKEN"]
TYPE = os.environ["SCRAMJET_TYPE"]
VALID_ID = os.environ["SCRAMJET_VALID_ID"]
SCHEMA_DIR = os.environ["SCRAMJET_SCHEMA_DIR"]
CONFIG = os.environ["SCRAMJET_CONFIG"]
with open(CONFIG, "rb") as config:
    DATABASE = tomllib.load(config)["postgres"]["url"]
BINARY = os.environ["SCRAMJET_BIN"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEEDS = int(os.environ["SCRAMJET__HTTP__MAX_EVENT_STREAMS"])  # set by tests/openapi/run.sh

schema = schemathesis.openapi.from_url(f"{BASE}/openapi.json")
spec = requests.get(f"{BASE}/openapi.json", timeout=10).json()
problems = []


def operations():
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def template(path):
    return re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")


TEMPLATES = [(path, template(path)) for path in spec["paths"]]


def operation_of(raw_path):
    """The documented path a raw request path matches, literal ones first."""
    matches = [p for p, t in TEMPLATES if t.match(raw_path)]
    return min(matches, key=lambda p: p.count("{"), default=None)


def url(path, **values):
    values.setdefault("type", TYPE)
    values.setdefault("id", VALID_ID)
    filled = re.sub(r"\{([^}]+)\}", lambda m: quote(values[m.group(1)], safe=""), path)
    return BASE + filled


documented = {
    (method, path, status)
    for method, path, operation in operations()
    for status in operation["responses"]
}
seen = set()
with open(sys.argv[1]) as har:
    for entry in json.load(har)["log"]["entries"]:
        path = operation_of(urlsplit(entry["request"]["url"]).path)
        if path is not None:
            seen.add((entry["request"]["method"], path, str(entry["response"]["status"])))
by_schemathesis = set(seen)
provoked = set()


def check(method, path, response, expected):
    """Records a provoked response, checked against the spec."""
    status = str(response.status_code)
    if status != str(expected):
        problems.append(f"{method} {path}: expected {expected}, got {status}: {response.text[:300]}")
        return
    provoked.add((method, path, status))
    try:
        schema[path][method].validate_response(response)
    except Exception as failure:  # schemathesis raises a group of failures
        problems.append(f"{method} {path} {status} does not conform: {failure}")


def call(method, path, headers=AUTH, timeout=60, **values):
    return requests.request(method, url(path, **values), headers=headers, timeout=timeout)


def missing():
    return sorted(documented - seen - provoked, key=lambda t: (t[1], t[0], t[2]))


def psql_value(sql):
    done = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", DATABASE, "-c", sql],
                          check=True, capture_output=True, text=True)
    return done.stdout.strip()


def database_name():
    return urlsplit(DATABASE).path.lstrip("/")


def admin_psql(sql):
    admin = DATABASE.rsplit("/", 1)[0] + "/postgres"
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", admin, "-c", sql], check=True,
                   stdout=subprocess.DEVNULL)


def wait_ready(want, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = requests.get(f"{BASE}/readyz", timeout=10)
        if (response.status_code == 200) == want:
            return response
        time.sleep(0.25)
    raise SystemExit(f"/readyz did not become {'ready' if want else 'unready'} within {seconds} s")


def provoke_spec():
    """schemathesis reads /openapi.json but does not record it as a test."""
    check("GET", "/openapi.json", call("GET", "/openapi.json", headers={}), 200)


def provoke_unauthorized():
    for method, path, operation in operations():
        if "401" in operation["responses"]:
            check(method, path, call(method, path, headers={}), 401)


def provoke_client_errors():
    for method, path, operation in operations():
        if "400" in operation["responses"] and "{type}" in path:
            check(method, path, call(method, path, type="9 is no type"), 400)
        if "404" in operation["responses"]:
            check(method, path, call(method, path, id="no such id"), 404)


def provoke_broken_schema():
    broken = os.path.join(SCHEMA_DIR, "zz_broken.json")
    with open(broken, "w") as f:
        f.write("{ this is not JSON")
    try:
        path = "/v1/staging/{type}/revalidate"
        check("POST", path, call("POST", path), 422)
    finally:
        os.remove(broken)


def provoke_timeouts():
    """The read API's tables locked by another session: each query waits
    past http.statement_timeout and is cancelled."""
    lock = subprocess.Popen(
        ["psql", "-X", "-q", DATABASE],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lock.stdin.write("BEGIN; LOCK TABLE resources, staging IN ACCESS EXCLUSIVE MODE;\n"
                     "SELECT 'locked';\n")
    lock.stdin.flush()
    try:
        deadline = time.monotonic() + 30
        while psql_value("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' "
                         "AND relation = 'staging'::regclass AND granted") != "1":
            if time.monotonic() > deadline:
                raise SystemExit("the tables could not be locked within 30 s")
            time.sleep(0.1)
        for method, path, operation in operations():
            if path.startswith("/v1/") and "503" in operation["responses"] and "stream" not in path:
                check(method, path, call(method, path), 503)
    finally:
        lock.stdin.write("ROLLBACK;\n\\q\n")
        lock.stdin.close()
        lock.wait(timeout=30)


def provoke_busy_feed():
    path = "/v1/events/stream"
    feeds = [requests.get(url(path), headers=AUTH, stream=True, timeout=10) for _ in range(FEEDS)]
    try:
        for feed in feeds:
            if feed.status_code != 200 or not feed.headers["content-type"].startswith("text/event-stream"):
                problems.append(f"GET {path}: expected a 200 text/event-stream, got {feed.status_code} {feed.headers}")
            else:
                provoked.add(("GET", path, "200"))
        check("GET", path, call("GET", path), 503)
    finally:
        for feed in feeds:
            feed.close()


def provoke_not_ready():
    """The database read-only: the next message makes the pipeline wait
    out an outage, which /readyz reports."""
    name = database_name()
    terminate = (f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    admin_psql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        admin_psql(terminate)
        subprocess.run(
            [BINARY, "--config", CONFIG, "send", "save", "--type", TYPE,
             "--id", "while-read-only", "--data", '{"name": "Grace Hopper"}'],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        check("GET", "/readyz", wait_ready(False, 30), 503)
    finally:
        admin_psql(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        admin_psql(terminate)
    wait_ready(True, 60)


# All of them, even where schemathesis saw the status already: each
# provoked response is one more checked against the spec.
for provoke in (provoke_spec, provoke_unauthorized, provoke_client_errors, provoke_broken_schema,
                provoke_timeouts, provoke_busy_feed, provoke_not_ready):
    provoke()

print(f"{'operation':<40} {'status':<7} reached by")
for method, path, status in sorted(documented, key=lambda t: (t[1], t[0], t[2])):
    key = (method, path, status)
    how = "schemathesis" if key in by_schemathesis else "provoked" if key in provoked else "NOT REACHED"
    print(f"{method + ' ' + path:<40} {status:<7} {how}")
for method, path, status in missing():
    problems.append(f"{method} {path}: status {status} is documented but was never reached")
if problems:
    print("\n".join(["", "FAILED:"] + problems), file=sys.stderr)
    sys.exit(1)
print(f"all {len(documented)} documented statuses reached and conforming")
