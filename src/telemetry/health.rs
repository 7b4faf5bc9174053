//! Connection state shared by the workers, the readiness probe and the
//! `scramjet_connected` gauge.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus::{IntCounterVec, IntGaugeVec};

use crate::telemetry::metrics::{Metrics, ProducerMetrics};

/// Connection state as the workers see it. `/readyz` reads the RabbitMQ
/// flag and the outages (PostgreSQL it also pings itself); they feed
/// `scramjet_connected` and `scramjet_outages_total`.
#[derive(Debug)]
pub struct Health {
    /// A RabbitMQ session is established (topology declared, consuming).
    amqp: AtomicBool,
    /// The outage each worker is waiting out, by worker ("pipeline",
    /// "publisher"). A ping that succeeds says nothing of a database that
    /// refuses writes or a role that lost a privilege: the workers say it.
    outages: Mutex<BTreeMap<&'static str, Outage>>,
    /// `scramjet_connected{service}`.
    gauge: IntGaugeVec,
    /// `scramjet_outages_total{service,reason}`.
    outages_total: IntCounterVec,
}

/// An outage a worker is waiting out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// The service at fault: "postgres" or "rabbitmq".
    pub service: &'static str,
    /// A short, stable reason (a metric label), e.g. "read_only".
    pub reason: String,
    /// The service's own words, for the operator.
    pub detail: String,
    /// When it began (RFC 3339).
    pub since: String,
}

impl Health {
    /// Both services down until a worker says otherwise.
    pub fn new(metrics: &Metrics) -> Health {
        Health {
            amqp: AtomicBool::new(false),
            outages: Mutex::new(BTreeMap::new()),
            gauge: metrics.connected.clone(),
            outages_total: metrics.outages.clone(),
        }
    }

    /// Records that `worker` waits out an outage of `service`. Counted once
    /// per outage: again only when the reason changes.
    pub fn outage(&self, worker: &'static str, service: &'static str, reason: &str, detail: &str) {
        let mut outages = self.outages.lock().expect("never poisoned");
        let same = outages
            .get(worker)
            .is_some_and(|o| o.service == service && o.reason == reason);
        if same {
            if let Some(o) = outages.get_mut(worker) {
                o.detail = detail.to_owned();
            }
            return;
        }
        self.outages_total
            .with_label_values(&[service, reason])
            .inc();
        outages.insert(
            worker,
            Outage {
                service,
                reason: reason.to_owned(),
                detail: detail.to_owned(),
                since: crate::domain::event::now_rfc3339(),
            },
        );
    }

    /// Records that `worker`'s outage, if any, is over.
    pub fn recovered(&self, worker: &'static str) {
        self.outages.lock().expect("never poisoned").remove(worker);
    }

    /// The outages being waited out now, by worker.
    pub fn outages(&self) -> Vec<(&'static str, Outage)> {
        self.outages
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|(w, o)| (*w, o.clone()))
            .collect()
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
pub struct ProducerHealth {
    /// The source database connection is open (LISTENing, outbox found).
    source: AtomicBool,
    /// A RabbitMQ connection with a confirm channel is open.
    amqp: AtomicBool,
    /// `scramjet_relay_connected{service}`.
    gauge: IntGaugeVec,
}

impl ProducerHealth {
    /// Both services down until the relay says otherwise.
    pub fn new(metrics: &ProducerMetrics) -> ProducerHealth {
        ProducerHealth {
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
