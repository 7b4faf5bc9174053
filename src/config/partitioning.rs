//! `[partitioning]`: how several daemons share the partition queues when
//! `amqp.partitions` is more than 1 (see `docs/scale-out.md`).

use std::time::Duration;

use serde::Deserialize;

/// Lease settings of partitioned mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartitioningSettings {
    /// How long a daemon's lease on a partition (and its membership) lasts
    /// without renewal (e.g. "15s"). A daemon that stops renewing — it
    /// crashed, paused, or lost the database — loses its partitions to the
    /// others this long after its last renewal.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl PartitioningSettings {
    /// How often a daemon renews its leases and looks at the members: a
    /// fifth of the lease, at most every 2 s, so that several renewals in a
    /// row can fail before a lease runs out.
    pub fn tick(&self) -> Duration {
        (self.lease_ttl / 5).min(Duration::from_secs(2))
    }
}

impl Default for PartitioningSettings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
        }
    }
}
