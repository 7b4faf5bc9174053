//! `[http]`: the listener for health, readiness, metrics and the read API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::secret::{Secret, resolve_password};

/// HTTP settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// When set, every endpoint but `/healthz` and `/readyz` requires
    /// `Authorization: Bearer <token>` (e.g. from `SCRAMJET__HTTP__BEARER_TOKEN`).
    pub bearer_token: Option<Secret>,
    /// File holding the bearer token; trailing newlines are ignored.
    pub bearer_token_file: Option<PathBuf>,
    /// Serve the read API and `/metrics` without a token on an address
    /// other than loopback. Off: the daemon refuses to start like that,
    /// since every resource and rejected record would be readable by anyone
    /// who reaches the port.
    pub allow_unauthenticated: bool,
    /// Connections of the read API (`/v1/...`), a pool of its own so that
    /// slow reads cannot take the pipeline's.
    pub pool_size: usize,
    /// Read-API requests served at once; one more is answered 503 with
    /// `Retry-After` rather than queued. Unset: `pool_size`.
    pub max_concurrent_queries: Option<usize>,
    /// Longest a read-API statement may run before PostgreSQL cancels it
    /// (the request is then answered 503), e.g. "5s".
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Live feeds (`GET /v1/events/stream`) served at once; one more is
    /// answered 503 with `Retry-After`.
    pub max_event_streams: usize,
}

impl HttpSettings {
    /// Refuses a listener that the network reaches with no token required,
    /// unless `allow_unauthenticated` says so; `token` is the resolved
    /// [`HttpSettings::bearer_token`].
    pub fn check_exposure(&self, token: Option<&str>) -> anyhow::Result<()> {
        anyhow::ensure!(
            token.is_some() || self.listen.ip().is_loopback() || self.allow_unauthenticated,
            "invalid configuration: http.listen {} is reachable from the network and no \
             http.bearer_token is set, so every resource and rejected record would be readable \
             by anyone; set http.bearer_token (or http.bearer_token_file), or \
             http.allow_unauthenticated = true to serve it openly",
            self.listen
        );
        Ok(())
    }

    /// The bearer token from `bearer_token` or `bearer_token_file`, if either is set.
    pub fn bearer_token(&self) -> anyhow::Result<Option<String>> {
        let token = resolve_password(
            "http.bearer_token",
            self.bearer_token.as_ref(),
            self.bearer_token_file.as_deref(),
        )?;
        if token.as_deref() == Some("") {
            anyhow::bail!("invalid configuration: http.bearer_token is empty");
        }
        Ok(token)
    }

    /// `max_concurrent_queries`, or `pool_size` when it is unset.
    pub fn max_concurrent_queries(&self) -> usize {
        self.max_concurrent_queries.unwrap_or(self.pool_size)
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("a valid literal address"),
            bearer_token: None,
            bearer_token_file: None,
            allow_unauthenticated: false,
            pool_size: 4,
            max_concurrent_queries: None,
            statement_timeout: Duration::from_secs(5),
            max_event_streams: 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_the_network_reaches_needs_a_token_or_an_explicit_opt_out() {
        let mut http = HttpSettings::default();
        http.check_exposure(None).expect("loopback needs no token");
        http.listen = "0.0.0.0:8080".parse().unwrap();
        let error = http.check_exposure(None).unwrap_err().to_string();
        assert!(error.contains("http.bearer_token"), "{error}");
        http.check_exposure(Some("t")).unwrap();
        http.listen = "[::]:8080".parse().unwrap();
        assert!(http.check_exposure(None).is_err());
        http.allow_unauthenticated = true;
        http.check_exposure(None).unwrap();
    }
}
