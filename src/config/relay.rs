//! `[relay]`: `scramjet relay`, a source database's outbox → the inbound
//! exchange.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use serde::Deserialize;

use super::{PostgresSettings, secret::Secret};

/// `scramjet relay`: moves the outbox of a source database (filled by the
/// triggers of `deploy/triggers/postgresql.sql`) to the inbound exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySettings {
    /// Connection URL of the source database; `--source-url` overrides it.
    /// Kept as a secret because such URLs often carry a password.
    pub source_url: Option<Secret>,
    /// Password for the source database, overriding any in `source_url`.
    pub source_password: Option<Secret>,
    /// File holding that password; trailing newlines are ignored.
    pub source_password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the source server's certificate.
    pub source_tls_ca_file: Option<PathBuf>,
    /// The outbox table in the source database (`table` or `schema.table`).
    pub outbox_table: String,
    /// The channel the triggers `NOTIFY` after writing to the outbox.
    pub notify_channel: String,
    /// Most outbox rows published per transaction (one confirmed batch).
    pub batch_size: i64,
    /// How often the outbox is read without a notification (a missed
    /// `NOTIFY`, a standby relay waiting to take over), e.g. "1s".
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Address of the relay's `/healthz`, `/readyz` and `/metrics`; not
    /// `http.listen`, so a relay and a daemon can share a host.
    pub http_listen: SocketAddr,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            source_url: None,
            source_password: None,
            source_password_file: None,
            source_tls_ca_file: None,
            outbox_table: "scramjet.outbox".into(),
            notify_channel: "scramjet_outbox".into(),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            http_listen: "127.0.0.1:8081".parse().expect("a valid literal address"),
        }
    }
}

impl RelaySettings {
    /// The source database as [`PostgresSettings`], so that it is reached
    /// exactly as the daemon reaches its own (TLS, passwords, loopback).
    pub fn source(&self) -> anyhow::Result<PostgresSettings> {
        let url = self.source_url.as_ref().context(
            "invalid configuration: the relay needs --source-url or relay.source_url \
             (e.g. SCRAMJET__RELAY__SOURCE_URL)",
        )?;
        Ok(PostgresSettings {
            url: url.0.clone(),
            pool_size: 1,
            password: self.source_password.clone(),
            password_file: self.source_password_file.clone(),
            tls_ca_file: self.source_tls_ca_file.clone(),
        })
    }

    /// `outbox_table` split into its schema (if given) and table name.
    pub fn outbox_parts(&self) -> (Option<&str>, &str) {
        match self.outbox_table.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, self.outbox_table.as_str()),
        }
    }
}

/// Whether `name` is a plain SQL identifier: letters, digits and `_`, not
/// starting with a digit, at most 63 bytes (what needs no quoting surprises).
pub(super) fn plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn relay_settings_reject_names_that_would_need_quoting_and_keep_the_url_secret() {
        let mut s = Settings::default();
        assert!(
            s.relay
                .source()
                .unwrap_err()
                .to_string()
                .contains("--source-url")
        );
        s.relay.source_url = Some(Secret("postgres://u:hunter2@db/src".into()));
        assert_eq!(s.relay.source().unwrap().url, "postgres://u:hunter2@db/src");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.relay.outbox_parts(), (Some("scramjet"), "outbox"));
        s.check().unwrap();
        for bad in ["a.b.c", "x;drop", "", "1abc", "scramjet.\"o\""] {
            s.relay.outbox_table = bad.into();
            assert!(s.check().is_err(), "{bad} accepted");
        }
        s.relay.outbox_table = "my_outbox".into();
        assert_eq!(s.relay.outbox_parts(), (None, "my_outbox"));
        s.check().unwrap();
        s.relay.batch_size = 0;
        assert!(s.check().is_err());
    }
}
