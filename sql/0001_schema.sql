-- The dispatcher's schema: events in, deliveries queued, attempts recorded.
--
-- Hot path in one picture:
--   INSERT INTO events ──trigger──> deliveries (one row per matching subscription, due now)
--   daemon claims due deliveries ──POST──> attempts (append-only) + delivery moves on:
--     delivered / failed  -> moved to deliveries_done (the queue table stays small)
--     retry               -> due_at pushed to the next attempt's time

CREATE SCHEMA IF NOT EXISTS dispatcher;

-- Subscriptions ------------------------------------------------------------------------
-- `events` holds the names and patterns a subscription wants: an exact event name
-- (products.create.v0), any version of one action (products.create.*), a whole entity
-- (products.*) or everything (*). Fan-out matches with one array overlap against
-- dispatcher.event_keys(name), which a GIN index serves.
CREATE TABLE dispatcher.subscriptions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    environment_id  text NOT NULL CHECK (environment_id <> ''),
    url             text NOT NULL,
    events          text[] NOT NULL CHECK (cardinality(events) > 0),
    profile         text NOT NULL DEFAULT 'standard',
    settings        jsonb NOT NULL DEFAULT '{}'::jsonb,   -- overrides of the profile's settings
    secret          text NOT NULL,
    name            text,
    description     text,
    active          boolean NOT NULL DEFAULT true,
    deactivated_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_events_idx ON dispatcher.subscriptions USING gin (events)
    WHERE active;
CREATE INDEX subscriptions_environment_idx ON dispatcher.subscriptions (environment_id);

CREATE FUNCTION dispatcher.event_keys(event_name text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY[
        event_name,
        split_part(event_name, '.', 1) || '.' || split_part(event_name, '.', 2) || '.*',
        split_part(event_name, '.', 1) || '.*',
        '*'
    ]
$$;

-- Events -------------------------------------------------------------------------------
-- Partitioned by day so retention drops a partition instead of deleting rows.
CREATE TABLE dispatcher.events (
    id                 uuid NOT NULL DEFAULT gen_random_uuid(),
    environment_id     text NOT NULL CHECK (environment_id <> ''),
    event_name         text NOT NULL
        CHECK (event_name ~ '^[a-z0-9_-]+\.[a-z0-9_-]+\.v[0-9]+$'),
    payload            jsonb NOT NULL,
    entity_instance_id text,
    idempotency_key    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE dispatcher.events_default PARTITION OF dispatcher.events DEFAULT;

-- Publishing with an idempotency key goes through dispatcher.publish(), which keeps the
-- first event id here (a unique key on the partitioned events table would have to
-- include the partition key).
CREATE TABLE dispatcher.idempotency_keys (
    environment_id  text NOT NULL,
    idempotency_key text NOT NULL,
    event_id        uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (environment_id, idempotency_key)
);

-- Deliveries: the queue --------------------------------------------------------------
-- Only live deliveries live here. A claim sets lease_owner and pushes due_at to the end of
-- the lease, so a row claimed by an instance that died becomes due again by itself.
CREATE TABLE dispatcher.deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id  uuid NOT NULL
        REFERENCES dispatcher.subscriptions (id) ON DELETE CASCADE,
    event_id         uuid NOT NULL,
    event_created_at timestamptz NOT NULL,
    environment_id   text NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    due_at           timestamptz NOT NULL DEFAULT now(),
    lease_owner      uuid,
    paused           boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error       text
) WITH (fillfactor = 80);
CREATE INDEX deliveries_due_idx ON dispatcher.deliveries (due_at) WHERE NOT paused;
CREATE INDEX deliveries_subscription_idx ON dispatcher.deliveries (subscription_id);

-- Deliveries that reached an end: delivered, failed (gave up) or expired.
CREATE TABLE dispatcher.deliveries_done (
    id               bigint NOT NULL,
    subscription_id  uuid NOT NULL,
    event_id         uuid NOT NULL,
    event_created_at timestamptz NOT NULL,
    environment_id   text NOT NULL,
    attempts         integer NOT NULL,
    status           text NOT NULL CHECK (status IN ('delivered', 'failed', 'expired')),
    created_at       timestamptz NOT NULL,
    finished_at      timestamptz NOT NULL,
    last_status      integer,
    last_error       text,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE dispatcher.deliveries_done_default PARTITION OF dispatcher.deliveries_done DEFAULT;
CREATE INDEX deliveries_done_subscription_idx
    ON dispatcher.deliveries_done (subscription_id, finished_at);

-- Attempts: append-only history -------------------------------------------------------
CREATE TABLE dispatcher.attempts (
    delivery_id      bigint NOT NULL,
    subscription_id  uuid NOT NULL,
    attempt          integer NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    status_code      integer,
    error            text,
    response_excerpt text,
    outcome          text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'failed', 'expired'))
) PARTITION BY RANGE (started_at);
CREATE TABLE dispatcher.attempts_default PARTITION OF dispatcher.attempts DEFAULT;
CREATE INDEX attempts_delivery_idx ON dispatcher.attempts (delivery_id);
CREATE INDEX attempts_subscription_idx ON dispatcher.attempts (subscription_id, started_at);

