-- Ed25519 signing keys (Standard Webhooks v1a) and operational events (issue 14).

-- Signing keys --------------------------------------------------------------------------
-- A subscription signing with "standard_v1a" holds an Ed25519 key pair: `signing_key` is the
-- private key (whsk_ + base64 of its 32 raw bytes; the public key is derived from it, so it
-- cannot drift). Next to the HMAC `secret`, not in its place: changing the signature back
-- and forth keeps both, and the receiver's trusted public key (or HMAC secret) stays valid.
-- A rotation keeps the previous key signing until it expires, as secrets do (sql/0005).
ALTER TABLE dispatcher.subscriptions
    ADD COLUMN signing_key text,
    ADD COLUMN previous_signing_key text,
    ADD COLUMN previous_signing_key_expires_at timestamptz;

-- Operational events ---------------------------------------------------------------------
-- The dispatcher publishes what happens to endpoints and deliveries as ordinary events of
-- the entity `dispatcher` into the environment concerned. The entity is reserved: only
-- dispatcher.publish_internal() may insert such events. It sets the transaction-local
-- setting dispatcher.internal for the length of its own INSERT and restores it, and the
-- statement-level trigger below refuses `dispatcher.` events inserted without it. That is a
-- guard against mistakes (a service publishing our names), not a security boundary:
-- whoever may insert into dispatcher.events may call the function as well.
CREATE FUNCTION dispatcher.publish_internal(
    environment_ids text[], event_names text[], payloads jsonb[]
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    before text := current_setting('dispatcher.internal', true);
    created integer;
BEGIN
    PERFORM set_config('dispatcher.internal', 'on', true);
    INSERT INTO dispatcher.events (environment_id, event_name, payload)
    SELECT * FROM unnest(environment_ids, event_names, payloads);
    GET DIAGNOSTICS created = ROW_COUNT;
    PERFORM set_config('dispatcher.internal', coalesce(before, ''), true);
    RETURN created;
END $$;

CREATE FUNCTION dispatcher.refuse_reserved() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dispatcher.internal', true) IS DISTINCT FROM 'on'
       AND EXISTS (SELECT 1 FROM new_events WHERE starts_with(event_name, 'dispatcher.'))
    THEN
        RAISE EXCEPTION 'event_name: the entity "dispatcher" is reserved for the dispatcher''s '
                        'own operational events; publish under another entity'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NULL;
END $$;

-- Per statement, with the transition table fan-out already captures: no per-row cost.
CREATE TRIGGER events_reserved_entity AFTER INSERT ON dispatcher.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION dispatcher.refuse_reserved();

-- `*` stays "all of my events": operational events reach only subscriptions that name the
-- entity (dispatcher.*, dispatcher.endpoint_disabled.*, or an exact name). So an existing
-- catch-all subscriber is not sent events about itself it never asked for.
CREATE OR REPLACE FUNCTION dispatcher.event_keys(event_name text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN split_part(event_name, '.', 1) = 'dispatcher' THEN ARRAY[
        event_name,
        split_part(event_name, '.', 1) || '.' || split_part(event_name, '.', 2) || '.*',
        split_part(event_name, '.', 1) || '.*'
    ] ELSE ARRAY[
        event_name,
        split_part(event_name, '.', 1) || '.' || split_part(event_name, '.', 2) || '.*',
        split_part(event_name, '.', 1) || '.*',
        '*'
    ] END
$$;

-- endpoint_disabled / endpoint_enabled: whoever changes `active` (an answer's status, the
-- error-rate rule, the API, an UPDATE by hand), the event is published in the same
-- transaction. Rare rows, so a row trigger is fine here. A deactivated subscription is not
-- sent its own endpoint_disabled (fan-out reaches active subscriptions only).
CREATE FUNCTION dispatcher.publish_active_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.active THEN
        PERFORM dispatcher.publish_internal(
            ARRAY[NEW.environment_id], ARRAY['dispatcher.endpoint_enabled.v1'],
            ARRAY[jsonb_build_object('subscription_id', NEW.id, 'url', NEW.url)]);
    ELSE
        PERFORM dispatcher.publish_internal(
            ARRAY[NEW.environment_id], ARRAY['dispatcher.endpoint_disabled.v1'],
            ARRAY[jsonb_build_object(
                'subscription_id', NEW.id, 'url', NEW.url,
                'reason', coalesce(NEW.deactivated_reason, 'deactivated'))]);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER subscriptions_active_events AFTER UPDATE OF active ON dispatcher.subscriptions
    FOR EACH ROW WHEN (OLD.active IS DISTINCT FROM NEW.active)
    EXECUTE FUNCTION dispatcher.publish_active_change();

-- delivery_failing / delivery_recovered: consecutive failed attempts per subscription
-- (operational deliveries left out), written by the recorder only for batches with failures
-- or with successes of subscriptions that have a streak; `notified` says delivery_failing was
-- published for the current streak (once per streak). Rows at 0 failures are swept by upkeep.
CREATE TABLE dispatcher.failure_streaks (
    subscription_id uuid PRIMARY KEY REFERENCES dispatcher.subscriptions ON DELETE CASCADE,
    failures        integer NOT NULL,
    notified        boolean NOT NULL DEFAULT false
);
