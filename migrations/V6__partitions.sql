-- Partitioned mode (amqp.partitions > 1, docs/scale-out.md): several
-- daemons share the partition queues <inbound_queue>.p0 ... by leases.
--
-- A lease is a consumer_epochs row, keyed by the partition queue's name: the
-- fence of single-queue mode (V4) and the lease are one mechanism. Taking a
-- lease from another owner (or from none) raises the epoch; every batch of
-- the partition checks, under a share lock, that the epoch is still the one
-- its daemon took. A daemon that paused and lost its lease can therefore
-- never commit late, and a takeover waits for a batch that is committing.
ALTER TABLE consumer_epochs
    ADD COLUMN owner text,
    ADD COLUMN expires_at timestamptz,
    -- The inbound queue a partition queue belongs to, and its number.
    ADD COLUMN partition_of text,
    ADD COLUMN partition int;

CREATE INDEX consumer_epochs_partitions ON consumer_epochs (partition_of, partition)
    WHERE partition_of IS NOT NULL;

-- The daemons sharing the partitions of an inbound queue: each renews its
-- row while it can consume, and takes the partitions its rank among the
-- live members gives it.
CREATE TABLE consumer_members (
    partition_of text NOT NULL,
    member       text NOT NULL,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (partition_of, member)
);

-- The partition of the messages whose events the row holds (a batch gathered
-- from several partitions writes a row per partition); NULL for the single
-- queue and for writers outside any partition (ingest, replay, revalidate,
-- the API).
-- Each daemon publishes the rows of the partitions it holds, in seq order.
ALTER TABLE outbox ADD COLUMN partition int;

CREATE INDEX outbox_partition_seq ON outbox (partition, seq) WHERE partition IS NOT NULL;
CREATE INDEX outbox_unpartitioned_seq ON outbox (seq) WHERE partition IS NULL;
