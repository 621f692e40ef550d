-- callgate 0003: customer management for admins (engine.admin): API tokens, the
-- audit log, the balance ledger (refills, charges, initial balances) and the one
-- ASTPP form field 0001 lacks.
--
-- Nothing here is read by the engine; the tables the engine reads are only written.

-- ASTPP's "PayPal permission" (Account Settings): may the customer top up online.
ALTER TABLE accounts ADD COLUMN paypal_permission boolean NOT NULL DEFAULT false;

------------------------------------------------------------------------------
-- API tokens: created with `callgate admin token create`, shown once, stored as the
-- SHA-256 of the token (a 256-bit random secret needs no slow hash). An admin token
-- sees everything; a reseller token only the accounts below its reseller.
CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL CHECK (name <> '' AND name = btrim(name)),
    token_sha256  text NOT NULL UNIQUE CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    token_hint    text NOT NULL,                  -- the first characters, to recognise a token
    scope         text NOT NULL CHECK (scope IN ('admin', 'reseller')),
    reseller_id   bigint,
    reseller_kind text NOT NULL DEFAULT 'reseller' CHECK (reseller_kind = 'reseller'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL,
    expires_at    timestamptz,                    -- NULL = does not expire
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT api_tokens_reseller_fkey FOREIGN KEY (reseller_id, reseller_kind)
        REFERENCES accounts (id, kind) ON UPDATE RESTRICT ON DELETE RESTRICT,
    CONSTRAINT api_tokens_scope CHECK ((scope = 'admin') = (reseller_id IS NULL))
);

------------------------------------------------------------------------------
-- Every mutation made through engine.admin: who, what, when, before and after.
-- Secrets never appear (password and PIN hashes are replaced by has_password /
-- has_pin, SIP passwords are dropped). Rows are never updated or deleted.
CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),   -- the transaction's time
    actor      text NOT NULL,                        -- "cli:<os user>" or "token:<id>:<name>"
    token_id   bigint REFERENCES api_tokens (id),
    action     text NOT NULL,                        -- e.g. customer.create, sip_device.delete
    account_id bigint REFERENCES accounts (id),      -- the account concerned, if any
    entity     text NOT NULL,                        -- account, sip_device, ip_map, did, token...
    entity_key text NOT NULL DEFAULT '',             -- the entity's natural key (number, username...)
    before     jsonb,
    after      jsonb,
    CONSTRAINT audit_log_has_image CHECK (before IS NOT NULL OR after IS NOT NULL)
);
CREATE INDEX audit_log_account_id_idx ON audit_log (account_id, id);
CREATE INDEX audit_log_at_idx ON audit_log (at);

CREATE FUNCTION callgate_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION callgate_audit_append_only();

-- An account as the audit log shows it: every column but the secrets and the sync bookkeeping.
CREATE FUNCTION callgate_audit_account(a accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT (to_jsonb(a) - 'password_hash' - 'pin_hash' - 'updated_at' - 'change_version')
        || jsonb_build_object('has_password', a.password_hash IS NOT NULL, 'has_pin', a.pin_hash IS NOT NULL)
$$;

------------------------------------------------------------------------------
-- The balance ledger: every balance change an admin makes, with the balance after it.
-- Refills (top-ups, the refill report) are credits, charges are debits, "initial" is
-- the opening balance of a new account. amount is signed from the customer's side:
-- positive = the customer holds more. (Call costs are billed elsewhere.)
CREATE TABLE balance_changes (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id),
    at            timestamptz NOT NULL DEFAULT now(),
    kind          text NOT NULL CHECK (kind IN ('initial', 'refill', 'charge')),
    amount        numeric(20,6) NOT NULL CHECK (amount <> 0),
    balance_after numeric(20,6) NOT NULL,
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    description   text NOT NULL DEFAULT '',
    reference     text NOT NULL DEFAULT '',          -- receipt / payment reference
    method        text NOT NULL DEFAULT '',          -- how a refill was paid: cash, bank transfer...
    actor         text NOT NULL,
    CONSTRAINT balance_changes_sign CHECK (
        kind = 'initial' OR (kind = 'refill' AND amount > 0) OR (kind = 'charge' AND amount < 0))
);
CREATE INDEX balance_changes_account_id_idx ON balance_changes (account_id, id);
CREATE INDEX balance_changes_refills_at_idx ON balance_changes (at) WHERE kind = 'refill';

CREATE TRIGGER balance_changes_append_only BEFORE UPDATE OR DELETE ON balance_changes
    FOR EACH ROW EXECUTE FUNCTION callgate_audit_append_only();
