//! The consume loop: gather deliveries into a batch, decode, run the
//! pipeline, dead-letter what cannot be processed, then ack the whole batch
//! with one `basic.ack(multiple)` — only after its transaction committed and
//! its dead letters were confirmed.
//!
//! Dead letters go over the publishing connection, which a broker short of
//! memory or disk blocks. A batch with a dead letter then waits for the
//! confirm up to [`CONFIRM_TIMEOUT`], unacked; past it the session ends and
//! reconnects, and the broker redelivers the batch. Applying a committed
//! batch again changes nothing (duplicate `message_id`s are dropped, equal
//! content hashes publish nothing) and its malformed messages are
//! dead-lettered again — possibly twice, if the first publish goes out once
//! the broker unblocks. So during an alarm a malformed message holds up the
//! queue, retried every [`CONFIRM_TIMEOUT`], but is never acked unconfirmed.

use std::{collections::BTreeMap, panic::AssertUnwindSafe, sync::Arc, time::Instant};

use futures_util::{FutureExt, Stream, StreamExt};
use lapin::{
    BasicProperties,
    message::Delivery,
    options::BasicAckOptions,
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    amqp::{CONFIRM_TIMEOUT, DeadLetters, Outgoing, REPLY_TIMEOUT},
    config::Settings,
    domain::entity::{KEY_HEADER, key_of},
    domain::message::{self, Malformed},
    domain::trace::TraceContext,
    domain::validate::{SchemaRegistry, Schemas},
    outbox::Wake,
    pipeline::{Interrupted, Pipeline, Prepared, Results},
    support::panic::panic_text,
    telemetry::metrics::Metrics,
};

/// Header added to dead-lettered messages, holding the reason.
pub const ERROR_HEADER: &str = "x-scramjet-error";

/// Consumes one session's deliveries.
pub(super) struct Consumer {
    /// Settings (batch size, linger, limits, exchange names).
    pub settings: Arc<Settings>,
    /// Applies batches to the database.
    pub pipeline: Pipeline,
    /// Schemas for validation.
    pub schemas: Arc<Schemas>,
    /// Publishes to the dead-letter exchange, over the publishing connection.
    pub dead_letters: DeadLetters,
    /// Wakes the outbox publisher after a commit that wrote events.
    pub publisher_wake: Wake,
    /// Counts outcomes and times batches.
    pub metrics: Metrics,
    /// Most messages per batch: [`Settings::batch_size`], or less for a
    /// partition's channel, whose prefetch is a share of the daemon's.
    pub batch_size: usize,
    /// Whether each message must carry the `scramjet-key` header of its
    /// type and id: in a partition queue, one without it could race the
    /// same id in another partition.
    pub check_key: bool,
}

