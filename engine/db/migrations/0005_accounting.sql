-- callgate 0005: accounting (engine.billing, docs/accounting.md): CDRs, call debits, the
-- ledger's running total of call debits, the account e-mail log and low-balance alerts.
--
-- The ledger equation, for every account, once the CDR writer has caught up:
--   accounts.balance = sum(balance_changes.amount)      -- opening ('initial') + refills - charges
--                    - sum(call_debits.amount)          -- every call the account paid for
-- The CDR writer inserts a call's debits and moves the balances in ONE transaction, and
-- only for debits really inserted (idempotent by call UUID), so a crash anywhere keeps it.

-- The sum of the call debits applied to balance, kept on the same row: the engines read
-- balance and calls_debited from one row version, so "settled in Redis but not yet in this
-- balance" is exactly Redis's spent minus calls_debited (engine.billing.funds).
ALTER TABLE accounts ADD COLUMN calls_debited numeric(20,6) NOT NULL DEFAULT 0;

------------------------------------------------------------------------------
-- One row per call attempt, rejects included. Partitioned by month of started_at (a busy
-- carrier writes millions a day; old months are detached or dropped whole). started_at
-- comes from FreeSWITCH's start_uepoch (fixed per channel), or the engine's decision time
-- for a reject, so a repeated record carries the same key.
CREATE TABLE cdrs (
    uuid                    text NOT NULL CHECK (uuid <> ''),
    started_at              timestamptz NOT NULL,
    answered_at             timestamptz,
    ended_at                timestamptz,
    account_id              bigint,                 -- no FK: CDRs outlive accounts
    account_number          text,
    chain                   bigint[] NOT NULL DEFAULT '{}',   -- the account, then each reseller up
    direction               text,
    caller_id_number        text,
    caller_id_name          text,
    dialled                 text,                   -- as the caller dialled it
    translated              text,                   -- after speed dial / localization (what was rated)
    rate_prefix             text,
    rate_cost_per_minute    numeric(20,6),          -- markup included, rounded half-up to 6 places
    trunk_id                bigint,
    trunk_name              text,
    gateway                 text,
    provider_id             bigint,
    carrier_prefix          text,
    carrier_cost_per_minute numeric(20,6),
    billsec                 integer NOT NULL DEFAULT 0 CHECK (billsec >= 0),
    duration                integer,
    max_duration            integer,
    customer_debit          numeric(20,6) NOT NULL DEFAULT 0,
    carrier_cost            numeric(20,6) NOT NULL DEFAULT 0,
    margin                  numeric(20,6) NOT NULL DEFAULT 0,  -- top of the chain's debit - carrier cost
    hangup_cause            text,
    q850                    integer,
    sip_code                integer,
    reject_reason           text,                   -- set on rejected attempts
    disposition             text,                   -- sip_hangup_disposition: who hung up
    notes                   text[] NOT NULL DEFAULT '{}',     -- anomalies found while rating
    recorded_at             timestamptz NOT NULL DEFAULT now(),
    stream_id               text,                   -- the {prefix}cdrs entry it was written from
    PRIMARY KEY (uuid, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX cdrs_account_started_idx ON cdrs (account_id, started_at DESC);
CREATE INDEX cdrs_started_idx ON cdrs (started_at DESC);
CREATE INDEX cdrs_chain_idx ON cdrs USING gin (chain);
-- Anything outside the monthly partitions the writer creates lands here, never lost.
CREATE TABLE cdrs_default PARTITION OF cdrs DEFAULT;

-- What each chain level paid for a call (level 0 = the caller). Same key and partitions.
CREATE TABLE call_debits (
    uuid       text NOT NULL,
    started_at timestamptz NOT NULL,
    account_id bigint NOT NULL,
    level      smallint NOT NULL CHECK (level >= 0),
    amount     numeric(20,6) NOT NULL,
    PRIMARY KEY (uuid, started_at, level)
) PARTITION BY RANGE (started_at);
CREATE INDEX call_debits_account_idx ON call_debits (account_id, started_at);
CREATE TABLE call_debits_default PARTITION OF call_debits DEFAULT;

-- Create the month's partitions of cdrs and call_debits (idempotent). A month whose rows
-- already sit in the default partition keeps them there (the creation is skipped).
CREATE FUNCTION callgate_cdr_month(month date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', month)::date;
    next date := (date_trunc('month', month) + interval '1 month')::date;
    suffix text := to_char(first, '"y"YYYY"m"MM');
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['cdrs', 'call_debits'] LOOP
        IF to_regclass(tbl || '_' || suffix) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               tbl || '_' || suffix, tbl, first, next);
            EXCEPTION WHEN check_violation OR duplicate_table THEN
                NULL;  -- rows of that month in the default partition, or created concurrently
            END;
        END IF;
    END LOOP;
END
$$;
SELECT callgate_cdr_month(now()::date);

-- Stream entries whose CDR was already stored from ANOTHER entry (a hangup settled twice in
-- Redis, e.g. after its settled flag expired): each such entry had added its debits to Redis's
-- spent counter once more, and the writer takes them back exactly once (this table is the
-- "exactly"). A replay of the entry a row was written from is not a duplicate.
CREATE TABLE cdr_duplicates (
    stream_id  text PRIMARY KEY,
    uuid       text NOT NULL,
    started_at timestamptz NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);

------------------------------------------------------------------------------
-- The account's e-mail log (the seed's "Emails" list): every message callgate sent or
-- tried to send. Low-balance alerts are queued here by a trigger (below) in the very
-- transaction that moved the balance, and sent by the mailer (engine.billing.alerts).
CREATE TABLE account_emails (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN ('low_balance')),
    recipient   text,
    subject     text NOT NULL,
    body        text NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    sent_at     timestamptz,
    error       text NOT NULL DEFAULT ''
);
CREATE INDEX account_emails_account_idx ON account_emails (account_id, id);
CREATE INDEX account_emails_pending_idx ON account_emails (id) WHERE status = 'pending';

