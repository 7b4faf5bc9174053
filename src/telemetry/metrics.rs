//! Prometheus metrics. Each daemon owns its registry (no global state), so
//! several daemons in one process — the tests — count separately.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// A registry and the constructors both sets of metrics build theirs with:
/// each metric is registered as it is made, so none can be left out of
/// `/metrics`.
#[derive(Clone)]
struct Exposition {
    /// Where every metric made here is registered.
    registry: Registry,
}

impl Exposition {
    /// An empty registry of its own.
    fn new() -> Exposition {
        Exposition {
            registry: Registry::new(),
        }
    }

    /// Registers `metric` and hands it back.
    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, metric: M) -> M {
        self.registry
            .register(Box::new(metric.clone()))
            .expect("registered once");
        metric
    }

    /// A counter with one label per name in `labels`.
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    /// A counter without labels.
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("valid metric"))
    }

    /// A gauge with one label.
    fn gauges(&self, name: &str, help: &str, label: &str) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    /// A gauge without labels.
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("valid metric"))
    }

    /// A histogram with the given bucket bounds.
    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.register(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric"),
        )
    }

    /// `connected{service}` and `reconnects{service}`, both shown for every
    /// one of `services` from the start (a dashboard then sees 0, not "no
    /// data", before the first connection).
    fn connections(
        &self,
        connected: (&str, &str),
        reconnects: (&str, &str),
        services: [&str; 2],
    ) -> (IntGaugeVec, IntCounterVec) {
        let gauge = self.gauges(connected.0, connected.1, "service");
        let counter = self.counters(reconnects.0, reconnects.1, &["service"]);
        for service in services {
            gauge.with_label_values(&[service]).set(0);
            counter.with_label_values(&[service]);
        }
        (gauge, counter)
    }

    /// The Prometheus text exposition of every metric.
    fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The daemon's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Where everything below is registered.
    registry: Exposition,
    /// Messages by outcome (created, updated, …, dead_lettered).
    pub messages: IntCounterVec,
    /// Events confirmed by the broker, by op.
    pub events_published: IntCounterVec,
    /// Events over `limits.max_event_bytes`, published in their reduced form, by op.
    pub events_reduced: IntCounterVec,
    /// Outbox rows published, by where their events came from: `handed`
    /// (by the pipeline that committed them, in memory) or `read` (back
    /// from the table: rows of an earlier run, another writer, or past the
    /// hand-off's bound).
    pub outbox_rows_published: IntCounterVec,
    /// Messages per batch.
    pub batch_size: Histogram,
    /// Seconds from gathering a batch to acking it.
    pub batch_duration: Histogram,
    /// Seconds from a batch's commit to the broker's confirm of its events.
    pub event_delay: Histogram,
    /// Outbox rows (committed batches whose events the broker has not confirmed yet).
    pub outbox_pending: IntGauge,
    /// Rejected rows kept in staging, by type.
    pub staging_invalid: IntGaugeVec,
    /// 1 while connected, by service (postgres, rabbitmq).
    pub connected: IntGaugeVec,
    /// Reconnections, by service.
    pub reconnects: IntCounterVec,
    /// Outages begun, by service and reason (see `crate::store::Cause`).
    pub outages: IntCounterVec,
    /// Partitions whose lease this daemon holds (partitioned mode).
    pub partitions_owned: IntGauge,
    /// Lease changes of this daemon, by kind: `taken`, `released` (handed
    /// over), `lost` (another daemon took it after it expired).
    pub partition_handovers: IntCounterVec,
    /// Ready messages in each partition queue this daemon holds.
    pub partition_depth: IntGaugeVec,
    /// Ready messages in the inbound queue (partitioned mode: in the
    /// partition queues this daemon holds); set through
    /// [`Metrics::set_inbound_depth`].
    inbound_depth: IntGauge,
    /// Whether `inbound_depth` was read at all, so that 0 means an empty
    /// queue, not "not read yet".
    inbound_depth_read: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in a registry of their own.
    pub fn new() -> Metrics {
        let r = Exposition::new();
        let latency = || prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets");
        let (connected, reconnects) = r.connections(
            ("scramjet_connected", "1 while connected, by service."),
            ("scramjet_reconnects_total", "Reconnections by service."),
            ["postgres", "rabbitmq"],
        );
        Metrics {
            messages: r.counters(
                "scramjet_messages_total",
                "Inbound messages by outcome.",
                &["outcome"],
            ),
            events_published: r.counters(
                "scramjet_events_published_total",
                "Change events confirmed by the broker, by op.",
                &["op"],
            ),
            events_reduced: r.counters(
                "scramjet_events_reduced_total",
                "Change events over limits.max_event_bytes, published in their reduced form, by op.",
                &["op"],
            ),
            outbox_rows_published: r.counters(
                "scramjet_outbox_rows_published_total",
                "Outbox rows published, by where their events came from: handed (in memory, by the batch that committed them) or read (back from the table).",
                &["source"],
            ),
            batch_size: r.histogram(
                "scramjet_batch_size",
                "Messages per batch.",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            ),
            batch_duration: r.histogram(
                "scramjet_batch_duration_seconds",
                "Seconds from gathering a batch to acking it.",
                latency(),
            ),
            event_delay: r.histogram(
                "scramjet_event_delay_seconds",
                "Seconds from a batch's commit to the broker's confirm of its events.",
                latency(),
            ),
            outbox_pending: r.gauge(
                "scramjet_outbox_pending",
                "Outbox rows: committed batches whose events the broker has not confirmed yet.",
            ),
            staging_invalid: r.gauges(
                "scramjet_staging_invalid",
                "Rejected rows kept in staging, by type.",
                "type",
            ),
            connected,
            reconnects,
            outages: r.counters(
                "scramjet_outages_total",
                "Outages begun (the environment, not a message, failed), by service and reason.",
                &["service", "reason"],
            ),
            partitions_owned: r.gauge(
                "scramjet_partitions_owned",
                "Partitions whose lease this daemon holds (amqp.partitions > 1).",
            ),
            partition_handovers: r.counters(
                "scramjet_partition_handovers_total",
                "Partition leases this daemon took, released (handed over) or lost (taken by another after expiry).",
                &["kind"],
            ),
            partition_depth: r.gauges(
                "scramjet_partition_queue_depth",
                "Ready messages in each partition queue this daemon holds.",
                "partition",
            ),
            inbound_depth: r.gauge(
                "scramjet_inbound_queue_depth",
                "Ready messages in the inbound queue (amqp.partitions > 1: in the partition queues this daemon holds).",
            ),
            inbound_depth_read: Default::default(),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.registry.render()
    }

    /// Records the inbound queue's depth, as just read from the broker.
    pub fn set_inbound_depth(&self, depth: i64) {
        self.inbound_depth.set(depth);
        self.inbound_depth_read
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The inbound queue's depth as last read; `None` before the first reading.
    pub fn inbound_depth(&self) -> Option<i64> {
        self.inbound_depth_read
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| self.inbound_depth.get())
    }
}

