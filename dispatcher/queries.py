"""The daemon's hot-path SQL as named statements; each is set-based: one round trip a batch."""

# Claim up to $2 due deliveries for lease owner $5: read the $2 earliest due, take of them
# at most a per-subscription share ($6/$7 give the room left for subscriptions this instance
# already sends to, others (idle here: a slow start) at most $8, or their lower
# "max_in_flight" setting; subscriptions with no room are skipped: $4), and lock only those,
# skipping rows other instances hold: a row lock writes the row and a WAL record, and with
# one busy endpoint a claim that locked all it read took 64 of 500. `locked` carries what
# the rest needs (joined back to `shared`, the planner compared every pair of rows: 1.6 ms
# of a 5.5 ms claim of 128, 34 of 48 ms at 500). Of the locked, the earliest whose payloads
# fit in $9 bytes (the first always: a payload larger than the whole budget goes out alone);
# sizes are measured at publish (sql/0012). `scanned`, `shared` and `taken` (on every row)
# count the rows read, those within the shares and those locked within the bytes: when the
# first reaches $2, or a later one falls short of the one before, more may be due. The lease
# ends $3 seconds ahead, in leased_until: a row whose owner died is claimable again then,
# with no sweeper. No index has that column, so the claim's update is heap-only (sql/0013);
# the scan reads past the rows in flight, which are still due. $1 is the daemon's clock
# (unix seconds), the clock that set the retry times, plus a short look-ahead: rows due
# within it come back with their due time and are started at it, not a claim's round trip
# after it. A delivery waiting behind the head of its ordering key is not claimable
# (sql/0010: the index leaves it out); `order_key` tells the recorder which claimed rows are
# heads. The due rows are read by dispatcher.due_deliveries (sql/0017), whose plan is the
# due index in order whatever the queue's statistics say, which are always stale: planned
# from them, a claim read and sorted every due row after the queue was vacuumed empty, or
# analyzed while most rows were leased. The update finds its rows by `id = ANY(...)` alone,
# one pass over the primary key whatever the estimate of the rows taken, and the answer
# joins what it returns to `taken`: joined in the update itself, PostgreSQL 15 with fresh
# statistics probed the key for every taken id once per taken row (128 rows: 18k buffers,
# 4 of the claim's 6.5 ms).
CLAIM = """
WITH due AS (
    SELECT * FROM dispatcher.due_deliveries($1::float8, $2::int, $4::uuid[])
), shared AS (
    SELECT c.id, s.updated_at FROM (
        SELECT due.*,
               row_number() OVER (PARTITION BY subscription_id ORDER BY due_at) AS rank
        FROM due
    ) c
    JOIN dispatcher.subscriptions s ON s.id = c.subscription_id
    LEFT JOIN unnest($6::uuid[], $7::int[]) AS room(subscription_id, free)
      ON room.subscription_id = c.subscription_id
    WHERE c.rank <= coalesce(room.free, least((s.settings->>'max_in_flight')::int, $8::int))
), locked AS (
    SELECT d.id, d.due_at, d.event_id, d.event_created_at, sh.updated_at
    FROM dispatcher.deliveries d JOIN shared sh USING (id)
    WHERE d.due_at <= to_timestamp($1::float8) AND NOT d.paused AND NOT d.waiting
      AND coalesce(d.leased_until, '-infinity') <= to_timestamp($1::float8)
    FOR UPDATE OF d SKIP LOCKED
), sized AS (
    SELECT l.id, l.due_at, l.updated_at, e.event_name, e.entity_instance_id,
           e.created_at, e.payload, b.bytes,
           sum(b.bytes) OVER (ORDER BY l.due_at, l.id) AS running
    FROM locked l
    JOIN dispatcher.events e ON e.id = l.event_id AND e.created_at = l.event_created_at
    CROSS JOIN LATERAL (
        SELECT coalesce(e.payload_bytes, pg_column_size(e.payload)) AS bytes
    ) b
), taken AS (
    SELECT * FROM sized WHERE running - bytes < $9::bigint
), leased AS (
    UPDATE dispatcher.deliveries d
    SET leased_until = to_timestamp($1::float8 + $3::float8), lease_owner = $5
    WHERE d.id = ANY(ARRAY(SELECT id FROM taken))
    RETURNING d.id, d.subscription_id, d.attempts, d.event_id, d.environment_id, d.order_key
)
SELECT l.id, l.subscription_id, l.attempts, l.event_id, l.environment_id,
       t.event_name, t.entity_instance_id, t.created_at, t.payload::text AS payload,
       t.updated_at, extract(epoch FROM t.due_at)::float8 AS due_at,
       l.order_key, t.bytes AS payload_bytes,
       (SELECT count(*) FROM due) AS scanned, (SELECT count(*) FROM shared) AS shared,
       (SELECT count(*) FROM taken) AS taken
FROM leased l JOIN taken t USING (id)
"""

