//! Checks of the deployment files under `deploy/`: they parse, agree with each
//! other, and name only configuration keys and metrics the daemon has.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_yaml::Value;

/// Every configuration key the daemon documents for deployment (`section.key`).
const CONFIG_KEYS: &[&str] = &[
    "postgres.url",
    "postgres.password",
    "postgres.password_file",
    "postgres.tls_ca_file",
    "postgres.pool_size",
    "amqp.url",
    "amqp.password",
    "amqp.password_file",
    "amqp.tls_ca_file",
    "amqp.prefetch",
    "amqp.max_inflight_bytes",
    "amqp.inbound_exchange",
    "amqp.inbound_queue",
    "amqp.changes_exchange",
    "amqp.dead_letter_exchange",
    "amqp.dead_letter_queue",
    "amqp.partitions",
    "partitioning.lease_ttl",
    "validation.schema_dir",
    "validation.unknown_types",
    "http.listen",
    "http.bearer_token",
    "http.bearer_token_file",
    "http.allow_unauthenticated",
    "http.pool_size",
    "http.max_concurrent_queries",
    "http.statement_timeout",
    "shutdown.timeout",
    "log.format",
    "log.level",
    "relay.source_url",
    "relay.source_password",
    "relay.source_password_file",
    "relay.http_listen",
];

/// Every metric the daemon (and `scramjet relay`) exports on `/metrics`.
const METRICS: &[&str] = &[
    "scramjet_messages_total",
    "scramjet_events_published_total",
    "scramjet_batch_size",
    "scramjet_batch_duration_seconds",
    "scramjet_event_delay_seconds",
    "scramjet_outbox_pending",
    "scramjet_staging_invalid",
    "scramjet_connected",
    "scramjet_reconnects_total",
    "scramjet_outages_total",
    "scramjet_events_reduced_total",
    "scramjet_outbox_rows_published_total",
    "scramjet_relay_messages_total",
    "scramjet_relay_delay_seconds",
    "scramjet_relay_pending",
    "scramjet_relay_active",
    "scramjet_relay_connected",
    "scramjet_relay_reconnects_total",
    "scramjet_relay_reduced_total",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Files under `dir`, recursively, in a stable order.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn yaml_files() -> Vec<PathBuf> {
    files_under(&deploy_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect()
}

/// Every document of a (possibly multi-document) YAML file.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Every Kubernetes object under `deploy/kubernetes/`.
fn kubernetes_objects() -> Vec<Value> {
    files_under(&deploy_dir().join("kubernetes"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .flat_map(|p| yaml_documents(p))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for key in path {
        v = v.get(*key)?;
    }
    v.as_str()
}

fn seq<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Tokens of `text` that start with `scramjet_`, as metric names (histogram
/// series suffixes removed).
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("scramjet_"))
        .map(|token| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| token.strip_suffix(suffix))
                .unwrap_or(token)
                .to_owned()
        })
        .collect()
}

fn assert_known_metrics(names: &BTreeSet<String>, origin: &str) {
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| !METRICS.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{origin} uses metrics the daemon does not export: {unknown:?}"
    );
}

/// `SCRAMJET__POSTGRES__URL` → `postgres.url`, if it is one of `CONFIG_KEYS`.
fn config_key_of(variable: &str) -> Option<String> {
    let rest = variable.strip_prefix("SCRAMJET__")?;
    let (section, key) = rest.split_once("__")?;
    let dotted = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
    CONFIG_KEYS.contains(&dotted.as_str()).then_some(dotted)
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = yaml_files();
    assert!(
        files.len() >= 6,
        "expected at least 6 YAML files under deploy/, found {files:?}"
    );
    let mut documents = 0;
    for file in &files {
        for doc in yaml_documents(file) {
            assert!(
                doc.is_mapping(),
                "{}: every document should be a mapping, got {doc:?}",
                file.display()
            );
            documents += 1;
        }
    }
    assert!(
        documents >= 7,
        "expected at least 7 YAML documents, found {documents}"
    );
}

