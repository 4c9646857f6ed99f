-- The daemon caches each subscription's URL, secrets and settings by (id, updated_at) and
-- reads them again only when updated_at changes, so every change must move it: also an
-- UPDATE that an operator runs by hand and that names no updated_at.
CREATE FUNCTION dispatcher.touch_subscription() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER subscriptions_touch BEFORE UPDATE ON dispatcher.subscriptions
    FOR EACH ROW EXECUTE FUNCTION dispatcher.touch_subscription();
