//! What one batch transaction runs: claim the message ids, lock the keys
//! and read their rows, plan, write — for the whole batch at once, or message
//! by message in savepoints. The caller commits.

use std::{collections::HashMap, panic::AssertUnwindSafe};

use super::{
    plan::plan,
    prepare::{Prepared, documents_needed, sorted_keys},
};
use crate::{
    domain::event,
    domain::outcome::Outcome,
    store::{
        Conn, StoreError,
        batch::{self, Current},
        outbox,
    },
    support::panic::panic_text,
};

/// The database's reason for refusing a message, and its SQLSTATE.
#[derive(Debug)]
pub(super) struct Refusal {
    /// The SQLSTATE, when the server gave one.
    pub(super) sqlstate: Option<String>,
    /// The database's words.
    pub(super) reason: String,
}

/// Applies `prepared` in `tx` as if one message at a time, leaving out the
/// ones the database refuses; passes the fence once, first.
///
/// Each message is first tried in a savepoint of its own, inside an outer
/// one, to find which the database refuses; the outer savepoint is then
/// rolled back and the others are applied together at the top level. So
/// every row is written by the top-level transaction, never a
/// subtransaction: a full-set sync tells rows committed after it began by
/// their `xmin` against its snapshot, which lists top-level transactions only.
pub(super) async fn each_alone(
    tx: Conn<'_>,
    fence: Option<batch::Fence<'_>>,
    prepared: &[Prepared],
) -> Result<(Vec<Result<Outcome, Refusal>>, Current, Rows), StoreError> {
    let current = batch::pass_fence(tx, fence).await?;
    let mut refusals: Vec<Option<Refusal>> = Vec::with_capacity(prepared.len());
    tx.batch_execute("SAVEPOINT scramjet_probe").await?;
    for p in prepared {
        tx.batch_execute("SAVEPOINT scramjet_message").await?;
        match plan_and_write(tx, None, std::slice::from_ref(p)).await {
            Ok(_) => {
                tx.batch_execute("RELEASE SAVEPOINT scramjet_message")
                    .await?;
                refusals.push(None);
            }
            Err(StoreError::Refused { sqlstate, detail }) => {
                tx.batch_execute(
                    "ROLLBACK TO SAVEPOINT scramjet_message; RELEASE SAVEPOINT scramjet_message",
                )
                .await?;
                refusals.push(Some(Refusal {
                    sqlstate,
                    reason: detail,
                }));
            }
            Err(outage) => return Err(outage),
        }
    }
    tx.batch_execute("ROLLBACK TO SAVEPOINT scramjet_probe; RELEASE SAVEPOINT scramjet_probe")
        .await?;
    let accepted: Vec<&Prepared> = prepared
        .iter()
        .zip(&refusals)
        .filter(|(_, r)| r.is_none())
        .map(|(p, _)| p)
        .collect();
    let mut outcomes = Vec::new().into_iter();
    let mut rows = Vec::new();
    if !accepted.is_empty() {
        // Cloned: a refused batch is the rare path.
        let accepted: Vec<Prepared> = accepted.into_iter().cloned().collect();
        // Refused now, after the probe let these through, the refusal
        // belongs to no one message: the caller waits it out.
        let (applied, _, written) = plan_and_write(tx, None, &accepted).await?;
        outcomes = applied.into_iter();
        rows = written;
    }
    let results = refusals
        .into_iter()
        .map(|r| match r {
            Some(refusal) => Err(refusal),
            None => Ok(outcomes.next().expect("one outcome per accepted message")),
        })
        .collect();
    Ok((results, current, rows))
}

/// The outbox rows a transaction wrote: each row's `seq` and its events, in
/// order, for the publisher once the transaction has committed.
pub(super) type Rows = Vec<(i64, Vec<event::Event>)>;

/// Applies `prepared` inside `tx` (which the caller commits): claim message
/// ids, lock the keys, plan, write (each event to its outbox lane). Returns
/// the outcomes, what the locking statement read (the transaction's id,
/// its server, the fence), and the outbox rows written.
pub(super) async fn plan_and_write(
    tx: Conn<'_>,
    fence: Option<batch::Fence<'_>>,
    prepared: &[Prepared],
) -> Result<(Vec<Outcome>, Current, Rows), StoreError> {
    let (duplicate, current) = lock_and_find_duplicates(tx, fence, prepared).await?;
    // A bug in planning (patch computation, say) must not take the daemon
    // down: report it like a refused batch, so the messages are retried
    // one by one and only the one that triggers it is dead-lettered.
    let now = event::now_rfc3339();
    let (writes, outcomes) = std::panic::catch_unwind(AssertUnwindSafe(|| {
        plan(prepared, &duplicate, &current, &now)
    }))
    .map_err(|panic| StoreError::Refused {
        sqlstate: None,
        detail: format!("internal error: {}", panic_text(&*panic)),
    })?;
    // Two steps, one round trip, one transaction: the net writes to
    // resources, staging and tombstones, then the batch's events appended to
    // the outbox, whence the publisher sends them once this commits.
    let (_, seqs) = futures_util::try_join!(
        batch::write(tx, &writes),
        outbox::append(tx, &writes.events),
    )?;
    let mut events = writes.events;
    let rows = match seqs.as_slice() {
        [(seq, _)] => vec![(*seq, events)],
        lanes => lanes
            .iter()
            .map(|(seq, lane)| {
                let (of_lane, rest) = events.drain(..).partition(|e| e.lane == *lane);
                events = rest;
                (*seq, of_lane)
            })
            .collect(),
    };
    Ok((outcomes, current, rows))
}

/// Applies `prepared` inside `tx`, for callers that lock more rows in the
/// same transaction first (`scramjet revalidate` takes the keys' locks, then locks the staging rows).
pub async fn process_in_transaction(
    tx: &deadpool_postgres::Transaction<'_>,
    prepared: &[Prepared],
) -> Result<Vec<Outcome>, StoreError> {
    let (outcomes, _, _) = plan_and_write(Conn::of_tx(tx), None, prepared).await?;
    Ok(outcomes)
}

/// Claims the batch's message ids and locks its keys; returns, per message,
/// whether it is a duplicate (claimed before, or earlier in the same batch).
async fn lock_and_find_duplicates(
    tx: Conn<'_>,
    fence: Option<batch::Fence<'_>>,
    prepared: &[Prepared],
) -> Result<(Vec<bool>, Current), StoreError> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (i, p) in prepared.iter().enumerate() {
        if let Some(m) = &p.message_id {
            first_seen.entry(m.as_str()).or_insert(i);
        }
    }
    let ids: Vec<&str> = first_seen.keys().copied().collect();
    let keys = sorted_keys(prepared);
    let needs = documents_needed(prepared, &keys);
    let (fresh, current) = batch::claim_and_lock(tx, fence, &ids, &keys, &needs).await?;
    let duplicate = prepared
        .iter()
        .enumerate()
        .map(|(i, p)| match &p.message_id {
            None => false,
            Some(m) => !(fresh.contains(m.as_str()) && first_seen[m.as_str()] == i),
        })
        .collect();
    Ok((duplicate, current))
}