impl Consumer {
    /// Runs until `stop` (after finishing the batch in hand) or a broker
    /// error. `stream` yields each delivery with its lane: the partition
    /// queue it came from (its channel's), `None` for the single queue.
    pub(super) async fn run(
        &self,
        mut stream: impl Stream<Item = Lane> + Unpin,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let batch_size = self.batch_size;
        let max_bytes = self.settings.pipeline.max_batch_bytes;
        let linger = self.settings.pipeline.linger();
        // One batch's vectors, kept from batch to batch: they grow to the
        // usual batch size once, not again for every batch.
        let mut batch = Batch::default();
        loop {
            batch.clear();
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                next = stream.next() => next,
            };
            batch.push(accept(first)?);
            let mut bytes = batch.deliveries[0].data.len();
            let room = |batch: &Batch, bytes: usize| {
                batch.deliveries.len() < batch_size && bytes < max_bytes
            };
            // Take whatever has already arrived: under load batches grow by
            // themselves, and an idle daemon answers a lone message at once.
            while room(&batch, bytes) {
                match stream.next().now_or_never() {
                    Some(next) => {
                        let d = accept(next)?;
                        bytes += d.1.data.len();
                        batch.push(d);
                    }
                    None => break,
                }
            }
            if !linger.is_zero() {
                let deadline = tokio::time::Instant::now() + linger;
                while room(&batch, bytes) {
                    match tokio::time::timeout_at(deadline, stream.next()).await {
                        Ok(next) => {
                            let d = accept(next)?;
                            bytes += d.1.data.len();
                            batch.push(d);
                        }
                        Err(_) => break,
                    }
                }
            }
            let span = tracing::info_span!(
                "batch",
                size = batch.deliveries.len(),
                first_tag = batch.deliveries[0].delivery_tag
            );
            match self.handle(&batch, stop).instrument(span).await {
                Ok(()) => {}
                // Not committed and not acked: the broker redelivers the batch.
                Err(HandleError::Interrupted) => return Ok(()),
                Err(HandleError::Broker(e)) => return Err(e),
            }
        }
    }

    /// One batch, in the order its effects must happen: decode, apply in
    /// one transaction, dead-letter (confirmed), ack, record. Nothing is
    /// acked before its transaction committed and its dead letters were
    /// confirmed.
    async fn handle(&self, batch: &Batch, stop: &CancellationToken) -> Result<(), HandleError> {
        let started = Instant::now();
        let lanes = &batch.lanes;
        let batch = batch.deliveries.as_slice();
        let mut decoded = self.decode_all(batch, lanes);
        let results = self
            .pipeline
            .process(&decoded.prepared, stop)
            .await
            .map_err(|Interrupted| HandleError::Interrupted)?;
        let mut counts = tally(batch, &mut decoded, results);
        // Rung as soon as the events are committed: the dead letters below
        // may wait on a blocked broker for up to CONFIRM_TIMEOUT.
        if counts.wrote_events {
            self.publisher_wake.notify();
        }
        if !decoded.dead.is_empty() {
            let dead_lettered = self.dead_letter_all(batch, decoded.dead).await?;
            counts.per_label.insert("dead_lettered", dead_lettered);
        }
        ack(batch, lanes).await?;
        self.record(batch.len(), &counts, started);
        Ok(())
    }

    /// Decodes and prepares every delivery of `batch`; those that cannot be
    /// processed are set aside for the dead-letter exchange, with the reason.
    fn decode_all(&self, batch: &[Delivery], lanes: &[Option<i32>]) -> Decoded {
        let limits = self.settings.limits.decoder_limits();
        let schemas = self.schemas.current();

        let mut decoded = Decoded {
            prepared: Vec::with_capacity(batch.len()),
            positions: Vec::with_capacity(batch.len()),
            dead: Vec::new(),
        };
        for (i, d) in batch.iter().enumerate() {
            if let Some(property) = property_not_utf8(&d.properties) {
                // Warn, not debug like other malformed messages: the producer
                // breaks the AMQP specification, and its library is to blame.
                tracing::warn!(delivery_tag = d.delivery_tag, %property, "an AMQP property is not UTF-8; dead-lettering the message");
                decoded.dead.push((i, format!("the AMQP {property} is not valid UTF-8 (its invalid bytes are U+FFFD in this dead letter)")));
                continue;
            }
            let prepared = prepare(d, limits, &schemas).and_then(|mut p| {
                if self.check_key {
                    check_key(d, &p)?;
                }
                p.lane = lanes[i];
                Ok(p)
            });
            match prepared {
                Ok(p) => {
                    decoded.prepared.push(p);
                    decoded.positions.push(i);
                }
                Err(reason) => {
                    tracing::debug!(delivery_tag = d.delivery_tag, %reason, "malformed message");
                    decoded.dead.push((i, reason.0));
                }
            }
        }
        decoded
    }

    /// Publishes `dead` to the dead-letter exchange in batch order and waits
    /// for the broker's confirms; returns how many there were.
    async fn dead_letter_all(
        &self,
        batch: &[Delivery],
        mut dead: Vec<(usize, String)>,
    ) -> Result<usize, HandleError> {
        dead.sort_by_key(|(i, _)| *i);
        let messages = dead
            .iter()
            .map(|(i, reason)| {
                dead_letter(&batch[*i], reason, &self.settings.amqp.dead_letter_exchange)
            })
            .collect();
        self.dead_letters
            .publish_all(messages, CONFIRM_TIMEOUT)
            .await
            .map_err(HandleError::Broker)?;
        Ok(dead.len())
    }

    /// Counts the batch in the metrics and logs the "batch committed" line.
    fn record(&self, size: usize, counts: &Counts, started: Instant) {
        for (outcome, n) in &counts.per_label {
            self.metrics
                .messages
                .with_label_values(&[outcome])
                .inc_by(*n as u64);
        }
        self.metrics.batch_size.observe(size as f64);
        self.metrics
            .batch_duration
            .observe(started.elapsed().as_secs_f64());
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            size,
            created = counts.get("created"),
            updated = counts.get("updated"),
            unchanged = counts.get("unchanged"),
            deleted = counts.get("deleted"),
            absent = counts.get("absent"),
            rejected = counts.get("rejected"),
            stale = counts.get("stale"),
            duplicate = counts.get("duplicate"),
            dead_lettered = counts.get("dead_lettered"),
            elapsed_ms = format!("{elapsed_ms:.1}"),
            "batch committed"
        );
    }
}

