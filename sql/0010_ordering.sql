-- Ordered delivery (issue 16), opt-in per subscription: "ordering": "entity" sends the
-- deliveries of one entity_instance_id strictly one after another in publish order,
-- "subscription" the whole subscription; "none" (the default) is the queue as it was.
--
-- The rule that keeps the unordered path as cheap as before: a delivery that must wait
-- behind another of its key is inserted *waiting* and stays out of the claim's index, and
-- exactly one delivery of a key (its head, the lowest order_seq) is ever claimable. When
-- the head leaves the queue (delivered, failed, expired) the next one of its key is
-- released in the same transaction. The claim never looks at predecessors, and an
-- unordered row never touches the ordering index.
--
-- Publish order is the order in which the publishing transactions' fan-outs got a key's
-- lock (below), which is their commit order: a publisher holds the lock to its commit, so a
-- second publisher to the same key waits, and then sees the first one's rows. Within one
-- statement it is the order the statement inserted its events.

-- The ordering a subscription asked for, kept next to the row so the fan-out reads a
-- column instead of parsing settings per event. NULL: unordered (absent, "none" or unknown).
ALTER TABLE dispatcher.subscriptions
    ADD COLUMN ordering text GENERATED ALWAYS AS (
        CASE WHEN settings->>'ordering' IN ('entity', 'subscription')
             THEN settings->>'ordering' END
    ) STORED;
-- The fan-out's "is any of these environments ordered at all?" is one probe of this.
CREATE INDEX subscriptions_ordered_idx ON dispatcher.subscriptions (environment_id)
    WHERE active AND ordering IS NOT NULL;

-- order_key: the entity_instance_id ("entity") or '' ("subscription"); NULL is unordered.
-- order_seq: the place in its key, from one sequence, drawn under the key's lock (so it
-- follows commit order), at fan-out and again at a resend (which goes to the back).
-- waiting: behind the key's head; not claimable until released.
ALTER TABLE dispatcher.deliveries
    ADD COLUMN order_key text,
    ADD COLUMN order_seq bigint,
    ADD COLUMN waiting boolean NOT NULL DEFAULT false;
CREATE SEQUENCE dispatcher.order_seq;

-- The claim's index, the same shape, without the waiting rows: however long a key's line,
-- the claim scans none of it.
DROP INDEX dispatcher.deliveries_due_idx;
CREATE INDEX deliveries_due_idx ON dispatcher.deliveries (due_at) WHERE NOT paused AND NOT waiting;
-- A key's line in order: finds the next one to release, and whether a key has a live head.
CREATE INDEX deliveries_order_idx ON dispatcher.deliveries (subscription_id, order_key, order_seq)
    WHERE order_key IS NOT NULL;

-- Advisory lock ids of a key: kind 0 serialises publishers (fan-out and resend) of a key
-- until they commit; kind 1 is held shared by a recorder ending a head, from before its
-- delete to its commit, and taken exclusively by a publisher's commit-time check (below).
-- A hash collision only makes two keys wait for each other, never reorders one.
CREATE FUNCTION dispatcher.order_lock(subscription_id uuid, order_key text, kind integer)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended(subscription_id::text || '/' || order_key, kind)
$$;

-- Release the next delivery of each key given whose head has ended: the lowest live one,
-- if it is waiting. Idempotent (a key whose lowest row is not waiting has its head), so a
-- recorder whose lease was taken over, or two checks of one key, release nothing twice.
CREATE FUNCTION dispatcher.release_next(subscription_ids uuid[], order_keys text[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    released integer;
BEGIN
    UPDATE dispatcher.deliveries d SET waiting = false
    FROM (
        SELECT DISTINCT k.subscription_id, k.order_key
        FROM unnest(subscription_ids, order_keys) AS k(subscription_id, order_key)
    ) k
    CROSS JOIN LATERAL (
        SELECT n.id FROM dispatcher.deliveries n
        WHERE n.subscription_id = k.subscription_id AND n.order_key = k.order_key
        ORDER BY n.order_seq
        LIMIT 1
    ) nxt
    WHERE d.id = nxt.id AND d.waiting;
    GET DIAGNOSTICS released = ROW_COUNT;
    IF released > 0 THEN
        PERFORM pg_notify('dispatcher_work', '');
    END IF;
    RETURN released;
END $$;

-- The commit-time check. A publisher decides "waiting" when its statement runs: if the key
-- has a live head then, its rows wait. But that head may be ending in a recorder's open
-- transaction, whose release cannot see the publisher's uncommitted rows: the rows would
-- wait behind nothing. So a publisher whose first row of a key waits behind a row of
-- another statement notes the key here, and at its commit (a deferred trigger) takes the
-- key's kind-1 lock exclusively: it waits for recorders ending a head of the key (short
-- transactions; a recorder never waits for a publisher's business logic, only for this
-- check and the commit right after it), and keeps new ones waiting until it has committed,
-- when they see its rows. Then, in a fresh snapshot, it releases the key's next if the key
-- has no head. The first check of a transaction does all of that transaction's keys in
-- lock order (no deadlocks between checks and recorders, who lock in the same order).
CREATE TABLE dispatcher.order_checks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    subscription_id uuid NOT NULL,
    order_key       text NOT NULL
);

