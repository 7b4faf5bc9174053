//! PostgreSQL: connection pool, database creation, migrations, and (in the
//! submodules) every SQL statement the daemon runs — and, in [`producer`], the
//! ones `scramjet relay` runs against a producer's database. SQL lives only
//! here (and in the expressions [`crate::api::filter`] renders for the statements
//! here to embed), and every value goes in as a parameter.

pub(crate) mod batch;
pub(crate) mod leases;
pub(crate) mod outbox;
pub(crate) mod producer;
pub(crate) mod read;
pub(crate) mod retention;
pub(crate) mod stage;
pub(crate) mod sync;

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    config::{PostgresSettings, Settings},
    support::redact,
    support::retry::Retry,
    support::tls,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Arbitrary constant naming the advisory lock that serializes migrations
/// when several daemons start against one database at once.
const MIGRATION_LOCK: i64 = 0x5c7a_3e70_0001;

/// An error from the database, sorted by whose fault it is — which decides
/// what the caller does. Only [`StoreError::Refused`] may dead-letter a
/// message: everything the environment causes is [`StoreError::Unavailable`],
/// an outage to wait out.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The environment failed: the connection, the server's state (read-only
    /// after a failover, shutting down, out of resources), credentials,
    /// privileges, the schema under a cached statement, a timeout, or a
    /// conflict with another transaction. Retrying the same input can succeed
    /// once the cause is gone.
    #[error("database unavailable ({}): {detail}", cause.as_str())]
    Unavailable {
        /// What kind of outage (a metric label).
        cause: Cause,
        /// The database's or the driver's words.
        detail: String,
    },
    /// The statement's own input was refused (a data exception, an integrity
    /// violation, a program limit): retrying the same data fails again.
    #[error("database rejected the data: {detail}")]
    Refused {
        /// The SQLSTATE, when the server gave one.
        sqlstate: Option<String>,
        /// The database's words.
        detail: String,
    },
}

/// Why the database is unavailable; the `reason` label of
/// `scramjet_outages_total` and the `reason` `/readyz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// No connection: refused, dropped, or timed out (SQLSTATE class 08, or none).
    Connection,
    /// The server takes no writes: a standby or a read-only database (25006, 55000).
    ReadOnly,
    /// The credentials were refused (class 28).
    Authentication,
    /// The role lacks a privilege (42501).
    Privilege,
    /// The schema changed under the daemon: a cached plan, a missing table
    /// or column, a dropped database (0A000, 26000, 3D000, class 42).
    Schema,
    /// `statement_timeout` cancelled a statement (57014).
    StatementTimeout,
    /// The server is shutting down or restarting (class 57).
    Shutdown,
    /// The server ran out of a resource: memory, disk, connections, locks (class 53).
    Resources,
    /// A deadlock or serialization failure with another transaction (class 40,
    /// 55P03): retried, but not an outage.
    Conflict,
    /// A COMMIT went unanswered and the server cannot say yet what became of it.
    CommitUnknown,
    /// Every message of a batch was refused with the same SQLSTATE: the
    /// cause is not in the messages.
    RefusedAll,
    /// Anything else: an internal or system error on the server, an error in the driver.
    Server,
}

impl Cause {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Connection => "connection",
            Cause::ReadOnly => "read_only",
            Cause::Authentication => "authentication",
            Cause::Privilege => "privilege",
            Cause::Schema => "schema",
            Cause::StatementTimeout => "statement_timeout",
            Cause::Shutdown => "shutdown",
            Cause::Resources => "resources",
            Cause::Conflict => "conflict",
            Cause::CommitUnknown => "commit_unknown",
            Cause::RefusedAll => "refused_all",
            Cause::Server => "server",
        }
    }

    /// Whether the cause is an outage (`/readyz` 503, counted), rather than
    /// a momentary conflict with another transaction.
    pub fn is_outage(self) -> bool {
        self != Cause::Conflict
    }

    /// Whether a smaller batch may get through where this one did not.
    pub fn shrinks(self) -> bool {
        self == Cause::StatementTimeout
    }
}

impl StoreError {
    /// An outage of the given cause.
    pub fn unavailable(cause: Cause, detail: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            cause,
            detail: detail.into(),
        }
    }

    /// Whether the connection this error came from should be closed rather
    /// than reused: after an outage its session may carry what caused it (a
    /// read-only default, statements prepared against an old schema, a
    /// revoked login).
    pub fn retires_connection(&self) -> bool {
        matches!(self, StoreError::Unavailable { cause, .. } if cause.is_outage())
    }
}