/// A batch after decoding: what goes to the pipeline, and what cannot.
struct Decoded {
    /// The well-formed messages, prepared, in batch order.
    prepared: Vec<Prepared>,
    /// The position in the batch of each of `prepared`.
    positions: Vec<usize>,
    /// Messages to dead-letter: (position in the batch, reason).
    dead: Vec<(usize, String)>,
}

/// What a batch's messages did, for the metrics and the log.
struct Counts {
    /// Messages per label of `scramjet_messages_total`: each outcome's name,
    /// and `dead_lettered` (a label appears only when counted).
    per_label: BTreeMap<&'static str, usize>,
    /// Whether any outcome published an event: the outbox has a new row.
    wrote_events: bool,
}

impl Counts {
    /// The count under `label`, 0 when there is none.
    fn get(&self, label: &str) -> usize {
        self.per_label.get(label).copied().unwrap_or(0)
    }
}

/// The W3C trace context of a delivery's `traceparent` and `tracestate`
/// headers (strings; anything else, or an invalid `traceparent`, is none).
fn trace_context(properties: &BasicProperties) -> Option<TraceContext> {
    let headers = properties.headers().as_ref()?.inner();
    let text = |name: &str| match headers.get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    };
    TraceContext::parse(text("traceparent"), text("tracestate"))
}

/// Decodes and prepares one delivery, or says why it is malformed.
fn prepare(
    d: &Delivery,
    limits: message::Limits,
    schemas: &SchemaRegistry,
) -> Result<Prepared, Malformed> {
    // Validation runs third-party code on producer data: a panic in it
    // dead-letters that message instead of stopping the daemon.
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        message::decode(&d.data, limits).map(|inbound| {
            let property =
                |p: &Option<lapin::types::ShortString>| p.as_ref().map(|s| s.as_str().to_owned());
            let mut prepared = Prepared::new(
                inbound,
                property(d.properties.correlation_id()),
                property(d.properties.message_id()),
                schemas,
            );
            prepared.trace = trace_context(&d.properties);
            prepared
        })
    }))
    .unwrap_or_else(|panic| {
        Err(Malformed(format!(
            "internal error while decoding or validating: {}",
            panic_text(&*panic)
        )))
    })
}

/// Refuses a message of a partition queue whose `scramjet-key` header is
/// missing or is not `<type>/<id>` of its body (CONTRACT §2): the broker
/// hashed the header to pick the partition, so another partition may hold
/// the same id, and processing it here could reorder that id's changes.
fn check_key(d: &Delivery, p: &Prepared) -> Result<(), Malformed> {
    let (t, id) = (p.entity_type.as_str().as_bytes(), p.id.as_str().as_bytes());
    // `<type>/<id>`, compared in place: the expected text is built only
    // for a refusal.
    let is_key = |key: &[u8]| {
        key.len() == t.len() + 1 + id.len()
            && key.starts_with(t)
            && key[t.len()] == b'/'
            && key.ends_with(id)
    };
    let expected = || key_of(p.entity_type.as_str(), p.id.as_str());
    let header = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(KEY_HEADER));
    let found: Option<&[u8]> = match header {
        Some(AMQPValue::LongString(s)) => Some(s.as_bytes()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().as_bytes()),
        _ => None,
    };
    match found {
        Some(key) if is_key(key) => Ok(()),
        Some(key) => Err(Malformed(format!(
            "the {KEY_HEADER} header {:?} is not this message's <type>/<id> {:?}: in a \
             partition queue it could race the same id in another partition",
            String::from_utf8_lossy(key),
            expected()
        ))),
        None if header.is_some() => Err(Malformed(format!(
            "the {KEY_HEADER} header is not a string; in a partition queue it must be the \
             message's <type>/<id> {:?}",
            expected()
        ))),
        None => Err(Malformed(format!(
            "no {KEY_HEADER} header: a message in a partition queue must carry {KEY_HEADER} = \
             <type>/<id> (here {:?}), or it could race the same id in another partition",
            expected()
        ))),
    }
}

