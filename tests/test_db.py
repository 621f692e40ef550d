"""PostgreSQL layer: migrations, constraints, fixtures and the catalogue loader (real server)."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import errors

from engine.db.fixtures import FixtureError, load_document, load_file, read_document, verify_secret
from engine.db.loader import load_catalog
from engine.db.migrate import MigrationError, discover, migrate
from engine.model import (
    AccountKind,
    CatalogData,
    CliPool,
    DidDestinationType,
    RoutingType,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.yaml"
ALL_MIGRATIONS = [m.name for m in discover()]
ENGINE_TABLES = [
    "localizations",
    "rate_groups",
    "accounts",
    "sip_devices",
    "ip_map",
    "caller_ids",
    "forced_caller_ids",
    "dids",
    "speed_dials",
    "blocked_codes",
    "gateways",
    "trunks",
    "trunk_failover_gateways",
    "rate_group_trunks",
    "origination_rates",
    "origination_rate_trunks",
    "termination_rates",
]


@pytest.fixture(scope="module")
def demo_url(module_pg_url: str) -> str:
    """A database private to this module: migrated, with the demo document loaded."""
    migrate(module_pg_url)
    with psycopg.connect(module_pg_url) as conn:
        load_file(conn, DEMO)
    return module_pg_url


@pytest.fixture
def conn(demo_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(demo_url) as connection:
        yield connection


@pytest.fixture(scope="module")
def catalog(demo_url: str) -> CatalogData:
    with psycopg.connect(demo_url) as connection:
        return load_catalog(connection)


Row = TypeVar("Row")


def one(cursor: psycopg.Cursor[Row]) -> Row:
    """The row a query must return (no row fails the test)."""
    row = cursor.fetchone()
    assert row is not None, "the query returned no row"
    return row


def dump(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every engine table, every column (updated_at and change_version included), sorted."""
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in ENGINE_TABLES}


# =========================================================================== migrations


def test_migrate_twice_is_idempotent(fresh_pg_url: str) -> None:
    assert migrate(fresh_pg_url) == ALL_MIGRATIONS
    assert ALL_MIGRATIONS[:2] == ["0001_accounts", "0002_routing"]
    assert migrate(fresh_pg_url) == []
    with psycopg.connect(fresh_pg_url) as c:
        rows = c.execute(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY 1"
        ).fetchall()
        assert [(v, n, s) for v, n, s, _ in rows] == [(m.version, m.name, m.checksum) for m in discover()]
        assert all(isinstance(r[3], datetime) for r in rows)
        tables = {r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert set(ENGINE_TABLES) <= tables


def test_concurrent_migrators_are_safe(fresh_pg_url: str) -> None:
    barrier = threading.Barrier(4)
    results: list[list[str]] = []
    failures: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(fresh_pg_url))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    applied = [name for r in results for name in r]
    assert sorted(applied) == ALL_MIGRATIONS  # each file applied exactly once, by someone
    with psycopg.connect(fresh_pg_url) as c:
        assert c.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(ALL_MIGRATIONS),)


def _copy_migrations(target: Path) -> Path:
    target.mkdir()
    for m in discover():
        (target / f"{m.name}.sql").write_text(m.sql)
    return target


def test_changed_checksum_is_refused(fresh_pg_url: str, tmp_path: Path) -> None:
    folder = _copy_migrations(tmp_path / "migrations")
    assert migrate(fresh_pg_url, directory=folder) == ALL_MIGRATIONS
    first = folder / "0001_accounts.sql"
    first.write_text(first.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match=r"0001_accounts was changed after it was applied"):
        migrate(fresh_pg_url, directory=folder)


def test_new_file_is_applied_and_unknown_applied_version_refused(fresh_pg_url: str, tmp_path: Path) -> None:
    folder = _copy_migrations(tmp_path / "migrations")
    migrate(fresh_pg_url, directory=folder)
    (folder / "9000_extra.sql").write_text("CREATE TABLE extra (id int);")
    assert migrate(fresh_pg_url, directory=folder) == ["9000_extra"]
    assert migrate(fresh_pg_url, directory=folder) == []
    with pytest.raises(MigrationError, match=r"9000_extra .* that this code does not know"):
        migrate(fresh_pg_url)  # the packaged migrations know no 9000


def test_database_newer_than_code_is_refused(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    with psycopg.connect(fresh_pg_url) as c:
        c.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, '9999_future', 'x')")
    with pytest.raises(MigrationError, match="9999_future"):
        migrate(fresh_pg_url)


def test_failing_migration_rolls_back_alone(fresh_pg_url: str, tmp_path: Path) -> None:
    folder = _copy_migrations(tmp_path / "migrations")
    (folder / "9001_broken.sql").write_text("CREATE TABLE half_done (id int);\nSELECT no_such_function();\n")
    with pytest.raises(MigrationError, match="9001_broken failed"):
        migrate(fresh_pg_url, directory=folder)
    with psycopg.connect(fresh_pg_url) as c:
        assert [r[0] for r in c.execute("SELECT name FROM schema_migrations ORDER BY 1")] == ALL_MIGRATIONS
        assert c.execute("SELECT to_regclass('half_done')").fetchone() == (None,)


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_Accounts.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_lower_case_name"):
        discover(tmp_path)


def test_migrations_shipped_as_package_resources() -> None:
    names = [m.name for m in discover()]
    assert names == sorted(names) and names[0] == "0001_accounts"
    assert all(re.fullmatch(r"[0-9a-f]{64}", m.checksum) for m in discover())


# =========================================================================== constraints

BASE_ROWS = """
INSERT INTO rate_groups (name) VALUES ('t-group');
INSERT INTO localizations (name) VALUES ('t-loc');
INSERT INTO accounts (number, kind, email) VALUES ('8800000001', 'reseller', 't-res@example.test');
INSERT INTO accounts (number, kind, email, reseller_id)
    VALUES ('8800000002', 'customer', 't-cust@example.test',
            (SELECT id FROM accounts WHERE number = '8800000001'));
INSERT INTO accounts (number, kind) VALUES ('8800000003', 'provider');
INSERT INTO gateways (name) VALUES ('t-gw'), ('t-gw2');
INSERT INTO trunks (name, provider_id, gateway_id)
    VALUES ('t-trunk', (SELECT id FROM accounts WHERE number = '8800000003'),
            (SELECT id FROM gateways WHERE name = 't-gw'));
INSERT INTO sip_devices (account_id, username, password) VALUES (%(cust)s, 't-user', 'secret');
INSERT INTO ip_map (account_id, cidr, tech_prefix) VALUES (%(cust)s, '192.0.2.0/24', '99');
INSERT INTO caller_ids (account_id, number) VALUES (%(cust)s, '15550001');
INSERT INTO forced_caller_ids (account_id, number) VALUES (%(cust)s, '15550002');
INSERT INTO dids (number, account_id) VALUES ('15550003', %(cust)s);
INSERT INTO speed_dials (account_id, key, number) VALUES (%(cust)s, '1', '15550004');
INSERT INTO blocked_codes (account_id, prefix) VALUES (%(cust)s, '900');
INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute) VALUES (%(grp)s, '44', 0.01);
INSERT INTO origination_rates (account_id, prefix, cost_per_minute) VALUES (%(cust)s, '44', 0.01);
INSERT INTO termination_rates (trunk_id, prefix, cost_per_minute) VALUES (%(trunk)s, '44', 0.005);
INSERT INTO trunk_failover_gateways (trunk_id, position, gateway_id) VALUES (%(trunk)s, 1, %(gw2)s);
"""
CUST = "(SELECT id FROM accounts WHERE number = '8800000002' AND NOT deleted)"
RES = "(SELECT id FROM accounts WHERE number = '8800000001')"
PROV = "(SELECT id FROM accounts WHERE number = '8800000003')"
GRP = "(SELECT id FROM rate_groups WHERE name = 't-group')"
TRUNK = "(SELECT id FROM trunks WHERE name = 't-trunk')"
GW = "(SELECT id FROM gateways WHERE name = 't-gw')"
GW2 = "(SELECT id FROM gateways WHERE name = 't-gw2')"
RATE = f"(SELECT id FROM origination_rates WHERE rate_group_id = {GRP} AND prefix = '44')"

