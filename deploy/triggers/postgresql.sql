-- Scramjet trigger kit for a *source* PostgreSQL database (PostgreSQL 13 or later).
--
-- Install once per source database (idempotent; safe to run again to upgrade):
--
--     psql "postgres://admin@db.example.org/hr" -v ON_ERROR_STOP=1 -f deploy/triggers/postgresql.sql
--
-- Then attach it to each table with one statement (see docs/producers.md):
--
--     SELECT scramjet.attach('public.person', 'person', 'person_id');
--     SELECT scramjet.attach('public.person', 'person', 'person_id', 'columns:name,email');
--     SELECT scramjet.attach('public.person', 'person', 'person_id', 'view:public.person_doc');
--
-- and run `scramjet relay --source-url postgres://…/hr` to move the outbox to
-- Scramjet's inbound exchange.
--
-- Every INSERT and UPDATE of an attached table writes a save of the row (as
-- JSON) to scramjet.outbox, every DELETE writes a delete — in the writing
-- transaction, so the outbox holds exactly what was committed — and NOTIFYs
-- the relay. Each outbox row gets `seq` from a sequence (the relay publishes
-- it as the message's `version`, and in `seq` order) and a random
-- `message_id` (so the daemon drops a row the relay publishes twice). The
-- relay adds the header `scramjet-key` = `<type>/<id>` from the row's type
-- and id (docs/producers.md).

CREATE SCHEMA IF NOT EXISTS scramjet;

COMMENT ON SCHEMA scramjet IS
    'Scramjet trigger kit: an outbox of entity changes, moved to RabbitMQ by `scramjet relay`.';

-- The outbox. `seq` is both the publishing order and the `version`: it only
-- grows, and for one row of a source table it grows in commit order (a second
-- writer of that row waits for the first one's row lock before its trigger
-- draws the next value). Never reset the sequence: the daemon would take
-- every later change as stale (after a restore, setval it above the old maximum).
CREATE TABLE IF NOT EXISTS scramjet.outbox (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text        NOT NULL DEFAULT gen_random_uuid()::text,
    action     text        NOT NULL CHECK (action IN ('save', 'delete')),
    type       text        NOT NULL,
    id         text,
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

COMMENT ON TABLE scramjet.outbox IS
    'Entity changes not yet confirmed by RabbitMQ; `scramjet relay` publishes and deletes them.';

-- The JSON document of a saved row: the whole row, chosen columns, or the
-- row of a view with the same id. NULL when the view does not show the row.
CREATE OR REPLACE FUNCTION scramjet.document(p_shape text, p_id_column text, p_row anyelement)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_doc jsonb;
BEGIN
    IF p_shape IS NULL OR p_shape = '' THEN
        RETURN to_jsonb(p_row);
    ELSIF p_shape LIKE 'columns:%' THEN
        SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb)
          INTO v_doc
          FROM jsonb_each(to_jsonb(p_row)) AS e
         WHERE e.key = ANY (string_to_array(substr(p_shape, 9), ','));
        RETURN v_doc;
    ELSIF p_shape LIKE 'view:%' THEN
        -- Compares the view's id column with the row's own, typed, so an
        -- index on the table's id column serves the lookup.
        EXECUTE format('SELECT to_jsonb(v) FROM %s AS v WHERE v.%I = ($1).%I LIMIT 1',
                       substr(p_shape, 6), p_id_column, p_id_column)
           INTO v_doc
          USING p_row;
        RETURN v_doc;
    END IF;
    RAISE EXCEPTION 'scramjet: unknown document shape %; use scramjet.attach()', quote_literal(p_shape);
END
$$;

-- The trigger function. Arguments: type, id column, shape (optional:
-- 'columns:a,b,c' or 'view:schema.view'). Use scramjet.attach() to create
-- the trigger: it checks them first.
CREATE OR REPLACE FUNCTION scramjet.capture()
RETURNS trigger
LANGUAGE plpgsql
-- Runs as the kit's owner, so writers need no rights on scramjet.outbox.
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_type   text := TG_ARGV[0];
    v_column text := TG_ARGV[1];
    v_shape  text := coalesce(TG_ARGV[2], '');
    v_old_id text;
    v_new_id text;
    v_doc    jsonb;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old_id := to_jsonb(OLD) ->> v_column;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new_id := to_jsonb(NEW) ->> v_column;
    END IF;
    -- A delete, or an update that changed the id: the old entity is gone.
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND v_old_id IS DISTINCT FROM v_new_id) THEN
        INSERT INTO scramjet.outbox (action, type, id) VALUES ('delete', v_type, v_old_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        -- Every update is sent, even one that changed nothing: the daemon
        -- publishes no event for it, and `UPDATE t SET id = id` resends a table.
        v_doc := scramjet.document(v_shape, v_column, NEW);
        IF v_doc IS NULL THEN
            -- The view hides the row: for Scramjet the entity does not exist.
            INSERT INTO scramjet.outbox (action, type, id) VALUES ('delete', v_type, v_new_id);
        ELSE
            INSERT INTO scramjet.outbox (action, type, id, data) VALUES ('save', v_type, v_new_id, v_doc);
        END IF;
    END IF;
    -- One notification per transaction: PostgreSQL folds identical ones.
    PERFORM pg_notify('scramjet_outbox', '');
    RETURN NULL;
END
$$;

-- Attaches the trigger to a table (replacing an earlier one), after checking
-- the type name (CONTRACT §2), the id column and the shape. Returns the
-- CREATE TRIGGER statement it ran.
CREATE OR REPLACE FUNCTION scramjet.attach(
    p_table     regclass,
    p_type      text,
    p_id_column text,
    p_shape     text DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql
-- No fixed search_path here: a view name resolves as it does for the caller.
AS $$
DECLARE
    v_shape   text := '';
    v_view    regclass;
    v_columns text[];
    v_missing text[];
    v_sql     text;
BEGIN
    IF p_type IS NULL OR p_type !~ '^[A-Za-z][A-Za-z0-9_-]{0,63}$' THEN
        RAISE EXCEPTION 'scramjet.attach: type % must match ^[A-Za-z][A-Za-z0-9_-]{0,63}$',
            quote_nullable(p_type);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = p_table AND attname = p_id_column
                      AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'scramjet.attach: % has no column %', p_table, quote_nullable(p_id_column);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_index i
                    WHERE i.indrelid = p_table AND i.indisunique AND i.indnkeyatts = 1
                      AND i.indkey[0] = (SELECT attnum FROM pg_attribute
                                          WHERE attrelid = p_table AND attname = p_id_column)) THEN
        RAISE WARNING 'scramjet.attach: % is not unique on its own in %; two rows with one id are one entity for Scramjet',
            p_id_column, p_table;
    END IF;
    IF p_shape LIKE 'view:%' THEN
        v_view := substr(p_shape, 6)::regclass;
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = v_view AND attname = p_id_column
                          AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'scramjet.attach: view % has no column %', v_view, p_id_column;
        END IF;
        -- Schema-qualified: the trigger runs with an empty search_path.
        SELECT 'view:' || format('%I.%I', n.nspname, c.relname) INTO v_shape
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = v_view;
    ELSIF p_shape LIKE 'columns:%' THEN
        SELECT array_agg(btrim(c)) INTO v_columns
          FROM unnest(string_to_array(substr(p_shape, 9), ',')) AS c;
        SELECT array_agg(c) INTO v_missing
          FROM unnest(v_columns) AS c
         WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                            WHERE attrelid = p_table AND attname = c
                              AND attnum > 0 AND NOT attisdropped);
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'scramjet.attach: % has no column(s) %', p_table, v_missing;
        END IF;
        v_shape := 'columns:' || array_to_string(v_columns, ',');
    ELSIF p_shape IS NOT NULL AND p_shape <> '' THEN
        RAISE EXCEPTION 'scramjet.attach: shape % must be ''columns:a,b,c'' or ''view:schema.view''',
            quote_literal(p_shape);
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS scramjet_capture ON %s', p_table);
    v_sql := format('CREATE TRIGGER scramjet_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                    'FOR EACH ROW EXECUTE FUNCTION scramjet.capture(%L, %L, %L)',
                    p_table, p_type, p_id_column, v_shape);
    EXECUTE v_sql;
    RETURN v_sql;
END
$$;

-- Detaches the trigger from a table. Rows already in the outbox still go out.
CREATE OR REPLACE FUNCTION scramjet.detach(p_table regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS scramjet_capture ON %s', p_table);
END
$$;
