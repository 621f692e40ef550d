"""Shared fixtures: a private PostgreSQL database and Redis key prefix per test run, and the layers.

Tests use the real servers (CALLGATE_TEST_PG_ADMIN_URL / CALLGATE_TEST_REDIS_URL,
defaulting to the local developer services); nothing is mocked. Where each test puts its data
is written down in docs/testing.md: databases ``callgate_test_<run>_...``, Redis keys under
``cgtest:<run>:...``, files under pytest's tmp_path, OS-assigned ports. Nothing else is touched.

Layers: every test that uses one of the server fixtures below (directly or through another
fixture) is marked ``e2e`` at collection, so ``pytest -m "not e2e"`` is the fast loop of pure
and in-process tests (docs/testing.md).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from engine.state.snapshot import delete_prefix

PG_ADMIN_URL = os.environ.get("CALLGATE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CALLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)

# A test that needs one of these fixtures talks to PostgreSQL or Redis: it is end-to-end.
SERVER_FIXTURES = frozenset(
    {
        "pg_url",
        "fresh_pg_url",
        "module_pg_url",
        "redis_url",
        "key_prefix",
        "module_key_prefix",
        "private_redis",  # a redis-server of the test's own (tests/test_limits*.py)
    }
)
# Tests that take seconds: those that wait on the wall clock for a second or more although
# they need no server (emulator timeouts, open-loop runs), and the end-to-end tests that take
# five seconds or more. Measured with `bash scripts/test.sh --durations=40`.
SLOW_TESTS = frozenset(
    {
        "tests/test_observability_e2e.py::test_ten_thousand_distinct_accounts_add_no_series",
        "tests/admin/test_api_auth_openapi.py::test_every_route_requires_a_valid_token",
        "tests/admin/test_api_auth_openapi.py::test_the_served_openapi_document_is_valid_and_complete",
        "tests/admin/test_bulk_bench.py::test_bulk_benchmark_runs_and_its_checks_hold_at_a_tiny_size",
        "tests/test_sync_e2e.py::test_a_flushed_redis_is_rebuilt_by_the_worker",
        "tests/test_sync_e2e.py::test_a_100k_rate_import_becomes_visible_all_at_once",
        "tests/test_sync.py::test_event_publisher_never_blocks_a_call_when_redis_is_down",
        "tests/test_limits_e2e.py::test_two_engines_sharing_a_limit_admit_exactly_the_limit",
        "tests/test_snapshot.py::test_200k_rates",
        "tests/test_snapshot.py::test_reload_does_not_block_the_gevent_hub",
        "tests/test_db.py::test_demo_loads_twice_with_identical_result",
        "tests/test_fsemu.py::test_sched_hangup_alloted_timeout_ends_a_held_call",
        "tests/test_fsemu.py::test_linger_with_seconds_closes_after_them",
        "tests/test_fsemu.py::test_inbound_auth_and_show_channels",
        "tests/test_fsemu.py::test_an_engine_that_never_closes_a_lingering_socket_is_reported",
        "tests/test_loadtest.py::test_lab_driver_against_an_emulated_inbound_socket",
        "tests/test_loadtest.py::test_open_loop_run_against_the_floor",
        "tests/test_metrics.py::test_multiprocess_totals_survive_a_killed_and_a_restarted_process",
        "tests/billing/test_cdr_writer.py::test_kill_9_mid_burst_then_restart_loses_and_doubles_nothing",
        "tests/billing/test_settler.py::test_redis_away_then_back_nothing_lost",
    }
)
# The environment a developer's shell may carry that would point a test (or a process it
# starts) at data it did not create: a deployment's settings, a shared metrics directory.
FOREIGN_ENVIRONMENT = ("CALLGATE_", "PROMETHEUS_MULTIPROC_DIR")


# Not a deployment setting: which ESL parser runs (scripts/test.sh runs the suite once more
# with CALLGATE_NO_SPEEDUPS=1, and the engine processes tests start must inherit it).
KEPT_ENVIRONMENT = ("CALLGATE_TEST_", "CALLGATE_NO_SPEEDUPS")


def pytest_configure(config: pytest.Config) -> None:
    """Forget the deployment settings of the shell running pytest (CALLGATE_TEST_* stay)."""
    for name in list(os.environ):
        if name.startswith(FOREIGN_ENVIRONMENT) and not name.startswith(KEPT_ENVIRONMENT):
            del os.environ[name]


def _where(url: str) -> str:
    """A server URL without its user and password (the header must not show secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}{parts.path}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say where this run puts its data, first thing (docs/testing.md)."""
    return [
        f"callgate test data of this run: PostgreSQL databases callgate_test_{RUN_ID}* on"
        f" {_where(PG_ADMIN_URL)} and Redis keys cgtest:{RUN_ID}:* on {_where(REDIS_URL)} (both removed"
        " at the end), files under pytest's tmp_path, OS-assigned ports",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the layers: `e2e` by the server fixtures a test uses, `slow` by measured duration."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        if item.nodeid.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def _database_url(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def _create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _database_url(name)


def _drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """An empty database private to this test run (dropped afterwards)."""
    name = f"callgate_test_{RUN_ID}"
    url = _create_database(name)
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty database private to one test."""
    name = f"callgate_test_{RUN_ID}_{secrets.token_hex(3)}"
    url = _create_database(name)
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the tests' Redis (bytes replies); closed after the test."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix private to one test; its keys are deleted afterwards."""
    prefix = f"cgtest:{RUN_ID}:{secrets.token_hex(3)}:"
    yield prefix
    _delete_keys(redis_url, prefix)


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[str]:
    """An empty database private to one test module (e.g. one catalogue and one engine process)."""
    name = f"callgate_test_{RUN_ID}_{secrets.token_hex(3)}"
    url = _create_database(name)
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture(scope="module")
def module_key_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix private to one test module."""
    prefix = f"cgtest:{RUN_ID}:{secrets.token_hex(3)}:"
    yield prefix
    _delete_keys(redis_url, prefix)


def _delete_keys(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()