# What the daemon caches of a subscription, by (id, updated_at): read when a claim returns
# a version it has not seen (sql/0006 moves updated_at on every change).
SUBSCRIPTIONS = """
SELECT id, updated_at, url, secret, profile, settings::text AS settings, auth::text AS auth,
       email IS NOT NULL AS mails, previous_secret,
       extract(epoch FROM previous_secret_expires_at)::float8 AS previous_until,
       signing_key, previous_signing_key,
       extract(epoch FROM previous_signing_key_expires_at)::float8 AS previous_key_until
FROM dispatcher.subscriptions
WHERE id = ANY($1::uuid[])
"""

# A standard_v1a subscription made in SQL comes without a key pair: the daemon gives it one
# when it first sends to it ($2: new whsk_ keys). Answers what SUBSCRIPTIONS does.
GIVE_SIGNING_KEYS = """
UPDATE dispatcher.subscriptions s SET signing_key = k.key
FROM unnest($1::uuid[], $2::text[]) AS k(id, key)
WHERE s.id = k.id AND s.signing_key IS NULL
RETURNING s.id, s.updated_at, s.url, s.secret, s.profile, s.settings::text AS settings,
          s.auth::text AS auth, s.email IS NOT NULL AS mails, s.previous_secret,
          extract(epoch FROM s.previous_secret_expires_at)::float8 AS previous_until,
          s.signing_key, s.previous_signing_key,
          extract(epoch FROM s.previous_signing_key_expires_at)::float8 AS previous_key_until
"""

# Hand claimed rows back unsent (shutdown, or more than an endpoint may take at once), each
# due at $3 (unix seconds on the daemon's clock: now, or a retry's own time).
RELEASE = """
UPDATE dispatcher.deliveries d
SET due_at = to_timestamp(r.due), lease_owner = NULL, leased_until = NULL
FROM unnest($1::bigint[], $3::float8[]) AS r(id, due)
WHERE d.id = r.id AND d.lease_owner = $2
"""

