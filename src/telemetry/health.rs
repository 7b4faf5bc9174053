//! Connection state shared by the workers, the readiness probe and the
//! `scramjet_connected` gauge (`scramjet_relay_connected` for `scramjet relay`).

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus::{IntCounterVec, IntGaugeVec};

use crate::telemetry::metrics::{Metrics, ProducerMetrics};

/// Which of its two services a process is connected to, as its workers last
/// saw it: a flag each for `/readyz`, mirrored in a `connected{service}`
/// gauge. The daemon's [`Health`] embeds one; `scramjet relay` has nothing
/// else to report, so this is its whole health.
#[derive(Debug)]
pub struct Connectivity {
    /// The database's `service` label: "postgres" for the daemon's own
    /// database, "source" for the relay's source database.
    database_service: &'static str,
    /// The database connection worked when last used (the relay's: its
    /// source connection is open, LISTENing, outbox found).
    database: AtomicBool,
    /// A RabbitMQ connection is established (the daemon's: topology
    /// declared, consuming; the relay's: with a confirm channel).
    amqp: AtomicBool,
    /// `scramjet_connected{service}` or `scramjet_relay_connected{service}`.
    gauge: IntGaugeVec,
}

impl Connectivity {
    /// Both services down until a worker says otherwise.
    fn new(database_service: &'static str, gauge: &IntGaugeVec) -> Connectivity {
        Connectivity {
            database_service,
            database: AtomicBool::new(false),
            amqp: AtomicBool::new(false),
            gauge: gauge.clone(),
        }
    }

    /// The connection state of `scramjet relay`: `/readyz` is 200 when both
    /// its source database and RabbitMQ are up.
    pub fn producer(metrics: &ProducerMetrics) -> Connectivity {
        Connectivity::new("source", &metrics.connected)
    }

    /// Records the database's state.
    pub fn set_database(&self, up: bool) {
        self.database.store(up, Ordering::Relaxed);
        self.gauge
            .with_label_values(&[self.database_service])
            .set(i64::from(up));
    }

    /// Records RabbitMQ's state.
    pub fn set_amqp(&self, up: bool) {
        self.amqp.store(up, Ordering::Relaxed);
        self.gauge
            .with_label_values(&["rabbitmq"])
            .set(i64::from(up));
    }

    /// The database's last known state.
    pub fn database(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }

    /// RabbitMQ's last known state.
    pub fn amqp(&self) -> bool {
        self.amqp.load(Ordering::Relaxed)
    }
}

/// Connection state as the daemon's workers see it. `/readyz` reads the
/// RabbitMQ flag and the outages (PostgreSQL it pings itself); they feed
/// `scramjet_connected` and `scramjet_outages_total`.
#[derive(Debug)]
pub struct Health {
    /// PostgreSQL's and RabbitMQ's flags and gauge.
    connectivity: Connectivity,
    /// The outage each worker is waiting out, by worker ("pipeline",
    /// "publisher"). A ping that succeeds says nothing of a database that
    /// refuses writes or a role that lost a privilege: the workers say it.
    outages: Mutex<BTreeMap<&'static str, Outage>>,
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
            connectivity: Connectivity::new("postgres", &metrics.connected),
            outages: Mutex::new(BTreeMap::new()),
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
        self.connectivity.set_database(up);
    }

    /// Records RabbitMQ's state.
    pub fn set_amqp(&self, up: bool) {
        self.connectivity.set_amqp(up);
    }

    /// RabbitMQ's last known state.
    pub fn amqp(&self) -> bool {
        self.connectivity.amqp()
    }
}
