//! `[postgres]`: the connection and pool.

use std::path::PathBuf;

use serde::Deserialize;

use super::secret::{Secret, resolve_password};

/// The fewest connections `postgres.pool_size` may give the daemon: the
/// pipeline's 2, the outbox publisher's 1, and 1 for the background work.
pub const DAEMON_MIN_CONNECTIONS: usize = 4;

/// PostgreSQL settings.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connection URL (or libpq key=value string); the database is created if missing.
    pub url: String,
    /// The daemon's connections outside the read API: 2 for the pipeline
    /// (its batch transaction, and settling a lost COMMIT), 1 for the outbox
    /// publisher, the rest for the gauges, pruning and `/readyz`. The
    /// commands (`replay`, `ingest`, …) use one pool of this size.
    pub pool_size: usize,
    /// Password, overriding any in `url` (e.g. from `SCRAMJET__POSTGRES__PASSWORD`).
    pub password: Option<Secret>,
    /// File holding the password (e.g. a mounted secret); trailing newlines are ignored.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the server's certificate (see `sslmode` in the URL).
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/scramjet".into(),
            pool_size: 4,
            password: None,
            password_file: None,
            tls_ca_file: None,
        }
    }
}

impl PostgresSettings {
    /// The password from `password` or `password_file`, if either is set.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        resolve_password(
            "postgres.password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )
    }
}

// Written out, not derived: a URL may carry a password, which `{:?}` must
// never print (`redact::url` hides it).
impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &crate::support::redact::url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}