#[test]
fn the_kubernetes_deployment_probes_healthz_and_readyz_and_references_only_existing_objects() {
    let objects = kubernetes_objects();
    let names_of = |kind: &str| -> BTreeSet<String> {
        objects
            .iter()
            .filter(|o| str_at(o, &["kind"]) == Some(kind))
            .filter_map(|o| str_at(o, &["metadata", "name"]).map(str::to_owned))
            .collect()
    };
    let config_maps = names_of("ConfigMap");
    let secrets = names_of("Secret");
    assert!(config_maps.contains("scramjet-config"), "{config_maps:?}");
    assert!(config_maps.contains("scramjet-schemas"), "{config_maps:?}");
    assert!(secrets.contains("scramjet-credentials"), "{secrets:?}");

    let deployments: Vec<_> = objects
        .iter()
        .filter(|o| str_at(o, &["kind"]) == Some("Deployment"))
        .collect();
    assert_eq!(deployments.len(), 1, "expected one Deployment");
    let pod = &deployments[0]["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"].as_u64(), Some(30));
    let containers = seq(pod, "containers");
    assert_eq!(containers.len(), 1, "expected one container");
    let container = &containers[0];

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}: {get:?}");
        assert_eq!(get["port"].as_u64(), Some(8080), "{probe}: {get:?}");
    }

    let mut used_config_maps = BTreeSet::new();
    let mut used_secrets = BTreeSet::new();
    let mut volume_names = BTreeSet::new();
    for volume in seq(pod, "volumes") {
        volume_names.insert(str_at(volume, &["name"]).expect("volume name").to_owned());
        if let Some(name) = str_at(volume, &["configMap", "name"]) {
            used_config_maps.insert(name.to_owned());
        }
        if let Some(name) = str_at(volume, &["secret", "secretName"]) {
            used_secrets.insert(name.to_owned());
        }
    }
    for source in seq(container, "envFrom") {
        if let Some(name) = str_at(source, &["configMapRef", "name"]) {
            used_config_maps.insert(name.to_owned());
        }
        if let Some(name) = str_at(source, &["secretRef", "name"]) {
            used_secrets.insert(name.to_owned());
        }
    }
    for var in seq(container, "env") {
        if let Some(name) = str_at(var, &["valueFrom", "configMapKeyRef", "name"]) {
            used_config_maps.insert(name.to_owned());
        }
        if let Some(name) = str_at(var, &["valueFrom", "secretKeyRef", "name"]) {
            used_secrets.insert(name.to_owned());
        }
    }
    assert!(
        used_config_maps.len() >= 2 && !used_secrets.is_empty(),
        "the Deployment should use both ConfigMaps and the Secret: {used_config_maps:?} {used_secrets:?}"
    );
    let missing_maps: Vec<_> = used_config_maps.difference(&config_maps).collect();
    assert!(
        missing_maps.is_empty(),
        "ConfigMaps not defined: {missing_maps:?}"
    );
    let missing_secrets: Vec<_> = used_secrets.difference(&secrets).collect();
    assert!(
        missing_secrets.is_empty(),
        "Secrets not defined: {missing_secrets:?}"
    );

    let mounts = seq(container, "volumeMounts");
    for mount in mounts {
        let name = str_at(mount, &["name"]).expect("volumeMount name");
        assert!(
            volume_names.contains(name),
            "volumeMount of undefined volume {name}"
        );
    }
    let args: Vec<_> = seq(container, "args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["--config", "/etc/scramjet/scramjet.toml", "run"]);
    assert!(
        mounts
            .iter()
            .any(|m| str_at(m, &["mountPath"]) == Some("/etc/scramjet/scramjet.toml")),
        "the --config file is not mounted"
    );
    assert!(
        mounts
            .iter()
            .any(|m| str_at(m, &["mountPath"]) == Some("/etc/scramjet/schemas")),
        "the schema directory is not mounted"
    );
}

