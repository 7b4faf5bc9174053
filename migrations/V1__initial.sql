-- Scramjet's tables. `staging` and `resources` are part of the external
-- contract (CONTRACT §7); `outbox` is the daemon's own.
--
-- Keys use the "C" collation: ids are opaque strings, compared byte for byte,
-- and ordered the same way on every server whatever its locale.

CREATE TABLE staging (
    type        text COLLATE "C" NOT NULL,
    id          text COLLATE "C" NOT NULL,
    data        jsonb,
    is_valid    boolean,
    to_delete   boolean NOT NULL DEFAULT false,
    errors      jsonb,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (type, id)
);

-- Rejected rows are looked up per type (operators, revalidation).
CREATE INDEX staging_invalid_by_type ON staging (type) WHERE is_valid = false;

CREATE TABLE resources (
    type       text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    hash       text NOT NULL,
    data       jsonb NOT NULL,
    version    bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (type, id)
);

-- Change events waiting for the broker's confirm. Written in the same
-- transaction as the change they describe; deleted once confirmed.
-- `payload` is text, not jsonb: it holds the exact bytes to publish
-- (jsonb would rewrite numbers such as 1E2 and reorder keys).
CREATE TABLE outbox (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL,
    routing_key    text NOT NULL,
    payload        text NOT NULL,
    correlation_id text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
