-- callgate 0004: live sync (engine.sync, docs/sync.md).
--
-- Every write to a table the engine reads is recorded, by statement-level triggers,
-- in the change log callgate_changes: one row per changed *snapshot entity* (the
-- entity name and key the Redis snapshot uses), stamped with the writing
-- transaction's id. Link tables are recorded as their parent entity (a failover
-- gateway as its trunk, a rate-group trunk as its rate group, a forced trunk as its
-- origination rate). A row that was deleted, or whose key changed, is recorded
-- under its old key as well, so the log also holds the tombstones that a poll on
-- change_version could never see.
--
-- The sync worker catches up exactly with transaction snapshots: it keeps the
-- pg_snapshot its Redis data reflects, and the changes it still has to apply are
-- those of transactions that snapshot did not see (txid >= its xmax, or in its
-- in-progress list). Versions are handed out before commit, so a late commit may
-- carry lower versions than changes already applied; the txid test does not care.
--
-- The same triggers NOTIFY channel callgate_changes at commit, so the worker wakes
-- at once. Payload: "entity,key,version,txid"; a statement that changes more than
-- 100 entities sends one summary instead: "entity,*,highest version,txid,count".
-- Notifications are only a wake-up: whatever is missed is still in the log. A log
-- row with key '*' (TRUNCATE, or a statement of more than 10000 rows) means "this
-- whole table changed": the worker publishes a whole new snapshot.

CREATE TABLE callgate_changes (
    txid    xid8 NOT NULL DEFAULT pg_current_xact_id(),
    entity  text NOT NULL,               -- a snapshot entity name: accounts, origination_rates...
    key     text NOT NULL,               -- its snapshot key; '*' = the whole table (TRUNCATE)
    version bigint NOT NULL,             -- the row's change_version; a fresh one for removals
    at      timestamptz NOT NULL DEFAULT clock_timestamp()   -- when written (lag metrics)
);
CREATE INDEX callgate_changes_txid_idx ON callgate_changes (txid);

-- How far the worker pruned the log: the changes of transactions up to txid
-- pruned_through may be gone, so a catch-up from a pg_snapshot whose xmin is not
-- above it could miss some, and the worker publishes a full snapshot instead.
CREATE TABLE callgate_sync_state (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through  xid8 NOT NULL DEFAULT '0'
);
INSERT INTO callgate_sync_state DEFAULT VALUES;

