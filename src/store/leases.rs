//! Partitioned mode (`amqp.partitions` > 1): the members that share an
//! inbound queue's partitions, and their leases (`migrations/V6__partitions.sql`).
//!
//! A lease is the `consumer_epochs` row of a partition queue. Taking it from
//! another owner, or from none, raises its epoch; renewing it does not. Every
//! batch of the partition passes the same fence as a single-queue batch
//! ([`super::batch::Fence::Check`]): a share lock on the row and its epoch
//! compared with the one its daemon took. So a takeover waits for a batch
//! that is committing, and a batch of a daemon that lost the lease never
//! commits.

use std::time::Duration;

use deadpool_postgres::Client;

use super::StoreError;

/// Longest a lease statement waits for a row lock (a batch of this daemon
/// that is committing holds a share lock on its lease): past it the
/// statement fails and the next tick tries again.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// The members of a group and this daemon's name in it.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    /// The inbound queue whose partitions are shared.
    pub of: String,
    /// This daemon's member name: unique to its process.
    pub member: String,
    /// How long a renewal lasts.
    pub ttl: Duration,
}

type Param = dyn tokio_postgres::types::ToSql + Sync;

/// A lease this daemon holds: the partition and the epoch it took it at.
pub(crate) type Held = (u16, i64);

impl Group {
    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Renews this daemon's membership and returns the live members, in
    /// name order (this one included); forgets members dead for an hour.
    pub(crate) async fn heartbeat(&self, client: &mut Client) -> Result<Vec<String>, StoreError> {
        let tx = client.transaction().await?;
        let (beat, live, forget) = futures_util::try_join!(
            tx.prepare_cached(
                "INSERT INTO consumer_members (partition_of, member, expires_at) \
                 VALUES ($1, $2, now() + $3::int8 * interval '1 millisecond') \
                 ON CONFLICT (partition_of, member) DO UPDATE SET expires_at = excluded.expires_at"
            ),
            tx.prepare_cached(
                "SELECT member FROM consumer_members \
                 WHERE partition_of = $1 AND expires_at > now() ORDER BY member"
            ),
            tx.prepare_cached(
                "DELETE FROM consumer_members \
                 WHERE partition_of = $1 AND expires_at < now() - interval '1 hour'"
            ),
        )?;
        let ttl = self.ttl_ms();
        let beat_params: [&Param; 3] = [&self.of, &self.member, &ttl];
        let group: [&Param; 1] = [&self.of];
        let (_, rows, _) = futures_util::try_join!(
            tx.execute(&beat, &beat_params),
            tx.query(&live, &group),
            tx.execute(&forget, &group),
        )?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// Extends the leases on `partitions` that this daemon still owns;
    /// returns those, with their epochs. One missing was taken by another
    /// daemon (this one paused, or could not renew in time).
    pub(crate) async fn renew(
        &self,
        client: &mut Client,
        partitions: &[u16],
    ) -> Result<Vec<Held>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        self.with_lock_timeout(
            client,
            "UPDATE consumer_epochs SET expires_at = now() + $4::int8 * interval '1 millisecond' \
             WHERE partition_of = $1 AND owner = $2 AND partition = ANY($3::int[]) \
             RETURNING partition, epoch",
            partitions,
            Some(self.ttl_ms()),
        )
        .await
    }

