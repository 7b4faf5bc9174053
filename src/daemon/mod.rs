//! The daemon, `scramjet run`: one session per broker connection consumes the
//! inbound queue, hands batches to the [`pipeline`](crate::pipeline), and acks
//! only what is committed; the [`outbox`](crate::outbox) publisher sends the
//! events.

pub mod app;
pub mod consumer;
