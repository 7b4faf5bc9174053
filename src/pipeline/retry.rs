//! How a batch gets committed whatever the database does: outages are waited
//! out in place, a COMMIT that went unanswered is settled before anything is
//! applied again, a batch a statement timeout stops is split in halves, and
//! one the database refuses for its data is applied message by message.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{
    Interrupted, Pipeline, Results, Session,
    prepare::Prepared,
    transaction::{Refusal, each_alone, plan_and_write},
};
use crate::{
    domain::outcome::Outcome,
    store::{
        self, Cause, StoreError,
        batch::{self, TransactionStatus},
    },
};

/// The name under which the pipeline reports its outages to [`crate::telemetry::health::Health`].
const WORKER: &str = "pipeline";

/// Longest pause between two attempts at a batch during an outage.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// How one call of [`Pipeline::commit_with_retries`] ended.
enum Applied {
    /// Committed, with each message's outcome (or, applied
    /// [`Mode::EachAlone`], the refusal of the ones that were rolled back).
    Done(Vec<Result<Outcome, Refusal>>),
    /// Refused for its data, as a whole ([`Mode::Together`]).
    Refused(Refusal),
    /// Too big to go through now (a statement timeout): try halves.
    TooBig,
}

/// How a batch's messages share its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Set-based statements for the whole batch: the fast path.
    Together,
    /// One message at a time, each in a savepoint, in one transaction: a
    /// message the database refuses is rolled back alone. One transaction,
    /// so that the environment cannot change half-way (a dropped constraint
    /// waits for it), and the batch commits once.
    EachAlone,
}

impl Pipeline {
    /// Applies `prepared` in one transaction. What the environment causes —
    /// a lost connection, a read-only database, a revoked privilege, … — is
    /// an outage: the batch waits and retries in place (never by
    /// requeueing, which would break per-id order), with `/readyz` 503 and
    /// the outage counted. A batch a statement timeout stops is applied in
    /// halves, in order. If the database refuses the batch for its data,
    /// the messages are applied one by one so that only the offending ones
    /// fail — unless every one fails with the same SQLSTATE, which says the
    /// cause is not in the messages: an outage too.
    pub async fn process(
        &self,
        prepared: &[Prepared],
        shutdown: &CancellationToken,
    ) -> Result<Results, Interrupted> {
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let mut backoff = crate::support::backoff::Backoff::new(RETRY_CAP);
        loop {
            let refusal = match self
                .commit_with_retries(prepared, Mode::Together, shutdown)
                .await?
            {
                Applied::Done(results) => return Ok(results_of(results)),
                Applied::TooBig => {
                    let (first, second) = prepared.split_at(prepared.len() / 2);
                    tracing::warn!(
                        size = prepared.len(),
                        "a statement timeout stopped the batch; applying it in two halves"
                    );
                    let mut results = Box::pin(self.process(first, shutdown)).await?;
                    results.extend(Box::pin(self.process(second, shutdown)).await?);
                    return Ok(results);
                }
                Applied::Refused(refusal) if prepared.len() == 1 => {
                    return Ok(vec![Err(refusal.reason)]);
                }
                Applied::Refused(refusal) => refusal,
            };
            tracing::warn!(
                size = prepared.len(),
                reason = %refusal.reason,
                "database refused a batch; applying its messages one by one"
            );
            let results = match self
                .commit_with_retries(prepared, Mode::EachAlone, shutdown)
                .await?
            {
                Applied::Done(results) => results,
                Applied::Refused(_) | Applied::TooBig => {
                    unreachable!("applied one by one, refusals are per message")
                }
            };
            let first = results.iter().find_map(|r| r.as_ref().err());
            let all_alike = first.is_some_and(|first| {
                first.sqlstate.is_some()
                    && results
                        .iter()
                        .all(|r| r.as_ref().is_err_and(|e| e.sqlstate == first.sqlstate))
            });
            let Some(first) = first.filter(|_| all_alike) else {
                return Ok(results_of(results));
            };
            // Nothing was committed but the (empty) transaction: every
            // message was refused, so the cause is not in the messages.
            let detail = format!(
                "every message of a batch of {} was refused with SQLSTATE {}: {}",
                prepared.len(),
                first.sqlstate.as_deref().unwrap_or_default(),
                first.reason
            );
            self.wait_out(
                &StoreError::unavailable(Cause::RefusedAll, detail),
                &mut backoff,
                shutdown,
            )
            .await?;
        }
    }

