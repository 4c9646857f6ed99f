-- Secret rotation: after a rotation the previous secret keeps signing (next to the new
-- one) until it expires, so receivers can switch without dropping a webhook. Standard
-- Webhooks carries one signature per active secret in webhook-signature.
ALTER TABLE dispatcher.subscriptions
    ADD COLUMN previous_secret text,
    ADD COLUMN previous_secret_expires_at timestamptz;
