//! Connection state shared by the workers, the readiness probe and the
//! `scramjet_connected` gauge.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::IntGaugeVec;

use crate::metrics::Metrics;

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
