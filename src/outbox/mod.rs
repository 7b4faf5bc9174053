//! Where events leave: the pipeline writes them to the `outbox` table in the
//! batch's own transaction; the [`publisher`] sends them to the changes
//! exchange and deletes only what the broker confirmed.

pub mod publisher;

pub use publisher::Publisher;
