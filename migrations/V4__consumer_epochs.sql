-- The fence that keeps a daemon which lost its broker session from
-- committing late. Each consumer session of a queue registers a new epoch
-- in its first batch; every later batch of that session checks, under a
-- row lock, that its epoch is still the newest. A session that another
-- consumer has replaced (the broker redelivered its messages to a standby)
-- can therefore never commit a batch on top of the newer one's.
CREATE TABLE consumer_epochs (
    queue         text PRIMARY KEY,
    epoch         bigint NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);
