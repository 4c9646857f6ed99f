-- The claim's read of due rows, planned the same whatever the queue's statistics (issue 17).
--
-- The queue swings from empty to tens of thousands of rows within a second, and its
-- statistics are those of whatever it held at its last VACUUM or ANALYZE. Vacuumed empty
-- (between bursts, autovacuum does), PostgreSQL 18 took the claim's first read of a burst
-- for a read of a few rows: it fetched every due row through a bitmap and sorted them all
-- for the earliest 128 (20,000 rows queued: 850 buffers and 4 ms, against 8 buffers read
-- in order from the due index), until the next ANALYZE (upkeep asks for one within a
-- second of new work, but a burst's first claims come before it).
--
-- Read in the due index's order there is one right plan: the earliest due rows, as many as
-- asked for, skipping those leased (in flight, still due), paused, waiting behind their
-- ordering key or of subscriptions with no room ($3). A SQL function with its own planner
-- settings keeps it: with table, bitmap scans and sorts off, the ordered index scan is the
-- only plan left, so the statistics choose nothing. (For the worker's connections as a
-- whole the same settings made every statement that needs a table scan plan arbitrarily on
-- PostgreSQL 15; here they apply to this one query.) The function's ROWS gives the rest of
-- the claim an estimate of its own, so its joins do not follow the queue's statistics
-- either. STABLE: it reads with the claim's snapshot.
CREATE FUNCTION dispatcher.due_deliveries(now_s float8, wanted integer, skipped uuid[])
RETURNS TABLE (id bigint, subscription_id uuid, due_at timestamptz, event_id uuid,
               event_created_at timestamptz)
LANGUAGE sql STABLE ROWS 128
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
AS $$
    SELECT d.id, d.subscription_id, d.due_at, d.event_id, d.event_created_at
    FROM dispatcher.deliveries d
    WHERE d.due_at <= to_timestamp(now_s) AND NOT d.paused AND NOT d.waiting
      AND (d.leased_until IS NULL OR d.leased_until <= to_timestamp(now_s))
      AND d.subscription_id <> ALL(skipped)
    ORDER BY d.due_at
    LIMIT wanted
$$;
