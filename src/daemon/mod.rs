//! The daemon, `scramjet run`: one session per broker connection consumes the
//! inbound queue, hands batches to the [`pipeline`](crate::pipeline), and acks
//! only what is committed; the `outbox` publisher sends the
//! events. With `amqp.partitions` > 1, a session consumes the partitions
//! whose leases it holds instead (`partitions`).

mod app;
mod consumer;
mod partitions;

pub use crate::amqp::declare_topology;
pub use app::App;
pub use consumer::ERROR_HEADER;