    /// Takes whichever of `partitions` no live daemon holds (never held,
    /// released, or expired), raising each one's epoch; returns those taken.
    /// A lease that a committing batch holds locked is skipped, not waited
    /// for: the next tick tries again.
    pub(crate) async fn take(
        &self,
        client: &mut Client,
        partitions: &[(u16, String)],
    ) -> Result<Vec<Held>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let numbers: Vec<i32> = partitions.iter().map(|(p, _)| i32::from(*p)).collect();
        let queues: Vec<String> = partitions.iter().map(|(_, q)| q.clone()).collect();
        let tx = client.transaction().await?;
        let (create, take) = futures_util::try_join!(
            tx.prepare_cached(
                "INSERT INTO consumer_epochs (queue, epoch, partition_of, partition) \
                 SELECT q, 0, $1, p FROM unnest($2::text[], $3::int[]) AS u(q, p) \
                 ON CONFLICT (queue) DO NOTHING"
            ),
            tx.prepare_cached(
                "WITH free AS ( \
                   SELECT queue FROM consumer_epochs \
                   WHERE queue = ANY($2::text[]) \
                     AND (owner IS NULL OR owner = $3 OR expires_at < now()) \
                   FOR UPDATE SKIP LOCKED) \
                 UPDATE consumer_epochs c \
                 SET owner = $3, epoch = c.epoch + 1, registered_at = now(), \
                     expires_at = now() + $4::int8 * interval '1 millisecond', \
                     partition_of = $1 \
                 FROM free WHERE c.queue = free.queue \
                 RETURNING c.partition, c.epoch"
            ),
        )?;
        let ttl = self.ttl_ms();
        let create_params: [&Param; 3] = [&self.of, &queues, &numbers];
        let take_params: [&Param; 4] = [&self.of, &queues, &self.member, &ttl];
        let (_, rows) = futures_util::try_join!(
            tx.execute(&create, &create_params),
            tx.query(&take, &take_params),
        )?;
        tx.commit().await?;
        held(&rows)
    }

    /// Gives up the leases on `partitions` (once their consumers have
    /// stopped): another daemon may take them at once.
    pub(crate) async fn release(
        &self,
        client: &mut Client,
        partitions: &[u16],
    ) -> Result<Vec<Held>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        self.with_lock_timeout(
            client,
            "UPDATE consumer_epochs SET owner = NULL, expires_at = NULL \
             WHERE partition_of = $1 AND owner = $2 AND partition = ANY($3::int[]) \
             RETURNING partition, epoch",
            partitions,
            None,
        )
        .await
    }

    /// Leaves the group: the membership row goes (the leases are released
    /// first, by [`Group::release`]).
    pub(crate) async fn leave(&self, client: &mut Client) -> Result<(), StoreError> {
        let stmt = client
            .prepare_cached("DELETE FROM consumer_members WHERE partition_of = $1 AND member = $2")
            .await?;
        client.execute(&stmt, &[&self.of, &self.member]).await?;
        Ok(())
    }

    /// Runs `sql` (parameters: group, member, partitions, and the ttl in
    /// ms when given) in a transaction with [`LOCK_TIMEOUT`]; returns the
    /// `(partition, epoch)` rows it returns.
    async fn with_lock_timeout(
        &self,
        client: &mut Client,
        sql: &str,
        partitions: &[u16],
        ttl_ms: Option<i64>,
    ) -> Result<Vec<Held>, StoreError> {
        let numbers: Vec<i32> = partitions.iter().map(|p| i32::from(*p)).collect();
        let tx = client.transaction().await?;
        let (limit, stmt) =
            futures_util::try_join!(tx.prepare_cached(LOCK_TIMEOUT), tx.prepare_cached(sql))?;
        let mut params: Vec<&Param> = vec![&self.of, &self.member, &numbers];
        if let Some(ttl) = &ttl_ms {
            params.push(ttl);
        }
        let (_, rows) = futures_util::try_join!(tx.execute(&limit, &[]), tx.query(&stmt, &params))?;
        tx.commit().await?;
        held(&rows)
    }
}

fn held(rows: &[tokio_postgres::Row]) -> Result<Vec<Held>, StoreError> {
    rows.iter()
        .map(|r| {
            let partition: i32 = r.try_get(0)?;
            let epoch: i64 = r.try_get(1)?;
            Ok((u16::try_from(partition).unwrap_or(u16::MAX), epoch))
        })
        .collect()
}

/// The partitions of `group` that a daemon ever took, or whose outbox lane
/// has rows: what a change of `amqp.partitions` must account for.
pub(crate) async fn known_partitions(client: &Client, group: &str) -> Result<Vec<u16>, StoreError> {
    let rows = client
        .query(
            "SELECT partition FROM consumer_epochs WHERE partition_of = $1 \
             UNION SELECT DISTINCT partition FROM outbox WHERE partition IS NOT NULL \
             ORDER BY 1",
            &[&group],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let p: i32 = r.try_get(0)?;
            Ok(u16::try_from(p).unwrap_or(u16::MAX))
        })
        .collect()
}

/// A partition as `scramjet status` shows it.
#[derive(Debug)]
pub(crate) struct PartitionRow {
    /// Its number.
    pub partition: u16,
    /// The daemon holding it, if any holds a live lease.
    pub owner: Option<String>,
    /// Its epoch (0: never taken).
    pub epoch: i64,
    /// Milliseconds left on the lease (negative: expired).
    pub expires_in_ms: Option<i64>,
    /// Outbox rows (committed batches with events) not yet published.
    pub outbox_rows: i64,
}