CREATE FUNCTION dispatcher.check_order() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    subs uuid[];
    keys text[];
BEGIN
    WITH gone AS (
        DELETE FROM dispatcher.order_checks WHERE txid = pg_current_xact_id()
        RETURNING subscription_id, order_key
    ), k AS (
        SELECT DISTINCT subscription_id, order_key,
               dispatcher.order_lock(subscription_id, order_key, 1) AS lock
        FROM gone
    )
    SELECT array_agg(subscription_id ORDER BY lock), array_agg(order_key ORDER BY lock)
    INTO subs, keys FROM k;
    IF subs IS NULL THEN
        RETURN NULL;  -- an earlier firing of this transaction did them all
    END IF;
    PERFORM pg_advisory_xact_lock(l.lock)
    FROM (
        SELECT DISTINCT dispatcher.order_lock(s, k, 1) AS lock
        FROM unnest(subs, keys) AS u(s, k)
        ORDER BY 1
    ) l;
    PERFORM dispatcher.release_next(subs, keys);
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER order_checks_at_commit AFTER INSERT ON dispatcher.order_checks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION dispatcher.check_order();

-- Fan-out ------------------------------------------------------------------------------
-- As before for environments with no ordered subscription (one probe of
-- subscriptions_ordered_idx decides). Otherwise: match once, lock every ordered key of
-- the statement in a fixed order (publishers to one key serialise; the order rules out
-- deadlocks between single-statement publishers), then insert in a new statement, whose
-- snapshot (READ COMMITTED) sees what the publishers before us committed. A row waits if
-- its key has a live delivery or an earlier one in this statement.
CREATE OR REPLACE FUNCTION dispatcher.fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    subs uuid[];
    event_ids uuid[];
    event_times timestamptz[];
    envs text[];
    keys text[];
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM dispatcher.subscriptions s
        WHERE s.active AND s.ordering IS NOT NULL
          AND s.environment_id IN (SELECT environment_id FROM new_events)
    ) THEN
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
    END IF;

    SELECT array_agg(m.sid ORDER BY m.n, m.sid), array_agg(m.eid ORDER BY m.n, m.sid),
           array_agg(m.created_at ORDER BY m.n, m.sid), array_agg(m.env ORDER BY m.n, m.sid),
           array_agg(m.order_key ORDER BY m.n, m.sid)
    INTO subs, event_ids, event_times, envs, keys
    FROM (
        SELECT s.id AS sid, e.id AS eid, e.created_at, e.environment_id AS env, e.n,
               CASE s.ordering WHEN 'entity' THEN e.entity_instance_id
                               WHEN 'subscription' THEN '' END AS order_key
        -- The transition table's order is the order the statement inserted its events.
        FROM (SELECT ne.*, row_number() OVER () AS n FROM new_events ne) e
        JOIN dispatcher.subscriptions s
          ON s.active
         AND s.environment_id = e.environment_id
         AND s.events && dispatcher.event_keys(e.event_name)
    ) m;
    IF subs IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM pg_advisory_xact_lock(l.lock)
    FROM (
        SELECT DISTINCT dispatcher.order_lock(u.s, u.k, 0) AS lock
        FROM unnest(subs, keys) AS u(s, k)
        WHERE u.k IS NOT NULL
        ORDER BY 1
    ) l;

    WITH m AS (
        SELECT u.*
        FROM unnest(subs, event_ids, event_times, envs, keys) WITH ORDINALITY
             AS u(subscription_id, event_id, event_created_at, environment_id, order_key, n)
    ), r AS (
        SELECT m.*,
               row_number() OVER (PARTITION BY m.subscription_id, m.order_key ORDER BY m.n)
                   AS rank,
               m.order_key IS NOT NULL AND EXISTS (
                   SELECT 1 FROM dispatcher.deliveries d
                   WHERE d.subscription_id = m.subscription_id AND d.order_key = m.order_key
               ) AS behind
        FROM m
    ), inserted AS (
        INSERT INTO dispatcher.deliveries
            (subscription_id, event_id, event_created_at, environment_id, due_at,
             order_key, order_seq, waiting)
        SELECT subscription_id, event_id, event_created_at, environment_id, now(), order_key,
               -- Volatile, so evaluated after the sort: the sequence follows the order.
               CASE WHEN order_key IS NOT NULL THEN nextval('dispatcher.order_seq') END,
               order_key IS NOT NULL AND (rank > 1 OR behind)
        FROM r
        ORDER BY n
    )
    INSERT INTO dispatcher.order_checks (subscription_id, order_key)
    SELECT subscription_id, order_key FROM r WHERE rank = 1 AND behind;
    PERFORM pg_notify('dispatcher_work', '');
    RETURN NULL;
