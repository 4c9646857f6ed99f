-- Retention: history older than `keep_days` leaves by dropping whole daily partitions,
-- so the database does not bloat and vacuum has nothing to chase.
--
--   SELECT dispatcher.drop_partitions(14);   -- returns how many partitions were dropped
--
-- The daily partitions are the <table>_YYYYMMDD tables dispatcher.ensure_partitions creates
-- for events, deliveries_done and attempts. A partition goes only when its upper bound is
-- at or before now() - keep_days. Rows that landed in a *_default partition (days published
-- before their partition existed) are deleted by the same rule.
--
-- Events are never removed while a live delivery may still need them: nothing at or after
-- min(event_created_at) of dispatcher.deliveries is touched in events. A subscription that
-- stays paused therefore holds its events back; `dispatcher status` shows paused deliveries.
-- Attempts and finished deliveries follow keep_days alone.
--
-- The only way an old event gets a new live delivery is a resend, which moves a row from
-- deliveries_done back into deliveries (dispatcher.resend). So finished deliveries go first:
-- their delete and drops wait for a resend in progress to commit and make later ones find
-- nothing, and only then is min(event_created_at) read and events cleaned up. A finished
-- delivery lives in the same day's partition as its event (both keyed by the publish time).
--
-- Dropping a partition takes an ACCESS EXCLUSIVE lock on its parent until the transaction
-- ends: call this in a transaction of its own. The locks are taken only when a partition is
-- old enough to go, all at once and without waiting; when a table is busy, its partitions
-- stay until the next run instead of queueing publishers or risking a deadlock.

CREATE FUNCTION dispatcher.drop_partitions(keep_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz;
    live_floor timestamptz;
    parent text;
    part record;
    upper_bound timestamptz;
    dropped integer := 0;
BEGIN
    IF keep_days IS NULL OR keep_days < 1 THEN
        RAISE EXCEPTION 'keep_days must be at least 1, not %', keep_days;
    END IF;
    cutoff := now() - make_interval(days => keep_days);
    -- The row deletes below wait for ordinary row locks only; bound that wait.
    IF current_setting('lock_timeout') IN ('0', '0ms', '0s') THEN
        PERFORM set_config('lock_timeout', '5s', true);
    END IF;

    -- Rows in the default partitions: row deletes, no table lock beyond the ordinary.
    DELETE FROM dispatcher.deliveries_done_default WHERE created_at < cutoff;
    DELETE FROM dispatcher.attempts_default WHERE started_at < cutoff;
    -- Read after the finished deliveries' delete (see the top of this file).
    SELECT min(event_created_at) INTO live_floor FROM dispatcher.deliveries;
    DELETE FROM dispatcher.events_default
    WHERE created_at < cutoff AND (live_floor IS NULL OR created_at < live_floor);
    -- An idempotency key outlives its event by no more than the retention: a repeat after
    -- keep_days publishes again.
    DELETE FROM dispatcher.idempotency_keys WHERE created_at < cutoff;

    -- Nothing old enough to drop (most runs): take no table lock at all.
    IF NOT EXISTS (
        SELECT 1
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = 'dispatcher'
          AND p.relname IN ('deliveries_done', 'attempts', 'events')
          AND c.relname ~ '_[0-9]{8}$'
          AND substring(pg_get_expr(c.relpartbound, c.oid)
                        FROM $re$TO \('([^']+)'\)$re$)::timestamptz <= cutoff
    ) THEN
        RETURN 0;
    END IF;

    -- DROP of a partition locks its parent ACCESS EXCLUSIVE until the transaction ends.
    -- Take all three at once, without waiting (NOWAIT): a publisher holds events and then
    -- reads deliveries_done, so waiting here could deadlock with it, and the deadlock
    -- detector might pick the publisher. When any is busy, the next run tries again.
    BEGIN
        LOCK TABLE dispatcher.deliveries_done, dispatcher.attempts, dispatcher.events
            IN ACCESS EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RAISE NOTICE 'keeping old partitions for now: the tables are busy';
        RETURN 0;
    END;

    -- The order matters: deliveries_done before events.
    FOREACH parent IN ARRAY ARRAY['deliveries_done', 'attempts', 'events'] LOOP
        IF parent = 'events' THEN
            SELECT min(event_created_at) INTO live_floor FROM dispatcher.deliveries;
        ELSE
            live_floor := NULL;
        END IF;
        FOR part IN
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
            FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = format('dispatcher.%I', parent)::regclass
              AND c.relname ~ ('^' || parent || '_[0-9]{8}$')
            ORDER BY c.relname
        LOOP
            -- The bound as Postgres stored it, not as the name suggests: a partition made
            -- under another TimeZone ends at another instant.
            upper_bound := substring(part.bound FROM $re$TO \('([^']+)'\)$re$)::timestamptz;
            CONTINUE WHEN upper_bound IS NULL OR upper_bound > cutoff;
            IF live_floor IS NOT NULL AND upper_bound > live_floor THEN
                RAISE NOTICE 'keeping %: live deliveries reference events from %',
                    part.relname, live_floor;
                CONTINUE;
            END IF;
            EXECUTE format('DROP TABLE dispatcher.%I', part.relname);
            dropped := dropped + 1;
        END LOOP;
    END LOOP;
    RETURN dropped;
END $$;