# Record a batch of outcomes in one statement: append the attempts, move finished
# deliveries to deliveries_done, push retried ones to their next due time. A row whose
# lease another instance has taken since is left alone (its attempt is still recorded).
# dispatcher.record_ending_heads (sql/0016) does the same for ordered batches: change both.
_OUTCOMES = """
WITH o AS (
    SELECT delivery_id, subscription_id, attempt, to_timestamp(started) AS started_at,
           duration_ms, status_code, error, excerpt, outcome, to_timestamp(next) AS next_at
    FROM unnest(
        $1::bigint[], $2::uuid[], $3::int[], $4::float8[], $5::float8[],
        $6::int[], $7::text[], $8::text[], $9::text[], $10::float8[]
    ) AS u(delivery_id, subscription_id, attempt, started, duration_ms,
           status_code, error, excerpt, outcome, next)
), attempts AS (
    INSERT INTO dispatcher.attempts (delivery_id, subscription_id, attempt, started_at,
                                     duration_ms, status_code, error, response_excerpt, outcome)
    SELECT delivery_id, subscription_id, attempt, started_at, duration_ms,
           status_code, error, excerpt, outcome
    FROM o
), finished AS (
    DELETE FROM dispatcher.deliveries d USING o
    WHERE d.id = o.delivery_id AND o.outcome <> 'retry' AND d.lease_owner = $11
    RETURNING d.id, d.subscription_id, d.event_id, d.event_created_at, d.environment_id,
              o.attempt, o.outcome, d.created_at, o.started_at, o.status_code, o.error
), moved AS (
    INSERT INTO dispatcher.deliveries_done
        (id, subscription_id, event_id, event_created_at, environment_id, attempts, status,
         created_at, finished_at, last_status, last_error)
    SELECT id, subscription_id, event_id, event_created_at, environment_id, attempt, outcome,
           created_at, now(), status_code, error
    FROM finished
), rescheduled AS (
    UPDATE dispatcher.deliveries d
    SET due_at = o.next_at, attempts = o.attempt, lease_owner = NULL, leased_until = NULL,
        last_attempt_at = o.started_at, last_status = o.status_code, last_error = o.error
    FROM o
    WHERE d.id = o.delivery_id AND o.outcome = 'retry' AND d.lease_owner = $11
    RETURNING d.id
)"""

RECORD = (
    _OUTCOMES
    + """
SELECT (SELECT count(*) FROM finished) AS finished,
       (SELECT count(*) FROM rescheduled) AS rescheduled
"""
)

# Ordered deliveries (sql/0010, sql/0014, sql/0016): a batch that ends heads of ordering
# keys ($15, $16) records and releases the next one of each key whose head it ended (the
# first after the head's place, if waiting) in one call, holding the keys' release locks
# (shared, in lock order) from before the statement's snapshot to the commit, so that a
# publisher's commit-time check waits for it instead of missing it (see
# dispatcher.check_order). The released rows go straight into this instance's lease ($14, to
# $12 + $13 like CLAIM's) and answer as CLAIM answers: a release and a later claim would be
# two updates of the row (the release not heap-only: `waiting` is in the claim index's
# predicate), this is one. Only heads this call deleted release: one whose lease another
# instance took is still live, and ends there. `leased` is false for a paused subscription's
# row (released for whoever claims it once it is active again) and for every row when $14 is
# NULL (a stopping instance: released due as they were, for others). Unordered batches never
# run it.
RECORD_ENDING_HEADS = """
SELECT * FROM dispatcher.record_ending_heads(
    $1::bigint[], $2::uuid[], $3::int[], $4::float8[], $5::float8[], $6::int[], $7::text[],
    $8::text[], $9::text[], $10::float8[], $11::uuid, $12::float8, $13::float8, $14::uuid,
    $15::uuid[], $16::text[]
)
"""

NOTIFY_WORK = "SELECT pg_notify('dispatcher_work', '')"

# Failure mails for a batch of outcomes (see sql/0004_profiles.sql).
QUEUE_EMAILS = """
SELECT dispatcher.queue_emails($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::int[],
                               $6::text[], $7::text[])
"""

# What a receiver's answer does to its subscription (the store's rules). Deactivation
# pauses the subscription's queued deliveries (trigger subscriptions_pause); deletion drops
# them (foreign key), while the history of finished ones stays.
DEACTIVATE = """
UPDATE dispatcher.subscriptions s
SET active = false, deactivated_reason = a.reason, updated_at = now()
FROM unnest($1::uuid[], $2::text[]) AS a(subscription_id, reason)
WHERE s.id = a.subscription_id AND s.active
"""

DELETE_SUBSCRIPTIONS = "DELETE FROM dispatcher.subscriptions WHERE id = ANY($1::uuid[])"

