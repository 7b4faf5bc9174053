//! Integration tests against the real PostgreSQL and RabbitMQ.
//! Each test runs its own daemon with its own database and broker names.

mod api;
mod bounds;
mod bulk;
mod cli;
mod cloudevents;
mod console;
mod conventions;
mod events;
mod exact;
mod faults;
mod filters;
mod helpers;
mod malformed;
mod model;
mod order;
mod outages;
mod partitions;
mod properties;
mod proxy;
mod raw_amqp;
mod read_limits;
mod source_relay;
mod tls;
mod trace;
