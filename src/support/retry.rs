//! Retrying: the one helper for every loop that waits out a failing service,
//! built on [`Backoff`].
//!
//! A [`Retry`] is a backoff with, optionally, a [`CancellationToken`] that
//! cuts every wait short and a number of attempts after which it gives up.
//! The caller keeps its own loop and its own reporting (log line, outage,
//! metric), and asks the `Retry` only how long to wait and whether to go on:
//!
//! - a worker that runs until shutdown and may fail at several points of
//!   one turn (the outbox publisher, `scramjet relay`, the daemon's consuming
//!   session) makes one `Retry::new(Backoff::new(CAP)).until(&stop)`, calls
//!   [`Retry::failed`] after each failure (it logs through the closure, then
//!   sleeps, and answers `false` once `stop` fires) and
//!   [`Retry::succeeded`] where its work went through, which starts the
//!   delays again from the smallest;
//! - an operation retried until it succeeds (the start-up connections) goes
//!   through [`Retry::run`], which owns the loop; [`Retry::startup`] gives
//!   the `startup.*` policy (so many attempts, exact delays);
//! - a wait that is not a backoff but must end on `stop` too (a fixed poll)
//!   is [`Retry::wait`].
//!
//! `bulk`'s `retry_transient` and `scramjet revalidate`'s page retry use
//! [`Retry::failed`] without a token (a command stops with the process).
//! The pipeline's `wait_out` takes its delays from the same [`Backoff`] but
//! keeps its own wait: it ends on two tokens (shutdown, a lost broker
//! session) with a different outcome and log line for each.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{config::StartupSettings, support::backoff::Backoff};

/// The longest wait between two start-up attempts, whatever
/// `startup.connect_backoff_ms` says.
const STARTUP_CAP: Duration = Duration::from_secs(10);

/// A backoff that sleeps, stops on a token, and may give up after so many
/// attempts.
#[derive(Debug)]
pub(crate) struct Retry {
    /// The delays.
    backoff: Backoff,
    /// Cuts every wait short when cancelled; `None`: nothing does.
    stop: Option<CancellationToken>,
    /// Attempts after which [`Retry::failed`] gives up; `None`: never.
    limit: Option<u32>,
    /// Attempts failed since the last success.
    failures: u32,
}

/// What [`Retry::failed`] is about to wait, for the caller's log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pause {
    /// Which attempt just failed, from 1 (since the last success).
    pub attempt: u32,
    /// How long the next attempt waits.
    pub delay: Duration,
}

impl Pause {
    /// The delay in milliseconds, as the log lines give it (`retry_in_ms`).
    pub(crate) fn retry_in_ms(&self) -> u64 {
        self.delay.as_millis() as u64
    }
}

/// Why [`Retry::run`] stopped without a success.
#[derive(Debug)]
pub(crate) struct GaveUp<E> {
    /// The last failure.
    pub error: E,
    /// How many attempts failed.
    pub attempts: u32,
}

impl Retry {
    /// Retries forever with `backoff`, until a token is added with [`Retry::until`].
    pub(crate) fn new(backoff: Backoff) -> Retry {
        Retry {
            backoff,
            stop: None,
            limit: None,
            failures: 0,
        }
    }

    /// The start-up policy: `startup.connect_attempts` attempts,
    /// `startup.connect_backoff_ms` before the second, doubling to 10 s, not
    /// jittered (one process starting alone has no herd to spread).
    pub(crate) fn startup(settings: &StartupSettings) -> Retry {
        let first = Duration::from_millis(settings.connect_backoff_ms);
        Retry::new(Backoff::starting_at(first, STARTUP_CAP).without_jitter())
            .at_most(settings.connect_attempts)
    }

    /// Stops waiting, and retrying, once `stop` is cancelled.
    pub(crate) fn until(self, stop: &CancellationToken) -> Retry {
        Retry {
            stop: Some(stop.clone()),
            ..self
        }
    }

    /// Gives up once `attempts` attempts in a row have failed.
    pub(crate) fn at_most(self, attempts: u32) -> Retry {
        Retry {
            limit: Some(attempts),
            ..self
        }
    }

    /// A success: the next failure waits the smallest delay again, and
    /// counts from attempt 1.
    pub(crate) fn succeeded(&mut self) {
        self.backoff.reset();
        self.failures = 0;
    }

    /// An attempt failed. Unless that was the last one allowed, calls
    /// `report` with the wait to come (to log it), then waits it out.
    /// Returns whether to try again: `false` when the attempts ran out (no
    /// report, no wait) or `stop` fired during the wait.
    pub(crate) async fn failed(&mut self, report: impl FnOnce(Pause)) -> bool {
        self.failures += 1;
        if self.limit.is_some_and(|limit| self.failures >= limit) {
            return false;
        }
        let delay = self.backoff.next_delay();
        report(Pause {
            attempt: self.failures,
            delay,
        });
        self.wait(delay).await
    }

    /// Waits `delay` (as it is: no backoff); `false` when `stop` fired first.
    pub(crate) async fn wait(&self, delay: Duration) -> bool {
        match &self.stop {
            None => {
                tokio::time::sleep(delay).await;
                true
            }
            Some(stop) => tokio::select! {
                biased;
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep(delay) => true,
            },
        }
    }

    /// Runs `op` until it succeeds, calling `report` with each failure that
    /// is retried (see [`Retry::failed`]); gives up with the last failure
    /// when the attempts run out or `stop` fires.
    pub(crate) async fn run<T, E>(
        &mut self,
        mut op: impl AsyncFnMut() -> Result<T, E>,
        mut report: impl FnMut(&E, Pause),
    ) -> Result<T, GaveUp<E>> {
        loop {
            match op().await {
                Ok(done) => {
                    self.succeeded();
                    return Ok(done);
                }
                Err(error) => {
                    if !self.failed(|pause| report(&error, pause)).await {
                        return Err(GaveUp {
                            error,
                            attempts: self.failures,
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_gives_up_after_the_attempts_with_the_last_error_and_reports_the_others() {
        let mut retry = Retry::new(
            Backoff::starting_at(Duration::from_millis(5), STARTUP_CAP).without_jitter(),
        )
        .at_most(3);
        let mut calls = 0;
        let mut pauses = Vec::new();
        let outcome: Result<(), _> = retry
            .run(
                async || {
                    calls += 1;
                    Err(calls)
                },
                |e, p| pauses.push((*e, p.attempt, p.delay.as_millis())),
            )
            .await;
        let gave_up = outcome.unwrap_err();
        assert_eq!((gave_up.error, gave_up.attempts), (3, 3));
        assert_eq!(pauses, [(1, 1, 5), (2, 2, 10)]);
    }

    #[tokio::test]
    async fn a_success_starts_the_delays_again_and_a_cancelled_token_ends_the_wait() {
        let stop = CancellationToken::new();
        let first = Duration::from_millis(5);
        let mut retry =
            Retry::new(Backoff::starting_at(first, Duration::from_secs(30))).until(&stop);
        assert!(retry.failed(|_| {}).await);
        assert!(retry.failed(|p| assert_eq!(p.attempt, 2)).await);
        retry.succeeded();
        assert!(
            retry
                .failed(|p| {
                    assert_eq!(p.attempt, 1);
                    assert!(p.delay <= first);
                })
                .await
        );
        stop.cancel();
        assert!(!retry.failed(|_| {}).await);
        assert!(!retry.wait(Duration::from_secs(3600)).await);
    }
}