#[test]
fn the_prometheus_alerts_are_complete_and_use_only_exported_metrics() {
    let path = deploy_dir().join("prometheus/alerts.yml");
    let docs = yaml_documents(&path);
    assert_eq!(docs.len(), 1, "one document expected");
    let groups = seq(&docs[0], "groups");
    assert!(!groups.is_empty(), "no groups");
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    for group in groups {
        assert!(str_at(group, &["name"]).is_some(), "group without a name");
        let rules = seq(group, "rules");
        assert!(!rules.is_empty(), "group without rules");
        for rule in rules {
            let alert = str_at(rule, &["alert"]).unwrap_or_else(|| panic!("no alert: {rule:?}"));
            let expr = str_at(rule, &["expr"]).unwrap_or_else(|| panic!("{alert}: no expr"));
            assert!(
                str_at(rule, &["labels", "severity"]).is_some(),
                "{alert}: no labels.severity"
            );
            assert!(
                str_at(rule, &["annotations", "summary"]).is_some(),
                "{alert}: no annotations.summary"
            );
            alerts.insert(alert.to_owned());
            used.extend(metric_names(expr));
        }
    }
    for expected in [
        "ScramjetNotReady",
        "ScramjetOutboxGrowing",
        "ScramjetDeadLetters",
        "ScramjetRejectedRising",
        "ScramjetReconnecting",
        "ScramjetDown",
    ] {
        assert!(alerts.contains(expected), "missing alert {expected}");
    }
    assert!(
        used.len() >= 4,
        "too few metrics found in expressions: {used:?}"
    );
    assert_known_metrics(&used, "alerts.yml");
}

#[test]
fn the_grafana_dashboard_parses_and_uses_only_exported_metrics() {
    let path = deploy_dir().join("grafana/scramjet-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(dashboard["schemaVersion"].as_u64(), Some(39));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "expected at least 8 panels");
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel without targets: {}",
            panel["title"]
        );
        for target in targets {
            used.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    assert_known_metrics(&used, "the Grafana dashboard");
    let unused: Vec<_> = METRICS.iter().filter(|m| !used.contains(**m)).collect();
    assert!(unused.is_empty(), "metrics without a panel: {unused:?}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    verify_unit(
        "scramjet.service",
        "ExecStart=/usr/local/bin/scramjet --config /etc/scramjet/scramjet.toml run",
    );
}

#[test]
fn the_relay_systemd_unit_passes_systemd_analyze_verify() {
    verify_unit(
        "scramjet-relay.service",
        "ExecStart=/usr/local/bin/scramjet --config /etc/scramjet/scramjet.toml relay",
    );
}

/// Checks `deploy/systemd/<name>` runs `exec_start` as the scramjet user and
/// passes `systemd-analyze verify`.
fn verify_unit(name: &str, exec_start: &str) {
    let unit = deploy_dir().join("systemd").join(name);
    let text = read(&unit);
    for line in ["User=scramjet", exec_start] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // The scramjet user and binary do not exist here: verify a copy that runs
    // /bin/true as the current user.
    let copy: String = text
        .lines()
        .filter(|l| !l.starts_with("User=") && !l.starts_with("Group="))
        .map(|l| {
            if l.starts_with("ExecStart=") {
                "ExecStart=/bin/true\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, copy).expect("write the unit copy");

    let output = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed, so the unit cannot be verified; \
             install it with `apt-get install systemd`"
        ),
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // systemd-analyze exits 0 on unknown keys and unparsable values (it only
    // warns), so also fail on any message about the unit itself. Messages about
    // other units of the machine are not this file's business.
    let complaints: Vec<_> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains(name))
        .collect();
    assert!(
        output.status.success() && complaints.is_empty(),
        "systemd-analyze verify failed ({}):\n{stdout}{stderr}",
        output.status
    );
}

#[test]
fn the_relay_exports_exactly_the_relay_metrics_of_the_list() {
    let exported = metric_names(&scramjet::telemetry::metrics::ProducerMetrics::new().render());
    let listed: BTreeSet<String> = METRICS
        .iter()
        .filter(|m| m.starts_with("scramjet_relay_"))
        .map(|m| (*m).to_owned())
        .collect();
    assert_eq!(exported, listed);
}

#[test]
fn the_env_example_sets_only_real_configuration_keys() {
    let path = deploy_dir().join("systemd/scramjet.env.example");
    let mut keys = BTreeSet::new();
    for line in read(&path).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, _) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not NAME=value: {line}"));
        let key = config_key_of(name)
            .unwrap_or_else(|| panic!("{name} is not SCRAMJET__<SECTION>__<KEY> of a real key"));
        assert!(keys.insert(key), "{name} set twice");
    }
    for expected in [
        "postgres.url",
        "postgres.password",
        "amqp.url",
        "amqp.password",
        "log.format",
    ] {
        assert!(
            keys.contains(expected),
            "the example does not set {expected}"
        );
    }
}

