-- Data read back exactly as it was sent (issue 11 §3), and the version of
-- a rejected save (§4).
--
-- jsonb keeps every digit of a number but rewrites some numbers' text:
-- `1e+2` becomes `100`, `1e-7` becomes `0.0000001`, `-0.0` becomes `0.0`.
-- Events built from stored rows (`deleted.previous`, `updated.patch`,
-- `snapshot`) and the read API must carry the data whose hash is stored,
-- so a row whose canonical text jsonb would rewrite keeps that text here.
-- It is NULL for every other row (numbers without exponent or negative
-- zero, which jsonb prints as sent): those read `data` as before, and cost
-- nothing more. Rows written before this migration keep NULL: their text
-- was already rewritten when they were stored, and is not known any more.
ALTER TABLE resources ADD COLUMN canonical text;
ALTER TABLE staging ADD COLUMN canonical text;

-- A rejected save's producer version, so that `scramjet revalidate`
-- applies it with its version (NULL: none was sent, or the row predates
-- this migration).
ALTER TABLE staging ADD COLUMN version bigint;

-- As for `data` (V3): lz4 where the server has it.
DO $$
BEGIN
    ALTER TABLE resources ALTER COLUMN canonical SET COMPRESSION lz4;
    ALTER TABLE staging ALTER COLUMN canonical SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error OR undefined_object THEN
    RAISE NOTICE 'lz4 compression is not available here; keeping the default';
END
$$;
