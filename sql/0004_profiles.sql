-- What the seed products need beyond the core: failure mails queued durably, Tilby's one
-- subscription per (environment, entity, event type), and imports sent in batches.

-- Failure mails wait here until the mailer has handed them to the SMTP server, so a
-- restart loses none. `body` is the request body the attempt sent (Tilby mails it).
CREATE TABLE dispatcher.emails (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id uuid NOT NULL,
    delivery_id     bigint NOT NULL,
    environment_id  text NOT NULL,
    recipient       text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('attempt_failed', 'gave_up')),
    attempt         integer NOT NULL,
    status_code     integer,
    error           text,
    url             text NOT NULL,
    event_name      text NOT NULL,
    body            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    due_at          timestamptz NOT NULL DEFAULT now(),
    tries           integer NOT NULL DEFAULT 0,
    last_error      text,
    sent_at         timestamptz
);
CREATE INDEX emails_due_idx ON dispatcher.emails (due_at) WHERE sent_at IS NULL;

-- Queue the mails of a batch of outcomes (one statement for the batch). Subscriptions
-- without an address get none.
CREATE FUNCTION dispatcher.queue_emails(
    delivery_ids bigint[], subscription_ids uuid[], kinds text[], attempts integer[],
    status_codes integer[], errors text[], bodies text[]
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    queued integer;
BEGIN
    INSERT INTO dispatcher.emails
        (subscription_id, delivery_id, environment_id, recipient, kind, attempt, status_code,
         error, url, event_name, body)
    SELECT m.subscription_id, m.delivery_id, s.environment_id, s.email, m.kind, m.attempt,
           m.status_code, m.error, s.url, e.event_name, m.body
    FROM unnest(delivery_ids, subscription_ids, kinds, attempts, status_codes, errors, bodies)
         AS m(delivery_id, subscription_id, kind, attempt, status_code, error, body)
    JOIN dispatcher.subscriptions s ON s.id = m.subscription_id AND s.email IS NOT NULL
    LEFT JOIN LATERAL (
        SELECT ev.event_name FROM dispatcher.deliveries d
        JOIN dispatcher.events ev ON ev.id = d.event_id AND ev.created_at = d.event_created_at
        WHERE d.id = m.delivery_id
        UNION ALL
        SELECT ev.event_name FROM dispatcher.deliveries_done d
        JOIN dispatcher.events ev ON ev.id = d.event_id AND ev.created_at = d.event_created_at
        WHERE d.id = m.delivery_id
        LIMIT 1
    ) e ON true
    WHERE e.event_name IS NOT NULL;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('dispatcher_email', '');
    END IF;
    RETURN queued;
END $$;

-- Tilby: "for each shop it's possible to have just 1 webhook for each combination of
-- entity_name and event_type" (its subscriptions carry one pattern, entity.type.*).
CREATE UNIQUE INDEX subscriptions_tilby_unique
    ON dispatcher.subscriptions (environment_id, (events[1]))
    WHERE profile = 'tilby';

-- An import publishes many entities at once. Items and customers reach subscribers in
-- batches of at most `batch_size` entities a request (the payload is then an array);
-- any other entity is published one event per entity. Returns the events created.
CREATE FUNCTION dispatcher.publish_import(
    environment_id text,
    event_name text,
    entities jsonb,
    batch_size integer DEFAULT 80
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    created integer;
BEGIN
    IF jsonb_typeof(entities) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'entities must be a JSON array' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF split_part(event_name, '.', 1) IN ('items', 'customers') THEN
        INSERT INTO dispatcher.events (environment_id, event_name, payload)
        SELECT publish_import.environment_id, publish_import.event_name,
               jsonb_agg(t.entity ORDER BY t.n)
        FROM jsonb_array_elements(entities) WITH ORDINALITY AS t(entity, n)
        GROUP BY (t.n - 1) / batch_size
        ORDER BY (t.n - 1) / batch_size;
    ELSE
        INSERT INTO dispatcher.events (environment_id, event_name, payload)
        SELECT publish_import.environment_id, publish_import.event_name, t.entity
        FROM jsonb_array_elements(entities) WITH ORDINALITY AS t(entity, n)
        ORDER BY t.n;
    END IF;
    GET DIAGNOSTICS created = ROW_COUNT;
    RETURN created;
END $$;