-- A row = the account was alerted and its balance has not been back at or above the
-- threshold since (no repeat). Deleted when it is: the next crossing alerts again.
CREATE TABLE low_balance_alerts (
    account_id bigint PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    alerted_at timestamptz NOT NULL DEFAULT now(),
    available  numeric(20,6) NOT NULL
);

-- Available = balance (+ credit_limit when postpaid), ASTPP's lowbalance rule; "below" is strict.
CREATE FUNCTION callgate_low_balance() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    available numeric := NEW.balance + CASE WHEN NEW.postpaid THEN NEW.credit_limit ELSE 0 END;
    recipient text := coalesce(NEW.notify_email, NEW.email);
BEGIN
    IF NEW.notify_enabled AND NEW.notify_balance_below IS NOT NULL AND NOT NEW.deleted
       AND available < NEW.notify_balance_below THEN
        INSERT INTO low_balance_alerts (account_id, available) VALUES (NEW.id, available)
            ON CONFLICT (account_id) DO NOTHING;
        IF FOUND THEN
            INSERT INTO account_emails (account_id, kind, recipient, subject, body, status, error)
            VALUES (NEW.id, 'low_balance', recipient,
                    format('Low balance on account %s', NEW.number),
                    format(E'The available balance of account %s is %s %s, below your alert threshold of %s %s.\n',
                           NEW.number, round(available, 2), NEW.currency,
                           round(NEW.notify_balance_below, 2), NEW.currency),
                    CASE WHEN recipient IS NULL THEN 'failed' ELSE 'pending' END,
                    CASE WHEN recipient IS NULL THEN 'the account has no e-mail address' ELSE '' END);
        END IF;
    ELSE
        DELETE FROM low_balance_alerts WHERE account_id = NEW.id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER accounts_low_balance AFTER INSERT OR UPDATE OF balance, credit_limit, postpaid,
    notify_enabled, notify_balance_below ON accounts
    FOR EACH ROW EXECUTE FUNCTION callgate_low_balance();

------------------------------------------------------------------------------
-- Accounts whose ledger does not add up (empty = the equation holds everywhere).
CREATE VIEW ledger_mismatches AS
SELECT a.id AS account_id, a.number, a.balance,
       coalesce(bc.total, 0) AS balance_changes, coalesce(cd.total, 0) AS call_debits,
       a.calls_debited
  FROM accounts a
  LEFT JOIN (SELECT account_id, sum(amount) AS total FROM balance_changes GROUP BY account_id) bc
         ON bc.account_id = a.id
  LEFT JOIN (SELECT account_id, sum(amount) AS total FROM call_debits GROUP BY account_id) cd
         ON cd.account_id = a.id
 WHERE a.balance <> coalesce(bc.total, 0) - coalesce(cd.total, 0)
    OR a.calls_debited <> coalesce(cd.total, 0);
