-- A subscription's max_in_flight given as a JSON number with a fraction of zero (4.0) was
-- read by the API as the integer it is, and stored as given; the claim's `::int` of it then
-- failed, and with it every claim, for every subscription. The API stores such numbers as
-- integers now (api_subscriptions._settings); these are the rows stored before.
UPDATE dispatcher.subscriptions
SET settings = jsonb_set(settings, '{max_in_flight}',
                         to_jsonb((settings->>'max_in_flight')::numeric::integer))
WHERE jsonb_typeof(settings->'max_in_flight') = 'number'
  AND settings->>'max_in_flight' !~ '^[0-9]+$';
