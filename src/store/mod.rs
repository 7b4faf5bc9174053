//! PostgreSQL: connection pool, database creation, migrations, and (in the
//! submodules) every SQL statement the daemon runs — and, in [`source`], the
//! ones `scramjet relay` runs against a producer's database. SQL lives only
//! here (and in the expressions [`crate::filter`] renders for the statements
//! here to embed), and every value goes in as a parameter.

pub mod batch;
pub mod outbox;
pub mod read;
pub mod retention;
pub mod source;
pub mod stage;
pub mod sync;

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    config::{PostgresSettings, Settings},
    redact, tls,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Arbitrary constant naming the advisory lock that serializes migrations
/// when several daemons start against one database at once.
const MIGRATION_LOCK: i64 = 0x5c7a_3e70_0001;

/// An error from the database, sorted by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying as is: the connection dropped, the server is restarting,
    /// a serialization failure or deadlock.
    #[error("transient database error: {0}")]
    Transient(String),
    /// Retrying the same input fails again (bad data, constraint, limits).
    #[error("database rejected the data: {0}")]
    Permanent(String),
    /// The server cancelled the statement (SQLSTATE 57014): it ran past
    /// `statement_timeout` (set on the read API's connections), or an
    /// operator cancelled it. Worth retrying, like `Transient`.
    #[error("statement cancelled: {0}")]
    Canceled(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = db_error_text(&e);
        match e.code() {
            // No SQLSTATE: I/O, a closed connection, a protocol error.
            None => StoreError::Transient(text),
            Some(code) if *code == SqlState::QUERY_CANCELED => StoreError::Canceled(text),
            Some(code) => {
                let class = &code.code()[..2];
                // 08 connection, 40 rollback (serialization, deadlock), 53
                // resources, 57 operator intervention (shutdown), 58 system, XX internal.
                if matches!(class, "08" | "40" | "53" | "57" | "58" | "XX")
                    || *code == SqlState::LOCK_NOT_AVAILABLE
                {
                    StoreError::Transient(text)
                } else {
                    StoreError::Permanent(text)
                }
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Transient(other.to_string()),
        }
    }
}

/// One line describing a database error, with the server's message when there is one.
pub fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.message(), db.code().code(), db.severity()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
    .replace('\n', " ")
}

/// The connection settings and TLS connector `postgres.*` describe.
pub fn pg_config(
    settings: &PostgresSettings,
) -> anyhow::Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let (url, mode) = tls::split_sslmode(&settings.url);
    let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: postgres.url {} is not a valid connection string: {e}",
            redact::url(&settings.url)
        )
    })?;
    if let Some(password) = settings.password()? {
        config.password(password);
    }
    if config.get_application_name().is_none() {
        config.application_name("scramjet");
    }
    // Without an explicit sslmode, tokio-postgres (like libpq) "prefers" TLS.
    // Over loopback that buys nothing and costs a third of the daemon's and
    // PostgreSQL's CPU per message (measured with `scramjet bench`), so a
    // loopback connection stays plain unless sslmode asks otherwise.
    if !settings.url.contains("sslmode") && only_loopback(&config) {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    let connector = tls::postgres_connector(mode, settings.tls_ca_file.as_deref())?;
    Ok((config, connector))
}

/// Whether every host of `config` is this machine (a loopback address,
/// `localhost`, or a Unix socket).
fn only_loopback(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        })
}

/// Connects once, creates the database if missing, runs migrations, and builds
/// one pool of `postgres.pool_size` (what the commands and the library use).
/// Retries the first connection as `startup` says.
pub async fn connect(settings: &Settings) -> anyhow::Result<Pool> {
    let (config, tls) = prepare(settings).await?;
    build_pool(config, tls, settings.postgres.pool_size)
}

/// The daemon's connections, in pools that cannot take from each other: what
/// the read API does (a slow filter, many clients) never makes the pipeline,
/// the outbox publisher, the gauges or `/readyz` wait for a connection.
#[derive(Clone)]
pub struct Pools {
    /// The pipeline's: 2, the batch transaction's and one for
    /// `Pipeline::settle` to look up a lost COMMIT, so that the pipeline
    /// never waits on itself.
    pub pipeline: Pool,
    /// The outbox publisher's: 1, as it holds one transaction at a time.
    pub publisher: Pool,
    /// Gauges, pruning and the `/readyz` ping: `postgres.pool_size` less the
    /// above. Each use is one short statement, so none waits long.
    pub background: Pool,
    /// The read API's: `http.pool_size`, each session with the
    /// `statement_timeout` of `http.statement_timeout`.
    pub read: Pool,
}

