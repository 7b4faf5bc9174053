//! Small pieces shared by the daemon and the commands.

pub mod backoff;
pub mod panic;
pub mod redact;
pub mod retry;
pub mod tls;
