"""The compact load path decides exactly as the plain one.

Reference: ``Catalog.build`` over the generated entities as constructed in memory (no codec,
no Redis). Under test: the same data published to Redis, read back page by page (shared
strings and datetimes, comma-joined pages, change tracking), and then changed in place by
live-sync changes. Thousands of random calls of the load-test mix (every call class, random
accounts and destinations) must give equal Decisions.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis

from engine.model import CallRequest, CatalogData
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from engine.state.snapshot import Page, _last_of_each_key, publish_snapshot, read_snapshot
from loadtest.dataset import CallMix, Scale, generate

SCALE = Scale(accounts=3_000, rates=20_000, groups=10, trunks=10, termination_rates=4_000, seed=5)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CALLS = 4_000


def decisions(catalog: Catalog, requests: list[CallRequest]) -> list[object]:
    ctx = DecisionContext(now=NOW, rng=random.Random(11), config=RulesConfig())
    return [decide(request, catalog, ctx) for request in requests]


def random_requests(seed: int) -> list[CallRequest]:
    mix = CallMix(SCALE, seed=seed)
    rng = random.Random(seed)
    requests = []
    for n, plan in enumerate(mix.take(CALLS)):
        requests.append(
            CallRequest(
                uuid=f"call-{n}",
                destination=plan.destination,
                sip_auth_username=plan.sip_auth_username,
                network_ip=plan.network_ip,
                caller_id_number=plan.caller_id_number or str(rng.randrange(10**10, 10**11)),
            )
        )
    return requests


@pytest.fixture(scope="module")
def generated() -> CatalogData:
    return generate(SCALE)


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_catalog_read_from_redis_decides_as_the_one_built_in_memory(generated, client, key_prefix) -> None:
    publish_snapshot(client, key_prefix, generated)
    data = read_snapshot(client, key_prefix, scan_count=97)  # many small pages
    compact = Catalog.build(data)
    compact.track_changes(data)
    reference = Catalog.build(generated)
    requests = random_requests(seed=1)
    expected = decisions(reference, requests)
    assert decisions(compact, requests) == expected
    outcomes = {type(d).__name__ for d in expected}
    assert outcomes == {"Accept", "Reject"}  # the mix reaches both sides
    assert len({getattr(d, "reason", None) for d in expected}) >= 5


def test_live_changes_in_place_decide_as_a_fresh_build(generated, client, key_prefix) -> None:
    publish_snapshot(client, key_prefix, generated)
    data = read_snapshot(client, key_prefix)
    live = Catalog.build(data)
    live.track_changes(data)
    rng = random.Random(3)
    changed = dataclasses.replace(generated)
    upserts: list[object] = []
    before: dict[tuple[str, str], object] = {}
    accounts = list(changed.accounts)
    for index in rng.sample(range(len(accounts)), 300):  # balances up and down, some deactivated
        old = accounts[index]
        accounts[index] = dataclasses.replace(
            old, balance=Decimal(rng.choice([0, 1, 5, 500])), active=rng.random() > 0.1
        )
        upserts.append(accounts[index])
    rates = list(changed.origination_rates)
    for index in rng.sample(range(len(rates)), 300):  # repriced, some switched off
        old = rates[index]
        rates[index] = dataclasses.replace(
            old, cost_per_minute=old.cost_per_minute * 3, active=rng.random() > 0.2
        )
        upserts.append(rates[index])
        before[("origination_rates", str(old.id))] = old
    devices = list(changed.sip_devices)
    gone = sorted(rng.sample(range(len(devices)), 100), reverse=True)
    deletes = [("sip_devices", str(devices[index].id)) for index in gone]
    for index in gone:
        del devices[index]
    changed.accounts, changed.origination_rates, changed.sip_devices = accounts, rates, devices
    assert live.apply_changes(upserts, deletes, before) == []
    requests = random_requests(seed=2)
    assert decisions(live, requests) == decisions(Catalog.build(changed), requests)


def test_a_row_read_twice_is_kept_once_the_last_read() -> None:
    rows = [("a", 1), ("b", 1), ("b", 2), ("c", 1)]
    assert _last_of_each_key(rows, lambda row: row[0]) == [("a", 1), ("b", 2), ("c", 1)]
    assert _last_of_each_key(rows[:2], lambda row: row[0]) == rows[:2]
    assert Page(b"[1],[2]", 2).rows == 2