Check, Unique, FK = errors.CheckViolation, errors.UniqueViolation, errors.ForeignKeyViolation
BadText, NotNull = errors.InvalidTextRepresentation, errors.NotNullViolation

BAD_DATA = [
    # accounts
    ("number-not-digits", "INSERT INTO accounts (number) VALUES ('12a4')", Check),
    ("number-empty", "INSERT INTO accounts (number) VALUES ('')", Check),
    ("number-duplicate-live", "INSERT INTO accounts (number) VALUES ('8800000002')", Unique),
    (
        "email-duplicate-any-case",
        "INSERT INTO accounts (number, email) VALUES ('8800000010', 'T-Cust@Example.test')",
        Unique,
    ),
    ("email-malformed", "INSERT INTO accounts (number, email) VALUES ('8800000010', 'not-an-email')", Check),
    ("kind-unknown", "INSERT INTO accounts (number, kind) VALUES ('8800000010', 'admin')", Check),
    ("status-unknown", "INSERT INTO accounts (number, status) VALUES ('8800000010', 'suspended')", Check),
    (
        "reseller-is-a-customer",
        f"INSERT INTO accounts (number, reseller_id) VALUES ('8800000010', {CUST})",
        FK,
    ),
    ("reseller-missing", "INSERT INTO accounts (number, reseller_id) VALUES ('8800000010', -5)", FK),
    ("reseller-is-self", f"UPDATE accounts SET reseller_id = id WHERE id = {RES}", Check),
    (
        "reseller-chain-loop",
        f"UPDATE accounts SET kind = 'reseller' WHERE id = {CUST};"
        f" UPDATE accounts SET reseller_id = {CUST} WHERE id = {RES}",
        Check,
    ),
    ("reseller-demoted-while-owning", f"UPDATE accounts SET kind = 'customer' WHERE id = {RES}", FK),
    (
        "provider-under-reseller",
        f"INSERT INTO accounts (number, kind, reseller_id) VALUES ('8800000010', 'provider', {RES})",
        Check,
    ),
    ("cli-pool-9", "INSERT INTO accounts (number, cli_pool) VALUES ('8800000010', 9)", Check),
    ("cli-pool-negative", "INSERT INTO accounts (number, cli_pool) VALUES ('8800000010', -1)", Check),
    ("max-channels-negative", "INSERT INTO accounts (number, max_channels) VALUES ('8800000010', -1)", Check),
    ("cps-negative", "INSERT INTO accounts (number, cps) VALUES ('8800000010', -1)", Check),
    (
        "credit-limit-negative",
        "INSERT INTO accounts (number, postpaid, credit_limit) VALUES ('8800000010', true, -1)",
        Check,
    ),
    ("prepaid-with-credit", "INSERT INTO accounts (number, credit_limit) VALUES ('8800000010', 10)", Check),
    (
        "local-cost-negative",
        "INSERT INTO accounts (number, local_call_cost_per_minute) VALUES ('8800000010', -0.1)",
        Check,
    ),
    ("deleted-without-date", "INSERT INTO accounts (number, deleted) VALUES ('8800000010', true)", Check),
    ("date-without-deleted", "INSERT INTO accounts (number, deleted_at) VALUES ('8800000010', now())", Check),
    ("invoice-day-29-monthly", "INSERT INTO accounts (number, invoice_day) VALUES ('8800000010', 29)", Check),
    (
        "invoice-day-8-weekly",
        "INSERT INTO accounts (number, billing_schedule, invoice_day) VALUES ('8800000010', 'weekly', 8)",
        Check,
    ),
    (
        "billing-schedule-unknown",
        "INSERT INTO accounts (number, billing_schedule) VALUES ('8800000010', 'yearly')",
        Check,
    ),
    (
        "notify-without-threshold",
        "INSERT INTO accounts (number, notify_enabled) VALUES ('8800000010', true)",
        Check,
    ),
    (
        "first-use-without-days",
        "INSERT INTO accounts (number, expiry_from_first_use) VALUES ('8800000010', true)",
        Check,
    ),
    ("valid-days-negative", "INSERT INTO accounts (number, valid_days) VALUES ('8800000010', -1)", Check),
    ("currency-lowercase", "INSERT INTO accounts (number, currency) VALUES ('8800000010', 'usd')", Check),
    ("country-long", "INSERT INTO accounts (number, country) VALUES ('8800000010', 'GBR')", Check),
    ("codecs-malformed", "INSERT INTO accounts (number, codecs) VALUES ('8800000010', 'PCMU,,PCMA')", Check),
    ("rate-group-missing", "INSERT INTO accounts (number, rate_group_id) VALUES ('8800000010', -1)", FK),
    (
        "rate-group-in-use-deleted",
        f"UPDATE accounts SET rate_group_id = {GRP} WHERE id = {CUST};"
        f" DELETE FROM rate_groups WHERE id = {GRP}",
        FK,
    ),
    (
        "localization-in-use-deleted",
        "UPDATE accounts SET localization_id = (SELECT id FROM localizations WHERE name = 't-loc')"
        f" WHERE id = {CUST};"
        " DELETE FROM localizations WHERE name = 't-loc'",
        FK,
    ),
    ("reseller-with-customers-deleted", f"DELETE FROM accounts WHERE id = {RES}", FK),
    # sip devices
    (
        "sip-username-duplicate",
        f"INSERT INTO sip_devices (account_id, username, password) VALUES ({RES}, 't-user', 'x')",
        Unique,
    ),
    (
        "sip-username-spaces",
        f"INSERT INTO sip_devices (account_id, username, password) VALUES ({CUST}, 'a b', 'x')",
        Check,
    ),
    (
        "sip-password-empty",
        f"INSERT INTO sip_devices (account_id, username, password) VALUES ({CUST}, 't-user2', '')",
        Check,
    ),
    (
        "sip-account-missing",
        "INSERT INTO sip_devices (account_id, username, password) VALUES (-1, 'u9', 'x')",
        FK,
    ),
    # ip map
    ("cidr-host-bits", f"INSERT INTO ip_map (account_id, cidr) VALUES ({CUST}, '10.0.0.1/8')", BadText),
    ("cidr-not-an-address", f"INSERT INTO ip_map (account_id, cidr) VALUES ({CUST}, '300.1.1.1')", BadText),
    (
        "tech-prefix-letters",
        f"INSERT INTO ip_map (account_id, cidr, tech_prefix) VALUES ({CUST}, '10.0.0.0/8', '12#')",
        Check,
    ),
    (
        "ip-map-duplicate",
        f"INSERT INTO ip_map (account_id, cidr, tech_prefix) VALUES ({RES}, '192.0.2.0/24', '99')",
        Unique,
    ),
    # caller ids
    ("caller-id-plus", f"INSERT INTO caller_ids (account_id, number) VALUES ({CUST}, '+4420')", Check),
    (
        "caller-id-duplicate",
        f"INSERT INTO caller_ids (account_id, number) VALUES ({CUST}, '15550001')",
        Unique,
    ),
    (
        "forced-caller-id-second",
        f"INSERT INTO forced_caller_ids (account_id, number) VALUES ({CUST}, '1555')",
        Unique,
    ),
    (
        "forced-caller-id-empty",
        f"INSERT INTO forced_caller_ids (account_id, number) VALUES ({RES}, '')",
        Check,
    ),
    # dids
    ("did-duplicate", "INSERT INTO dids (number) VALUES ('15550003')", Unique),
    ("did-not-digits", "INSERT INTO dids (number) VALUES ('1555-0003')", Check),
    ("did-destination-type", "INSERT INTO dids (number, destination_type) VALUES ('1555000', 'fax')", Check),
    (
        "did-number-destination",
        "INSERT INTO dids (number, destination_type, destination) VALUES ('1555000', 'number', 'sip:x@y')",
        Check,
    ),
    ("did-provider-is-customer", f"INSERT INTO dids (number, provider_id) VALUES ('1555000', {CUST})", FK),
    ("did-negative-cost", "INSERT INTO dids (number, cost_per_minute) VALUES ('1555000', -1)", Check),
    # speed dials, blocked codes
    (
        "speed-dial-key-letter",
        f"INSERT INTO speed_dials (account_id, key, number) VALUES ({CUST}, 'a', '1')",
        Check,
    ),
    (
        "speed-dial-key-long",
        f"INSERT INTO speed_dials (account_id, key, number) VALUES ({CUST}, '1234', '1')",
        Check,
    ),
    (
        "speed-dial-empty-number",
        f"INSERT INTO speed_dials (account_id, key, number) VALUES ({CUST}, '2', '')",
        Check,
    ),
    (
        "speed-dial-duplicate",
        f"INSERT INTO speed_dials (account_id, key, number) VALUES ({CUST}, '1', '2')",
        Unique,
    ),
    ("blocked-code-empty", f"INSERT INTO blocked_codes (account_id, prefix) VALUES ({CUST}, '')", Check),
    (
        "blocked-code-duplicate",
        f"INSERT INTO blocked_codes (account_id, prefix) VALUES ({CUST}, '900')",
        Unique,
    ),
    # localizations, rate groups
    (
        "localization-bad-rule",
        "INSERT INTO localizations (name, number_originate) VALUES ('x', '00*/')",
        Check,
    ),
    ("localization-no-slash", "INSERT INTO localizations (name, cli_originate) VALUES ('x', '44')", Check),
    ("localization-duplicate", "INSERT INTO localizations (name) VALUES ('t-loc')", Unique),
    ("rate-group-routing", "INSERT INTO rate_groups (name, routing_type) VALUES ('x', 'fastest')", Check),
    ("rate-group-inc", "INSERT INTO rate_groups (name, inc) VALUES ('x', -1)", Check),
    ("rate-group-markup", "INSERT INTO rate_groups (name, markup_percent) VALUES ('x', -5)", Check),
    ("rate-group-owner-customer", f"INSERT INTO rate_groups (name, reseller_id) VALUES ('x', {CUST})", FK),
    ("rate-group-duplicate", "INSERT INTO rate_groups (name) VALUES ('t-group')", Unique),
    ("rate-group-blank-name", "INSERT INTO rate_groups (name) VALUES (' padded ')", Check),
    # origination rates
    (
        "rate-two-owners",
        f"INSERT INTO origination_rates (rate_group_id, account_id, prefix, cost_per_minute)"
        f" VALUES ({GRP}, {CUST}, '1', 0.01)",
        Check,
    ),
    ("rate-no-owner", "INSERT INTO origination_rates (prefix, cost_per_minute) VALUES ('1', 0.01)", Check),
    (
        "rate-group-prefix-duplicate",
        f"INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute) VALUES ({GRP}, '44', 0.02)",
        Unique,
    ),
    (
        "rate-account-prefix-duplicate",
        f"INSERT INTO origination_rates (account_id, prefix, cost_per_minute) VALUES ({CUST}, '44', 0.02)",
        Unique,
    ),
    (
        "rate-prefix-letters",
        f"INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute) VALUES ({GRP}, '4x', 0.02)",
        Check,
    ),
    (
        "rate-cost-negative",
        f"INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute) VALUES ({GRP}, '1', -0.02)",
        Check,
    ),
    (
        "rate-cost-missing",
        f"INSERT INTO origination_rates (rate_group_id, prefix) VALUES ({GRP}, '1')",
        NotNull,
    ),
    (
        "rate-init-inc-negative",
        f"INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute, init_inc)"
        f" VALUES ({GRP}, '1', 0.02, -1)",
        Check,
    ),
    (
        "rate-included-negative",
        f"INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute,"
        f" included_seconds) VALUES ({GRP}, '1', 0.02, -1)",
        Check,
    ),
    (
        "forced-trunk-missing",
        f"INSERT INTO origination_rate_trunks (rate_id, trunk_id) VALUES ({RATE}, -1)",
        FK,
    ),
    (
        "rate-group-trunk-missing",
        f"INSERT INTO rate_group_trunks (rate_group_id, trunk_id) VALUES ({GRP}, -1)",
        FK,
    ),
    # gateways, trunks, termination rates
    ("gateway-name-spaces", "INSERT INTO gateways (name) VALUES ('my gw')", Check),
    ("gateway-params-array", "INSERT INTO gateways (name, params) VALUES ('gw9', '[1]')", Check),
    ("gateway-in-use-deleted", f"DELETE FROM gateways WHERE id = {GW2}", FK),
    (
        "trunk-provider-is-customer",
        f"INSERT INTO trunks (name, provider_id, gateway_id) VALUES ('x', {CUST}, {GW})",
        FK,
    ),
    (
        "trunk-gateway-missing",
        f"INSERT INTO trunks (name, provider_id, gateway_id) VALUES ('x', {PROV}, -1)",
        FK,
    ),
    (
        "trunk-leg-timeout",
        f"INSERT INTO trunks (name, provider_id, gateway_id, leg_timeout) VALUES ('x', {PROV}, {GW}, -1)",
        Check,
    ),
    (
        "trunk-cid-type",
        f"INSERT INTO trunks (name, provider_id, gateway_id, sip_cid_type)"
        f" VALUES ('x', {PROV}, {GW}, 'header')",
        Check,
    ),
    (
        "trunk-failover-twice",
        f"INSERT INTO trunk_failover_gateways (trunk_id, position, gateway_id) VALUES ({TRUNK}, 2, {GW2})",
        Unique,
    ),
    (
        "trunk-failover-position-0",
        f"INSERT INTO trunk_failover_gateways (trunk_id, position, gateway_id) VALUES ({TRUNK}, 0, {GW})",
        Check,
    ),
    (
        "termination-duplicate",
        f"INSERT INTO termination_rates (trunk_id, prefix, cost_per_minute) VALUES ({TRUNK}, '44', 0.1)",
        Unique,
    ),
    (
        "termination-strip-letters",
        f"INSERT INTO termination_rates (trunk_id, prefix, cost_per_minute, strip)"
        f" VALUES ({TRUNK}, '1', 0.1, 'ab')",
        Check,
    ),
    (
        "termination-prepend",
        f"INSERT INTO termination_rates (trunk_id, prefix, cost_per_minute, prepend)"
        f" VALUES ({TRUNK}, '1', 0.1, 'sip:')",
        Check,
    ),
    (
        "termination-inc-negative",
        f"INSERT INTO termination_rates (trunk_id, prefix, cost_per_minute, inc)"
        f" VALUES ({TRUNK}, '1', 0.1, -6)",
        Check,
    ),
]


