//! The one-shot commands: `send`, `status`, `tail`, `replay`, `revalidate`,
//! `ingest` and `delete`.

pub mod admin;
pub mod bulk;
pub mod replay;
pub mod revalidate;