/// Counts the pipeline's `results` and logs each message; the ones the
/// database refused join the dead letters of `decoded`.
fn tally(batch: &[Delivery], decoded: &mut Decoded, results: Results) -> Counts {
    let mut counts = Counts {
        per_label: BTreeMap::new(),
        wrote_events: false,
    };
    let Decoded {
        prepared,
        positions,
        dead,
    } = decoded;
    for ((p, &i), result) in prepared.iter().zip(positions.iter()).zip(results) {
        match result {
            Ok(outcome) => {
                tracing::debug!(delivery_tag = batch[i].delivery_tag, r#type = %p.entity_type, id = %p.id, correlation_id = ?p.correlation_id, trace_id = p.trace.as_ref().map(|t| t.trace_id()), %outcome, "processed");
                counts.wrote_events |= outcome.has_event();
                *counts.per_label.entry(outcome.as_str()).or_default() += 1;
            }
            Err(reason) => {
                tracing::warn!(delivery_tag = batch[i].delivery_tag, r#type = %p.entity_type, id = %p.id, %reason, "database refused a message; dead-lettering it");
                dead.push((i, format!("the database refused the message: {reason}")));
            }
        }
    }
    counts
}

/// Acks the whole batch with one `basic.ack(multiple)` on the last delivery
/// of each lane (each lane is a channel of its own).
async fn ack(batch: &[Delivery], lanes: &[Option<i32>]) -> Result<(), HandleError> {
    let mut last: Vec<(Option<i32>, &Delivery)> = Vec::new();
    for (d, lane) in batch.iter().zip(lanes) {
        match last.iter_mut().find(|(l, _)| l == lane) {
            Some(slot) => slot.1 = d,
            None => last.push((*lane, d)),
        }
    }
    let acks = last
        .iter()
        .map(|(_, d)| d.acker.ack(BasicAckOptions { multiple: true }));
    // An ack that cannot be written means a dead connection: reconnect,
    // and the broker redelivers the (committed, so harmless) batch.
    tokio::time::timeout(REPLY_TIMEOUT, futures_util::future::try_join_all(acks))
        .await
        .map_err(|_| {
            HandleError::Broker(anyhow::anyhow!(
                "cannot ack: no progress within {} s",
                REPLY_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| HandleError::Broker(anyhow::anyhow!("cannot ack: {e}")))?;
    Ok(())
}

/// How a batch ended without being acked.
enum HandleError {
    /// Shutdown while waiting for the database.
    Interrupted,
    /// The broker failed; the session must reconnect.
    Broker(anyhow::Error),
}

/// A delivery and its lane: the partition whose queue (and channel) it
/// came from, `None` for the single inbound queue.
pub(super) type Lane = (Option<i32>, lapin::Result<Delivery>);

/// Deliveries gathered for one transaction, with their lanes.
#[derive(Default)]
struct Batch {
    deliveries: Vec<Delivery>,
    lanes: Vec<Option<i32>>,
}

impl Batch {
    fn push(&mut self, (lane, d): (Option<i32>, Delivery)) {
        self.deliveries.push(d);
        self.lanes.push(lane);
    }

    /// Drops the deliveries (each batch is acked or abandoned before the
    /// next is gathered), keeping the room.
    fn clear(&mut self) {
        self.deliveries.clear();
        self.lanes.clear();
    }
}

fn accept(next: Option<Lane>) -> anyhow::Result<(Option<i32>, Delivery)> {
    match next {
        Some((lane, Ok(delivery))) => Ok((lane, delivery)),
        Some((_, Err(e))) => Err(anyhow::anyhow!("consuming failed: {e}")),
        None => Err(anyhow::anyhow!("the broker cancelled the consumer")),
    }
}

/// Which short-string property of `p` was not UTF-8 on the wire, named for a
/// reason (`property message_id`, `header name "x-\u{FFFD}"`), if any.
///
/// The AMQP client decodes such bytes to U+FFFD rather than failing the
/// frame (see `deploy/vendor/amq-protocol-types`), so a replacement character
/// is the mark. A producer that sends a genuine U+FFFD in one of these is
/// dead-lettered too: it cannot be told apart, and an identifier holding
/// U+FFFD is itself the scar of an earlier lossy decode.
fn property_not_utf8(p: &BasicProperties) -> Option<String> {
    let short_strings = [
        ("content_type", p.content_type()),
        ("content_encoding", p.content_encoding()),
        ("correlation_id", p.correlation_id()),
        ("reply_to", p.reply_to()),
        ("expiration", p.expiration()),
        ("message_id", p.message_id()),
        ("type", p.kind()),
        ("user_id", p.user_id()),
        ("app_id", p.app_id()),
        ("cluster_id", p.cluster_id()),
    ];
    let lossy = |s: &ShortString| s.as_str().contains(char::REPLACEMENT_CHARACTER);
    short_strings
        .into_iter()
        .find(|(_, value)| value.as_ref().is_some_and(lossy))
        .map(|(name, _)| format!("property {name}"))
        .or_else(|| {
            p.headers()
                .as_ref()
                .and_then(header_name_not_utf8)
                .map(|name| format!("header name {name:?}"))
        })
}

/// The first name in `table`, or in a table nested in its values, that
/// holds U+FFFD.
fn header_name_not_utf8(table: &FieldTable) -> Option<String> {
    fn in_value(value: &AMQPValue) -> Option<String> {
        match value {
            AMQPValue::FieldTable(t) => header_name_not_utf8(t),
            AMQPValue::FieldArray(a) => a.as_slice().iter().find_map(in_value),
            _ => None,
        }
    }
    table.inner().iter().find_map(|(name, value)| {
        if name.as_str().contains(char::REPLACEMENT_CHARACTER) {
            Some(name.as_str().to_owned())
        } else {
            in_value(value)
        }
    })
}

/// The original message, body and properties unchanged, with the reason added
/// as a header, made persistent so it survives a broker restart.
fn dead_letter<'a>(d: &'a Delivery, reason: &str, exchange: &'a str) -> Outgoing<'a> {
    let mut headers: FieldTable = d.properties.headers().clone().unwrap_or_default();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
    let properties: BasicProperties = d
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    Outgoing {
        exchange,
        routing_key: d.routing_key.as_str(),
        body: &d.data,
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `basic` content header's property list: flags, then `bytes` as the
    /// one short string the flag `bit` announces.
    fn properties_with(bit: u16, bytes: &[u8]) -> Vec<u8> {
        let mut wire = (1u16 << bit).to_be_bytes().to_vec();
        wire.push(bytes.len() as u8);
        wire.extend_from_slice(bytes);
        wire
    }

    fn parse(wire: &[u8]) -> BasicProperties {
        let (rest, properties) = lapin::protocol::basic::parse_properties(wire)
            .expect("properties that are not UTF-8 still parse");
        assert!(rest.is_empty());
        properties
    }

    #[test]
    fn a_message_id_that_is_not_utf8_parses_and_is_named() {
        let p = parse(&properties_with(7, b"\xff\xfebad"));
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some("\u{FFFD}\u{FFFD}bad")
        );
        assert_eq!(
            property_not_utf8(&p).as_deref(),
            Some("property message_id")
        );
    }

    #[test]
    fn every_short_string_property_that_is_not_utf8_is_named() {
        let bits = [
            (15, "content_type"),
            (14, "content_encoding"),
            (10, "correlation_id"),
            (9, "reply_to"),
            (8, "expiration"),
            (7, "message_id"),
            (5, "type"),
            (4, "user_id"),
            (3, "app_id"),
            (2, "cluster_id"),
        ];
        for (bit, name) in bits {
            let p = parse(&properties_with(bit, b"ok\xc3("));
            assert_eq!(property_not_utf8(&p), Some(format!("property {name}")));
        }
    }

    #[test]
    fn a_header_name_that_is_not_utf8_is_named_also_in_a_nested_table() {
        let mut inner = FieldTable::default();
        inner.insert("\u{FFFD}k".into(), AMQPValue::Boolean(true));
        let mut headers = FieldTable::default();
        headers.insert("x-fine".into(), AMQPValue::LongString("\u{FFFD}".into()));
        headers.insert("x-nested".into(), AMQPValue::FieldTable(inner));
        let p = BasicProperties::default().with_headers(headers);
        assert_eq!(
            property_not_utf8(&p).as_deref(),
            Some("header name \"\u{FFFD}k\"")
        );
    }

    #[test]
    fn utf8_properties_and_byte_header_values_are_fine() {
        let mut headers = FieldTable::default();
        headers.insert("x-bytes".into(), AMQPValue::LongString(b"\xff"[..].into()));
        let p = BasicProperties::default()
            .with_message_id("m-é".into())
            .with_correlation_id("c".into())
            .with_headers(headers);
        assert_eq!(property_not_utf8(&p), None);
    }
}
