//! Retry delays.

use std::time::Duration;

/// `delay` scaled by a random factor in [0.5, 1.0], so that many clients
/// retrying after one outage do not return in lockstep.
pub(crate) fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..=1.0))
}

/// Capped exponential backoff: 250 ms doubling to `cap`, with jitter (or
/// from another first delay, or without jitter: see the constructors).
#[derive(Debug)]
pub(crate) struct Backoff {
    /// The first delay, and the one after a reset.
    first: Duration,
    /// The next delay before jitter.
    next: Duration,
    /// The largest delay.
    cap: Duration,
    /// Whether each delay is scaled by [`jitter`].
    jitter: bool,
}

impl Backoff {
    /// A backoff that starts at 250 ms and grows to `cap`.
    pub(crate) fn new(cap: Duration) -> Self {
        Self::starting_at(Duration::from_millis(250), cap)
    }

    /// A backoff that starts at `first` and grows to `cap` (`first` itself
    /// is not capped: it is what the caller asked for).
    pub(crate) fn starting_at(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            next: first,
            cap,
            jitter: true,
        }
    }

    /// The same delays, exact: for the start-up retries, which have always
    /// waited exactly what `startup.connect_backoff_ms` says.
    pub(crate) fn without_jitter(self) -> Self {
        Self {
            jitter: false,
            ..self
        }
    }

    /// The delay to wait now; the next one is twice as long (up to the cap).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        if self.jitter { jitter(d) } else { d }
    }

    /// Starts again from the first delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_jittered() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(125) && delays[0] <= Duration::from_millis(250));
        assert!(delays[5] >= Duration::from_secs(1) && delays[5] <= Duration::from_secs(2));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
    }

    #[test]
    fn exact_delays_start_where_asked_and_double_to_the_cap() {
        let mut b = Backoff::starting_at(Duration::from_millis(500), Duration::from_secs(2))
            .without_jitter();
        let delays: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
    }
}
