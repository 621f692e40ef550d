"""The packed catalogue decides exactly as the plain one it replaced.

Reference (:func:`plain`): the catalogue as it was before issue 19's packed tables: plain
dicts of the generated entities as constructed in memory (accounts and devices by id,
number and username, every rate table a dict), no codec, no Redis. Under test: the same
data published to Redis, read back page by page, built into packed tables (records built
on a hit, accounts by number and devices by username chosen at lookup time), then changed
in place by live-sync changes (the packed tables' overlays), and the same catalogue written
to an image file and mapped back (engine.state.image). Thousands of random calls of the
load-test mix (every call class, random accounts and destinations) must give equal Decisions.
"""

from __future__ import annotations

import dataclasses
import marshal
import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis

import engine.model
import engine.rules
import engine.rules.catalog as catalog_module
from engine.model import CallRequest, CatalogData, OriginationRate
from engine.rules.catalog import RECORD_TYPES, Catalog, longest_prefix
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from engine.rules.packed import PackedTable, record_codec
from engine.rules.rating import find_rate
from engine.state.image import ImageStore, code_fingerprint
from engine.state.snapshot import Page, SnapshotStamp, _last_of_each_key, fetch_snapshot, publish_snapshot
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


def plain(data: CatalogData) -> Catalog:
    """The catalogue before packing: every large table a dict of the entities as given."""
    saved = catalog_module.PACK_RATES_FROM
    catalog_module.PACK_RATES_FROM = 10**12  # no rate table is packed
    try:
        catalog = Catalog.build(data)
    finally:
        catalog_module.PACK_RATES_FROM = saved
    catalog.accounts = {a.id: a for a in data.accounts}  # type: ignore[assignment]
    catalog.accounts_by_number = catalog_module._accounts_by_number(data.accounts)
    catalog.sip_devices = {d.id: d for d in data.sip_devices}  # type: ignore[assignment]
    catalog.devices = catalog_module._devices_by_username(data.sip_devices)
    return catalog


def test_the_packed_tables_are_in_use(generated) -> None:
    catalog = Catalog.build(generated)
    assert type(catalog.accounts) is PackedTable and type(catalog.sip_devices) is PackedTable
    assert all(type(table) is PackedTable for table in catalog.group_rates.values())
    assert any(type(table) is PackedTable for table in catalog.termination_rates.values())
    reference = plain(generated)
    assert catalog.accounts == reference.accounts and catalog.devices == reference.devices
    assert catalog.accounts_by_number == reference.accounts_by_number
    assert catalog.group_rates == reference.group_rates
    assert catalog.termination_rates == reference.termination_rates


def old_find_rate(catalog: Catalog, account_id: int, group_id: int, destination: str) -> object:
    """find_rate as it was: one lookup per prefix length, the personal table first."""
    personal = catalog.personal_rates.get(account_id, {})
    group = catalog.group_rates.get(group_id, {})
    for n in range(min(len(destination), catalog.longest_origination_prefix), -1, -1):
        rate = personal.get(destination[:n]) or group.get(destination[:n])
        if rate is not None:
            return rate
    return None


@pytest.mark.parametrize("seed", range(20))
def test_find_rate_equals_the_per_length_lookup(seed: int) -> None:
    rng = random.Random(seed)
    digits = "012"

    def prefix() -> str:
        return "".join(rng.choice(digits) for _ in range(rng.randrange(0, 5)))

    rates = [
        OriginationRate(n, prefix(), Decimal(rng.randrange(1, 9)), *rng.choice([(1, None), (None, 7)]))
        for n in range(rng.randrange(1, 120))
    ]
    for pack_from in (1, 10**6):
        saved, catalog_module.PACK_RATES_FROM = catalog_module.PACK_RATES_FROM, pack_from
        try:
            catalog = Catalog.build(CatalogData(origination_rates=rates))
        finally:
            catalog_module.PACK_RATES_FROM = saved
        for _ in range(300):
            destination = prefix() + prefix()
            expected = old_find_rate(catalog, 7, 1, destination)
            assert find_rate(catalog, 7, 1, destination) == expected
            assert find_rate(catalog, 8, 1, destination) == longest_prefix(
                catalog.group_rates.get(1, {}), destination, catalog.longest_origination_prefix
            )


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.mark.parametrize("records", [(), RECORD_TYPES], ids=["entities", "records"])
def test_catalog_read_from_redis_decides_as_the_one_built_in_memory(
    generated, client, key_prefix, records
) -> None:
    publish_snapshot(client, key_prefix, generated)
    data = fetch_snapshot(client, key_prefix, scan_count=97).decode(records)  # many small pages
    assert set(data.records) == set(records)
    compact = Catalog.build(data)
    compact.track_changes(data)
    reference = plain(generated)
    requests = random_requests(seed=1)
    expected = decisions(reference, requests)
    assert decisions(compact, requests) == expected
    outcomes = {type(d).__name__ for d in expected}
    assert outcomes == {"Accept", "Reject"}  # the mix reaches both sides
    assert len({getattr(d, "reason", None) for d in expected}) >= 5