/// The metrics of `scramjet relay` (a process of its own, so a registry of its own).
#[derive(Clone)]
pub struct ProducerMetrics {
    /// Where everything below is registered.
    registry: Exposition,
    /// Outbox rows published and confirmed by the broker, by action.
    pub messages: IntCounterVec,
    /// Outbox rows over `limits.max_message_bytes`, published in their reduced form.
    pub reduced: IntCounter,
    /// Seconds from a row's insertion into the outbox to the broker's confirm.
    pub delay: Histogram,
    /// Outbox rows waiting (all relays together).
    pub pending: IntGauge,
    /// 1 while this relay is the one draining the outbox, 0 while it stands by.
    pub active: IntGauge,
    /// 1 while connected, by service (source, rabbitmq).
    pub connected: IntGaugeVec,
    /// Reconnections, by service.
    pub reconnects: IntCounterVec,
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProducerMetrics {
    /// Fresh metrics in a registry of their own.
    pub fn new() -> ProducerMetrics {
        let r = Exposition::new();
        let messages = r.counters(
            "scramjet_relay_messages_total",
            "Source outbox rows published and confirmed by the broker, by action.",
            &["action"],
        );
        for action in ["save", "delete"] {
            messages.with_label_values(&[action]);
        }
        let (connected, reconnects) = r.connections(
            (
                "scramjet_relay_connected",
                "1 while the relay is connected, by service.",
            ),
            (
                "scramjet_relay_reconnects_total",
                "Relay reconnections by service.",
            ),
            ["source", "rabbitmq"],
        );
        ProducerMetrics {
            messages,
            reduced: r.counter(
                "scramjet_relay_reduced_total",
                "Source outbox rows over limits.max_message_bytes, published without their data.",
            ),
            delay: r.histogram(
                "scramjet_relay_delay_seconds",
                "Seconds from a row's insertion into the source outbox to the broker's confirm.",
                prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
            ),
            pending: r.gauge(
                "scramjet_relay_pending",
                "Rows waiting in the source outbox.",
            ),
            active: r.gauge(
                "scramjet_relay_active",
                "1 while this relay drains the source outbox, 0 while it stands by.",
            ),
            connected,
            reconnects,
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_text_format() {
        let m = Metrics::new();
        m.messages.with_label_values(&["created"]).inc_by(3);
        m.batch_size.observe(7.0);
        let text = m.render();
        assert!(
            text.contains("scramjet_messages_total{outcome=\"created\"} 3"),
            "{text}"
        );
        assert!(text.contains("scramjet_batch_size_count 1"), "{text}");
        assert!(
            text.contains("scramjet_connected{service=\"postgres\"} 0"),
            "{text}"
        );
    }
}
