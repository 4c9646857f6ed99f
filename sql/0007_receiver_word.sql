-- What a receiver says about when to come back (Retry-After).
--
-- A 429 with Retry-After pauses its whole endpoint until then, for every instance: the one
-- that got the answer at once, the others at their next safety poll (upkeep reads this).
CREATE TABLE dispatcher.endpoint_pauses (
    subscription_id uuid PRIMARY KEY REFERENCES dispatcher.subscriptions ON DELETE CASCADE,
    until           timestamptz NOT NULL
);

-- The Retry-After (seconds) an attempt's answer carried and that set its next attempt.
ALTER TABLE dispatcher.attempts ADD COLUMN retry_after double precision;