# Retry-After answers (rare, so not in RECORD): which attempts it set the next one of, and
# which endpoints a 429 paused until when (sql/0007).
NOTE_RETRY_AFTER = """
UPDATE dispatcher.attempts a SET retry_after = n.seconds
FROM unnest($1::bigint[], $2::int[], $3::float8[]) AS n(delivery_id, attempt, seconds)
WHERE a.delivery_id = n.delivery_id AND a.attempt = n.attempt
"""

PAUSE_ENDPOINTS = """
INSERT INTO dispatcher.endpoint_pauses AS p (subscription_id, until)
SELECT subscription_id, to_timestamp(max(until))
FROM unnest($1::uuid[], $2::float8[]) AS n(subscription_id, until)
WHERE EXISTS (SELECT 1 FROM dispatcher.subscriptions s WHERE s.id = n.subscription_id)
GROUP BY subscription_id
ON CONFLICT (subscription_id) DO UPDATE SET until = greatest(p.until, excluded.until)
"""

# Pauses still running at $1 (the clock); the ended ones are dropped on the way.
PAUSES = """
WITH ended AS (
    DELETE FROM dispatcher.endpoint_pauses
    WHERE until <= to_timestamp($1::float8) - interval '1 hour'
)
SELECT subscription_id, extract(epoch FROM until)::float8 AS until
FROM dispatcher.endpoint_pauses
WHERE until > to_timestamp($1::float8)
"""

# Deactivate subscriptions whose failure share over their window stays at or above their
# threshold ($1..$4: one entry per subscription with such a limit that failed lately).
# Attempts the egress proxy failed (error 'proxy: ...') are not the receiver's and not counted.
# Test deliveries (POST /v1/subscriptions/{id}/test, sql/0009) do not count.
ERROR_RATE_DEACTIVATE = """
UPDATE dispatcher.subscriptions s
SET active = false, updated_at = now(),
    deactivated_reason = format('error rate %s%% over %s attempts in %s s',
                                round(r.rate * 100), r.attempts, t.window_s)
FROM unnest($1::uuid[], $2::float8[], $3::int[], $4::float8[])
     AS t(subscription_id, threshold, min_attempts, window_s)
CROSS JOIN LATERAL (
    SELECT count(*) AS attempts,
           avg((a.outcome <> 'delivered')::int) AS rate
    FROM dispatcher.attempts a
    WHERE a.subscription_id = t.subscription_id
      AND a.started_at >= now() - make_interval(secs => t.window_s)
      AND (a.error IS NULL OR a.error NOT LIKE 'proxy%')
      AND NOT EXISTS (SELECT 1 FROM dispatcher.test_deliveries x
                      WHERE x.delivery_id = a.delivery_id)
) r
WHERE s.id = t.subscription_id AND s.active
  AND r.attempts >= t.min_attempts AND r.rate >= t.threshold
RETURNING s.id, s.deactivated_reason
"""

# The earliest time work that is not paused or waiting becomes claimable (its due time, or
# its lease's end: sql/0013), what the timer should wake for, read from the head of the
# claim's index. Rows past the first 1,024 are due no sooner than the last of those: when
# the head is that long, its last due time bounds the answer (all in flight: a wake that
# finds nothing to claim).
NEXT_DUE = """
SELECT CASE WHEN count(*) < 1024 THEN min(greatest(due_at, leased_until))
            ELSE least(min(greatest(due_at, leased_until)), max(due_at)) END
FROM (
    SELECT due_at, leased_until FROM dispatcher.deliveries
    WHERE NOT paused AND NOT waiting
    ORDER BY due_at
    LIMIT 1024
) head
"""

# Gauges for /metrics: live deliveries (not paused), how long the oldest due one has
# waited, and subscriptions by state. Leased rows count only once their lease has ended
# (from its end, sql/0013); deliveries waiting behind their key's head count in the
# depth, not in the age (they are not due until released).
QUEUE_STATS = """
SELECT count(*) AS depth,
       coalesce(extract(epoch FROM now() - min(greatest(due_at, leased_until))
                FILTER (WHERE greatest(due_at, leased_until) <= now() AND NOT waiting)), 0)
           AS oldest_due_age,
       (SELECT count(*) FROM dispatcher.subscriptions WHERE active) AS active_subscriptions,
       (SELECT count(*) FROM dispatcher.subscriptions WHERE NOT active)
           AS inactive_subscriptions
FROM dispatcher.deliveries
WHERE NOT paused
"""