/// Every partition of `group` (the inbound queue) that has a lease row or
/// outbox rows, in partition order, and the live members.
pub(crate) async fn list(
    client: &Client,
    group: &str,
) -> Result<(Vec<PartitionRow>, Vec<String>), StoreError> {
    let rows = client
        .query(
            "SELECT coalesce(c.partition, o.partition), c.owner, coalesce(c.epoch, 0), \
               (extract(epoch FROM c.expires_at - now()) * 1000)::int8, coalesce(o.n, 0) \
             FROM (SELECT partition, owner, epoch, expires_at FROM consumer_epochs \
                   WHERE partition_of = $1) c \
             FULL JOIN (SELECT partition, count(*) AS n FROM outbox \
                        WHERE partition IS NOT NULL GROUP BY partition) o \
               ON o.partition = c.partition \
             ORDER BY 1",
            &[&group],
        )
        .await?;
    let members = client
        .query(
            "SELECT member FROM consumer_members \
             WHERE partition_of = $1 AND expires_at > now() ORDER BY member",
            &[&group],
        )
        .await?;
    let partitions = rows
        .iter()
        .map(|r| {
            let partition: i32 = r.try_get(0)?;
            Ok(PartitionRow {
                partition: u16::try_from(partition).unwrap_or(u16::MAX),
                owner: r.try_get(1)?,
                epoch: r.try_get(2)?,
                expires_in_ms: r.try_get(3)?,
                outbox_rows: r.try_get(4)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let members = members
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    Ok((partitions, members))
}

/// Which of `partitions` partitions the member `me` should hold, given the
/// live `members` (in any order): a balanced share — each member gets
/// ⌊P/n⌋ or ⌈P/n⌉, so every member has one when P ≥ n — chosen by
/// rendezvous hashing, so that a member joining or leaving moves few
/// partitions. Every member computes the same answer from the same list;
/// while lists differ (a member just joined), the leases keep any
/// partition to one owner.
pub(crate) fn share(members: &[String], me: &str, partitions: u16) -> Vec<u16> {
    let mut members: Vec<&str> = members.iter().map(String::as_str).collect();
    members.sort_unstable();
    members.dedup();
    let n = members.len();
    if n == 0 || !members.contains(&me) {
        return Vec::new();
    }
    let total = usize::from(partitions);
    // The first P mod n members (in name order) take one more.
    let mut room: Vec<usize> = (0..n)
        .map(|i| total / n + usize::from(i < total % n))
        .collect();
    let mut mine = Vec::new();
    for p in 0..partitions {
        let mut ranked: Vec<(u64, usize)> = members
            .iter()
            .enumerate()
            .map(|(i, m)| (weight(m, p), i))
            .collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        let (_, chosen) = *ranked
            .iter()
            .find(|(_, i)| room[*i] > 0)
            .expect("the quotas add up to the partitions");
        room[chosen] -= 1;
        if members[chosen] == me {
            mine.push(p);
        }
    }
    mine
}

/// Rendezvous weight of `member` for `partition`: FNV-1a, then a
/// splitmix64 finish, so that names that differ in one character still
/// spread. Stable across processes and versions (it decides assignments
/// between daemons of different builds).
fn weight(member: &str, partition: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member
        .as_bytes()
        .iter()
        .chain(&[0u8])
        .chain(&partition.to_be_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("host-{i}/{:08x}", i * 7919))
            .collect()
    }

    #[test]
    fn every_partition_has_exactly_one_member_and_shares_are_balanced() {
        for n in 1..=6 {
            for p in [1u16, 2, 3, 8, 16, 31] {
                let members = names(n);
                let mut owners = vec![0; usize::from(p)];
                let mut sizes = Vec::new();
                for m in &members {
                    let mine = share(&members, m, p);
                    sizes.push(mine.len());
                    for q in mine {
                        owners[usize::from(q)] += 1;
                    }
                }
                assert!(owners.iter().all(|&o| o == 1), "n={n} p={p}: {owners:?}");
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "n={n} p={p}: {sizes:?}");
                if usize::from(p) >= n {
                    assert!(*lo >= 1, "n={n} p={p}: {sizes:?}");
                }
            }
        }
    }

    #[test]
    fn a_member_leaving_moves_few_partitions() {
        let members = names(4);
        let before: Vec<Vec<u16>> = members.iter().map(|m| share(&members, m, 64)).collect();
        let rest: Vec<String> = members[..3].to_vec();
        let mut moved = 0;
        for (i, m) in rest.iter().enumerate() {
            let after = share(&rest, m, 64);
            moved += before[i].iter().filter(|p| !after.contains(p)).count();
        }
        // Only the leaver's 16 must move; a rank-based share would move most.
        assert!(moved <= 8, "{moved} partitions left a member that stayed");
    }

    #[test]
    fn a_daemon_not_among_the_members_takes_nothing() {
        assert!(share(&names(3), "someone-else", 8).is_empty());
        assert!(share(&[], "a", 8).is_empty());
    }
}