@pytest.fixture
def base_rows(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A small valid graph, inside a transaction that is always rolled back."""
    with conn.transaction(force_rollback=True):
        conn.execute(BASE_ROWS.split("INSERT INTO sip_devices")[0])
        ids = {
            "cust": one(conn.execute(f"SELECT {CUST}"))[0],
            "grp": one(conn.execute(f"SELECT {GRP}"))[0],
            "trunk": one(conn.execute(f"SELECT {TRUNK}"))[0],
            "gw2": one(conn.execute(f"SELECT {GW2}"))[0],
        }
        rest = "INSERT INTO sip_devices" + BASE_ROWS.split("INSERT INTO sip_devices")[1]
        for statement in filter(str.strip, rest.split(";")):
            conn.execute(statement, ids)
        yield conn


@pytest.mark.parametrize(("statement", "error"), [pytest.param(s, e, id=i) for i, s, e in BAD_DATA])
def test_constraint_rejects_bad_data(
    base_rows: psycopg.Connection[Any], statement: str, error: type[Exception]
) -> None:
    with pytest.raises(error), base_rows.transaction():
        for part in filter(str.strip, statement.split(";")):
            base_rows.execute(part)


def test_constraints_allow_what_should_be_allowed(base_rows: psycopg.Connection[Any]) -> None:
    c = base_rows
    # a soft-deleted account frees its number and e-mail address
    c.execute(f"UPDATE accounts SET deleted = true, deleted_at = now() WHERE id = {CUST}")
    c.execute("INSERT INTO accounts (number, email) VALUES ('8800000002', 't-cust@example.test')")
    # IPv6, bare addresses, an empty (catch-all) rate prefix, a daily schedule without invoice day
    c.execute(
        f"INSERT INTO ip_map (account_id, cidr) VALUES ({RES}, '2001:db8::/32'), ({RES}, '198.51.100.7')"
    )
    assert c.execute("SELECT cidr::text FROM ip_map WHERE cidr = '198.51.100.7'").fetchone() == (
        "198.51.100.7/32",
    )
    c.execute(
        f"INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute) VALUES ({GRP}, '', 0.5)"
    )
    c.execute(
        "INSERT INTO accounts (number, billing_schedule, invoice_day) VALUES ('8800000011', 'daily', NULL)"
    )
    c.execute(
        "INSERT INTO localizations (name, number_originate) VALUES ('ok', ' 00 / , + / * , */1, 0/44 ')"
    )


def test_deletes_cascade_or_unassign(base_rows: psycopg.Connection[Any]) -> None:
    c = base_rows
    cust = one(c.execute(f"SELECT {CUST}"))[0]
    c.execute("DELETE FROM accounts WHERE id = %s", [cust])
    for table in (
        "sip_devices",
        "ip_map",
        "caller_ids",
        "forced_caller_ids",
        "speed_dials",
        "blocked_codes",
        "origination_rates",
    ):
        assert c.execute(f"SELECT count(*) FROM {table} WHERE account_id = %s", [cust]).fetchone() == (0,), (
            table
        )
    assert c.execute("SELECT account_id FROM dids WHERE number = '15550003'").fetchone() == (None,)
    c.execute(f"DELETE FROM accounts WHERE id = {PROV}")  # a provider takes its trunks and their rates along
    assert c.execute("SELECT count(*) FROM trunks WHERE name = 't-trunk'").fetchone() == (0,)


def test_change_version_trigger(base_rows: psycopg.Connection[Any]) -> None:
    c = base_rows

    def version(table: str, where: str) -> int:
        return one(c.execute(f"SELECT change_version FROM {table} WHERE {where}"))[0]

    start = version("accounts", f"id = {CUST}")
    assert start > 0
    c.execute(f"UPDATE accounts SET balance = balance, first_name = first_name WHERE id = {CUST}")
    assert version("accounts", f"id = {CUST}") == start  # a no-op update keeps the version
    c.execute(f"UPDATE accounts SET balance = balance + 1 WHERE id = {CUST}")
    bumped = version("accounts", f"id = {CUST}")
    assert bumped > start
    c.execute(f"UPDATE accounts SET change_version = 1 WHERE id = {CUST}")  # cannot be forged
    assert version("accounts", f"id = {CUST}") > bumped
    c.execute("UPDATE gateways SET active = false WHERE name = 't-gw'")  # one sequence for all tables
    assert version("gateways", "name = 't-gw'") > version("accounts", f"id = {CUST}")
    last = one(c.execute("SELECT last_value FROM callgate_change_seq"))[0]
    assert version("gateways", "name = 't-gw'") == last
    for table in ENGINE_TABLES:
        cols = {
            r[0]
            for r in c.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s", [table]
            )
        }
        assert {"updated_at", "change_version"} <= cols, table
        triggers = {
            r[0]
            for r in c.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", [table]
            )
        }
        assert f"{table}_touch" in triggers, table


def test_money_columns_are_numeric_20_6(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT table_name, column_name, data_type, numeric_precision, numeric_scale"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " AND (column_name LIKE '%cost%'"
        "      OR column_name IN ('balance', 'credit_limit', 'notify_balance_below'))"
    ).fetchall()
    assert len(rows) >= 12
    assert {(r[2], r[3], r[4]) for r in rows} == {("numeric", 20, 6)}
    assert conn.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public'"
        " AND data_type IN ('real', 'double precision')"
    ).fetchone() == (0,)


# =========================================================================== fixtures


def test_demo_loads_twice_with_identical_result(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    with psycopg.connect(fresh_pg_url) as c:
        first = load_file(c, DEMO)
        assert first.changed > 700 and first.updated.total() == 0
        before = dump(c)
        second = load_file(c, DEMO)
        assert second.changed == 0, str(second)
        assert second.unchanged.total() == first.inserted.total()
        assert dump(c) == before  # not even updated_at / change_version moved
        # the same document as JSON is the same catalogue
        doc = read_document(DEMO)
        third = load_document(c, json.loads(json.dumps(doc, default=str)))
        assert third.changed == 0
        assert dump(c) == before


def test_load_file_json(fresh_pg_url: str, tmp_path: Path) -> None:
    migrate(fresh_pg_url)
    path = tmp_path / "doc.json"
    path.write_text(
        json.dumps(
            {
                "rate_groups": [{"name": "g", "rates": [{"prefix": "0044", "cost_per_minute": 0.0125}]}],
            }
        )
    )
    with psycopg.connect(fresh_pg_url) as c:
        load_file(c, path)
        assert c.execute("SELECT prefix, cost_per_minute FROM origination_rates").fetchall() == [
            ("0044", Decimal("0.0125"))
        ]


def test_yaml_keeps_digits_and_decimals_as_written(fresh_pg_url: str, tmp_path: Path) -> None:
    migrate(fresh_pg_url)
    path = tmp_path / "doc.yaml"
    path.write_text(
        "rate_groups:\n  - name: g\n    rates:\n      - {prefix: 0044, cost_per_minute: 0.1}\n"
        "      - {prefix: 33, cost_per_minute: 1.000001}\n"
    )
    with psycopg.connect(fresh_pg_url) as c:
        load_file(c, path)
        assert c.execute("SELECT prefix, cost_per_minute FROM origination_rates ORDER BY 1").fetchall() == [
            ("0044", Decimal("0.1")),
            ("33", Decimal("1.000001")),
        ]


SMALL: dict[str, Any] = {  # a fixture document, as read from YAML or JSON
    "localizations": [{"name": "l", "number_originate": "00/"}],
    "gateways": [{"name": "gw1"}, {"name": "gw2"}],
    "providers": [
        {
            "number": "700",
            "trunks": [
                {
                    "name": "t1",
                    "gateway": "gw1",
                    "failover_gateways": ["gw2"],
                    "termination_rates": [{"prefix": "44", "cost_per_minute": "0.01"}],
                }
            ],
        }
    ],
    "rate_groups": [{"name": "g", "trunks": ["t1"], "rates": [{"prefix": "44", "cost_per_minute": "0.02"}]}],
    "resellers": [
        {
            "number": "800",
            "rate_group": "g",
            "customers": [{"number": "801", "sip_devices": [{"username": "bob", "password": "pw"}]}],
        }
    ],
    "customers": [
        {
            "number": "901",
            "rate_group": "g",
            "email": "a@example.test",
            "sip_devices": [{"username": "alice", "password": "pw"}],
            "ip_map": [{"cidr": "192.0.2.0/24", "tech_prefix": "11"}],
            "dids": [{"number": "4420", "destination": "alice"}],
        },
        {"number": "902", "rate_group": "g", "sip_devices": [{"username": "carol", "password": "pw"}]},
        {"number": "903", "rate_group": "g", "sip_devices": [{"username": "dave", "password": "pw"}]},
    ],
}


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """SMALL with the value at a dotted path replaced (value DELETE removes the key)."""
    doc = copy.deepcopy(SMALL)
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    target: Any = doc
    for part in parts[:-1]:
        target = target[part]
    if value == "DELETE":
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return doc


BAD_ENTRIES = [
    (
        "customers.2.sip_devices.0.username",
        "alice",
        "customers[2].sip_devices[0].username: duplicate 'alice'"
        " (first at customers[0].sip_devices[0].username)",
    ),
    (
        "resellers.0.customers.0.sip_devices.0.username",
        "carol",
        "customers[1].sip_devices[0].username: duplicate 'carol' (first at "
        "resellers[0].customers[0].sip_devices[0].username)",
    ),
    (
        "customers.1.number",
        "801",
        "customers[1].number: duplicate '801' (first at resellers[0].customers[0].number)",
    ),
    ("customers.1.colour", "blue", "customers[1].colour: unknown key"),
    ("pricelists", [], "pricelists: unknown section"),
    ("customers.0.rate_group", "nope", "customers[0].rate_group: unknown rate group 'nope'"),
    ("rate_groups.0.trunks", ["t1", "t9"], "rate_groups[0].trunks: unknown trunk 't9'"),
    ("providers.0.trunks.0.gateway", "gw9", "providers[0].trunks[0].gateway: unknown gateway 'gw9'"),
    ("customers.0.localization", "xx", "customers[0].localization: unknown localization 'xx'"),
    ("customers.1.reseller", "902", "customers[1].reseller: account '902' is a customer, not a reseller"),
    ("customers.1.reseller", "555", "customers[1].reseller: unknown reseller '555'"),
    (
        "rate_groups.0.rates.0.cost_per_minute",
        "abc",
        "rate_groups[0].rates[0].cost_per_minute: 'abc' is not a decimal number",
    ),
    (
        "rate_groups.0.rates.0.cost_per_minute",
        "0.0000001",
        "rate_groups[0].rates[0].cost_per_minute: '0.0000001' has more than 6 decimal places",
    ),
    (
        "rate_groups.0.rates.0.cost_per_minute",
        0.02,
        "rate_groups[0].rates[0].cost_per_minute:"
        " must be a decimal written as a string or integer, not float",
    ),
    (
        "rate_groups.0.rates.0.cost_per_minute",
        "NaN",
        "rate_groups[0].rates[0].cost_per_minute: 'NaN' is not a finite",
    ),
    (
        "rate_groups.0.rates.0.cost_per_minute",
        "-1",
        "rate_groups[0].rates[0].cost_per_minute: '-1' must be at least",
    ),
    (
        "rate_groups.0.rates.0.prefix",
        "44a",
        "rate_groups[0].rates[0].prefix: '44a' is not a string of digits",
    ),
    ("rate_groups.0.rates.0.cost_per_minute", "DELETE", "rate_groups[0].rates[0].cost_per_minute: required"),
    (
        "customers.0.ip_map.0.cidr",
        "192.0.2.1/24",
        "customers[0].ip_map[0].cidr: '192.0.2.1/24' is not a valid CIDR",
    ),
    (
        "customers.0.ip_map.0.cidr",
        "999.0.0.0/8",
        "customers[0].ip_map[0].cidr: '999.0.0.0/8' is not a valid CIDR",
    ),
    (
        "customers.0.ip_map.0.tech_prefix",
        "1#",
        "customers[0].ip_map[0].tech_prefix: '1#' is not a string of digits",
    ),
    ("customers.0.cli_pool", 9, "customers[0].cli_pool: 9 is above 8"),
    ("customers.0.max_channels", -1, "customers[0].max_channels: -1 is below 0"),
    ("customers.0.postpaid", "yes", "customers[0].postpaid: must be true or false"),
    (
        "customers.0.credit_limit",
        "100",
        "customers[0].credit_limit: only postpaid accounts have a credit limit",
    ),
    (
        "customers.0.timezone",
        "Mars/Olympus",
        "customers[0].timezone: 'Mars/Olympus' is not a known IANA time zone",
    ),
    ("customers.0.email", "nobody", "customers[0].email: 'nobody' is not an e-mail address"),
    ("customers.0.number", "DELETE", "customers[0].number: required"),
    ("customers.0.number", "12-34", "customers[0].number: '12-34' is not a string of digits"),
    (
        "localizations.0.number_originate",
        "00*/",
        "localizations[0].number_originate: '00*/' is not a rule set",
    ),
    (
        "customers.0.dids.0.destination",
        "bob",
        "customers[0].dids[0].destination: 'bob' is not a SIP device of the DID's account",
    ),
    (
        "providers.0.trunks.0.failover_gateways",
        ["gw1"],
        "providers[0].trunks[0].failover_gateways: lists the primary gateway 'gw1'",
    ),
    ("customers.0.sip_devices", {"username": "x"}, "customers[0].sip_devices: must be a list, not dict"),
    ("customers.0.sip_devices.0", "alice", "customers[0].sip_devices[0]: must be a mapping, not str"),
    (
        "resellers.0.customers.0.sip_devices.0.password",
        "DELETE",
        "resellers[0].customers[0].sip_devices[0].password: required",
    ),
    ("resellers.0.customers.0.reseller", "800", "resellers[0].customers[0].reseller: unknown key"),
    (
        "origination_rates",
        [{"prefix": "1", "cost_per_minute": "1", "rate_group": "g", "account": "901"}],
        "origination_rates[0]: needs exactly one of rate_group",
    ),
    (
        "origination_rates",
        [{"prefix": "44", "cost_per_minute": "1", "rate_group": "g"}],
        "origination_rates[0].prefix: duplicate '44' (first at rate_groups[0].rates[0].prefix)",
    ),
    ("dids", [{"number": "4420"}], "dids[0].number: duplicate '4420' (first at customers[0].dids[0].number)"),
    ("customers.0.password", "short1", "customers[0].password: must be a password of at least 8 characters"),
    ("customers.0.status", "suspended", "customers[0].status: 'suspended' is not one of active, inactive"),
    (
        "customers.0.expiry",
        "next tuesday",
        "customers[0].expiry: 'next tuesday' is not an ISO 8601 date/time",
    ),
    (
        "customers.0.forced_caller_id",
        {"number": "+1555"},
        "customers[0].forced_caller_id.number: '+1555' is not a string of digits",
    ),
    (
        "rate_groups.0.routing_type",
        "fastest",
        "rate_groups[0].routing_type: 'fastest' is not one of lcr, cost",
    ),
    ("localizations.0.name", " padded", "localizations[0].name: ' padded' is not a non-empty name"),
    ("gateways.0.params", {"ping": [30]}, "gateways[0].params: parameter 'ping' must map a name"),
    (
        "providers.0.trunks.0.termination_rates.0.prefix",
        "4 4",
        "providers[0].trunks[0].termination_rates[0].prefix: '4 4' is not a string of digits",
    ),
    ("providers.0.customers", [], "providers[0].customers: unknown key"),
    (
        "customers.0.speed_dials",
        [{"key": "12345", "number": "1"}],
        "customers[0].speed_dials[0].key: '12345' is not a speed-dial key",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), [pytest.param(*case, id=f"{case[0]}={case[1]!r}") for case in BAD_ENTRIES]
)
def test_bad_entry_names_its_path(conn: psycopg.Connection[Any], path: str, value: Any, message: str) -> None:
    with conn.transaction(force_rollback=True):
        with pytest.raises(FixtureError) as caught:
            load_document(conn, _mutate(path, value))
        assert any(p.startswith(message) for p in caught.value.problems), caught.value.problems


def test_secrets_never_appear_in_errors() -> None:
    with pytest.raises(FixtureError) as caught:
        load_document(None, _mutate("customers.0.password", "hunter2"))  # type: ignore[arg-type]
    assert "hunter2" not in str(caught.value)


def test_all_problems_are_reported_at_once() -> None:
    doc = _mutate("customers.0.cli_pool", 12)
    doc["customers"][1]["colour"] = "red"
    doc["rate_groups"][0]["rates"][0]["prefix"] = "x"
    with pytest.raises(FixtureError) as caught:
        load_document(None, doc)  # type: ignore[arg-type]  # parse errors need no database
    assert len(caught.value.problems) == 3
    assert str(caught.value).startswith("3 problems:")


def test_database_rejection_names_the_entry(conn: psycopg.Connection[Any]) -> None:
    doc = _mutate("customers.0.billing_schedule", "weekly")
    doc["customers"][0]["invoice_day"] = 20
    with conn.transaction(force_rollback=True), pytest.raises(FixtureError) as caught:
        load_document(conn, doc)
    assert caught.value.problems == [
        "customers[0].invoice_day: does not fit the billing schedule (weekly 1-7, monthly 1-28, daily none)"
    ]
    # a collision with a row outside the document: the demo's alice already uses this address
    doc = _mutate("customers.0.email", "alice@carterdesign.example")
    with conn.transaction(force_rollback=True), pytest.raises(FixtureError) as caught:
        load_document(conn, doc)
    assert caught.value.problems == ["customers[0].email: already used by another account"]


def test_failed_load_writes_nothing(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    doc = _mutate("customers.0.dids.0.destination", "bob")  # detected late, in the database phase
    with psycopg.connect(fresh_pg_url, autocommit=True) as c:
        with pytest.raises(FixtureError):
            load_document(c, doc)
        assert all(rows == [] for rows in dump(c).values())


def test_reload_semantics_and_secrets(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    doc = copy.deepcopy(SMALL)
    doc["customers"][0].update({"password": "Secret-123", "pin": "4711"})
    with psycopg.connect(fresh_pg_url) as c:
        load_document(c, doc)
        pw, pin = one(c.execute("SELECT password_hash, pin_hash FROM accounts WHERE number = '901'"))
        assert pw.startswith("scrypt$") and "Secret-123" not in pw and verify_secret("Secret-123", pw)
        assert verify_secret("4711", pin) and not verify_secret("4712", pin)
        assert c.execute("SELECT password FROM sip_devices WHERE username = 'alice'").fetchone() == ("pw",)

        # billing moves the balance; a document that does not mention balance leaves it alone
        c.execute("UPDATE accounts SET balance = 12.5 WHERE number = '901'")
        c.commit()
        assert load_document(c, doc).changed == 0
        assert c.execute("SELECT balance, password_hash FROM accounts WHERE number = '901'").fetchone() == (
            Decimal("12.5"),
            pw,
        )

        # one changed value updates exactly one row and bumps its version
        version = one(c.execute("SELECT change_version FROM accounts WHERE number = '901'"))[0]
        doc["customers"][0]["password"] = "Other-456"
        doc["customers"][0]["max_channels"] = 3
        report = load_document(c, doc)
        assert report.changed == 1 and report.updated["accounts"] == 1
        new_pw, channels, new_version = one(
            c.execute("SELECT password_hash, max_channels, change_version FROM accounts WHERE number = '901'")
        )
        assert verify_secret("Other-456", new_pw) and channels == 3 and new_version > version

        # a daily schedule has no invoice day
        doc["customers"][2]["billing_schedule"] = "daily"
        load_document(c, doc)
        assert c.execute("SELECT invoice_day FROM accounts WHERE number = '903'").fetchone() == (None,)

        # link lists are replaced; moving a customer under a reseller is a plain update
        doc["providers"][0]["trunks"][0]["failover_gateways"] = []
        doc["rate_groups"][0]["trunks"] = []
        doc["customers"][1]["reseller"] = "800"
        report = load_document(c, doc)
        assert report.removed["trunk_failover_gateways"] == 1 and report.removed["rate_group_trunks"] == 1
        assert c.execute(
            "SELECT r.number FROM accounts a JOIN accounts r ON r.id = a.reseller_id WHERE a.number = '902'"
        ).fetchone() == ("800",)


def test_load_inside_callers_transaction_uses_a_savepoint(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    with psycopg.connect(fresh_pg_url) as c:
        c.execute("SELECT 1")  # a transaction is now open
        load_document(c, SMALL)
        c.rollback()
        assert c.execute("SELECT count(*) FROM accounts").fetchone() == (0,)


# =========================================================================== loader


def _by(items: list[Any], **match: Any) -> Any:
    found = [i for i in items if all(getattr(i, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_catalog_maps_the_demo(catalog: CatalogData, conn: psycopg.Connection[Any]) -> None:
    groups = {g.name: g for g in catalog.rate_groups}
    trunks = {t.name: t for t in catalog.trunks}
    gateways = {g.name: g for g in catalog.gateways}
    accounts = {a.number: a for a in catalog.accounts}

    # money is Decimal, exactly as written
    rate = _by(catalog.origination_rates, rate_group_id=groups["retail"].id, prefix="4420")
    assert rate.cost_per_minute == Decimal("0.0096") and isinstance(rate.cost_per_minute, Decimal)
    assert (
        rate.account_id is None
        and rate.forced_trunk_ids == ()
        and rate.description == "United Kingdom - London"
    )
    sat = _by(catalog.origination_rates, rate_group_id=groups["retail"].id, prefix="8816")
    assert sat.connect_cost == Decimal("0.5")
    forced = _by(catalog.origination_rates, rate_group_id=groups["retail"].id, prefix="2348")
    assert forced.forced_trunk_ids == (trunks["beta-premium"].id,)
    personal = _by(catalog.origination_rates, account_id=accounts["1000000001"].id, prefix="447")
    assert personal.rate_group_id is None and personal.cost_per_minute == Decimal("0.02")

    # CIDR and tech prefix
    entry = _by(catalog.ip_map, account_id=accounts["1000000002"].id)
    assert (entry.cidr, entry.tech_prefix, entry.active) == ("203.0.113.0/28", "7788", True)

    # reseller chain: customer -> reseller -> admin; the reseller buys at wholesale
    dental, acme = accounts["2000000101"], accounts["2000000001"]
    assert dental.reseller_id == acme.id and dental.kind is AccountKind.CUSTOMER
    assert acme.kind is AccountKind.RESELLER and acme.reseller_id is None
    assert acme.rate_group_id == groups["wholesale"].id and dental.rate_group_id == groups["acme-retail"].id
    assert conn.execute(
        "SELECT a.number FROM rate_groups g JOIN accounts a ON a.id = g.reseller_id"
        " WHERE g.name = 'acme-retail'"
    ).fetchone() == ("2000000001",)

    # postpaid sign convention
    harbor = accounts["2000000102"]
    assert harbor.postpaid and harbor.balance == Decimal("-35.5") and harbor.credit_limit == Decimal("250")
    assert harbor.available_credit == Decimal("214.5")

    alice = accounts["1000000001"]
    assert alice.expiry == datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert alice.expiry.tzinfo is UTC
    assert alice.cli_pool is CliPool.KEEP_IF_IN_CALLER_IDS_ELSE_RANDOM_CALLER_ID and alice.usable
    assert alice.local_call_cost_per_minute == Decimal("0.001") and alice.codecs == "PCMA,PCMU"
    northwind = accounts["1000000002"]
    assert northwind.non_cli_rate_group_id == groups["retail-noncli"].id and northwind.cli_pool == 5

    # trunks, failover gateways, rate-group links, localizations
    alpha = trunks["alpha-main"]
    assert alpha.gateway_id == gateways["alpha-gw1"].id and alpha.failover_gateway_ids == (
        gateways["alpha-gw2"].id,
    )
    assert alpha.provider_id == accounts["9000000001"].id and alpha.codecs == "PCMA,PCMU,G729"
    assert groups["retail"].trunk_ids == tuple(sorted((alpha.id, trunks["beta-premium"].id)))
    assert groups["retail-noncli"].routing_type is RoutingType.COST and groups["wholesale"].inc == 1
    loc = _by(catalog.localizations, id=alpha.localization_id)
    assert loc.name == "alpha-e164" and loc.number_terminate == "*/+"
    assert _by(catalog.localizations, id=alice.localization_id).number_originate == "00/, +/, 0/44"

    # account children
    assert _by(catalog.sip_devices, username="alice").account_id == alice.id
    assert _by(catalog.forced_caller_ids, account_id=northwind.id).number == "12125550100"
    assert {s.key: s.number for s in catalog.speed_dials if s.account_id == alice.id} == {
        "1": "442079460000",
        "2": "12125550100",
    }
    assert {b.prefix for b in catalog.blocked_codes if b.account_id == alice.id} == {
        "449",
        "4470",
        "882",
        "8816",
    }
    assert {c.number for c in catalog.caller_ids if c.account_id == alice.id} == {
        "442079460001",
        "447700900001",
    }
    did = _by(catalog.dids, number="12125550100")
    assert did.destination_type is DidDestinationType.URI and did.account_id == northwind.id
    assert _by(catalog.dids, number="442039990000").account_id is None
    term = _by(catalog.termination_rates, trunk_id=alpha.id, prefix="4420")
    assert term.cost_per_minute == Decimal("0.006")

    # sizes and version
    assert len(catalog.origination_rates) > 300 and len(catalog.accounts) == 7
    assert catalog.version == max(
        one(conn.execute(f"SELECT coalesce(max(change_version), 0) FROM {t}"))[0] for t in ENGINE_TABLES
    )


def test_catalog_includes_inactive_and_deleted_rows(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction(force_rollback=True):
        conn.execute("UPDATE accounts SET deleted = true, deleted_at = now() WHERE number = '2000000102'")
        conn.execute("UPDATE accounts SET status = 'inactive' WHERE number = '2000000101'")
        data = load_catalog(conn)  # inside the caller's transaction: sees its uncommitted changes
        accounts = {a.number: a for a in data.accounts}
        assert accounts["2000000102"].deleted and not accounts["2000000102"].usable
        assert not accounts["2000000101"].active


def test_load_catalog_restores_connection_settings(demo_url: str) -> None:
    with psycopg.connect(demo_url, autocommit=True) as c:
        load_catalog(c)
        assert c.isolation_level is None and c.read_only is None and c.autocommit
        c.execute("CREATE TEMP TABLE writable (x int)")  # not left read-only


def test_loader_speed_sanity_100k_rates(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    with psycopg.connect(fresh_pg_url) as c:
        load_document(c, SMALL)
        c.execute(
            "INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute, description)"
            " SELECT (SELECT id FROM rate_groups WHERE name = 'g'), (100000 + n)::text, (n % 500) / 1000.0,"
            " 'generated ' || (n % 50) FROM generate_series(1, 100000) AS n"
        )
        c.execute(
            "INSERT INTO origination_rate_trunks (rate_id, trunk_id) SELECT r.id, t.id"
            " FROM origination_rates r, trunks t WHERE r.prefix LIKE '1000%'"
        )
        c.commit()
        started = time.perf_counter()
        data = load_catalog(c)
        elapsed = time.perf_counter() - started
    print(f"load_catalog: {len(data.origination_rates)} rates in {elapsed:.2f}s")
    assert len(data.origination_rates) == 100_001
    sample = _by(data.origination_rates, prefix="100777")
    assert sample.cost_per_minute == Decimal("0.277") and sample.description == "generated 27"
    assert sample.forced_trunk_ids == ()
    assert len(_by(data.origination_rates, prefix="100099").forced_trunk_ids) == 1


# =========================================================================== the demo's promised calls


def _translate(rules: str, number: str) -> str:
    """decision-rules 4.2, for checking the demo only."""
    for pair in filter(None, re.sub(r"\s", "", rules).split(",")):
        match, _, replace = pair.partition("/")
        replace = "" if replace == "*" else replace
        if match == "*":
            number = replace + number
        elif number.startswith(match):
            number = replace + number[len(match) :]
    return number


def _rate_for(data: CatalogData, account: Any, group_id: int, number: str) -> Any:
    candidates = [
        r
        for r in data.origination_rates
        if r.active
        and number.startswith(r.prefix)
        and (r.rate_group_id == group_id or r.account_id == account.id)
    ]
    return max(
        candidates, key=lambda r: (len(r.prefix), r.account_id is not None, r.cost_per_minute), default=None
    )


def _route(data: CatalogData, group_id: int, rate: Any, number: str) -> list[str]:
    group = _by(data.rate_groups, id=group_id)
    routes = []
    for trunk_id in rate.forced_trunk_ids or group.trunk_ids:
        terms = [t for t in data.termination_rates if t.trunk_id == trunk_id and number.startswith(t.prefix)]
        if terms:
            best = max(terms, key=lambda t: len(t.prefix))
            if not group.lossless or best.cost_per_minute <= rate.cost_per_minute:
                routes.append((-len(best.prefix), best.cost_per_minute, _by(data.trunks, id=trunk_id).name))
    return [name for *_, name in sorted(routes)]


DEMO_CALLS = [
    # (caller number, dialled after identification, CLI, expected rate prefix, rate group, trunks)
    ("1000000001", "00442079460123", "442079460001", "4420", "retail", ["beta-premium", "alpha-main"]),
    ("1000000001", "1", "442079460001", "4420", "retail", ["beta-premium", "alpha-main"]),
    ("1000000001", "00447700900123", "442079460001", "4477", "retail", ["alpha-main", "beta-premium"]),
    ("1000000001", "2348123456789", "442079460001", "2348", "retail", ["beta-premium"]),
    ("1000000002", "12125550123", "12125550100", "1212", "retail", ["alpha-main", "beta-premium"]),
    ("1000000002", "442079460123", "15550001111", "4420", "retail-noncli", ["beta-premium", "alpha-main"]),
    ("2000000101", "004915112345678", "442079460201", "4915", "acme-retail", ["alpha-main", "beta-premium"]),
    ("2000000102", "33612345678", "442039990102", "336", "acme-retail", ["alpha-main", "beta-premium"]),
]


@pytest.mark.parametrize(("number", "dialled", "cli", "prefix", "group", "trunks"), DEMO_CALLS)
def test_demo_calls_are_satisfiable(
    catalog: CatalogData, number: str, dialled: str, cli: str, prefix: str, group: str, trunks: list[str]
) -> None:
    accounts = {a.number: a for a in catalog.accounts}
    groups = {g.name: g.id for g in catalog.rate_groups}
    account = accounts[number]
    speed = {s.key: s.number for s in catalog.speed_dials if s.account_id == account.id}
    destination = speed.get(dialled, dialled)
    if account.localization_id is not None:
        destination = _translate(
            _by(catalog.localizations, id=account.localization_id).number_originate, destination
        )
    assert not any(
        destination.startswith(b.prefix) for b in catalog.blocked_codes if b.account_id == account.id
    )
    known = {d.number for d in catalog.dids if d.account_id == account.id} | {
        c.number for c in catalog.caller_ids if c.account_id == account.id
    }
    group_id = account.rate_group_id
    if account.cli_pool in (3, 4, 5) and cli not in known:
        group_id = account.non_cli_rate_group_id
    assert group_id == groups[group]
    rate = _rate_for(catalog, account, group_id, destination)
    assert rate is not None and rate.prefix == prefix
    assert _route(catalog, group_id, rate, destination) == trunks
    level, level_rate = account, rate
    while True:  # every level of the chain can afford a minute at its own rate
        assert level.usable and level.available_credit >= level_rate.connect_cost + level_rate.cost_per_minute
        if level.reseller_id is None:
            break
        level = _by(catalog.accounts, id=level.reseller_id)
        level_rate = _rate_for(catalog, level, level.rate_group_id, destination)
        assert level_rate is not None


def test_demo_comment_promises_match(catalog: CatalogData) -> None:
    header = DEMO.read_text().split("\nlocalizations:")[0]
    assert header.count("ACCEPTED") >= 10
    alice = _by(catalog.accounts, number="1000000001")
    assert any("449012345678".startswith(b.prefix) for b in catalog.blocked_codes if b.account_id == alice.id)
    assert _by(catalog.dids, number="442071234567").destination == "alice"
    assert _by(catalog.sip_devices, username="2000000101").active
    northwind = _by(catalog.ip_map, tech_prefix="7788")
    assert ipaddress.ip_address("203.0.113.10") in ipaddress.ip_network(northwind.cidr)
    assert ipaddress.ip_address("192.0.2.50") not in ipaddress.ip_network(northwind.cidr)


def test_demo_document_is_what_the_repo_ships() -> None:
    doc = read_document(DEMO)
    assert set(doc) == {
        "localizations",
        "gateways",
        "providers",
        "rate_groups",
        "resellers",
        "customers",
        "dids",
    }
    rates = sum(len(g["rates"]) for g in doc["rate_groups"])
    assert 300 <= rates <= 1000


def test_each_loader_table_spec_fills_every_field_of_its_entity() -> None:
    """The loader's one column spec per table: every model field comes from exactly one
    column or from the table's links; the entity key is among the columns."""
    import dataclasses

    from engine.db import loader
    from engine.model import ENTITY_KEY_FIELDS, ENTITY_TYPES

    for name, table in loader._TABLES.items():
        filled = [c.field for c in table.columns] + ([table.links_field] if table.links_field else [])
        assert len(filled) == len(set(filled)), name
        assert set(filled) == {f.name for f in dataclasses.fields(ENTITY_TYPES[name])}, name
        assert set(ENTITY_KEY_FIELDS[name]) <= {c.field for c in table.columns}, name
        assert len(table.types) == len(table.columns)
        assert table.select().startswith("SELECT ") and table.select().endswith(f"FROM {table.table}")


# =========================================================================== the ledger


def test_balances_a_document_sets_are_ledger_entries(fresh_pg_url: str) -> None:
    # The ledger equation (docs/accounting.md) must hold for loaded accounts too: an opening
    # balance is an 'initial' entry, and a document that later sets another balance records
    # the difference as a refill or a charge. Loading the same document again records nothing.
    migrate(fresh_pg_url)
    doc = {"customers": [{"number": "7100000001", "balance": "12.50"}, {"number": "7100000002"}]}
    with psycopg.connect(fresh_pg_url) as conn:
        load_document(conn, doc)
        load_document(conn, doc)
        assert conn.execute("SELECT count(*) FROM ledger_mismatches").fetchone() == (0,)
        entries = "SELECT kind, amount, balance_after FROM balance_changes ORDER BY id"
        assert conn.execute(entries).fetchall() == [("initial", Decimal("12.5"), Decimal("12.5"))]
        for balance, kind, amount in (("20", "refill", "7.5"), ("5.25", "charge", "-14.75")):
            load_document(conn, {"customers": [{"number": "7100000001", "balance": balance}]})
            assert conn.execute(entries).fetchall()[-1] == (kind, Decimal(amount), Decimal(balance))
        assert conn.execute("SELECT count(*) FROM ledger_mismatches").fetchone() == (0,)


def test_the_demo_catalogue_balances_to_the_cent(demo_url: str) -> None:
    with psycopg.connect(demo_url) as conn:
        assert conn.execute("SELECT number FROM ledger_mismatches").fetchall() == []
