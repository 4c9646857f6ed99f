-- The ended heads' places from their DELETE, not from a join back to the queue (issue 17).
--
-- dispatcher.record_ending_heads (sql/0014) found the places (key, order_seq) of the heads
-- it ended by joining the rows its DELETE returned back to the queue, which the statement's
-- snapshot still shows. The planner sized that join from the queue's statistics: taken
-- while few rows had an ordering key (upkeep analyzes a queue that fills, as the bench's
-- unordered run did just before its ordered one), with the DELETE's rows estimated at
-- one, PostgreSQL 18 read the whole ordering index for each ended head, its `order_key IS
-- NOT NULL` taken for a handful of rows: 100-400 ms a record call of 96 over 50,000
-- queued, and the ordered burn-down at 1.1k deliveries/s instead of 13k. The DELETE
-- returns the places itself.
CREATE OR REPLACE FUNCTION dispatcher.record_ending_heads(
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
                  o.attempt, o.outcome, d.created_at, o.started_at, o.status_code, o.error,
                  d.order_key, d.order_seq
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
        SELECT array_agg(f.subscription_id) AS subs, array_agg(f.order_key) AS keys,
               array_agg(f.order_seq) AS seqs
        FROM finished f
        WHERE f.order_key IS NOT NULL
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
