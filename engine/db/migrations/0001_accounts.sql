-- callgate 0001: accounts and everything that hangs off an account.
--
-- Conventions (deliberately unlike ASTPP): booleans are booleans, enums are
-- text with a CHECK, "none" is NULL, money is NUMERIC(20,6), and
-- accounts.balance is what the customer holds (negative = debt, also postpaid).
-- Every table the engine reads carries updated_at and change_version, both set
-- by callgate_touch() from the one sequence callgate_change_seq.

CREATE SEQUENCE callgate_change_seq AS bigint;

CREATE FUNCTION callgate_touch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- An UPDATE that changes nothing keeps its version (idempotent reloads).
    IF TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    NEW.change_version := nextval('callgate_change_seq');
    RETURN NEW;
END
$$;

-- A number-translation rule set: comma-separated "match/replace" pairs where
-- match is "*" or a non-empty run of [0-9+#] and replace is "*" or [0-9+#]*.
-- Whitespace is ignored (decision-rules 4.2). Empty = no rules.
CREATE FUNCTION callgate_valid_rules(rules text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT regexp_replace(rules, '\s', '', 'g')
        ~ '^((\*|[0-9+#]+)/(\*|[0-9+#]*)(,(\*|[0-9+#]+)/(\*|[0-9+#]*))*)?$'
$$;

-- A FreeSWITCH codec list: "PCMU,PCMA,OPUS@48000h@20i"; empty = default.
CREATE FUNCTION callgate_valid_codecs(codecs text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT codecs ~ '^([A-Za-z0-9][A-Za-z0-9@._-]*(,[A-Za-z0-9][A-Za-z0-9@._-]*)*)?$'
$$;

------------------------------------------------------------------------------
CREATE TABLE localizations (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name <> '' AND name = btrim(name)),
    description      text NOT NULL DEFAULT '',
    active           boolean NOT NULL DEFAULT true,
    number_originate text NOT NULL DEFAULT '' CHECK (callgate_valid_rules(number_originate)),
    cli_originate    text NOT NULL DEFAULT '' CHECK (callgate_valid_rules(cli_originate)),
    cli_inbound      text NOT NULL DEFAULT '' CHECK (callgate_valid_rules(cli_inbound)),
    number_terminate text NOT NULL DEFAULT '' CHECK (callgate_valid_rules(number_terminate)),
    cli_terminate    text NOT NULL DEFAULT '' CHECK (callgate_valid_rules(cli_terminate)),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    change_version   bigint NOT NULL DEFAULT 0
);

------------------------------------------------------------------------------
CREATE TABLE rate_groups (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name <> '' AND name = btrim(name)),
    description    text NOT NULL DEFAULT '',
    active         boolean NOT NULL DEFAULT true,
    -- owner: NULL = the admin; otherwise a reseller (FK added below)
    reseller_id    bigint,
    reseller_kind  text NOT NULL DEFAULT 'reseller' CHECK (reseller_kind = 'reseller'),
    markup_percent numeric(9,4) NOT NULL DEFAULT 0 CHECK (markup_percent >= 0),
    routing_type   text NOT NULL DEFAULT 'lcr' CHECK (routing_type IN ('lcr', 'cost')),
    init_inc       integer NOT NULL DEFAULT 0 CHECK (init_inc >= 0),
    inc            integer NOT NULL DEFAULT 0 CHECK (inc >= 0),
    lossless       boolean NOT NULL DEFAULT true,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0
);

------------------------------------------------------------------------------
-- Customers, resellers and providers (carriers) alike: the ASTPP customer form.
CREATE TABLE accounts (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    number                  text NOT NULL CHECK (number ~ '^[0-9]+$' AND char_length(number) <= 20),
    kind                    text NOT NULL DEFAULT 'customer'
                                CHECK (kind IN ('customer', 'reseller', 'provider')),
    -- parent: NULL = owned by the admin. (reseller_id, reseller_kind) must name a
    -- reseller: reseller_kind is a constant column that makes the FK check the kind.
    reseller_id             bigint,
    reseller_kind           text NOT NULL DEFAULT 'reseller' CHECK (reseller_kind = 'reseller'),
    status                  text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    deleted                 boolean NOT NULL DEFAULT false,
    deleted_at              timestamptz,

    -- money
    postpaid                boolean NOT NULL DEFAULT false,
    balance                 numeric(20,6) NOT NULL DEFAULT 0,   -- held by the customer; < 0 = debt
    credit_limit            numeric(20,6) NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    currency                text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),

    -- rating and routing
    rate_group_id           bigint REFERENCES rate_groups (id) ON DELETE RESTRICT,
    non_cli_rate_group_id   bigint REFERENCES rate_groups (id) ON DELETE RESTRICT,
    cli_pool                smallint NOT NULL DEFAULT 0 CHECK (cli_pool BETWEEN 0 AND 8),
    localization_id         bigint REFERENCES localizations (id) ON DELETE RESTRICT,
    local_calls_allowed     boolean NOT NULL DEFAULT true,
    local_call_cost_per_minute numeric(20,6) NOT NULL DEFAULT 0 CHECK (local_call_cost_per_minute >= 0),
    codecs                  text NOT NULL DEFAULT '' CHECK (callgate_valid_codecs(codecs)),

    -- limits (0 = unlimited)
    max_channels            integer NOT NULL DEFAULT 0 CHECK (max_channels >= 0),
    cps                     integer NOT NULL DEFAULT 0 CHECK (cps >= 0),

    -- panel access (hashes only: "scrypt$..." / "pbkdf2_sha256$...")
    pin_hash                text,
    password_hash           text,
    email                   text CHECK (email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'),

    -- profile
    first_name              text NOT NULL DEFAULT '',
    last_name               text NOT NULL DEFAULT '',
    company                 text NOT NULL DEFAULT '',
    phone                   text NOT NULL DEFAULT '' CHECK (phone ~ '^[0-9 +()-]*$'),
    mobile                  text NOT NULL DEFAULT '' CHECK (mobile ~ '^[0-9 +()-]*$'),
    address_1               text NOT NULL DEFAULT '',
    address_2               text NOT NULL DEFAULT '',
    city                    text NOT NULL DEFAULT '',
    province                text NOT NULL DEFAULT '',
    postal_code             text NOT NULL DEFAULT '',
    country                 text CHECK (country ~ '^[A-Z]{2}$'),        -- ISO 3166-1 alpha-2
    timezone                text NOT NULL DEFAULT 'UTC' CHECK (timezone <> ''),  -- IANA name
    language                text NOT NULL DEFAULT 'en' CHECK (language ~ '^[a-z]{2}(-[A-Z]{2})?$'),

    -- account settings
    notifications           boolean NOT NULL DEFAULT true,
    is_recording            boolean NOT NULL DEFAULT false,
    allow_ip_management     boolean NOT NULL DEFAULT false,

    -- billing
    billing_schedule        text NOT NULL DEFAULT 'monthly'
                                CHECK (billing_schedule IN ('daily', 'weekly', 'monthly')),
    invoice_day             smallint DEFAULT 1,
    tax_number              text NOT NULL DEFAULT '',
    reference               text NOT NULL DEFAULT '' CHECK (char_length(reference) <= 100),
    invoice_note            text NOT NULL DEFAULT '',
    generate_invoice        boolean NOT NULL DEFAULT true,

    -- low-balance alert
    notify_enabled          boolean NOT NULL DEFAULT false,
    notify_balance_below    numeric(20,6),
    notify_email            text CHECK (notify_email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'),

    -- validity
    created_at              timestamptz NOT NULL DEFAULT now(),
    first_used              timestamptz,
    expiry                  timestamptz,                 -- NULL = never expires
    valid_days              integer CHECK (valid_days >= 0),
    expiry_from_first_use   boolean NOT NULL DEFAULT false,

    updated_at              timestamptz NOT NULL DEFAULT now(),
    change_version          bigint NOT NULL DEFAULT 0,

    CONSTRAINT accounts_id_kind_key UNIQUE (id, kind),
    CONSTRAINT accounts_reseller_fkey FOREIGN KEY (reseller_id, reseller_kind)
        REFERENCES accounts (id, kind) ON UPDATE RESTRICT ON DELETE RESTRICT,
    CONSTRAINT accounts_not_own_reseller CHECK (reseller_id <> id),
    CONSTRAINT accounts_provider_top_level CHECK (kind <> 'provider' OR reseller_id IS NULL),
    CONSTRAINT accounts_deleted_at CHECK (deleted = (deleted_at IS NOT NULL)),
    CONSTRAINT accounts_prepaid_no_credit CHECK (postpaid OR credit_limit = 0),
    CONSTRAINT accounts_invoice_day CHECK (
        (billing_schedule = 'daily' AND invoice_day IS NULL)
        OR (billing_schedule = 'weekly' AND invoice_day BETWEEN 1 AND 7)
        OR (billing_schedule = 'monthly' AND invoice_day BETWEEN 1 AND 28)),
    CONSTRAINT accounts_notify_threshold CHECK (NOT notify_enabled OR notify_balance_below IS NOT NULL),
    CONSTRAINT accounts_expiry_from_first_use CHECK (NOT expiry_from_first_use OR valid_days IS NOT NULL)
);

-- Numbers and e-mail addresses of soft-deleted accounts may be reused (as in ASTPP).
CREATE UNIQUE INDEX accounts_number_live_key ON accounts (number) WHERE NOT deleted;
CREATE UNIQUE INDEX accounts_email_live_key ON accounts (lower(email)) WHERE NOT deleted AND email IS NOT NULL;
CREATE INDEX accounts_reseller_id_idx ON accounts (reseller_id) WHERE reseller_id IS NOT NULL;

ALTER TABLE rate_groups ADD CONSTRAINT rate_groups_reseller_fkey
    FOREIGN KEY (reseller_id, reseller_kind) REFERENCES accounts (id, kind)
    ON UPDATE RESTRICT ON DELETE RESTRICT;

-- The reseller chain must end at the admin: refuse an update that closes a loop.
-- (An INSERT cannot close one: nothing references the new row yet.)
CREATE FUNCTION callgate_check_reseller_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.reseller_id IS NULL THEN
        RETURN NEW;
    END IF;
    -- serialise chain changes so two concurrent updates cannot build a loop together
    PERFORM pg_advisory_xact_lock(hashtext('callgate_reseller_chain'));
    IF EXISTS (
        WITH RECURSIVE chain (id, depth) AS (
            SELECT NEW.reseller_id, 1
            UNION ALL
            SELECT a.reseller_id, chain.depth + 1
              FROM accounts a JOIN chain ON a.id = chain.id
             WHERE a.reseller_id IS NOT NULL AND chain.depth < 1000
        )
        SELECT 1 FROM chain WHERE chain.id = NEW.id
    ) THEN
        RAISE EXCEPTION 'reseller chain of account % would loop', NEW.number
            USING ERRCODE = 'check_violation', CONSTRAINT = 'accounts_reseller_chain';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER accounts_reseller_chain BEFORE UPDATE OF reseller_id ON accounts
    FOR EACH ROW EXECUTE FUNCTION callgate_check_reseller_chain();

------------------------------------------------------------------------------
-- SIP devices: the password is kept as given (FreeSWITCH needs it for digest auth).
CREATE TABLE sip_devices (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id         bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    username           text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    password           text NOT NULL CHECK (password <> ''),
    active             boolean NOT NULL DEFAULT true,
    codecs             text NOT NULL DEFAULT '' CHECK (callgate_valid_codecs(codecs)),
    caller_id_name     text NOT NULL DEFAULT '',
    caller_id_number   text NOT NULL DEFAULT '' CHECK (caller_id_number ~ '^[0-9]*$'),
    context            text NOT NULL DEFAULT 'default' CHECK (context <> ''),
    voicemail_enabled  boolean NOT NULL DEFAULT false,
    voicemail_password text NOT NULL DEFAULT '' CHECK (voicemail_password ~ '^[0-9]*$'),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    change_version     bigint NOT NULL DEFAULT 0
);
CREATE INDEX sip_devices_account_id_idx ON sip_devices (account_id);

------------------------------------------------------------------------------
-- IP authentication: a source network plus a tech prefix (stripped from the number).
CREATE TABLE ip_map (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name           text NOT NULL DEFAULT '',
    cidr           cidr NOT NULL,
    tech_prefix    text NOT NULL DEFAULT '' CHECK (tech_prefix ~ '^[0-9]*$'),
    active         boolean NOT NULL DEFAULT true,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    CONSTRAINT ip_map_cidr_prefix_key UNIQUE (cidr, tech_prefix)
);
CREATE INDEX ip_map_account_id_idx ON ip_map (account_id);

------------------------------------------------------------------------------
-- Whitelisted caller IDs (the CLI pool's "caller IDs").
CREATE TABLE caller_ids (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    number         text NOT NULL CHECK (number ~ '^[0-9]+$'),
    description    text NOT NULL DEFAULT '',
    active         boolean NOT NULL DEFAULT true,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    CONSTRAINT caller_ids_account_number_key UNIQUE (account_id, number)
);

-- The caller ID forced onto every outbound call of an account (at most one).
CREATE TABLE forced_caller_ids (
    account_id     bigint PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    number         text NOT NULL CHECK (number ~ '^[0-9]+$'),
    name           text NOT NULL DEFAULT '',
    active         boolean NOT NULL DEFAULT true,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0
);

------------------------------------------------------------------------------
CREATE TABLE dids (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    number           text NOT NULL UNIQUE CHECK (number ~ '^[0-9]+$'),
    account_id       bigint REFERENCES accounts (id) ON DELETE SET NULL,   -- NULL = unassigned
    provider_id      bigint,                                              -- the carrier it comes from
    provider_kind    text NOT NULL DEFAULT 'provider' CHECK (provider_kind = 'provider'),
    description      text NOT NULL DEFAULT '',
    active           boolean NOT NULL DEFAULT true,
    destination_type text NOT NULL DEFAULT 'device'
                         CHECK (destination_type IN ('device', 'uri', 'number')),
    destination      text NOT NULL DEFAULT '',
    max_channels     integer NOT NULL DEFAULT 0 CHECK (max_channels >= 0),
    cps              integer NOT NULL DEFAULT 0 CHECK (cps >= 0),
    leg_timeout      integer NOT NULL DEFAULT 0 CHECK (leg_timeout >= 0),
    connect_cost     numeric(20,6) NOT NULL DEFAULT 0 CHECK (connect_cost >= 0),
    cost_per_minute  numeric(20,6) NOT NULL DEFAULT 0 CHECK (cost_per_minute >= 0),
    included_seconds integer NOT NULL DEFAULT 0 CHECK (included_seconds >= 0),
    init_inc         integer NOT NULL DEFAULT 0 CHECK (init_inc >= 0),
    inc              integer NOT NULL DEFAULT 0 CHECK (inc >= 0),
    setup_cost       numeric(20,6) NOT NULL DEFAULT 0 CHECK (setup_cost >= 0),
    monthly_cost     numeric(20,6) NOT NULL DEFAULT 0 CHECK (monthly_cost >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    change_version   bigint NOT NULL DEFAULT 0,
    CONSTRAINT dids_provider_fkey FOREIGN KEY (provider_id, provider_kind)
        REFERENCES accounts (id, kind) ON UPDATE RESTRICT ON DELETE RESTRICT,
    CONSTRAINT dids_number_destination CHECK (destination_type <> 'number' OR destination ~ '^[0-9]*$')
);
CREATE INDEX dids_account_id_idx ON dids (account_id) WHERE account_id IS NOT NULL;

------------------------------------------------------------------------------
-- A speed dial applies only when the whole destination equals the key, and its
-- number can never be empty (fixes ASTPP's empty pre-created slots).
CREATE TABLE speed_dials (
    account_id     bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key            text NOT NULL CHECK (key ~ '^[0-9]{1,3}$'),
    number         text NOT NULL CHECK (number ~ '^[0-9]+$'),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, key)
);

CREATE TABLE blocked_codes (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    prefix         text NOT NULL CHECK (prefix ~ '^[0-9]+$'),
    description    text NOT NULL DEFAULT '',
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    CONSTRAINT blocked_codes_account_prefix_key UNIQUE (account_id, prefix)
);

------------------------------------------------------------------------------
CREATE TRIGGER localizations_touch BEFORE INSERT OR UPDATE ON localizations
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER rate_groups_touch BEFORE INSERT OR UPDATE ON rate_groups
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER accounts_touch BEFORE INSERT OR UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER sip_devices_touch BEFORE INSERT OR UPDATE ON sip_devices
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER ip_map_touch BEFORE INSERT OR UPDATE ON ip_map
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER caller_ids_touch BEFORE INSERT OR UPDATE ON caller_ids
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER forced_caller_ids_touch BEFORE INSERT OR UPDATE ON forced_caller_ids
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER dids_touch BEFORE INSERT OR UPDATE ON dids
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER speed_dials_touch BEFORE INSERT OR UPDATE ON speed_dials
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER blocked_codes_touch BEFORE INSERT OR UPDATE ON blocked_codes
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