/// Connections of [`Pools::pipeline`].
const PIPELINE_CONNECTIONS: usize = 2;
/// Connections of [`Pools::publisher`].
const PUBLISHER_CONNECTIONS: usize = 1;
// `Settings::check` refuses a `postgres.pool_size` below this minimum,
// which must leave the background pool at least one connection.
const _: () =
    assert!(PIPELINE_CONNECTIONS + PUBLISHER_CONNECTIONS < crate::config::DAEMON_MIN_CONNECTIONS);

impl Pools {
    /// Prepares the database as [`connect`] does and builds the daemon's pools.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Pools> {
        let (config, tls) = prepare(settings).await?;
        let background = settings
            .postgres
            .pool_size
            .saturating_sub(PIPELINE_CONNECTIONS + PUBLISHER_CONNECTIONS)
            .max(1);
        let mut read = config.clone();
        // Appended, so that options given in postgres.url still apply.
        let timeout = format!(
            "-c statement_timeout={}",
            settings.http.statement_timeout.as_millis()
        );
        read.options(&match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {timeout}"),
            _ => timeout,
        });
        Ok(Pools {
            pipeline: build_pool(config.clone(), tls.clone(), PIPELINE_CONNECTIONS)?,
            publisher: build_pool(config.clone(), tls.clone(), PUBLISHER_CONNECTIONS)?,
            background: build_pool(config, tls.clone(), background)?,
            read: build_pool(read, tls, settings.http.pool_size)?,
        })
    }

    /// Closes every pool.
    pub fn close(&self) {
        for pool in [
            &self.pipeline,
            &self.publisher,
            &self.background,
            &self.read,
        ] {
            pool.close();
        }
    }
}

/// Reaches PostgreSQL (with the start-up retries), creates the database if
/// missing and migrates it; returns what connects to it.
async fn prepare(
    settings: &Settings,
) -> anyhow::Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let shown = redact::url(&settings.postgres.url);
    let (config, tls) = pg_config(&settings.postgres)?;
    let dbname = config
        .get_dbname()
        .map(str::to_owned)
        .or_else(|| config.get_user().map(str::to_owned))
        .context("invalid configuration: postgres.url names no database")?;

    let mut attempt = 0;
    let mut delay = Duration::from_millis(settings.startup.connect_backoff_ms);
    loop {
        attempt += 1;
        match prepare_database(&config, &tls, &dbname).await {
            Ok(()) => break,
            Err(e) if attempt >= settings.startup.connect_attempts => {
                return Err(e).with_context(|| {
                    format!("cannot use PostgreSQL at {shown} after {attempt} attempt(s)")
                });
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), attempt, url = %shown, "PostgreSQL not available yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }

    Ok((config, tls))
}

/// A pool of at most `size` connections, opened as they are first needed.
fn build_pool(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    size: usize,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("cannot build the PostgreSQL pool")
}

/// Creates the database when missing, then migrates it.
async fn prepare_database(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    dbname: &str,
) -> anyhow::Result<()> {
    match connect_one(config, tls).await {
        Ok(mut client) => return migrate_with(&mut client).await,
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(anyhow::anyhow!(db_error_text(&e))),
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect_one(&admin, tls).await.map_err(|e| {
        anyhow::anyhow!(
            "database {dbname} is missing and cannot be created: {}",
            db_error_text(&e)
        )
    })?;
    // CREATE DATABASE takes no parameters; the name is quoted as an identifier.
    let sql = format!("CREATE DATABASE {}", quote_ident(dbname));
    match client.batch_execute(&sql).await {
        Ok(()) => tracing::info!(database = dbname, "created database"),
        // Another process created it first.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
        Err(e) => anyhow::bail!("cannot create database {dbname}: {}", db_error_text(&e)),
    }
    let mut client = connect_one(config, tls)
        .await
        .map_err(|e| anyhow::anyhow!(db_error_text(&e)))?;
    migrate_with(&mut client).await
}

/// Runs pending migrations (used by `scramjet migrate` and at start).
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    connect(settings).await.map(drop)
}

async fn migrate_with(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| anyhow::anyhow!("cannot take the migration lock: {}", db_error_text(&e)))?;
    let report = embedded::migrations::runner()
        .run_async(client)
        .await
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"));
    // The lock is also released when the session ends; this is the tidy path.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    for m in report?.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(())
}

async fn connect_one(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls.clone()).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "setup connection closed");
        }
    });
    Ok(client)
}

/// Quotes an SQL identifier: wraps it in `"` and doubles any `"` inside.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether the database answers a trivial query within `timeout`.
pub async fn ping(pool: &Pool, timeout: Duration) -> bool {
    let check = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(tokio::time::timeout(timeout, check).await, Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("scramjet"), "\"scramjet\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
