-- The W3C trace context (traceparent, tracestate) of the inbound message
-- behind each event, published as the same AMQP headers. NULL for a row
-- none of whose events has one, so rows without tracing cost nothing.
ALTER TABLE outbox ADD COLUMN traceparents text[];
ALTER TABLE outbox ADD COLUMN tracestates text[];
