-- Measured with `scramjet bench` (see BENCHMARKS.md): one outbox row per
-- committed batch instead of one per event cuts PostgreSQL's work per
-- message (a heap tuple and an index entry written, then deleted, per event)
-- to a share of one row per batch.

ALTER TABLE outbox RENAME TO outbox_v1;

-- The events of one committed batch, in order. Rows are deleted once the
-- broker has confirmed every event of the row.
CREATE TABLE outbox (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_ids       uuid[] NOT NULL,
    routing_keys    text[] NOT NULL,
    -- The exact bytes to publish (text, not jsonb, which would rewrite numbers).
    payloads        text[] NOT NULL,
    correlation_ids text[] NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Events not yet published by an older version move over, in order.
INSERT INTO outbox (event_ids, routing_keys, payloads, correlation_ids)
SELECT array_agg(event_id ORDER BY seq), array_agg(routing_key ORDER BY seq),
       array_agg(payload ORDER BY seq), array_agg(correlation_id ORDER BY seq)
FROM outbox_v1
HAVING count(*) > 0;

DROP TABLE outbox_v1;

-- lz4 compresses several times faster than the default pglz: large
-- documents and batches of events are stored faster. It needs PostgreSQL 14
-- or later built with lz4; elsewhere the default stays.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payloads SET COMPRESSION lz4;
    ALTER TABLE resources ALTER COLUMN data SET COMPRESSION lz4;
    ALTER TABLE staging ALTER COLUMN data SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error OR undefined_object THEN
    RAISE NOTICE 'lz4 compression is not available here; keeping the default';
END
$$;
