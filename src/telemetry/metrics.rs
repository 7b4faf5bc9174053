//! Prometheus metrics. Each daemon owns its registry (no global state), so
//! several daemons in one process — the tests — count separately.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The daemon's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Where everything below is registered.
    registry: Registry,
    /// Messages by outcome (created, updated, …, dead_lettered).
    pub messages: IntCounterVec,
    /// Events confirmed by the broker, by op.
    pub events_published: IntCounterVec,
    /// Events over `limits.max_event_bytes`, published in their reduced form, by op.
    pub events_reduced: IntCounterVec,
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
    /// Outages begun, by service and reason (see [`crate::store::Cause`]).
    pub outages: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in a registry of their own.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        let messages = counter(
            "scramjet_messages_total",
            "Inbound messages by outcome.",
            "outcome",
        );
        let events_published = counter(
            "scramjet_events_published_total",
            "Change events confirmed by the broker, by op.",
            "op",
        );
        let events_reduced = counter(
            "scramjet_events_reduced_total",
            "Change events over limits.max_event_bytes, published in their reduced form, by op.",
            "op",
        );
        let reconnects = counter(
            "scramjet_reconnects_total",
            "Reconnections by service.",
            "service",
        );
        let batch_size = histogram(
            "scramjet_batch_size",
            "Messages per batch.",
            vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        );
        let batch_duration = histogram(
            "scramjet_batch_duration_seconds",
            "Seconds from gathering a batch to acking it.",
            prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets"),
        );
        let event_delay = histogram(
            "scramjet_event_delay_seconds",
            "Seconds from a batch's commit to the broker's confirm of its events.",
            prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets"),
        );
        let outbox_pending = IntGauge::new(
            "scramjet_outbox_pending",
            "Outbox rows: committed batches whose events the broker has not confirmed yet.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(outbox_pending.clone()))
            .expect("registered once");
        let gauge = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let staging_invalid = gauge(
            "scramjet_staging_invalid",
            "Rejected rows kept in staging, by type.",
            "type",
        );
        let connected = gauge(
            "scramjet_connected",
            "1 while connected, by service.",
            "service",
        );
        let outages = IntCounterVec::new(
            Opts::new(
                "scramjet_outages_total",
                "Outages begun (the environment, not a message, failed), by service and reason.",
            ),
            &["service", "reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(outages.clone()))
            .expect("registered once");
        for service in ["postgres", "rabbitmq"] {
            connected.with_label_values(&[service]).set(0);
            reconnects.with_label_values(&[service]);
        }
        Metrics {
            registry,
            messages,
            events_published,
            events_reduced,
            batch_size,
            batch_duration,
            event_delay,
            outbox_pending,
            staging_invalid,
            connected,
            reconnects,
            outages,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The metrics of `scramjet relay` (a process of its own, so a registry of its own).
#[derive(Clone)]
pub struct ProducerMetrics {
    /// Where everything below is registered.
    registry: Registry,
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
        let registry = Registry::new();
        let register = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("registered once");
        };
        let messages = IntCounterVec::new(
            Opts::new(
                "scramjet_relay_messages_total",
                "Source outbox rows published and confirmed by the broker, by action.",
            ),
            &["action"],
        )
        .expect("valid metric");
        let delay = Histogram::with_opts(
            HistogramOpts::new(
                "scramjet_relay_delay_seconds",
                "Seconds from a row's insertion into the source outbox to the broker's confirm.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        let reduced = IntCounter::new(
            "scramjet_relay_reduced_total",
            "Source outbox rows over limits.max_message_bytes, published without their data.",
        )
        .expect("valid metric");
        let pending = IntGauge::new(
            "scramjet_relay_pending",
            "Rows waiting in the source outbox.",
        )
        .expect("valid metric");
        let active = IntGauge::new(
            "scramjet_relay_active",
            "1 while this relay drains the source outbox, 0 while it stands by.",
        )
        .expect("valid metric");
        let connected = IntGaugeVec::new(
            Opts::new(
                "scramjet_relay_connected",
                "1 while the relay is connected, by service.",
            ),
            &["service"],
        )
        .expect("valid metric");
        let reconnects = IntCounterVec::new(
            Opts::new(
                "scramjet_relay_reconnects_total",
                "Relay reconnections by service.",
            ),
            &["service"],
        )
        .expect("valid metric");
        register(Box::new(messages.clone()));
        register(Box::new(reduced.clone()));
        register(Box::new(delay.clone()));
        register(Box::new(pending.clone()));
        register(Box::new(active.clone()));
        register(Box::new(connected.clone()));
        register(Box::new(reconnects.clone()));
        for action in ["save", "delete"] {
            messages.with_label_values(&[action]);
        }
        for service in ["source", "rabbitmq"] {
            connected.with_label_values(&[service]).set(0);
            reconnects.with_label_values(&[service]);
        }
        ProducerMetrics {
            registry,
            messages,
            reduced,
            delay,
            pending,
            active,
            connected,
            reconnects,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
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
