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

import psycopg
import pytest
import redis

from engine.state.snapshot import delete_prefix

PG_ADMIN_URL = os.environ.get("CALLGATE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CALLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)

# A test that needs one of these fixtures talks to PostgreSQL or Redis: it is end-to-end.
SERVER_FIXTURES = frozenset(
    {"pg_url", "fresh_pg_url", "module_pg_url", "redis_url", "key_prefix", "module_key_prefix"}
)
# Modules that reach real servers or processes without those fixtures (their own private
# redis-server, a `callgate` subprocess on the test's own database, ...).
E2E_MODULES = frozenset()
# Tests that take more than a few seconds even on an idle machine (measured with --durations).
SLOW_TESTS: frozenset[str] = frozenset()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the layers: `e2e` by fixture use (or module), `slow` by measured duration."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVER_FIXTURES or module in E2E_MODULES:
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
