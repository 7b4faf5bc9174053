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
//! Data flows one way: **consume → decode → process → outbox → publish → ack**.
//!
//! | module | concern |
//! |---|---|
//! | [`daemon`] | `scramjet run`: builds everything, runs sessions until the shutdown token fires, reconnects; the consumer turns deliveries into batches, dead letters and acks |
//! | [`domain`] | what the data is: inbound messages, canonical form and hash, schemas, change events |
//! | [`pipeline`] | a batch → per-message outcomes and net writes, in one transaction |
//! | `outbox` | where events leave: outbox rows → changes exchange, deleting only what the broker confirmed |
//! | `store` | all SQL: pools, migrations, batch writes, outbox, reads, a producer's outbox |
//! | `amqp` | broker connections, topology, publisher confirms, dead letters |
//! | [`api`] | HTTP: `/healthz`, `/readyz`, `/metrics`, the read API, the filter language |
//! | [`producer`] | `scramjet relay`: a producer database's outbox → inbound exchange |
//! | [`commands`] | the one-shot commands: `send`, `status`, `tail`, `replay`, `revalidate`, `ingest`, `delete` |
//! | [`bulk`] | the library API: stash, validate, traject, ingest (full-set sync), remove, apply, list |
//! | [`config`] | settings: defaults ← TOML file ← `SCRAMJET__…` environment |
//! | [`telemetry`] | logs, Prometheus metrics, health and outages |
//! | `support` | backoff, redaction, TLS |
//! | [`bench`](mod@bench) | `scramjet bench`: throughput, latency, memory, CPU |

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
