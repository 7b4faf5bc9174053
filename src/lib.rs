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
//! | [`config`] | settings: defaults ← TOML file ← `SCRAMJET__…` environment |
//! | [`telemetry`] | log subscriber (text or JSON) |
//! | [`app`] | builds everything, runs until the shutdown token fires, reconnects |
//! | [`amqp`] | broker connections (one consumes, one publishes), topology, confirms, deadlines |
//! | [`consumer`] | deliveries → batches → pipeline → dead letters → ack |
//! | [`message`] | bytes → a typed inbound message, or a dead-letter reason |
//! | [`canonical`] | canonical JSON and its SHA-256 hash |
//! | [`validate`] | JSON Schema registry, one schema per type |
//! | [`pipeline`] | a batch → per-message outcomes and net writes, in one transaction |
//! | [`event`] | change event bodies |
//! | [`store`] | all SQL: pool, migrations, batch writes, outbox, a source's outbox |
//! | [`filter`] | `--where` / `?where=` filters: parsed, then rendered to parameterized SQL |
//! | [`relay`] | outbox → changes exchange over the publishing connection, deleting only what the broker confirmed |
//! | [`source_relay`] | `scramjet relay`: a producer database's outbox → inbound exchange |
//! | [`http`] | `/healthz`, `/readyz`, `/metrics`, the read API |
//! | [`metrics`] | Prometheus metrics, one registry per daemon |
//! | [`admin`] | `scramjet send`, `status` and `tail` |
//! | [`replay`] | `scramjet replay`: snapshot events through the outbox |
//! | [`revalidate`] | `scramjet revalidate`: rejected rows again, after a schema change |
//! | [`bulk`] | the library API: stash, validate, traject, ingest (full-set sync), remove, apply, list; `scramjet ingest` and `delete` |
//! | [`bench`] | `scramjet bench`: throughput, latency, memory, CPU |
//! | [`tls`] | rustls for PostgreSQL (`sslmode`) and RabbitMQ (`amqps://`) |
//! | [`health`], [`backoff`], [`redact`] | small shared pieces |

pub mod admin;
pub mod amqp;
pub mod app;
pub mod backoff;
pub mod bench;
pub mod bulk;
pub mod canonical;
pub mod config;
pub mod consumer;
pub mod event;
pub mod filter;
pub mod health;
pub mod http;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod redact;
pub mod relay;
pub mod replay;
pub mod revalidate;
pub mod source_relay;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod validate;
