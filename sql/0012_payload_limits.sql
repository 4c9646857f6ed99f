-- Memory bounded whatever the payload (issue 17). Internal services publish in SQL, where
-- no request limit applies, and the daemon holds each claimed payload as text, envelope
-- and body. So every event's size is measured once, at insert, as the daemon will read it
-- (payload::text, the claim's form), refused over a limit, and carried to the claim, which
-- takes rows up to a byte budget ([delivery] claim_bytes) as well as a row count.

-- The limit, one row, written by each daemon at start from [delivery] max_payload_bytes
-- (the same for every instance of one database, or the last one started wins).
CREATE TABLE dispatcher.limits (
    one               boolean PRIMARY KEY DEFAULT true CHECK (one),
    max_payload_bytes integer NOT NULL CHECK (max_payload_bytes > 0)
);
INSERT INTO dispatcher.limits (max_payload_bytes) VALUES (1048576);

-- NULL on events published before this migration: the claim reads their size instead.
ALTER TABLE dispatcher.events ADD COLUMN payload_bytes integer;

CREATE FUNCTION dispatcher.measure_payload() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    most integer;
BEGIN
    NEW.payload_bytes := octet_length(NEW.payload::text);
    SELECT max_payload_bytes INTO most FROM dispatcher.limits;
    IF NEW.payload_bytes > most THEN
        RAISE EXCEPTION 'payload of % bytes is over max_payload_bytes (%)',
                        NEW.payload_bytes, most
            USING ERRCODE = 'program_limit_exceeded',
                  DETAIL = format('event %s of environment %s', NEW.event_name,
                                  NEW.environment_id),
                  HINT = 'split the event, or raise [delivery] max_payload_bytes';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER events_measure_payload BEFORE INSERT ON dispatcher.events
    FOR EACH ROW EXECUTE FUNCTION dispatcher.measure_payload();
