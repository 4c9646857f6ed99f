-- What the operator page needs beyond the history: test deliveries, kept apart from stats.
--
-- POST /v1/subscriptions/{id}/test queues one delivery of an example event for one
-- subscription. Its id is kept here so the stats (GET .../stats), the error-rate rule
-- (queries.ERROR_RATE_DEACTIVATE) and the history's `test` flag can tell it from real
-- traffic without a column on the hot tables: the claim and RECORD statements stay as
-- they are, and the anti-join against this small table is one hash probe per attempt.
-- Rows older than the longest stats window (90 days) are dropped when a test is queued.
CREATE TABLE dispatcher.test_deliveries (
    delivery_id     bigint PRIMARY KEY,
    subscription_id uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The stats series reads dispatcher.attempts by (subscription_id, started_at): the index
-- attempts_subscription_idx of 0001 already serves it on every daily partition, so none
-- is added here (see README, "The operator page", for the measured cost).
