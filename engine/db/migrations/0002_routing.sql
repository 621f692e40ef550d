-- callgate 0002: rating and routing: gateways, trunks (with failover gateways),
-- rate-group <-> trunk links, origination rates (+ forced trunks), termination rates.
-- Providers are accounts of kind 'provider' (0001).

CREATE TABLE gateways (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the sofia gateway name: sofia/gateway/<name>/<number>
    name           text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'),
    description    text NOT NULL DEFAULT '',
    active         boolean NOT NULL DEFAULT true,
    sip_profile    text NOT NULL DEFAULT 'external' CHECK (sip_profile <> ''),
    proxy          text NOT NULL DEFAULT '',
    username       text NOT NULL DEFAULT '',
    password       text NOT NULL DEFAULT '',
    register       boolean NOT NULL DEFAULT false,
    params         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0
);

------------------------------------------------------------------------------
CREATE TABLE trunks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name <> '' AND name = btrim(name)),
    provider_id     bigint NOT NULL,
    provider_kind   text NOT NULL DEFAULT 'provider' CHECK (provider_kind = 'provider'),
    gateway_id      bigint NOT NULL REFERENCES gateways (id) ON DELETE RESTRICT,
    active          boolean NOT NULL DEFAULT true,
    precedence      integer NOT NULL DEFAULT 0 CHECK (precedence >= 0),
    max_channels    integer NOT NULL DEFAULT 0 CHECK (max_channels >= 0),
    cps             integer NOT NULL DEFAULT 0 CHECK (cps >= 0),
    codecs          text NOT NULL DEFAULT '' CHECK (callgate_valid_codecs(codecs)),
    leg_timeout     integer NOT NULL DEFAULT 0 CHECK (leg_timeout >= 0),   -- 0 = configured default
    localization_id bigint REFERENCES localizations (id) ON DELETE RESTRICT,
    sip_cid_type    text NOT NULL DEFAULT 'none' CHECK (sip_cid_type IN ('none', 'rpid', 'pid')),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    change_version  bigint NOT NULL DEFAULT 0,
    CONSTRAINT trunks_provider_fkey FOREIGN KEY (provider_id, provider_kind)
        REFERENCES accounts (id, kind) ON UPDATE RESTRICT ON DELETE CASCADE
);
CREATE INDEX trunks_provider_id_idx ON trunks (provider_id);

-- Failover gateways of a trunk, tried in position order after the primary one.
CREATE TABLE trunk_failover_gateways (
    trunk_id       bigint NOT NULL REFERENCES trunks (id) ON DELETE CASCADE,
    position       smallint NOT NULL CHECK (position >= 1),
    gateway_id     bigint NOT NULL REFERENCES gateways (id) ON DELETE RESTRICT,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (trunk_id, position),
    CONSTRAINT trunk_failover_gateways_once UNIQUE (trunk_id, gateway_id)
);

-- The trunks a rate group routes over (used when a rate forces none).
CREATE TABLE rate_group_trunks (
    rate_group_id  bigint NOT NULL REFERENCES rate_groups (id) ON DELETE CASCADE,
    trunk_id       bigint NOT NULL REFERENCES trunks (id) ON DELETE CASCADE,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rate_group_id, trunk_id)
);
CREATE INDEX rate_group_trunks_trunk_id_idx ON rate_group_trunks (trunk_id);

------------------------------------------------------------------------------
-- Origination rates: what a customer (or reseller) pays. Either a rate group's
-- rate or an account's personal rate, never both.
CREATE TABLE origination_rates (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rate_group_id    bigint REFERENCES rate_groups (id) ON DELETE CASCADE,
    account_id       bigint REFERENCES accounts (id) ON DELETE CASCADE,
    prefix           text NOT NULL CHECK (prefix ~ '^[0-9]*$'),   -- '' matches everything
    description      text NOT NULL DEFAULT '',
    active           boolean NOT NULL DEFAULT true,
    connect_cost     numeric(20,6) NOT NULL DEFAULT 0 CHECK (connect_cost >= 0),
    cost_per_minute  numeric(20,6) NOT NULL CHECK (cost_per_minute >= 0),
    included_seconds integer NOT NULL DEFAULT 0 CHECK (included_seconds >= 0),
    init_inc         integer NOT NULL DEFAULT 0 CHECK (init_inc >= 0),
    inc              integer NOT NULL DEFAULT 0 CHECK (inc >= 0),
    precedence       integer NOT NULL DEFAULT 0 CHECK (precedence >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    change_version   bigint NOT NULL DEFAULT 0,
    CONSTRAINT origination_rates_one_owner CHECK (num_nonnulls(rate_group_id, account_id) = 1),
    CONSTRAINT origination_rates_group_prefix_key UNIQUE (rate_group_id, prefix),
    CONSTRAINT origination_rates_account_prefix_key UNIQUE (account_id, prefix)
);

-- "Force routing": a rate that names its own trunks ignores the rate group's.
CREATE TABLE origination_rate_trunks (
    rate_id        bigint NOT NULL REFERENCES origination_rates (id) ON DELETE CASCADE,
    trunk_id       bigint NOT NULL REFERENCES trunks (id) ON DELETE CASCADE,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    change_version bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rate_id, trunk_id)
);
CREATE INDEX origination_rate_trunks_trunk_id_idx ON origination_rate_trunks (trunk_id);

------------------------------------------------------------------------------
-- Termination rates: what a carrier charges on one of its trunks.
CREATE TABLE termination_rates (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trunk_id         bigint NOT NULL REFERENCES trunks (id) ON DELETE CASCADE,
    prefix           text NOT NULL CHECK (prefix ~ '^[0-9]*$'),
    description      text NOT NULL DEFAULT '',
    active           boolean NOT NULL DEFAULT true,
    connect_cost     numeric(20,6) NOT NULL DEFAULT 0 CHECK (connect_cost >= 0),
    cost_per_minute  numeric(20,6) NOT NULL CHECK (cost_per_minute >= 0),
    included_seconds integer NOT NULL DEFAULT 0 CHECK (included_seconds >= 0),
    init_inc         integer NOT NULL DEFAULT 0 CHECK (init_inc >= 0),
    inc              integer NOT NULL DEFAULT 0 CHECK (inc >= 0),
    strip            text NOT NULL DEFAULT '' CHECK (strip ~ '^[0-9]*$'),
    prepend          text NOT NULL DEFAULT '' CHECK (prepend ~ '^[0-9+#*]*$'),
    precedence       integer NOT NULL DEFAULT 0 CHECK (precedence >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    change_version   bigint NOT NULL DEFAULT 0,
    CONSTRAINT termination_rates_prefix_trunk_key UNIQUE (prefix, trunk_id)
);
CREATE INDEX termination_rates_trunk_id_idx ON termination_rates (trunk_id);

------------------------------------------------------------------------------
CREATE TRIGGER gateways_touch BEFORE INSERT OR UPDATE ON gateways
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER trunks_touch BEFORE INSERT OR UPDATE ON trunks
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER trunk_failover_gateways_touch BEFORE INSERT OR UPDATE ON trunk_failover_gateways
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER rate_group_trunks_touch BEFORE INSERT OR UPDATE ON rate_group_trunks
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER origination_rates_touch BEFORE INSERT OR UPDATE ON origination_rates
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER origination_rate_trunks_touch BEFORE INSERT OR UPDATE ON origination_rate_trunks
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
CREATE TRIGGER termination_rates_touch BEFORE INSERT OR UPDATE ON termination_rates
    FOR EACH ROW EXECUTE FUNCTION callgate_touch();