/// Sorts a SQLSTATE into whose fault it is: `None` for the data's (only
/// data exceptions, class 22, integrity violations, 23, and program limits,
/// 54, belong to the data of one statement), else the environment's cause.
pub(crate) fn classify(code: &SqlState) -> Option<Cause> {
    let code = code.code();
    let class = &code[..2];
    Some(match (class, code) {
        ("22" | "23" | "54", _) => return None,
        ("08", _) => Cause::Connection,
        (_, "25006" | "55000") => Cause::ReadOnly,
        ("28", _) => Cause::Authentication,
        (_, "42501") => Cause::Privilege,
        (_, "0A000" | "26000" | "3D000") | ("42", _) => Cause::Schema,
        (_, "57014") => Cause::StatementTimeout,
        ("57", _) => Cause::Shutdown,
        ("53", _) => Cause::Resources,
        ("40", _) | (_, "55P03") => Cause::Conflict,
        _ => Cause::Server,
    })
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let detail = db_error_text(&e);
        match e.code() {
            // No SQLSTATE: I/O, a closed connection, a protocol error.
            None => StoreError::unavailable(Cause::Connection, detail),
            Some(code) => match classify(code) {
                Some(cause) => StoreError::unavailable(cause, detail),
                None => StoreError::Refused {
                    sqlstate: Some(code.code().to_owned()),
                    detail,
                },
            },
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::unavailable(Cause::Connection, other.to_string()),
        }
    }
}

/// One line describing a database error, with the server's message when there is one.
pub(crate) fn db_error_text(e: &tokio_postgres::Error) -> String {
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
pub(crate) fn pg_config(
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
    // A server that stops answering without closing the connection (a
    // black-holed network, a frozen host) would otherwise hold a batch for
    // hours: tokio-postgres probes an idle connection only after 2 h, and
    // unacknowledged data waits for the kernel's retransmissions (about
    // 15 min). Probe after 30 s, and give up on data unacknowledged for 60 s.
    if !settings.url.contains("keepalives") {
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
    }
    if !settings.url.contains("tcp_user_timeout") {
        config.tcp_user_timeout(Duration::from_secs(60));
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

/// A stored document exactly as it was sent: the row's canonical text when
/// it keeps one (only rows whose numbers jsonb would rewrite do, see
/// `migrations/V5__exact_data.sql`), else its jsonb `data`.
fn exact_data<T: From<Value>>(jsonb: T, canonical: Option<String>) -> Result<T, StoreError> {
    match canonical {
        None => Ok(jsonb),
        Some(text) => serde_json::from_str::<Value>(&text)
            .map(T::from)
            .map_err(|e| StoreError::Refused {
                sqlstate: None,
                detail: format!("a stored canonical text is not JSON: {e}"),
            }),
    }
}

/// Connects once, creates the database if missing, runs migrations, and builds
/// one pool of `postgres.pool_size` (what the commands and the library use).
/// Retries the first connection as `startup` says.
pub(crate) async fn connect(settings: &Settings) -> anyhow::Result<Pool> {
    let (config, tls) = prepare(settings).await?;
    build_pool(config, tls, settings.postgres.pool_size)
}

/// Connects to a database that already exists and is migrated, without
/// creating or changing anything: for commands that only read and write rows
/// (`status`, `replay`), so they need no DDL rights. A database whose schema
/// is older than this build's is refused with a line saying so.
pub(crate) async fn connect_migrated(settings: &Settings) -> anyhow::Result<Pool> {
    let shown = redact::url(&settings.postgres.url);
    let (config, tls) = pg_config(&settings.postgres)?;
    let client = connect_one(&config, &tls)
        .await
        .map_err(|e| anyhow::anyhow!("cannot use PostgreSQL at {shown}: {}", db_error_text(&e)))?;
    let newest = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0);
    let read = |e: tokio_postgres::Error| {
        anyhow::anyhow!(
            "cannot read the schema version at {shown}: {}",
            db_error_text(&e)
        )
    };
    // Two statements: one naming a missing table fails as it is parsed.
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(read)?
        .try_get(0)?;
    let applied: Option<i64> = if exists {
        client
            .query_one(
                "SELECT max(version)::int8 FROM refinery_schema_history",
                &[],
            )
            .await
            .map_err(read)?
            .try_get(0)?
    } else {
        None
    };
    match applied {
        Some(v) if v >= newest => build_pool(config, tls, settings.postgres.pool_size),
        Some(v) => anyhow::bail!(
            "the database at {shown} has schema version {v}, this scramjet needs {newest}: \
             run `scramjet migrate` (or start the daemon) first"
        ),
        None => anyhow::bail!(
            "the database at {shown} has no Scramjet schema: run `scramjet migrate` (or start the \
             daemon) first"
        ),
    }
}

/// Begins a transaction of a writer of `resources` at READ COMMITTED,
/// whatever the server's or the database's `default_transaction_isolation`:
/// the writers lock a key with an advisory lock, then read its rows in a
/// later statement, and only under READ COMMITTED does that statement see
/// what another writer of the key committed while this one waited.
pub(crate) async fn begin(
    client: &mut deadpool_postgres::Client,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
}

/// What [`Pipelined::begin_with`] sends: a writer's transaction at READ COMMITTED, as [`begin`] opens one.
const BEGIN_WRITER: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A connection's client and its statement cache, whether it runs inside a
/// [`deadpool_postgres::Transaction`] or inside a transaction opened with
/// [`Pipelined::begin_with`]: what the statements of [`batch`] and
/// [`outbox`] run on.
#[derive(Clone, Copy)]
pub(crate) struct Conn<'a> {
    /// The connection.
    client: &'a tokio_postgres::Client,
    /// Its prepared statements.
    cache: &'a deadpool_postgres::StatementCache,
}

impl<'a> Conn<'a> {
    /// The connection of `tx` (a transaction or a savepoint).
    pub(crate) fn of_tx(tx: &'a deadpool_postgres::Transaction<'_>) -> Conn<'a> {
        Conn {
            client: tx.client(),
            cache: &tx.statement_cache,
        }
    }

    /// Like [`deadpool_postgres::Transaction::prepare_cached`].
    pub(crate) async fn prepare_cached(
        &self,
        query: &str,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        self.cache.prepare(self.client, query).await
    }
}

