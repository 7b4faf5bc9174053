#![warn(unreachable_pub)]
//! Scramjet keeps a persistent, validated cache of JSON entities in PostgreSQL
//! and publishes exactly what changed.
//!
//! Producers publish `save` and `delete` messages to RabbitMQ; Scramjet stashes
//! each in `staging`, validates it against the JSON Schema of its type, moves
//! valid ones into `resources` keyed by (type, id) with a canonical content
//! hash, and publishes `created` / `updated` / `deleted` / `rejected` events —
//! never an event for a save that changed nothing. The external contract
//! (messages, events, tables, settings) is `docs/CONTRACT.md`.
//!
//! # Layout
//!
//! Data flows one way: **consume → decode → process → outbox → publish → ack**,
//! and the first four rows follow it. Modules without a link are internal
//! (`cargo doc --document-private-items` shows them); the public ones are
//! what the binary, the library API ([`bulk`]) and the tests use.
//!
//! | folder | concern |
//! |---|---|
//! | [`daemon`] | `scramjet run`: `app` builds pools, connections and the HTTP server, runs one session per broker connection and reconnects; `consumer` turns deliveries into batches, dead letters and acks |
//! | [`domain`] | what the data is: `entity` (type and id, parsed once), `message` (bytes → a typed message or a dead-letter reason), `canonical` (canonical JSON and its hash), `validate` (a JSON Schema per type), `event` (change events), `outcome` |
//! | [`pipeline`] | a batch → per-message outcomes in one transaction: `prepare` (hash, validate), `plan` (pure), `transaction` (lock, plan, write, append to the outbox), `retry` (outages, settling, splitting) |
//! | `outbox` | where events leave: the `publisher` sends outbox rows to the changes exchange and deletes only what the broker confirmed; `Wake` is how the consumer tells it |
//! | `store` | all SQL: pools and migrations, `batch` writes, `outbox`, `read`, `stage`, `sync`, `retention`, and a `producer`'s outbox |
//! | `amqp` | broker connections, topology, publisher confirms, the dead-letter link |
//! | [`api`] | HTTP: `/healthz`, `/readyz`, `/metrics`, the read API, and the [`api::filter`] language (lex, parse, SQL) |
//! | [`producer`] | `scramjet relay`: a producer database's outbox → inbound exchange |
//! | [`commands`] | one module per subcommand, each with its `clap` arguments and `run` |
//! | [`bulk`] | the library API: stash, validate, traject, ingest (full-set sync), remove, apply, list |
//! | [`config`] | settings, one file per section: defaults ← TOML file ← `SCRAMJET__…` environment |
//! | [`telemetry`] | logs, Prometheus metrics, health and outages |
//! | `support` | backoff and retry, redaction, TLS, panic text |
//! | [`bench`](mod@bench) | `scramjet bench`: throughput, latency, memory, CPU (not used by the daemon) |

mod amqp;
pub mod api;
pub mod bench;
pub mod bulk;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod domain;
mod outbox;
pub mod pipeline;
pub mod producer;
mod store;
mod support;
pub mod telemetry;
