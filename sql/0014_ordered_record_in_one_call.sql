-- Ordered outcomes in one round trip (issue 17). A batch that ended heads of ordering keys
-- took four: BEGIN, the keys' release locks, the statement that records the batch and
-- releases each ended key's next delivery, COMMIT. While the daemon is busy sending, each
-- answer waits its turn in the event loop behind the requests just started (1-2 ms each),
-- and PostgreSQL waits with it. Called alone this function is its own transaction.
--
-- The lock must be held before the statement's snapshot is taken (see
-- dispatcher.check_order: a publisher that checked before sees its row released by this
-- statement, one that checks after waits for its commit). A volatile PL/pgSQL function
-- takes a new snapshot for each statement it runs, so the lock is taken first, then the
-- statement runs with a snapshot taken once it is held, as the two statements did.
--
-- Parameters 1-11 are queries.RECORD's (the batch's outcomes and the recording instance);
-- 12-14 the lease of the released rows (queries.CLAIM's now, lease seconds and owner; a
-- NULL owner releases them due for any instance); 15-16 the keys whose heads end here.
-- The rows answer as queries.CLAIM's do, `leased` false for those not in the lease.
CREATE FUNCTION dispatcher.record_ending_heads(
    delivery_ids bigint[], subscription_ids uuid[], attempt_numbers integer[],
    started double precision[], durations_ms double precision[], statuses integer[],
    errors text[], excerpts text[], outcomes text[], next_ats double precision[],
    recorder uuid, lease_from double precision, lease_seconds double precision,
    lease_to uuid, head_subscriptions uuid[], head_keys text[]
)
RETURNS TABLE (
    id bigint, subscription_id uuid, attempts integer, event_id uuid, environment_id text,
    event_name text, entity_instance_id text, created_at timestamptz, payload text,
    updated_at timestamptz, due_at double precision, order_key text, payload_bytes integer,
    leased boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock_shared(l.lock) FROM (
        SELECT DISTINCT dispatcher.order_lock(k.sub, k.key, 1) AS lock
        FROM unnest(head_subscriptions, head_keys) AS k(sub, key)
        ORDER BY 1
    ) l;
    RETURN QUERY
    WITH o AS (
        SELECT u.delivery_id, u.subscription_id, u.attempt,
               to_timestamp(u.started) AS started_at, u.duration_ms, u.status_code, u.error,
               u.excerpt, u.outcome, to_timestamp(u.next) AS next_at
        FROM unnest(
            delivery_ids, subscription_ids, attempt_numbers, started, durations_ms, statuses,
            errors, excerpts, outcomes, next_ats
        ) AS u(delivery_id, subscription_id, attempt, started, duration_ms,
               status_code, error, excerpt, outcome, next)
    ), recorded AS (
        INSERT INTO dispatcher.attempts (delivery_id, subscription_id, attempt, started_at,
                                         duration_ms, status_code, error, response_excerpt,
                                         outcome)
        SELECT o.delivery_id, o.subscription_id, o.attempt, o.started_at, o.duration_ms,
               o.status_code, o.error, o.excerpt, o.outcome
        FROM o
    ), finished AS (
        DELETE FROM dispatcher.deliveries d USING o
        WHERE d.id = o.delivery_id AND o.outcome <> 'retry' AND d.lease_owner = recorder
        RETURNING d.id, d.subscription_id, d.event_id, d.event_created_at, d.environment_id,
                  o.attempt, o.outcome, d.created_at, o.started_at, o.status_code, o.error
    ), moved AS (
        INSERT INTO dispatcher.deliveries_done
            (id, subscription_id, event_id, event_created_at, environment_id, attempts,
             status, created_at, finished_at, last_status, last_error)
        SELECT f.id, f.subscription_id, f.event_id, f.event_created_at, f.environment_id,
               f.attempt, f.outcome, f.created_at, now(), f.status_code, f.error
        FROM finished f
    ), rescheduled AS (
        UPDATE dispatcher.deliveries d
        SET due_at = o.next_at, attempts = o.attempt, lease_owner = NULL, leased_until = NULL,
            last_attempt_at = o.started_at, last_status = o.status_code, last_error = o.error
        FROM o
        WHERE d.id = o.delivery_id AND o.outcome = 'retry' AND d.lease_owner = recorder
        RETURNING d.id
    ), ended AS (
        -- The statement's snapshot still shows the rows `finished` deletes: their places.
        SELECT array_agg(h.subscription_id) AS subs, array_agg(h.order_key) AS keys,
               array_agg(h.order_seq) AS seqs
        FROM finished f JOIN dispatcher.deliveries h ON h.id = f.id
        WHERE h.order_key IS NOT NULL
    )
    UPDATE dispatcher.deliveries d
    SET waiting = false,
        lease_owner = CASE WHEN d.paused THEN NULL ELSE lease_to END,
        leased_until = CASE WHEN d.paused OR lease_to IS NULL THEN NULL
                            ELSE to_timestamp(lease_from + lease_seconds) END
    FROM ended
         CROSS JOIN LATERAL dispatcher.next_waiting(ended.subs, ended.keys, ended.seqs)
             AS nxt(id),
         dispatcher.events e, dispatcher.subscriptions s
    WHERE d.id = nxt.id AND d.waiting
      AND e.id = d.event_id AND e.created_at = d.event_created_at
      AND s.id = d.subscription_id
    RETURNING d.id, d.subscription_id, d.attempts, d.event_id, d.environment_id,
              e.event_name, e.entity_instance_id, e.created_at, e.payload::text,
              s.updated_at, lease_from, d.order_key,
              coalesce(e.payload_bytes, pg_column_size(e.payload)),
              d.lease_owner IS NOT NULL;
END $$;