ANALYZE_QUEUE = "ANALYZE dispatcher.deliveries"

# What the planner believes of the queue (rows, from the last VACUUM or ANALYZE; -1: never),
# whether this role may ANALYZE it, and the queue counted up to $1 rows (see
# upkeep.STALE_FACTOR).
QUEUE_BELIEF = """
SELECT c.reltuples::float8 AS planned_rows, pg_has_role(c.relowner, 'USAGE') AS may_analyze
FROM pg_class c WHERE c.oid = 'dispatcher.deliveries'::regclass
"""
QUEUE_COUNT_UP_TO = """
SELECT count(*) FROM (SELECT 1 FROM dispatcher.deliveries WHERE NOT paused LIMIT $1::bigint) q
"""

# Client certificates of active subscriptions (settings.tls.client_cert), for their expiry.
CLIENT_CERTIFICATES = """
SELECT settings->'tls'->>'client_cert' AS pem FROM dispatcher.subscriptions
WHERE active AND settings->'tls' ? 'client_cert'
"""

PARTITIONS = "SELECT dispatcher.ensure_partitions(current_date, 3)"
DROP_PARTITIONS = "SELECT dispatcher.drop_partitions($1)"

# Operational events (sql/0008; payloads in models.OPERATIONAL_EVENTS). Published with
# dispatcher.publish_internal(), the one way past the reserved entity, in the recorder's
# transaction. A subscription deleted meanwhile publishes nothing.

# endpoint_disabled for subscriptions about to be deleted by the receiver's answer (the
# store's unsubscribe phrase); run before DELETE_SUBSCRIPTIONS.
PUBLISH_DELETED = """
SELECT dispatcher.publish_internal(
    array_agg(s.environment_id),
    array_agg('dispatcher.endpoint_disabled.v1'::text),
    array_agg(jsonb_build_object('subscription_id', s.id, 'url', s.url,
                                 'reason', 'deleted: the receiver asked to unsubscribe')))
FROM dispatcher.subscriptions s WHERE s.id = ANY($1::uuid[]) AND s.active
"""

