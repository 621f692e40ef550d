"""Fixtures of the micro-benchmarks: catalogs at scale, FreeSWITCH frames, a private Redis prefix.

Run with ``.venv/bin/pytest loadtest/bench --benchmark-only`` (the default ``pytest`` run
only collects ``tests/``; ``scripts/test.sh`` runs them once, untimed, with
``--benchmark-disable``). Building the 1M-rate catalog takes a few seconds, once per session.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from engine.rules import Catalog, DecisionContext, RulesConfig
from engine.state.snapshot import delete_prefix
from loadtest.dataset import CallMix, Scale, generate

REDIS_URL = os.environ.get("CALLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

SMALL = Scale(accounts=1_000, rates=10_000, groups=10, termination_rates=10_000)
LARGE = Scale(accounts=100_000, rates=1_000_000, groups=100, termination_rates=100_000)
HUGE_ACCOUNTS = Scale(accounts=1_000_000, rates=10_000, groups=10, termination_rates=10_000)
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every micro-benchmark is marked `bench` (pyproject.toml; docs/testing.md)."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.bench)


@pytest.fixture(scope="session")
def small_catalog() -> Catalog:
    return Catalog.build(generate(SMALL))


@pytest.fixture(scope="session")
def large_catalog() -> Catalog:
    return Catalog.build(generate(LARGE))


@pytest.fixture(scope="session")
def million_accounts_catalog() -> Catalog:
    return Catalog.build(generate(HUGE_ACCOUNTS))


@pytest.fixture
def ctx() -> DecisionContext:
    return DecisionContext(now=datetime.now(UTC), rng=random.Random(1), config=RulesConfig())


@pytest.fixture(scope="session")
def fs_library():
    """FreeSWITCH's bytes for a call, recorded from the emulator (loadtest.driver)."""
    from loadtest.driver import record_library

    return record_library()


def plans(scale: Scale, kind: str = "accept", n: int = 2000) -> list:
    return CallMix(scale, {kind: 1.0}, seed=11).take(n)


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"cgbench:{secrets.token_hex(4)}:"
    yield prefix
    delete_prefix(redis_client, prefix)
