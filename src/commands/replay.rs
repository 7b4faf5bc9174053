//! `scramjet replay`: `snapshot` events (CONTRACT §5) for the current
//! resources of a type, so that a new downstream consumer can bootstrap.
//!
//! Snapshots go through the outbox, a page per transaction that reads its
//! rows under their keys' advisory locks, as every writer of `resources`
//! takes them: the outbox publisher of the running daemon publishes them in commit
//! order with the live changes, so a consumer never sees a snapshot older
//! than a change it already received. Pages are small transactions, so the
//! live pipeline is never held up for long; `--rate` throttles further, and
//! `--after` resumes from the last id printed.

use std::time::{Duration, Instant};

use anyhow::Context;
use time::OffsetDateTime;

use crate::{
    api::filter::Filter,
    config::Settings,
    domain::canonical,
    domain::entity::EntityType,
    domain::event::{self, Event, EventFields, Op},
    store,
};

/// The arguments of `scramjet replay`, as typed; [`run`] checks them into a
/// [`ReplayRequest`].
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Entity type.
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: String,
    /// Only resources changed at or after this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only resources matching this filter (docs/filters.md),
    /// e.g. 'dept_id in department(name = "Physics")'.
    #[arg(long = "where", value_name = "FILTER")]
    pub filter: Option<String>,
    /// Put before `<type>.snapshot` in the routing key, e.g. `replay.`.
    // The help says it without code marks, as it always has.
    #[arg(
        long,
        default_value = "",
        help = r#"Prefix for the routing key, e.g. "replay." gives "replay.<type>.snapshot""#
    )]
    pub routing_prefix: String,
    /// Resume after this id (as printed by an earlier run).
    #[arg(long, value_name = "ID")]
    pub after: Option<String>,
    /// Snapshots per transaction.
    #[arg(long, default_value_t = 500)]
    pub page: i64,
    /// Most snapshots per second (0: no limit).
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
}

/// `scramjet replay`: checks the arguments, then [`replay`]s.
pub async fn run(settings: &Settings, args: ReplayArgs) -> anyhow::Result<()> {
    let since = args
        .since
        .map(|s| {
            OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339).map_err(
                |_| anyhow::anyhow!("--since must be an RFC 3339 time, e.g. 2026-11-23T00:00:00Z"),
            )
        })
        .transpose()?;
    anyhow::ensure!(
        (1..=10_000).contains(&args.page),
        "--page must be from 1 to 10000"
    );
    let filter = super::parse_where(args.filter.as_deref())?;
    let request = ReplayRequest {
        since,
        filter,
        entity_type: args.entity_type,
        routing_prefix: args.routing_prefix,
        after: args.after,
        page: args.page,
        rate: args.rate,
    };
    replay(settings, &request).await.map(drop)
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The entity type.
    pub entity_type: String,
    /// Only resources changed at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only resources matching this filter (`--where`).
    pub filter: Option<Filter>,
    /// Put before `<type>.snapshot` in the routing key, e.g. `replay.`.
    pub routing_prefix: String,
    /// Resume after this id (byte order).
    pub after: Option<String>,
    /// Snapshots per transaction.
    pub page: i64,
    /// Most snapshots per second (0: no limit).
    pub rate: u64,
}

/// Writes snapshot events for every matching resource; returns how many.
pub async fn replay(settings: &Settings, req: &ReplayRequest) -> anyhow::Result<u64> {
    EntityType::parse(req.entity_type.as_str()).map_err(|m| anyhow::anyhow!("--type: {m}"))?;
    anyhow::ensure!(
        req.routing_prefix.len() + req.entity_type.len() + ".snapshot".len() <= 255,
        "--routing-prefix is too long for a routing key"
    );
    let pool = store::connect_migrated(settings).await?;
    let started = Instant::now();
    let mut after = req.after.clone();
    let mut total = 0u64;
    loop {
        let mut client = pool.get().await.context("cannot reach PostgreSQL")?;
        let tx = store::begin(&mut client).await.context("cannot begin")?;
        let page = store::read::PageOf {
            entity_type: &req.entity_type,
            after: after.as_deref(),
            updated_since: req.since,
            filter: req.filter.as_ref(),
            limit: req.page,
        };
        let (last, rows) = store::read::lock_resources_page(&tx, &page).await?;
        if last.is_none() {
            break;
        }
        let occurred_at = event::now_rfc3339();
        let events: Vec<Event> = rows
            .iter()
            .map(|r| {
                let data = canonical::to_canonical(&r.data);
                let mut e = Event::new(
                    Op::Snapshot,
                    &r.entity_type,
                    &r.id,
                    EventFields {
                        data: Some(&data),
                        hash: Some(&r.hash),
                        version: r.version,
                        ..Default::default()
                    },
                    &occurred_at,
                    None,
                );
                e.routing_key = format!("{}{}", req.routing_prefix, e.routing_key);
                e
            })
            .collect();
        store::outbox::insert(store::Conn::of_tx(&tx), &events).await?;
        tx.commit().await.context("cannot commit")?;
        total += rows.len() as u64;
        after = last;
        println!(
            "replayed {total} snapshot(s) of {}; resume with --after {}",
            req.entity_type,
            serde_json::to_string(after.as_deref().unwrap_or_default())
                .expect("a string serializes")
        );
        if req.rate > 0 {
            // Stay at or under `rate` snapshots per second on average.
            let due = Duration::from_secs_f64(total as f64 / req.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    println!(
        "done: {total} snapshot(s) of {} written to the outbox in {:.1} s; the running daemon publishes them",
        req.entity_type,
        started.elapsed().as_secs_f64()
    );
    Ok(total)
}