# RECORD ($1-$11), and in the same statement what the batch's failures publish: one round
# trip and one commit where a transaction of three statements took five, so a flush with a
# failure in it (most of them, when some endpoint is down) costs little more than one
# without (issue 17). With empty outcomes, the second statement of an ordered batch's
# transaction, after dispatcher.record_ending_heads recorded them.
#
# - delivery_exhausted for each delivery of the batch that gave up ($12-$18) and that this
#   statement (`finished`) or, when $23 says so, the earlier one moved to deliveries_done:
#   one whose lease another instance took meanwhile ends there, and is announced there,
#   once. $23 false (the one-statement case) folds the lookup of deliveries_done away
#   before planning: 0.34 against 0.51 ms of planning a call.
# - Failure streaks per subscription ($19-$22): $20 failed attempts after its last success
#   in the batch, $21 whether it had a success (which ends a streak), $22 its
#   failing_threshold (null: never). Existing rows are locked first (in id order: two
#   instances never deadlock) and so read at their latest; a row another instance inserts
#   meanwhile is added to. delivery_failing when a streak reaches its threshold (once,
#   `notified`), delivery_recovered when a notified streak ends.
#
# Answers how many deliveries it finished and how many events it published.
RECORD_FAILURES = (
    _OUTCOMES
    + """, exhausted AS (
    SELECT dispatcher.publish_internal(
        array_agg(s.environment_id),
        array_agg('dispatcher.delivery_exhausted.v1'::text),
        array_agg(jsonb_build_object(
            'delivery_id', x.delivery_id, 'subscription_id', x.subscription_id, 'url', s.url,
            'event_name', x.event_name, 'outcome', x.outcome, 'attempts', x.attempts,
            'last_status', x.last_status, 'last_error', x.last_error))) AS published
    FROM unnest($12::bigint[], $13::uuid[], $14::text[], $15::text[], $16::int[], $17::int[],
                $18::text[])
         AS x(delivery_id, subscription_id, event_name, outcome, attempts, last_status,
              last_error)
    JOIN dispatcher.subscriptions s ON s.id = x.subscription_id
    WHERE x.delivery_id IN (SELECT f.id FROM finished f)
       OR ($23::bool AND EXISTS (SELECT 1 FROM dispatcher.deliveries_done f
                                 WHERE f.subscription_id = x.subscription_id
                                   AND f.finished_at = now() AND f.id = x.delivery_id))
    HAVING count(*) > 0
), b AS (
    SELECT * FROM unnest($19::uuid[], $20::int[], $21::bool[], $22::int[])
        AS b(subscription_id, failures, succeeded, threshold)
), locked AS (
    SELECT f.subscription_id, f.failures, f.notified FROM dispatcher.failure_streaks f
    WHERE f.subscription_id = ANY($19::uuid[])
    ORDER BY f.subscription_id
    FOR UPDATE
), n AS (
    SELECT b.subscription_id, l.subscription_id IS NOT NULL AS known, b.threshold,
           CASE WHEN b.succeeded THEN 0 ELSE coalesce(l.failures, 0) END + b.failures
               AS failures,
           coalesce(l.notified, false) AND NOT b.succeeded AS was_notified,
           coalesce(l.notified, false) AND b.succeeded AS recovered
    FROM b LEFT JOIN locked l USING (subscription_id)
), m AS (
    SELECT *, coalesce(NOT was_notified AND failures >= threshold, false) AS crossed
    FROM n
), updated AS (
    UPDATE dispatcher.failure_streaks f
    SET failures = m.failures, notified = m.was_notified OR m.crossed
    FROM m WHERE m.known AND f.subscription_id = m.subscription_id
), inserted AS (
    INSERT INTO dispatcher.failure_streaks AS f (subscription_id, failures, notified)
    SELECT m.subscription_id, m.failures, m.crossed FROM m
    WHERE NOT m.known AND m.failures > 0
      AND EXISTS (SELECT 1 FROM dispatcher.subscriptions s WHERE s.id = m.subscription_id)
    ON CONFLICT (subscription_id) DO UPDATE
    SET failures = f.failures + excluded.failures, notified = f.notified OR excluded.notified
), streak_events AS (
    SELECT dispatcher.publish_internal(
        array_agg(s.environment_id),
        array_agg(CASE WHEN m.crossed THEN 'dispatcher.delivery_failing.v1'
                       ELSE 'dispatcher.delivery_recovered.v1' END),
        array_agg(CASE WHEN m.crossed
            THEN jsonb_build_object('subscription_id', s.id, 'url', s.url,
                                    'consecutive_failures', m.failures,
                                    'threshold', m.threshold)
            ELSE jsonb_build_object('subscription_id', s.id, 'url', s.url) END)) AS published
    FROM m JOIN dispatcher.subscriptions s ON s.id = m.subscription_id
    WHERE m.crossed OR m.recovered
    HAVING count(*) > 0
)
SELECT (SELECT count(*) FROM finished) AS finished,
       coalesce((SELECT sum(published) FROM exhausted), 0)
           + coalesce((SELECT sum(published) FROM streak_events), 0) AS published
"""
)


# Upkeep: ended streaks swept, the live ones' subscriptions listed (at most $1) so that
# every instance's recorder knows whose successes end a streak.
STREAKS = """
WITH swept AS (DELETE FROM dispatcher.failure_streaks WHERE failures = 0)
SELECT subscription_id FROM dispatcher.failure_streaks WHERE failures > 0 LIMIT $1
"""
