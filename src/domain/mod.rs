//! What Scramjet's data is, apart from where it is kept: inbound messages,
//! the canonical form and its hash, schemas, and change events.

pub mod canonical;
pub mod entity;
pub mod event;
pub mod message;
pub mod outcome;
pub mod trace;
pub mod validate;