-- Partitions ---------------------------------------------------------------------------
-- Creates one partition per day for each time-partitioned table, from `from_day` for
-- `days` days. A day whose rows already sit in the default partition is skipped (they
-- stay there until retention deletes them), so this never fails a running system.
CREATE FUNCTION dispatcher.ensure_partitions(from_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    day date;
    part text;
    created integer := 0;
BEGIN
    FOREACH parent IN ARRAY ARRAY['events', 'deliveries_done', 'attempts'] LOOP
        FOR i IN 0 .. days - 1 LOOP
            day := from_day + i;
            part := format('%s_%s', parent, to_char(day, 'YYYYMMDD'));
            CONTINUE WHEN to_regclass(format('dispatcher.%I', part)) IS NOT NULL;
            BEGIN
                EXECUTE format(
                    'CREATE TABLE dispatcher.%I PARTITION OF dispatcher.%I '
                    'FOR VALUES FROM (%L) TO (%L)',
                    part, parent, day::timestamptz, (day + 1)::timestamptz);
                created := created + 1;
            EXCEPTION WHEN check_violation THEN
                RAISE NOTICE 'rows for % already in %_default; partition skipped', day, parent;
            END;
        END LOOP;
    END LOOP;
    RETURN created;
END $$;

-- Fan-out ------------------------------------------------------------------------------
-- One statement-level trigger: every event inserted by a statement fans out to the
-- active subscriptions of its environment that want it, in the publisher's transaction,
-- and the daemon is woken by one NOTIFY (Postgres folds identical notifications of a
-- transaction into one).
CREATE FUNCTION dispatcher.fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dispatcher.deliveries
        (subscription_id, event_id, event_created_at, environment_id, due_at)
    SELECT s.id, e.id, e.created_at, e.environment_id, now()
    FROM new_events e
    JOIN dispatcher.subscriptions s
      ON s.active
     AND s.environment_id = e.environment_id
     AND s.events && dispatcher.event_keys(e.event_name);
    IF FOUND THEN
        PERFORM pg_notify('dispatcher_work', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER events_fan_out AFTER INSERT ON dispatcher.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION dispatcher.fan_out();

-- Publishing ---------------------------------------------------------------------------
-- The function internal services call. With an idempotency key, a repeat returns the
-- first event's id and creates nothing.
CREATE FUNCTION dispatcher.publish(
    environment_id text,
    event_name text,
    payload jsonb,
    entity_instance_id text DEFAULT NULL,
    idempotency_key text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    new_id uuid := gen_random_uuid();
    existing uuid;
BEGIN
    IF idempotency_key IS NOT NULL THEN
        INSERT INTO dispatcher.idempotency_keys (environment_id, idempotency_key, event_id)
        VALUES (publish.environment_id, publish.idempotency_key, new_id)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.event_id INTO existing FROM dispatcher.idempotency_keys k
            WHERE k.environment_id = publish.environment_id
              AND k.idempotency_key = publish.idempotency_key;
            RETURN existing;
        END IF;
    END IF;
    INSERT INTO dispatcher.events
        (id, environment_id, event_name, payload, entity_instance_id, idempotency_key)
    VALUES (new_id, publish.environment_id, publish.event_name, publish.payload,
            publish.entity_instance_id, publish.idempotency_key);
    RETURN new_id;
END $$;

-- Pausing ------------------------------------------------------------------------------
-- A deactivated subscription's queued deliveries wait (paused) until it is reactivated.
CREATE FUNCTION dispatcher.sync_paused() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatcher.deliveries SET paused = NOT NEW.active
    WHERE subscription_id = NEW.id AND paused = NEW.active;
    IF NEW.active THEN
        PERFORM pg_notify('dispatcher_work', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER subscriptions_pause AFTER UPDATE OF active ON dispatcher.subscriptions
    FOR EACH ROW WHEN (OLD.active IS DISTINCT FROM NEW.active)
    EXECUTE FUNCTION dispatcher.sync_paused();