    /// Applies `prepared` in one transaction, waiting out outages. Returns
    /// the outcomes, the data's refusal, or — for a batch of several
    /// messages that a statement timeout stopped — that it is too big.
    async fn commit_with_retries(
        &self,
        prepared: &[Prepared],
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> Result<Applied, Interrupted> {
        let mut backoff = crate::support::backoff::Backoff::new(RETRY_CAP);
        // A transaction whose COMMIT was sent but not answered: it may have
        // committed. Applying the batch again would then repeat its changes
        // as events (a save A then B replayed over B publishes B→A→B), so
        // its fate is looked up first — on the same server, the only one
        // whose answer about that transaction id means anything.
        let mut unsettled: Option<Unsettled> = None;
        loop {
            let attempt = match unsettled.take() {
                Some(u) => match self.settle(&u).await {
                    Ok(TransactionStatus::Committed) => {
                        tracing::info!(
                            xid = u.xid,
                            "the batch's COMMIT had gone through; not applying it again"
                        );
                        if let (Some(session), Some(epoch)) = (&self.session, u.registered) {
                            session.registered(Some(epoch));
                        }
                        Ok(u.outcomes)
                    }
                    Ok(TransactionStatus::Aborted) => self.commit_once(prepared, mode).await,
                    Ok(TransactionStatus::InProgress) => {
                        let xid = u.xid;
                        unsettled = Some(u);
                        Err(Attempt::Failed(StoreError::unavailable(
                            Cause::CommitUnknown,
                            format!("transaction {xid} is still finishing"),
                        )))
                    }
                    Err(e) => {
                        unsettled = Some(u);
                        Err(Attempt::Failed(e))
                    }
                },
                None => self.commit_once(prepared, mode).await,
            };
            let error = match attempt {
                Ok(outcomes) => {
                    self.health.set_postgres(true);
                    self.health.recovered(WORKER);
                    return Ok(Applied::Done(outcomes));
                }
                Err(Attempt::Failed(e)) => e,
                Err(Attempt::Abandoned(why)) => {
                    tracing::warn!(%why, "batch abandoned, not committed; the broker redelivers it");
                    return Err(Interrupted);
                }
                Err(Attempt::CommitUnknown(u, reason)) => {
                    unsettled = Some(u);
                    StoreError::unavailable(Cause::CommitUnknown, reason)
                }
            };
            match error {
                StoreError::Refused { sqlstate, detail } if mode == Mode::Together => {
                    return Ok(Applied::Refused(Refusal {
                        sqlstate,
                        reason: detail,
                    }));
                }
                // Applied one by one, a refusal belongs to no message (a
                // deferred constraint at COMMIT, say): wait it out.
                StoreError::Refused { detail, .. } => {
                    let outage = StoreError::unavailable(Cause::RefusedAll, detail);
                    self.wait_out(&outage, &mut backoff, shutdown).await?
                }
                StoreError::Unavailable { cause, detail }
                    if cause.shrinks()
                        && mode == Mode::Together
                        && prepared.len() > 1
                        && unsettled.is_none() =>
                {
                    self.health
                        .outage(WORKER, "postgres", cause.as_str(), &detail);
                    return Ok(Applied::TooBig);
                }
                outage => self.wait_out(&outage, &mut backoff, shutdown).await?,
            }
        }
    }

    /// Reports `error` (an outage, or a conflict worth no report) and
    /// sleeps before the next attempt, unless shutdown comes first.
    async fn wait_out(
        &self,
        error: &StoreError,
        backoff: &mut crate::support::backoff::Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let delay = backoff.next_delay();
        if let StoreError::Unavailable { cause, detail } = error
            && cause.is_outage()
        {
            // The connection is gone (a COMMIT goes unanswered when it drops).
            if matches!(cause, Cause::Connection | Cause::CommitUnknown) {
                self.health.set_postgres(false);
                self.metrics
                    .reconnects
                    .with_label_values(&["postgres"])
                    .inc();
            }
            self.health
                .outage(WORKER, "postgres", cause.as_str(), detail);
        }
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "database unavailable; the batch waits and retries");
        let lost = async {
            match &self.session {
                Some(s) => s.lost.cancelled().await,
                None => std::future::pending().await,
            }
        };
        // Biased, the session's end first: a lost lease cancels both it and
        // `shutdown` at once, and the abandoned batch must be told either way.
        tokio::select! {
            biased;
            _ = lost => {
                tracing::warn!(
                    "batch abandoned, not committed; the broker redelivers it (the session \
                     ended while the batch waited: its broker connection or a partition lease was lost)"
                );
                Err(Interrupted)
            }
            _ = shutdown.cancelled() => Err(Interrupted),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// What became of the transaction of `u`. Never the data's fault: any
    /// error here is an outage, and an answer from another server (a
    /// failover) is no answer.
    async fn settle(&self, u: &Unsettled) -> Result<TransactionStatus, StoreError> {
        let client = self.pool.get().await?;
        let answer = settled(u, batch::transaction_status(&client, u.xid).await);
        if answer
            .as_ref()
            .err()
            .is_some_and(StoreError::retires_connection)
        {
            drop(deadpool_postgres::Object::take(client));
        }
        answer
    }

    /// One attempt at `prepared`: one transaction that passes the fence,
    /// writes the batch as `mode` says and commits — unless the broker
    /// session ended or another consumer took the queue over meanwhile.
    async fn commit_once(
        &self,
        prepared: &[Prepared],
        mode: Mode,
    ) -> Result<Vec<Result<Outcome, Refusal>>, Attempt> {
        let started = std::time::Instant::now();
        // BEGIN goes out with the batch's first statements (the fence, the
        // claim, the key locks): no round trip of its own.
        let tx = store::Pipelined::new(self.pool.get().await?);
        let conn = tx.conn();
        let fence = self.session.as_deref().map(Session::fence);
        let result = async {
            let (results, current, rows) = tx
                .begin_with(async {
                    Ok(match mode {
                        Mode::Together => {
                            let (outcomes, current, rows) =
                                plan_and_write(conn, fence, prepared).await?;
                            (outcomes.into_iter().map(Ok).collect(), current, rows)
                        }
                        Mode::EachAlone => each_alone(conn, fence, prepared).await?,
                    })
                })
                .await?;
            // A registration's epoch becomes the session's once committed.
            let mut registered = None;
            if let Some(leases) = self.session.as_ref().and_then(|s| s.leases.as_ref()) {
                if current.leases != *leases {
                    return Err(Attempt::Abandoned(format!(
                        "another daemon took over a partition (leases {:?}, this session's {leases:?})",
                        current.leases
                    )));
                }
            } else if let Some(session) = &self.session {
                match session.epoch() {
                    None => registered = current.epoch,
                    Some(mine) if current.epoch != Some(mine) => {
                        return Err(Attempt::Abandoned(format!(
                            "another consumer of {} took over (epoch {:?}, this session's {mine})",
                            session.queue, current.epoch
                        )));
                    }
                    Some(_) => {}
                }
            }
            // The last moment to learn that the broker session is gone; past
            // it, the fence's share lock keeps a successor from committing first.
            if self.session_lost() {
                return Err(Attempt::Abandoned(
                    "the broker session ended before the batch committed".into(),
                ));
            }
            let written = started.elapsed();
            if let Err(e) = tx.commit().await {
                return Err(match StoreError::from(e) {
                    // No answer: the server may or may not have committed.
                    StoreError::Unavailable {
                        cause: Cause::Connection,
                        detail,
                    } => Attempt::CommitUnknown(
                        Unsettled {
                            xid: current.xid,
                            server: current.server,
                            registered,
                            outcomes: results,
                        },
                        detail,
                    ),
                    refused => Attempt::Failed(refused),
                });
            }
            if let (Some(session), Some(epoch)) = (&self.session, registered) {
                session.registered(Some(epoch));
            }
            if let Some(publisher) = &self.publisher
                && !rows.is_empty()
            {
                publisher.hand_over(rows);
            }
            Ok((results, written))
        }
        .await;
        let (results, written) = match result {
            Ok(done) => done,
            Err(attempt) => {
                let retire = match &attempt {
                    Attempt::Failed(e) => e.retires_connection(),
                    Attempt::CommitUnknown(..) => true,
                    Attempt::Abandoned(_) => false,
                };
                tx.release(retire).await;
                return Err(attempt);
            }
        };
        drop(tx);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            size = prepared.len(),
            ?mode,
            write_ms = ms(written),
            commit_ms = ms(started.elapsed() - written),
            "batch transaction"
        );
        Ok(results)
    }
}

/// A batch's results as the consumer takes them: an outcome, or the
/// database's reason for refusing the message.
fn results_of(results: Vec<Result<Outcome, Refusal>>) -> Results {
    results
        .into_iter()
        .map(|r| r.map_err(|refusal| refusal.reason))
        .collect()
}

/// What `txid_status` said of the transaction of `u`, as the pipeline may
/// take it: only from the server the transaction ran on, and never as the
/// data's fault.
fn settled(
    u: &Unsettled,
    answer: Result<(TransactionStatus, batch::ServerId), StoreError>,
) -> Result<TransactionStatus, StoreError> {
    match answer {
        Ok((status, server)) if server == u.server => Ok(status),
        Ok((_, server)) => Err(StoreError::unavailable(
            Cause::CommitUnknown,
            format!(
                "a COMMIT went unanswered on server {}/{} and the database now answers from \
                 {}/{} (a failover?): the batch stays unacked until that server can say \
                 what became of transaction {}",
                u.server.system, u.server.timeline, server.system, server.timeline, u.xid
            ),
        )),
        Err(StoreError::Refused { detail, .. }) => {
            Err(StoreError::unavailable(Cause::CommitUnknown, detail))
        }
        Err(e) => Err(e),
    }
}

/// A batch whose COMMIT was sent and not answered.
#[derive(Debug)]
struct Unsettled {
    /// Its transaction id.
    xid: i64,
    /// The server it ran on.
    server: batch::ServerId,
    /// The epoch it registered for the session, if it did commit.
    registered: Option<i64>,
    /// Its results, if it did commit.
    outcomes: Vec<Result<Outcome, Refusal>>,
}

/// How one attempt at a batch failed.
#[derive(Debug)]
enum Attempt {
    /// Nothing was committed.
    Failed(StoreError),
    /// COMMIT was sent and no answer came (the driver's words): the
    /// transaction may have committed.
    CommitUnknown(Unsettled, String),
    /// Not committed, and must not be: the broker session ended, or
    /// another consumer took the queue over (why).
    Abandoned(String),
}

impl<E: Into<StoreError>> From<E> for Attempt {
    fn from(e: E) -> Attempt {
        Attempt::Failed(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_commit_is_settled_only_by_the_server_it_ran_on() {
        let ran_on = batch::ServerId {
            system: 7,
            timeline: "00000001".into(),
        };
        let u = Unsettled {
            xid: 42,
            server: ran_on.clone(),
            registered: None,
            outcomes: vec![Ok(Outcome::Created)],
        };
        assert_eq!(
            settled(&u, Ok((TransactionStatus::Committed, ran_on.clone()))).unwrap(),
            TransactionStatus::Committed
        );
        // A promoted standby: same cluster, new timeline, where 42 may name
        // another transaction. Its "aborted" must not make the batch run again.
        let promoted = batch::ServerId {
            timeline: "00000002".into(),
            ..ran_on
        };
        for status in [TransactionStatus::Aborted, TransactionStatus::Committed] {
            match settled(&u, Ok((status, promoted.clone()))) {
                Err(StoreError::Unavailable { cause, detail }) => {
                    assert_eq!(cause, Cause::CommitUnknown);
                    assert!(detail.contains("failover"), "{detail}");
                }
                other => panic!("{other:?}"),
            }
        }
        // txid_status refusing the id (22023 after a failover) is no data fault.
        let refused = StoreError::Refused {
            sqlstate: Some("22023".into()),
            detail: "transaction ID 42 is in the future".into(),
        };
        assert!(matches!(
            settled(&u, Err(refused)),
            Err(StoreError::Unavailable {
                cause: Cause::CommitUnknown,
                ..
            })
        ));
    }
}
