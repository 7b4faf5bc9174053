//! Connection state shared by the workers, the readiness probe and the
//! `scramjet_connected` gauge.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::IntGaugeVec;

use crate::metrics::{Metrics, RelayMetrics};

/// Connection state as the workers see it. `/readyz` reads the RabbitMQ
/// flag (PostgreSQL it pings itself); both feed `scramjet_connected`.
#[derive(Debug)]
pub struct Health {
    /// A RabbitMQ session is established (topology declared, consuming).
    amqp: AtomicBool,
    /// `scramjet_connected{service}`.
    gauge: IntGaugeVec,
}

impl Health {
    /// Both services down until a worker says otherwise.
    pub fn new(metrics: &Metrics) -> Health {
        Health {
            amqp: AtomicBool::new(false),
            gauge: metrics.connected.clone(),
        }
    }

    /// Records PostgreSQL's state (the last use succeeded or not).
    pub fn set_postgres(&self, up: bool) {
        self.gauge
            .with_label_values(&["postgres"])
            .set(i64::from(up));
    }

    /// Records RabbitMQ's state.
    pub fn set_amqp(&self, up: bool) {
        self.amqp.store(up, Ordering::Relaxed);
        self.gauge
            .with_label_values(&["rabbitmq"])
            .set(i64::from(up));
    }

    /// RabbitMQ's last known state.
    pub fn amqp(&self) -> bool {
        self.amqp.load(Ordering::Relaxed)
    }
}

/// Connection state of `scramjet relay`: `/readyz` is 200 when both are up.
#[derive(Debug)]
pub struct RelayHealth {
    /// The source database connection is open (LISTENing, outbox found).
    source: AtomicBool,
    /// A RabbitMQ connection with a confirm channel is open.
    amqp: AtomicBool,
    /// `scramjet_relay_connected{service}`.
    gauge: IntGaugeVec,
}

impl RelayHealth {
    /// Both services down until the relay says otherwise.
    pub fn new(metrics: &RelayMetrics) -> RelayHealth {
        RelayHealth {
            source: AtomicBool::new(false),
            amqp: AtomicBool::new(false),
            gauge: metrics.connected.clone(),
        }
    }

    /// Records the source database's state.
    pub fn set_source(&self, up: bool) {
        self.source.store(up, Ordering::Relaxed);
        self.gauge.with_label_values(&["source"]).set(i64::from(up));
    }

    /// Records RabbitMQ's state.
    pub fn set_amqp(&self, up: bool) {
        self.amqp.store(up, Ordering::Relaxed);
        self.gauge
            .with_label_values(&["rabbitmq"])
            .set(i64::from(up));
    }

    /// The source database's last known state.
    pub fn source(&self) -> bool {
        self.source.load(Ordering::Relaxed)
    }

    /// RabbitMQ's last known state.
    pub fn amqp(&self) -> bool {
        self.amqp.load(Ordering::Relaxed)
    }
}
