//! Small pieces shared by the daemon and the commands.

pub(crate) mod backoff;
pub(crate) mod panic;
pub(crate) mod redact;
pub(crate) mod retry;
pub(crate) mod tls;