@pytest.mark.parametrize("records", [(), RECORD_TYPES], ids=["entities", "records"])
def test_live_changes_in_place_decide_as_a_fresh_build(
    generated, client, key_prefix, tmp_path, records
) -> None:
    publish_snapshot(client, key_prefix, generated)
    data = fetch_snapshot(client, key_prefix).decode(records)
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
    expected = decisions(plain(changed), requests)
    assert decisions(live, requests) == expected

    # The same catalogue written as an image (before its changes) and mapped back decides
    # the same, and takes the same changes in its overlays.
    store = ImageStore(tmp_path, key_prefix, code_fingerprint([engine.model, engine.rules]))
    image = Catalog.build(data)
    image.track_changes(data)
    stamp = SnapshotStamp(data.version, "t", 0)
    assert store.write(stamp, image) is not None
    loaded = store.load(stamp)
    assert loaded is not None and isinstance(loaded.value.accounts._records, memoryview)  # mapped
    mapped = loaded.value
    first = random_requests(seed=1)
    assert decisions(mapped, first) == decisions(plain(generated), first)
    assert mapped.apply_changes(upserts, deletes, before) == []
    assert decisions(mapped, requests) == expected


def test_built_from_records_equals_built_from_entities(generated, client, key_prefix) -> None:
    """The first load packs the large tables from the rows' record tuples, without entities:
    every index equal to the entity build's, the records decoding to equal entities."""
    publish_snapshot(client, key_prefix, generated)
    raw = fetch_snapshot(client, key_prefix, scan_count=333)
    from_entities = Catalog.build(raw.decode())
    from_entities.track_changes(raw.decode())
    data = raw.decode(RECORD_TYPES)
    assert not data.accounts and not data.sip_devices and not data.origination_rates
    from_records = Catalog.build(data)
    from_records.track_changes(data)
    for name in Catalog.__slots__:
        if name != "_changes":
            assert getattr(from_records, name) == getattr(from_entities, name), name
    for table in (from_records.accounts, *from_records.group_rates.values()):
        assert isinstance(table, PackedTable)
    assert from_records.sip_devices == from_entities.sip_devices == {d.id: d for d in generated.sip_devices}


def test_records_read_twice_or_out_of_order_build_the_same(generated) -> None:
    """HSCAN may return a row twice and returns them in any order: the records path keeps one
    per key and lists its problems in id order, as the entity path (sorted, deduplicated)."""
    data = dataclasses.replace(generated)
    orphan = dataclasses.replace(data.origination_rates[5], id=10**9, rate_group_id=None, account_id=None)
    data.origination_rates = [*data.origination_rates, orphan, dataclasses.replace(orphan, id=10**9 + 1)]
    reference = Catalog.build(data)
    rng = random.Random(4)
    as_records: dict[str, list[tuple[object, ...]]] = {}
    for name in RECORD_TYPES:
        rows = [marshal.loads(record_codec(type(e)).encode(e)) for e in getattr(data, name)]
        rows += rng.sample(rows, len(rows) // 10)  # read twice
        rng.shuffle(rows)
        as_records[name] = rows
    shuffled = dataclasses.replace(
        data, accounts=[], sip_devices=[], origination_rates=[], termination_rates=[]
    )
    shuffled.records = as_records
    built = Catalog.build(shuffled)
    assert len(reference.problems) >= 2
    for name in Catalog.__slots__:
        assert getattr(built, name) == getattr(reference, name), name


def test_a_row_read_twice_is_kept_once_the_last_read() -> None:
    rows = [("a", 1), ("b", 1), ("b", 2), ("c", 1)]
    assert _last_of_each_key(rows, lambda row: row[0]) == [("a", 1), ("b", 2), ("c", 1)]
    assert _last_of_each_key(rows[:2], lambda row: row[0]) == rows[:2]
    assert Page(b"[1],[2]", 2).rows == 2