#[test]
fn every_scramjet_variable_and_toml_key_in_deploy_is_a_real_configuration_key() {
    let mut variables = 0;
    for file in files_under(&deploy_dir()) {
        let text = read(&file);
        for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if token.starts_with("SCRAMJET__") && token != "SCRAMJET__" {
                assert!(
                    config_key_of(token).is_some(),
                    "{}: {token} names no configuration key",
                    file.display()
                );
                variables += 1;
            }
        }
    }
    assert!(
        variables >= 10,
        "too few SCRAMJET__ variables found: {variables}"
    );

    // The TOML in the ConfigMap: `[section]` headers and `key = value` lines.
    let objects = kubernetes_objects();
    let config_map = objects
        .iter()
        .find(|o| str_at(o, &["metadata", "name"]) == Some("scramjet-config"))
        .expect("ConfigMap scramjet-config");
    let toml = str_at(config_map, &["data", "scramjet.toml"]).expect("data.scramjet.toml");
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in toml.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else {
            let (key, _) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key = value: {line}"));
            let dotted = format!("{section}.{}", key.trim());
            assert!(
                CONFIG_KEYS.contains(&dotted.as_str()),
                "scramjet.toml sets unknown key {dotted}"
            );
            keys.insert(dotted);
        }
    }
    assert!(toml.contains("listen = \"0.0.0.0:8080\""), "{toml}");
    // Reachable across the cluster, so the token must come with it (the
    // daemon refuses to start otherwise).
    let secret = objects
        .iter()
        .find(|o| str_at(o, &["metadata", "name"]) == Some("scramjet-credentials"))
        .expect("Secret scramjet-credentials");
    assert!(
        str_at(secret, &["stringData", "SCRAMJET__HTTP__BEARER_TOKEN"])
            .is_some_and(|t| !t.is_empty()),
        "the Secret carries SCRAMJET__HTTP__BEARER_TOKEN"
    );
    assert!(!keys.contains("http.allow_unauthenticated"), "{keys:?}");
    assert!(
        toml.contains("schema_dir = \"/etc/scramjet/schemas\""),
        "{toml}"
    );
    assert!(keys.len() >= 4, "too few keys in scramjet.toml: {keys:?}");
}

#[test]
fn the_compose_file_builds_the_dockerfile_from_the_repository_root() {
    let compose_path = deploy_dir().join("docker/docker-compose.yml");
    let compose = &yaml_documents(&compose_path)[0];
    let build = &compose["services"]["scramjet"]["build"];
    let context = compose_path
        .parent()
        .expect("deploy/docker")
        .join(build["context"].as_str().expect("build.context"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        context.canonicalize().expect("context exists"),
        root.canonicalize().expect("repository root"),
        "the build context should be the repository root"
    );
    let dockerfile = context.join(build["dockerfile"].as_str().expect("build.dockerfile"));
    let dockerfile = read(&dockerfile);
    for line in [
        "EXPOSE 8080",
        "ENV SCRAMJET__HTTP__LISTEN=0.0.0.0:8080",
        "ENTRYPOINT [\"/usr/local/bin/scramjet\"]",
        "CMD [\"run\"]",
    ] {
        assert!(
            dockerfile.lines().any(|l| l == line),
            "the Dockerfile lacks {line}"
        );
    }
    let ignore = read(&root.join(".dockerignore"));
    for entry in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
