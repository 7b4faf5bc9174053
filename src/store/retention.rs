//! Pruning of expired duplicate-detection and ordering state, in small
//! chunks so that no statement holds locks for long or competes with the
//! pipeline for more than a moment.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::StoreError;

/// Rows deleted per statement.
const CHUNK: i64 = 5_000;

/// Deletes `inbox` rows older than `message_ids` and tombstones older than
/// `tombstones`. Returns how many of each went.
pub(crate) async fn prune(
    pool: &Pool,
    message_ids: Duration,
    tombstones: Duration,
) -> Result<(u64, u64), StoreError> {
    const INBOX: &str = "DELETE FROM inbox WHERE message_id IN ( \
           SELECT message_id FROM inbox \
           WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2)";
    const GRAVES: &str = "DELETE FROM tombstones WHERE (type, id) IN ( \
           SELECT type, id FROM tombstones \
           WHERE deleted_at < now() - make_interval(secs => $1) LIMIT $2)";
    let mut totals = [0u64; 2];
    for (i, (sql, age)) in [(INBOX, message_ids), (GRAVES, tombstones)]
        .into_iter()
        .enumerate()
    {
        let secs = age.as_secs_f64();
        loop {
            // A connection per chunk: the daemon's background pool is small
            // and `/readyz` pings through it, so none is held for long.
            let client = pool.get().await?;
            let stmt = client.prepare_cached(sql).await?;
            let n = client.execute(&stmt, &[&secs, &CHUNK]).await?;
            totals[i] += n;
            if n < CHUNK as u64 {
                break;
            }
        }
    }
    Ok((totals[0], totals[1]))
}
