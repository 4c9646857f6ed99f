-- One index of the queue by subscription instead of two: the ordering index (sql/0010)
-- leads with subscription_id, so it serves what deliveries_subscription_idx served (the
-- foreign key's cascade, pausing a subscription's queue, listing it) once it covers every
-- row. An ordered delivery then maintains one index fewer at each of its writes (fan-out,
-- claim, release, retry: each is a non-HOT update); an unordered row's entry is the same
-- uuid with two nulls.
DROP INDEX dispatcher.deliveries_order_idx;
DROP INDEX dispatcher.deliveries_subscription_idx;
CREATE INDEX deliveries_subscription_idx
    ON dispatcher.deliveries (subscription_id, order_key, order_seq);

-- Release starts after the finished head: a key's range in that index holds an entry for
-- every version of every row it ever had (each claim and release is a non-HOT update),
-- dead until vacuum, and a scan from the range's start read them all: 38 buffers a key
-- in a burn-down of 1,000 keys, 9 ms a batch of 256. From the head's order_seq it reads
-- the next row's one entry. after_seqs NULL (the publishers' commit-time check, which has
-- no head) scans from the start as before. Still idempotent: whatever is live after the
-- head and not waiting is a head already.
CREATE FUNCTION dispatcher.next_waiting(
    subscription_ids uuid[], order_keys text[], after_seqs bigint[]
)
RETURNS SETOF bigint LANGUAGE sql STABLE AS $$
    SELECT nxt.id
    FROM (
        SELECT k.subscription_id, k.order_key, coalesce(max(k.after_seq), 0) AS after_seq
        FROM unnest(subscription_ids, order_keys, after_seqs)
             AS k(subscription_id, order_key, after_seq)
        GROUP BY 1, 2
    ) k
    CROSS JOIN LATERAL (
        SELECT n.id, n.waiting FROM dispatcher.deliveries n
        WHERE n.subscription_id = k.subscription_id AND n.order_key = k.order_key
          AND n.order_seq > k.after_seq
        ORDER BY n.order_seq
        LIMIT 1
    ) nxt
    WHERE nxt.waiting
$$;

-- The publishers' commit-time check releases for any instance to claim (the daemon's
-- recorder releases into its own lease instead: queries.RELEASE_NEXT).
CREATE OR REPLACE FUNCTION dispatcher.release_next(subscription_ids uuid[], order_keys text[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    released integer;
BEGIN
    UPDATE dispatcher.deliveries d SET waiting = false
    FROM dispatcher.next_waiting(subscription_ids, order_keys, NULL) AS nxt(id)
    WHERE d.id = nxt.id AND d.waiting;
    GET DIAGNOSTICS released = ROW_COUNT;
    IF released > 0 THEN
        PERFORM pg_notify('dispatcher_work', '');
    END IF;
    RETURN released;
END $$;
