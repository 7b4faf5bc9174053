//! Retry delays.

use std::time::Duration;

/// `delay` scaled by a random factor in [0.5, 1.0], so that many clients
/// retrying after one outage do not return in lockstep.
pub fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..=1.0))
}

/// Capped exponential backoff: 250 ms doubling to `cap`, with jitter.
#[derive(Debug)]
pub struct Backoff {
    /// The next delay before jitter.
    next: Duration,
    /// The largest delay.
    cap: Duration,
}

impl Backoff {
    /// A backoff that starts at 250 ms and grows to `cap`.
    pub fn new(cap: Duration) -> Self {
        Self {
            next: Duration::from_millis(250),
            cap,
        }
    }

    /// The delay to wait now; the next one is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        jitter(d)
    }

    /// Starts again from the smallest delay (after a success).
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(250);
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
}