END $$;

-- Resending ----------------------------------------------------------------------------
-- As before, and a resent delivery of an ordered subscription goes to the back of its key
-- (under the subscription's ordering now): a new order_seq, waiting if the key has a live
-- delivery, with the publishers' lock and commit-time check.
CREATE OR REPLACE FUNCTION dispatcher.resend(ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
    woken integer;
BEGIN
    PERFORM pg_advisory_xact_lock(l.lock)
    FROM (
        SELECT DISTINCT dispatcher.order_lock(d.subscription_id, k.order_key, 0) AS lock
        FROM dispatcher.deliveries_done d
        JOIN dispatcher.subscriptions s ON s.id = d.subscription_id AND s.ordering IS NOT NULL
        LEFT JOIN dispatcher.events e
          ON s.ordering = 'entity' AND e.id = d.event_id AND e.created_at = d.event_created_at
        CROSS JOIN LATERAL (
            SELECT CASE s.ordering WHEN 'entity' THEN e.entity_instance_id ELSE '' END
                AS order_key
        ) k
        WHERE d.id = ANY(ids) AND k.order_key IS NOT NULL
        ORDER BY 1
    ) l;

    WITH back AS (
        DELETE FROM dispatcher.deliveries_done d
        WHERE d.id = ANY(ids)
          AND EXISTS (SELECT 1 FROM dispatcher.subscriptions s WHERE s.id = d.subscription_id)
        RETURNING d.*
    ), b AS (
        SELECT b.*, NOT s.active AS paused,
               CASE s.ordering WHEN 'entity' THEN e.entity_instance_id
                               WHEN 'subscription' THEN '' END AS order_key
        FROM back b
        JOIN dispatcher.subscriptions s ON s.id = b.subscription_id
        LEFT JOIN dispatcher.events e
          ON s.ordering = 'entity' AND e.id = b.event_id AND e.created_at = b.event_created_at
    ), r AS (
        SELECT b.*,
               row_number() OVER (PARTITION BY b.subscription_id, b.order_key ORDER BY b.id)
                   AS rank,
               b.order_key IS NOT NULL AND EXISTS (
                   SELECT 1 FROM dispatcher.deliveries d
                   WHERE d.subscription_id = b.subscription_id AND d.order_key = b.order_key
               ) AS behind
        FROM b
    ), inserted AS (
        INSERT INTO dispatcher.deliveries
            (id, subscription_id, event_id, event_created_at, environment_id, attempts, due_at,
             paused, created_at, last_status, last_error, order_key, order_seq, waiting)
        OVERRIDING SYSTEM VALUE
        SELECT id, subscription_id, event_id, event_created_at, environment_id, attempts,
               now(), paused, created_at, last_status, last_error, order_key,
               CASE WHEN order_key IS NOT NULL THEN nextval('dispatcher.order_seq') END,
               order_key IS NOT NULL AND (rank > 1 OR behind)
        FROM r
        ORDER BY id
        RETURNING 1
    ), checks AS (
        INSERT INTO dispatcher.order_checks (subscription_id, order_key)
        SELECT subscription_id, order_key FROM r WHERE rank = 1 AND behind
    )
    SELECT count(*) INTO moved FROM inserted;
    -- A live delivery waiting for its next retry is simply made due now (a waiting one
    -- keeps its place: it is claimable only once released).
    UPDATE dispatcher.deliveries SET due_at = now()
    WHERE id = ANY(ids) AND lease_owner IS NULL AND due_at > now();
    GET DIAGNOSTICS woken = ROW_COUNT;
    IF moved + woken > 0 THEN
        PERFORM pg_notify('dispatcher_work', '');
    END IF;
    RETURN moved + woken;
END $$;
