-- Duplicate detection and ordering (CONTRACT §4).

-- AMQP message_ids already processed, written in the same transaction as the
-- message's effect; pruned after `retention.message_ids`.
CREATE TABLE inbox (
    message_id   text COLLATE "C" PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_processed_at ON inbox (processed_at);

-- The version of deleted entities, so that a stale save (lower version)
-- cannot bring them back; pruned after `retention.tombstones`.
CREATE TABLE tombstones (
    type       text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    version    bigint NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (type, id)
);
CREATE INDEX tombstones_deleted_at ON tombstones (deleted_at);