impl std::ops::Deref for Conn<'_> {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        self.client
    }
}

/// A pooled connection for one writer's transaction at a time whose `BEGIN`
/// goes out with its first statements instead of alone: one round trip less
/// per transaction (about 200 µs over loopback), which the batch and the
/// outbox publisher pay on every round.
///
/// The statements sent behind `BEGIN` would run each in a transaction of
/// its own if `BEGIN` failed and they did not. That cannot happen while the
/// session lives: `BEGIN` fails only when the session does (lost
/// connection, shutdown), and in a transaction already open it only warns —
/// which this type rules out, since it never lets the connection go back to
/// the pool with a transaction open: dropped unfinished (a cancelled
/// future, an error path), it closes the connection, and the server rolls
/// the transaction back.
pub(crate) struct Pipelined {
    /// The connection; `None` once given back or retired.
    client: Option<deadpool_postgres::Client>,
    /// Whether a transaction may be open on it.
    open: std::sync::atomic::AtomicBool,
}

impl Pipelined {
    /// Takes `client` for transactions.
    pub(crate) fn new(client: deadpool_postgres::Client) -> Pipelined {
        Pipelined {
            client: Some(client),
            open: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The connection, for the statements of the transaction.
    pub(crate) fn conn(&self) -> Conn<'_> {
        let client = self.client.as_ref().expect("held until dropped");
        Conn {
            client,
            cache: &client.statement_cache,
        }
    }

    /// Begins a transaction at READ COMMITTED (see [`begin`]) and runs
    /// `first` in it, `BEGIN` sent ahead of `first`'s statements: `first`
    /// must send its first statement on its first poll, as the statements of
    /// [`batch`] and [`outbox`] do (`try_join!` polls in argument order).
    pub(crate) async fn begin_with<T>(
        &self,
        first: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.open.store(true, std::sync::atomic::Ordering::Relaxed);
        let conn = self.conn();
        let begin = async {
            conn.batch_execute(BEGIN_WRITER)
                .await
                .map_err(StoreError::from)
        };
        let ((), value) = futures_util::try_join!(begin, first)?;
        Ok(value)
    }

    /// Commits the transaction. An error leaves it to the caller to tell
    /// an unanswered COMMIT from a refused one; either way the connection
    /// is then retired on drop.
    pub(crate) async fn commit(&self) -> Result<(), tokio_postgres::Error> {
        self.conn().batch_execute("COMMIT").await?;
        self.open.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Rolls the transaction back without waiting for the reply, as a
    /// dropped [`tokio_postgres::Transaction`] does: the ROLLBACK goes out
    /// ahead of whatever the connection's next user sends.
    pub(crate) fn rollback_unawaited(&self) {
        use futures_util::FutureExt;
        // The first poll sends it; the reply is dropped when it comes.
        let _ = self.conn().batch_execute("ROLLBACK").now_or_never();
        // A connection already gone stays marked open: it is retired on drop.
        self.open.store(
            self.conn().is_closed(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Ends an unfinished transaction, giving the connection back to the
    /// pool: rolled back, or — with `retire`, or if the rollback fails —
    /// by closing the connection.
    pub(crate) async fn release(mut self, retire: bool) {
        if !retire && *self.open.get_mut() && self.conn().batch_execute("ROLLBACK").await.is_ok() {
            *self.open.get_mut() = false;
        }
        if retire {
            *self.open.get_mut() = true;
        }
        // Drop retires it if still open.
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && *self.open.get_mut()
        {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The daemon's connections, in pools that cannot take from each other: what
/// the read API does (a slow filter, many clients) never makes the pipeline,
/// the outbox publisher, the gauges or `/readyz` wait for a connection.
#[derive(Clone)]
pub(crate) struct Pools {
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
    pub(crate) async fn connect(settings: &Settings) -> anyhow::Result<Pools> {
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
        // Partitioned, a batch transaction of a daemon that paused must not
        // keep a takeover waiting on its leases' share locks: PostgreSQL ends
        // it once idle for a lease's time (its batch then fails the fence).
        let pipeline = if settings.amqp.partitioned() {
            let mut partitioned = config.clone();
            let idle = format!(
                "-c idle_in_transaction_session_timeout={}",
                settings.partitioning.lease_ttl.as_millis()
            );
            partitioned.options(&match config.get_options() {
                Some(given) if !given.is_empty() => format!("{given} {idle}"),
                _ => idle,
            });
            partitioned
        } else {
            config.clone()
        };
        Ok(Pools {
            pipeline: build_pool(pipeline, tls.clone(), PIPELINE_CONNECTIONS)?,
            publisher: build_pool(config.clone(), tls.clone(), PUBLISHER_CONNECTIONS)?,
            background: build_pool(config, tls.clone(), background)?,
            read: build_pool(read, tls, settings.http.pool_size)?,
        })
    }

    /// Closes every pool.
    pub(crate) fn close(&self) {
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

    Retry::startup(&settings.startup)
        .run(
            async || prepare_database(&config, &tls, &dbname).await,
            |e, pause| {
                tracing::warn!(error = %format!("{e:#}"), attempt = pause.attempt, url = %shown, "PostgreSQL not available yet; retrying");
            },
        )
        .await
        .map_err(|gave_up| {
            gave_up.error.context(format!(
                "cannot use PostgreSQL at {shown} after {} attempt(s)",
                gave_up.attempts
            ))
        })?;

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
pub(crate) async fn migrate(settings: &Settings) -> anyhow::Result<()> {
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
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether the database answers a trivial query within `timeout`.
pub(crate) async fn ping(pool: &Pool, timeout: Duration) -> bool {
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
    fn only_data_exceptions_integrity_violations_and_program_limits_are_the_datas_fault() {
        for refused in ["22P02", "22003", "23505", "23514", "54000", "54001"] {
            assert_eq!(classify(&SqlState::from_code(refused)), None, "{refused}");
        }
        for (code, cause) in [
            ("25006", Cause::ReadOnly),
            ("28P01", Cause::Authentication),
            ("28000", Cause::Authentication),
            ("42501", Cause::Privilege),
            ("0A000", Cause::Schema),
            ("42P01", Cause::Schema),
            ("57014", Cause::StatementTimeout),
            ("57P01", Cause::Shutdown),
            ("08006", Cause::Connection),
            ("53300", Cause::Resources),
            ("40P01", Cause::Conflict),
            ("XX000", Cause::Server),
            ("58030", Cause::Server),
            ("P0001", Cause::Server),
        ] {
            assert_eq!(classify(&SqlState::from_code(code)), Some(cause), "{code}");
        }
        assert!(!Cause::Conflict.is_outage());
        assert!(Cause::ReadOnly.is_outage());
    }

    #[test]
    fn a_silent_server_is_given_up_on_within_a_minute_unless_the_url_says_otherwise() {
        let mut settings = PostgresSettings::default();
        let (config, _) = pg_config(&settings).unwrap();
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(60))
        );
        settings.url = "postgres://u@db/x?keepalives_idle=5&tcp_user_timeout=7".into();
        let (config, _) = pg_config(&settings).unwrap();
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("scramjet"), "\"scramjet\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
