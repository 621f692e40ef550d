"""Shared fixtures: a private PostgreSQL database and Redis key prefix per test run.

Tests use the real servers (CALLGATE_TEST_PG_ADMIN_URL / CALLGATE_TEST_REDIS_URL,
defaulting to the local developer services); nothing is mocked.
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