-- NOTIFY what one statement logged (see the header for the payloads); items NULL = summary only.
CREATE FUNCTION callgate_announce_changes(entity text, total bigint, top bigint, items text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tx text := pg_current_xact_id()::text;
    item text;
BEGIN
    IF total = 0 THEN
        RETURN;
    ELSIF items IS NOT NULL AND total <= 100 THEN
        FOREACH item IN ARRAY items LOOP
            PERFORM pg_notify('callgate_changes', entity || ',' || item || ',' || tx);
        END LOOP;
    ELSE
        PERFORM pg_notify('callgate_changes', concat_ws(',', entity, '*', top, tx, total));
    END IF;
END
$$;

-- One logging function per table (static SQL, so its plans are cached), generated
-- from (table, entity, key expression over the row alias r). A statement that writes
-- more than 10000 rows (a rate-deck import) is logged as one row with key '*': the
-- worker publishes a whole new snapshot for it anyway, and the import does not pay
-- for a second copy of every row.
DO $gen$
DECLARE
    spec record;
    changed_insert text;
    changed_update text;
    changed_delete text;
BEGIN
    FOR spec IN
        SELECT * FROM (VALUES
            ('localizations',           'localizations',     'r.id::text'),
            ('rate_groups',             'rate_groups',       'r.id::text'),
            ('accounts',                'accounts',          'r.id::text'),
            ('sip_devices',             'sip_devices',       'r.id::text'),
            ('ip_map',                  'ip_map',            'r.id::text'),
            ('caller_ids',              'caller_ids',        'r.id::text'),
            ('forced_caller_ids',       'forced_caller_ids', 'r.account_id::text'),
            ('dids',                    'dids',              'r.id::text'),
            ('speed_dials',             'speed_dials',       'r.account_id::text || '':'' || r.key'),
            ('blocked_codes',           'blocked_codes',     'r.account_id::text || '':'' || r.prefix'),
            ('gateways',                'gateways',          'r.id::text'),
            ('trunks',                  'trunks',            'r.id::text'),
            ('trunk_failover_gateways', 'trunks',            'r.trunk_id::text'),
            ('rate_group_trunks',       'rate_groups',       'r.rate_group_id::text'),
            ('origination_rates',       'origination_rates', 'r.id::text'),
            ('origination_rate_trunks', 'origination_rates', 'r.rate_id::text'),
            ('termination_rates',       'termination_rates', 'r.id::text')
        ) AS t (tbl, entity, key_expr)
    LOOP
        -- (key, version of the new row, or NULL for a key that lost its row)
        changed_insert := format('SELECT %s AS k, r.change_version AS v FROM new_rows r', spec.key_expr);
        -- An UPDATE that changed nothing keeps its change_version (callgate_touch): skipped.
        changed_update := format(
            'SELECT %1$s AS k, r.change_version AS v FROM new_rows r'
            ' WHERE r.change_version NOT IN (SELECT change_version FROM old_rows)'
            ' UNION ALL'
            ' SELECT %1$s, NULL FROM old_rows r'
            ' WHERE r.change_version NOT IN (SELECT change_version FROM new_rows)',
            spec.key_expr);
        changed_delete := format('SELECT %s AS k, NULL::bigint AS v FROM old_rows r', spec.key_expr);

        EXECUTE format($fn$
            CREATE FUNCTION %1$I() RETURNS trigger
            LANGUAGE plpgsql AS $body$
            DECLARE
                total bigint;
                top bigint;
                items text[];
            BEGIN
                IF TG_OP = 'TRUNCATE' THEN
                    total := 1;
                ELSIF TG_OP = 'DELETE' THEN
                    SELECT count(*) INTO total FROM old_rows;
                ELSE
                    SELECT count(*) INTO total FROM new_rows;
                END IF;
                IF TG_OP = 'TRUNCATE' OR total > 10000 THEN
                    INSERT INTO callgate_changes (entity, key, version)
                        VALUES (%2$L, '*', nextval('callgate_change_seq')) RETURNING version INTO top;
                    items := NULL;
                ELSIF TG_OP = 'INSERT' THEN
                    WITH logged AS (
                        INSERT INTO callgate_changes (entity, key, version)
                        SELECT %2$L, k, coalesce(max(v), nextval('callgate_change_seq'))
                          FROM (%3$s) c GROUP BY k
                        RETURNING key, version)
                    SELECT (SELECT count(*) FROM logged), (SELECT max(version) FROM logged),
                           ARRAY(SELECT key || ',' || version FROM logged LIMIT 101)
                      INTO total, top, items;
                ELSIF TG_OP = 'UPDATE' THEN
                    WITH logged AS (
                        INSERT INTO callgate_changes (entity, key, version)
                        SELECT %2$L, k, coalesce(max(v), nextval('callgate_change_seq'))
                          FROM (%4$s) c GROUP BY k
                        RETURNING key, version)
                    SELECT (SELECT count(*) FROM logged), (SELECT max(version) FROM logged),
                           ARRAY(SELECT key || ',' || version FROM logged LIMIT 101)
                      INTO total, top, items;
                ELSE
                    WITH logged AS (
                        INSERT INTO callgate_changes (entity, key, version)
                        SELECT %2$L, k, nextval('callgate_change_seq')
                          FROM (SELECT DISTINCT k FROM (%5$s) d) c
                        RETURNING key, version)
                    SELECT (SELECT count(*) FROM logged), (SELECT max(version) FROM logged),
                           ARRAY(SELECT key || ',' || version FROM logged LIMIT 101)
                      INTO total, top, items;
                END IF;
                PERFORM callgate_announce_changes(%2$L, total, top, items);
                RETURN NULL;
            END
            $body$
        $fn$, 'callgate_log_' || spec.tbl, spec.entity, changed_insert, changed_update, changed_delete);

        EXECUTE format(
            'CREATE TRIGGER %1$I AFTER INSERT ON %2$I REFERENCING NEW TABLE AS new_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION %3$I()',
            spec.tbl || '_log_insert', spec.tbl, 'callgate_log_' || spec.tbl);
        EXECUTE format(
            'CREATE TRIGGER %1$I AFTER UPDATE ON %2$I REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION %3$I()',
            spec.tbl || '_log_update', spec.tbl, 'callgate_log_' || spec.tbl);
        EXECUTE format(
            'CREATE TRIGGER %1$I AFTER DELETE ON %2$I REFERENCING OLD TABLE AS old_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION %3$I()',
            spec.tbl || '_log_delete', spec.tbl, 'callgate_log_' || spec.tbl);
        EXECUTE format(
            'CREATE TRIGGER %1$I AFTER TRUNCATE ON %2$I FOR EACH STATEMENT EXECUTE FUNCTION %3$I()',
            spec.tbl || '_log_truncate', spec.tbl, 'callgate_log_' || spec.tbl);
    END LOOP;
END
$gen$;

------------------------------------------------------------------------------
-- Call records sent by the engines through the Redis stream {prefix}events and
-- persisted by the sync worker, idempotently (one row per call UUID). The data is
-- the engine's record as sent; the CDR schema proper may replace this table.
CREATE TABLE call_records (
    uuid        text PRIMARY KEY CHECK (uuid <> ''),
    account_id  bigint,                                  -- no FK: the account may be gone
    recorded_at timestamptz NOT NULL,                    -- the engine's clock
    received_at timestamptz NOT NULL DEFAULT now(),
    data        jsonb NOT NULL CHECK (jsonb_typeof(data) = 'object')
);
CREATE INDEX call_records_account_id_idx ON call_records (account_id, recorded_at);
