-- The admin API's tables: environment-scoped tokens, receiver auth and failure emails on
-- subscriptions, and resend jobs whose progress can be read.

-- A token belongs to one environment and sees nothing else. Only its SHA-256 is stored:
-- tokens are 32 random bytes, so a plain hash is enough (no password stretching needed).
CREATE TABLE dispatcher.tokens (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    environment_id text NOT NULL CHECK (environment_id <> ''),
    token_hash     bytea NOT NULL UNIQUE,
    name           text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- How the dispatcher authenticates to the receiver ({"type": "basic", "username",
-- "password"}, {"type": "bearer", "token"}, {"type": "header", "name", "value"} or
-- {"type": "none"}), and who is mailed about failures.
ALTER TABLE dispatcher.subscriptions
    ADD COLUMN auth jsonb NOT NULL DEFAULT '{"type": "none"}'::jsonb,
    ADD COLUMN email text;

-- Bulk resends run in the background; `filter` is what the caller asked for, `cutoff`
-- keeps a resend from picking up the deliveries it has itself sent back and seen fail.
CREATE TABLE dispatcher.resend_jobs (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    environment_id text,
    filter         jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    matched        integer NOT NULL DEFAULT 0,
    resent         integer NOT NULL DEFAULT 0,
    error          text,
    cutoff         timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

-- History is listed newest first per subscription and per environment.
CREATE INDEX deliveries_done_environment_idx ON dispatcher.deliveries_done (environment_id, id);
CREATE INDEX deliveries_environment_idx ON dispatcher.deliveries (environment_id, id);

-- Resending a finished delivery moves it back into the queue with its id, due now; its
-- attempts stay where they are, and the next attempt continues their numbering.
CREATE FUNCTION dispatcher.resend(ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
    woken integer;
BEGIN
    WITH back AS (
        DELETE FROM dispatcher.deliveries_done d
        WHERE d.id = ANY(ids)
          AND EXISTS (SELECT 1 FROM dispatcher.subscriptions s WHERE s.id = d.subscription_id)
        RETURNING d.*
    )
    INSERT INTO dispatcher.deliveries
        (id, subscription_id, event_id, event_created_at, environment_id, attempts, due_at,
         paused, created_at, last_status, last_error)
    OVERRIDING SYSTEM VALUE
    SELECT b.id, b.subscription_id, b.event_id, b.event_created_at, b.environment_id,
           b.attempts, now(), NOT s.active, b.created_at, b.last_status, b.last_error
    FROM back b JOIN dispatcher.subscriptions s ON s.id = b.subscription_id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    -- A live delivery waiting for its next retry is simply made due now.
    UPDATE dispatcher.deliveries SET due_at = now()
    WHERE id = ANY(ids) AND lease_owner IS NULL AND due_at > now();
    GET DIAGNOSTICS woken = ROW_COUNT;
    IF moved + woken > 0 THEN
        PERFORM pg_notify('dispatcher_work', '');
    END IF;
    RETURN moved + woken;
END $$;
