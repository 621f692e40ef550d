"""The Redis snapshot: codec, publish/read, version switching and cleanup, the engine-side holder.

Runs against the real Redis (``redis_url``), every test under its own ``key_prefix``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import marshal
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from engine.model import (
    ENTITY_TYPES,
    Account,
    AccountKind,
    BlockedCode,
    CallerId,
    CatalogData,
    CliPool,
    Did,
    DidDestinationType,
    ForcedCallerId,
    Gateway,
    IpMapEntry,
    Localization,
    OriginationRate,
    RateGroup,
    RoutingType,
    SipDevice,
    SpeedDial,
    TerminationRate,
    Trunk,
)
from engine.rules.packed import record_codec
from engine.state import keys, snapshot
from engine.state.codec import (
    CodecError,
    decode_entity,
    decode_joined,
    decode_joined_records,
    decode_many,
    encode_entity,
    schema,
)
from engine.state.snapshot import (
    DuplicateEntityKey,
    SchemaMismatch,
    SnapshotStamp,
    SnapshotSuperseded,
    SnapshotUnavailable,
    apply_changes,
    current_stamp,
    current_version,
    delete_prefix,
    entity_key,
    fetch_snapshot,
    publish_snapshot,
    read_snapshot,
)
from engine.state.watcher import SnapshotHolder
from tests.private_redis import PrivateRedis, private_redis_fixture, quick_client  # noqa: F401
from tests.support import wait_until

T0 = datetime(2025, 1, 31, 23, 59, 59, 123456, tzinfo=UTC)

# --- samples --------------------------------------------------------------------------------

SAMPLES: dict[str, Any] = {
    "accounts": Account(
        id=2**53 + 1,
        number="1001",
        kind=AccountKind.RESELLER,
        reseller_id=None,
        active=True,
        deleted=False,
        postpaid=True,
        balance=Decimal("-0.00"),
        credit_limit=Decimal("1E+3"),
        rate_group_id=7,
        expiry=T0,
        first_used=datetime(1970, 1, 1, tzinfo=UTC),
        valid_days=None,
        expiry_from_first_use=True,
        non_cli_rate_group_id=None,
        cli_pool=CliPool.REJECT_UNLESS_IN_EITHER,
        localization_id=0,
        local_calls_allowed=False,
        local_call_cost_per_minute=Decimal("123456789012345678901234.567890123"),
        max_channels=0,
        cps=-1,
        codecs='PCMA,"G729"\n\\ ünïcødé ☎',
    ),
    "sip_devices": SipDevice(
        id=1,
        account_id=2,
        username="alice@example.com",
        active=False,
        codecs="",
        a1_hash='p<&>"\n ☎',
        caller_id_name="Ann ünïcødé",
        caller_id_number="",
        context="public",
    ),
    "ip_map": IpMapEntry(id=3, account_id=2, cidr="2001:db8::/32", tech_prefix="#99", active=True),
    "caller_ids": CallerId(id=4, account_id=2, number="+441234", active=False),
    "forced_caller_ids": ForcedCallerId(account_id=2, number="", name="Ａ名前", active=True),
    "dids": Did(
        id=5,
        number="442079460000",
        account_id=None,
        destination_type=DidDestinationType.URI,
        destination="sip:x@y;transport=tcp",
        connect_cost=Decimal("0.10"),
        cost_per_minute=Decimal("1.100"),
        init_inc=60,
        inc=1,
    ),
    "speed_dials": SpeedDial(account_id=2, key="1:2", number="*97"),
    "blocked_codes": BlockedCode(account_id=2, prefix=""),
    "localizations": Localization(id=6, name="UK", number_originate="^0/44,^00/", cli_terminate="/"),
    "rate_groups": RateGroup(
        id=7,
        name="retail",
        markup_percent=Decimal("-12.5"),
        routing_type=RoutingType.COST,
        lossless=False,
        trunk_ids=(3, 1, 2),
    ),
    "origination_rates": OriginationRate(
        id=8,
        prefix="",
        cost_per_minute=Decimal("0.0000001"),
        account_id=2,
        forced_trunk_ids=(),
        description="Rest of world",
    ),
    "gateways": Gateway(
        id=9,
        name="gw-1",
        active=False,
        sip_profile="carriers",
        proxy="[2001:db8::1]:5061",
        username="u=t&",
        register=True,
        params=("expire-seconds=600", "ping=30"),
    ),
    "trunks": Trunk(
        id=10,
        name="carrier",
        provider_id=3,
        gateway_id=9,
        failover_gateway_ids=(11, 12),
        leg_timeout=30,
        localization_id=6,
    ),
    "termination_rates": TerminationRate(
        id=11, trunk_id=10, prefix="44", cost_per_minute=Decimal("0.0093"), strip="0", prepend="+"
    ),
}


def sample_catalog(tag: int = 0, rates: int = 3) -> CatalogData:
    """A small catalog with every entity type; ``tag`` makes catalogs differ."""

    def account(i: int) -> Account:
        return Account(
            id=i,
            number=f"{1000 + i}",
            kind=AccountKind.CUSTOMER,
            reseller_id=None,
            active=True,
            deleted=False,
            postpaid=False,
            balance=Decimal(f"{tag}.{i:02d}"),
            credit_limit=Decimal(0),
            rate_group_id=1,
        )

    return CatalogData(
        version=100 + tag,
        accounts=[account(i) for i in (1, 2, 3)],
        sip_devices=[SipDevice(id=1, account_id=1, username=f"u{tag}")],
        ip_map=[IpMapEntry(id=1, account_id=2, cidr="192.0.2.0/24")],
        caller_ids=[CallerId(id=1, account_id=1, number=f"1{tag}")],
        forced_caller_ids=[
            ForcedCallerId(account_id=1, number="555"),
            ForcedCallerId(account_id=3, number="7"),
        ],
        dids=[Did(id=1, number="4420", account_id=1)],
        speed_dials=[
            SpeedDial(account_id=1, key="1", number="100"),
            SpeedDial(account_id=1, key="2", number="2"),
        ],
        blocked_codes=[BlockedCode(account_id=1, prefix="900"), BlockedCode(account_id=2, prefix="900")],
        localizations=[Localization(id=1, name="l")],
        rate_groups=[RateGroup(id=1, name="rg", trunk_ids=(1,))],
        origination_rates=[
            OriginationRate(
                id=i, prefix=f"{i}", cost_per_minute=Decimal(tag) + Decimal(i) / 1000, rate_group_id=1
            )
            for i in range(1, rates + 1)
        ],
        gateways=[Gateway(id=1, name="gw")],
        trunks=[Trunk(id=1, name="t", provider_id=3, gateway_id=1)],
        termination_rates=[
            TerminationRate(id=i, trunk_id=1, prefix=f"{i}", cost_per_minute=Decimal(tag) + Decimal(i) / 1000)
            for i in range(1, rates + 1)
        ],
    )


def as_version(data: CatalogData, version: int) -> CatalogData:
    return dataclasses.replace(data, version=version)


def keys_of_version(client: redis.Redis, prefix: str, version: int) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}snapshot:{version}:*", count=1000))


def listed_versions(client: redis.Redis, prefix: str) -> list[int]:
    """The versions listed in the snapshot version index."""
    # without scores and on a client that does not decode, the members are bytes
    members = cast(list[bytes], client.zrange(f"{prefix}snapshot:versions", 0, -1))
    return [int(v) for v in members]


def next_message(pubsub: Any, timeout: float = 5.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            return message
    return None


# --- codec ----------------------------------------------------------------------------------


def test_samples_cover_every_entity_type() -> None:
    assert set(SAMPLES) == set(ENTITY_TYPES)
    assert all(type(SAMPLES[name]) is cls for name, cls in ENTITY_TYPES.items())


@pytest.mark.parametrize("name", list(ENTITY_TYPES))
def test_codec_round_trip(name: str) -> None:
    obj = SAMPLES[name]
    data = encode_entity(obj)
    back = decode_entity(type(obj), data)
    assert back == obj
    for f in dataclasses.fields(obj):  # exact: same types, Decimal exponents, tz, enum members
        a, b = getattr(obj, f.name), getattr(back, f.name)
        assert type(a) is type(b), f.name
        assert repr(a) == repr(b), f.name
    assert encode_entity(back) == data  # stable
    values = json.loads(data)
    assert data == json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode()  # compact
    assert isinstance(values, list) and len(values) == len(schema(type(obj)))
    assert decode_many(type(obj), [data, data]) == [obj, obj]


def test_codec_format() -> None:
    rate = TerminationRate(id=5, trunk_id=1, prefix="44", cost_per_minute=Decimal("0.0100"))
    assert encode_entity(rate) == b'[5,1,"44","0.0100","0",0,0,0,"","",0,true]'
    account = SAMPLES["accounts"]
    values = json.loads(encode_entity(account))
    assert values[2] == "reseller" and values[15] == 8 and values[3] is None
    assert values[10] == "2025-01-31T23:59:59.123456+00:00"


def test_codec_datetimes_are_utc() -> None:
    cest = timezone(timedelta(hours=2))
    account = dataclasses.replace(SAMPLES["accounts"], expiry=datetime(2025, 6, 1, 12, 0, tzinfo=cest))
    back = decode_entity(Account, encode_entity(account))
    assert back.expiry == account.expiry and back.expiry.tzinfo is UTC and back.expiry.hour == 10
    with pytest.raises(CodecError, match="naive"):
        encode_entity(dataclasses.replace(account, expiry=datetime(2025, 6, 1)))


def test_codec_rejects_bad_input() -> None:
    with pytest.raises(CodecError):
        encode_entity(object())
    with pytest.raises(CodecError):
        encode_entity(dataclasses.replace(SAMPLES["accounts"], kind="nonsense"))
    with pytest.raises(CodecError, match="expected 8 values"):
        decode_entity(Gateway, b'[1,"gw"]')
    good = encode_entity(SAMPLES["gateways"])
    with pytest.raises(CodecError, match="not json"):
        decode_many(Gateway, [good, b"not json", good])
    with pytest.raises(CodecError):
        decode_entity(Account, encode_entity(SAMPLES["accounts"]).replace(b'"reseller"', b'"alien"'))


def test_codec_reads_other_schemas() -> None:
    """Rows from a writer with another field layout decode by name: defaults fill, extras drop."""
    older = ("id", "trunk_id", "prefix", "cost_per_minute")  # a writer without the later fields
    rate = decode_entity(TerminationRate, b'[1,2,"44","0.5"]', older)
    assert rate == TerminationRate(id=1, trunk_id=2, prefix="44", cost_per_minute=Decimal("0.5"))
    newer = ("name", "id", "colour", "active")  # reordered, with an unknown field
    assert decode_entity(Gateway, b'["gw",9,"red",false]', newer) == Gateway(id=9, name="gw", active=False)
    with pytest.raises(CodecError, match="required field 'name'"):
        decode_entity(Gateway, b"[9]", ("id",))


def _records(cls: type, entities: list[Any]) -> list[tuple[Any, ...]]:
    """What the packed record codec makes of ``entities`` (the reference of the rows path)."""
    return [marshal.loads(record_codec(cls).encode(entity)) for entity in entities]


@pytest.mark.parametrize("name", list(ENTITY_TYPES))
def test_rows_decode_to_the_records_of_their_entities(name: str) -> None:
    """decode_joined_records (a full load's rows path) gives, row for row, the record tuple of
    the entity decode_joined gives: Decimals, datetimes, enums, tuples, optional fields."""
    obj = SAMPLES[name]
    cls = type(obj)
    variants = [obj]
    for f in dataclasses.fields(obj):  # every optional field also as None
        if getattr(obj, f.name) is not None and "None" in str(f.type):
            variants.append(dataclasses.replace(obj, **{f.name: None}))
    joined = b",".join(encode_entity(v) for v in variants)
    entities = decode_joined(cls, joined, len(variants))
    records = decode_joined_records(cls, joined, len(variants))
    assert records == _records(cls, entities)
    assert [record_codec(cls).decode(marshal.dumps(r)) for r in records] == variants
    # written with the fields in another order plus an unknown one (a newer writer)
    names = list(schema(cls))
    shuffled = [*reversed(names), "colour"]
    rows = []
    for variant in variants:
        values = dict(zip(names, json.loads(encode_entity(variant)), strict=True), colour="red")
        rows.append(json.dumps([values[n] for n in shuffled]).encode())
    joined = b",".join(rows)
    stored = tuple(shuffled)
    assert decode_joined_records(cls, joined, len(rows), stored) == _records(
        cls, decode_joined(cls, joined, len(rows), stored)
    )


def test_rows_of_an_older_writer_decode_to_records_with_the_defaults() -> None:
    older = ("id", "trunk_id", "prefix", "cost_per_minute")
    joined = b'[1,2,"44","0.50"],[2,2,"4",1.5E+1]'
    entities = decode_joined(TerminationRate, joined, 2, older)
    assert entities[0] == TerminationRate(id=1, trunk_id=2, prefix="44", cost_per_minute=Decimal("0.50"))
    assert decode_joined_records(TerminationRate, joined, 2, older) == _records(TerminationRate, entities)


def test_a_bad_row_fails_the_records_path_as_the_entity_path() -> None:
    good = encode_entity(SAMPLES["accounts"])
    for bad in (
        good.replace(b'"reseller"', b'"alien"'),
        b"[1,2]",
        b"not json",
        good.replace(b'"2025-', b'"x'),
    ):
        joined = b",".join([good, bad, good])
        with pytest.raises(CodecError) as from_entities:
            decode_joined(Account, joined, 3)
        with pytest.raises(CodecError) as from_records:
            decode_joined_records(Account, joined, 3)
        assert str(from_records.value) == str(from_entities.value)


def test_a_snapshot_decodes_its_large_types_as_records(client: redis.Redis, key_prefix: str) -> None:
    data = CatalogData(accounts=[SAMPLES["accounts"]], termination_rates=[SAMPLES["termination_rates"]])
    publish_snapshot(client, key_prefix, data)
    raw = fetch_snapshot(client, key_prefix)
    split = raw.decode(["accounts", "termination_rates"])
    assert split.accounts == [] and split.termination_rates == []
    assert list(split.records["accounts"]) == _records(Account, [SAMPLES["accounts"]])
    assert list(split.records["termination_rates"]) == _records(
        TerminationRate, [SAMPLES["termination_rates"]]
    )
    assert list(split.records["accounts"]) == _records(Account, [SAMPLES["accounts"]])  # iterable again
    assert raw.decode().records == {}


# --- publish / read -------------------------------------------------------------------------


def test_publish_then_read(client: redis.Redis, key_prefix: str) -> None:
    with pytest.raises(SnapshotUnavailable):
        read_snapshot(client, key_prefix)
    assert current_version(client, key_prefix) is None
    data = sample_catalog(1)
    data.termination_rates.append(SAMPLES["termination_rates"])
    data.accounts.append(SAMPLES["accounts"])
    version = publish_snapshot(client, key_prefix, data, batch_size=2)
    assert current_version(client, key_prefix) == version
    back = read_snapshot(client, key_prefix, scan_count=1)
    assert back.version == version
    expected = as_version(data, version)
    expected.accounts.sort(key=lambda a: a.id)
    assert back == expected
    meta = client.hgetall(f"{key_prefix}snapshot:{version}:meta")
    assert meta[b"count:accounts"] == b"4" and meta[b"source_version"] == b"101"
    assert meta[b"schema:gateways"] == b"id,name,active,sip_profile,proxy,username,register,params"
    for name in ENTITY_TYPES:
        assert client.hlen(f"{key_prefix}snapshot:{version}:{name}") == len(getattr(data, name))
    assert client.hget(f"{key_prefix}snapshot:{version}:speed_dials", "1:2") is not None
    assert client.hget(f"{key_prefix}snapshot:{version}:blocked_codes", "2:900") is not None
    assert client.hget(f"{key_prefix}snapshot:{version}:forced_caller_ids", "3") is not None


def test_read_with_decoding_client(redis_url: str, client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, sample_catalog(2))
    text_client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert read_snapshot(text_client, key_prefix) == as_version(sample_catalog(2), version)
    finally:
        text_client.close()


def test_entity_keys() -> None:
    assert entity_key(SAMPLES["accounts"]) == str(2**53 + 1)
    assert entity_key(SAMPLES["forced_caller_ids"]) == "2"
    assert entity_key(SAMPLES["speed_dials"]) == "2:1:2"
    assert entity_key(SAMPLES["blocked_codes"]) == "2:"
    assert entity_key(SAMPLES["termination_rates"]) == "11"


def test_duplicate_keys(client: redis.Redis, key_prefix: str) -> None:
    data = sample_catalog()
    data.blocked_codes.append(BlockedCode(account_id=1, prefix="900"))  # exact duplicate: dropped
    version = publish_snapshot(client, key_prefix, data)
    assert read_snapshot(client, key_prefix).blocked_codes == sample_catalog().blocked_codes
    data.speed_dials.append(SpeedDial(account_id=1, key="1", number="999"))  # conflicting
    with pytest.raises(DuplicateEntityKey, match="speed_dials"):
        publish_snapshot(client, key_prefix, data)
    assert current_version(client, key_prefix) == version
    assert client.get(f"{key_prefix}snapshot:next_version") == str(version).encode()  # nothing written


def test_pointer_only_moves_forward(client: redis.Redis, key_prefix: str, monkeypatch: Any) -> None:
    """A slow publisher that loses the race to a newer version is refused and removes its keys."""
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    paused, release = threading.Event(), threading.Event()
    real_write_meta = snapshot._write_meta
    outcome: list[Any] = []

    def slow_write_meta(*args: Any) -> str:
        if threading.current_thread().name == "slow":
            paused.set()
            release.wait(10)
        return real_write_meta(*args)

    def slow_publish() -> None:
        try:
            outcome.append(publish_snapshot(client, key_prefix, sample_catalog(2), grace_seconds=0))
        except Exception as exc:
            outcome.append(exc)

    monkeypatch.setattr(snapshot, "_write_meta", slow_write_meta)
    slow = threading.Thread(target=slow_publish, name="slow")
    slow.start()
    assert paused.wait(10)
    slow_version = v1 + 1
    assert keys_of_version(client, key_prefix, slow_version)  # being written
    v3 = publish_snapshot(client, key_prefix, sample_catalog(3), grace_seconds=0)
    assert v3 == slow_version + 1
    assert keys_of_version(client, key_prefix, slow_version)  # leased: cleanup left it alone
    release.set()
    slow.join(10)
    assert isinstance(outcome[0], SnapshotSuperseded)
    assert current_version(client, key_prefix) == v3
    assert read_snapshot(client, key_prefix) == as_version(sample_catalog(3), v3)
    assert keys_of_version(client, key_prefix, slow_version) == []
    with pytest.raises(SnapshotSuperseded):  # switching back to an old version is refused
        snapshot._switch(client, key_prefix, v1, "token", {})
    assert current_version(client, key_prefix) == v3


def test_orphaned_partial_version_is_cleaned_up(
    client: redis.Redis, key_prefix: str, monkeypatch: Any
) -> None:
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))

    def crash(*args: Any) -> str:
        raise redis.ConnectionError("simulated crash after the data, before the meta")

    monkeypatch.setattr(snapshot, "_write_meta", crash)
    with pytest.raises(redis.ConnectionError):
        publish_snapshot(client, key_prefix, sample_catalog(2, rates=50), batch_size=7)
    monkeypatch.undo()
    orphan = v1 + 1
    assert client.hlen(f"{key_prefix}snapshot:{orphan}:termination_rates") == 50
    assert current_version(client, key_prefix) == v1
    assert read_snapshot(client, key_prefix) == as_version(sample_catalog(1), v1)

    v3 = publish_snapshot(client, key_prefix, sample_catalog(3))
    assert keys_of_version(client, key_prefix, orphan)  # its writer lease has not expired yet
    client.delete(f"{key_prefix}snapshot:{orphan}:writer")  # ... now it has
    v4 = publish_snapshot(client, key_prefix, sample_catalog(4))
    assert keys_of_version(client, key_prefix, orphan) == []
    remaining = set(listed_versions(client, key_prefix))
    assert remaining == {v1, v3, v4}  # v1 is still within the grace period


def test_failed_publish_removes_its_own_version(client: redis.Redis, key_prefix: str) -> None:
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    bad = sample_catalog(2)
    bad.accounts.append(dataclasses.replace(bad.accounts[0], id=99, expiry=datetime(2030, 1, 1)))  # naive
    with pytest.raises(CodecError):
        publish_snapshot(client, key_prefix, bad)
    assert keys_of_version(client, key_prefix, v1 + 1) == []
    assert set(listed_versions(client, key_prefix)) == {v1}


@pytest.mark.parametrize("keep_previous", [0, 1, 2])
def test_old_versions_deleted_except_previous(
    client: redis.Redis, key_prefix: str, keep_previous: int
) -> None:
    versions = [
        publish_snapshot(client, key_prefix, sample_catalog(i), keep_previous=keep_previous, grace_seconds=0)
        for i in range(5)
    ]
    kept = versions[len(versions) - 1 - keep_previous :]
    for v in versions:
        assert bool(keys_of_version(client, key_prefix, v)) == (v in kept), v
    assert sorted(listed_versions(client, key_prefix)) == kept


def test_grace_period_keeps_recently_superseded_versions(client: redis.Redis, key_prefix: str) -> None:
    versions = [publish_snapshot(client, key_prefix, sample_catalog(i), grace_seconds=60) for i in range(4)]
    assert all(keys_of_version(client, key_prefix, v) for v in versions)
    publish_snapshot(client, key_prefix, sample_catalog(9), grace_seconds=0)
    assert [v for v in versions if keys_of_version(client, key_prefix, v)] == versions[-1:]


# --- consistency: a read never mixes versions -----------------------------------------------


def _publish_in_thread(client: redis.Redis, prefix: str, data: CatalogData, **kwargs: Any) -> int:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(publish_snapshot(client, prefix, data, **kwargs)))
    thread.start()
    thread.join(30)
    return result[0]


def test_read_retries_when_a_new_version_is_published_meanwhile(client: redis.Redis, key_prefix: str) -> None:
    v1_data, v2_data = sample_catalog(1, rates=500), sample_catalog(2, rates=500)
    v1 = publish_snapshot(client, key_prefix, v1_data)
    seen: list[tuple[int, int]] = []
    published: list[int] = []

    def on_round(version: int, rows: int) -> None:
        seen.append((version, rows))
        if not published:  # mid-way through v1, publish v2 concurrently
            published.append(_publish_in_thread(client, key_prefix, v2_data))

    raw = fetch_snapshot(client, key_prefix, scan_count=50, on_round=on_round)
    v2 = published[0]
    assert {v for v, _ in seen} == {v1, v2}
    assert raw.version == v2 and raw.confirmed_at is not None
    assert raw.decode() == as_version(v2_data, v2)  # exactly v2, nothing of v1


def test_read_retries_when_its_version_vanishes(client: redis.Redis, key_prefix: str) -> None:
    publish_snapshot(client, key_prefix, sample_catalog(1, rates=500))
    published: list[int] = []

    def on_round(version: int, rows: int) -> None:
        if not published:  # two publishes without grace delete the version being read
            for tag in (2, 3):
                published.append(
                    _publish_in_thread(client, key_prefix, sample_catalog(tag, rates=500), grace_seconds=0)
                )

    data = fetch_snapshot(client, key_prefix, on_round=on_round).decode()
    assert data == as_version(sample_catalog(3, rates=500), published[-1])


def test_read_gives_up_after_one_retry(client: redis.Redis, key_prefix: str) -> None:
    publish_snapshot(client, key_prefix, sample_catalog(1, rates=200))
    tags = iter(range(2, 100))
    triggered: set[int] = set()

    def on_round(version: int, rows: int) -> None:
        if rows >= 100 and version not in triggered:  # each attempt: its version vanishes midway
            triggered.add(version)
            for _ in range(2):
                data = sample_catalog(next(tags), rates=200)
                _publish_in_thread(client, key_prefix, data, keep_previous=0, grace_seconds=0)

    with pytest.raises(SnapshotUnavailable, match="vanished"):
        fetch_snapshot(client, key_prefix, scan_count=20, on_round=on_round)


def test_concurrent_reads_see_whole_versions(client: redis.Redis, redis_url: str, key_prefix: str) -> None:
    """A publisher thread races a reader thread; every read is exactly one published catalog."""
    catalogs = {tag: sample_catalog(tag, rates=300) for tag in range(1, 9)}
    publish_snapshot(client, key_prefix, catalogs[1], batch_size=25)
    stop = threading.Event()
    reads: list[CatalogData] = []
    errors: list[BaseException] = []

    def reader() -> None:
        c = redis.Redis.from_url(redis_url)
        try:
            while not stop.is_set():
                with contextlib.suppress(SnapshotUnavailable):  # outrun twice: allowed, unlike a mix
                    reads.append(read_snapshot(c, key_prefix, scan_count=30))
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    thread = threading.Thread(target=reader)
    thread.start()
    versions = {}
    for tag in range(2, 9):
        versions[publish_snapshot(client, key_prefix, catalogs[tag], batch_size=25, grace_seconds=0)] = tag
        time.sleep(0.01)
    stop.set()
    thread.join(30)
    assert not errors
    for data in reads:
        tag = versions.get(data.version, 1)
        assert data == as_version(catalogs[tag], data.version)
    assert reads


# --- single-entity changes ------------------------------------------------------------------


def test_apply_changes(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, sample_catalog(1))
    before = current_stamp(client, key_prefix)
    assert before is not None and before.changes == 0
    pubsub = client.pubsub()
    pubsub.subscribe(keys.snapshot_events_channel(key_prefix))
    try:
        account = dataclasses.replace(sample_catalog(1).accounts[1], balance=Decimal("-5.5"))
        new_dial = SpeedDial(account_id=3, key="9", number="911")
        changes = apply_changes(
            client,
            key_prefix,
            version,
            upserts=[account, new_dial],
            deletes=[("blocked_codes", "1:900"), ("termination_rates", "2")],
        )
        assert changes == 1
        message = next_message(pubsub)
    finally:
        pubsub.close()
    assert message is not None
    event = json.loads(message["data"])
    assert event == {
        "type": "changes",
        "version": version,
        "changes": 1,
        "upserts": {"accounts": ["2"], "speed_dials": ["3:9"]},
        "deletes": {"blocked_codes": ["1:900"], "termination_rates": ["2"]},
    }
    after = current_stamp(client, key_prefix)
    assert after == SnapshotStamp(version, before.token, 1)
    data = read_snapshot(client, key_prefix)
    expected = as_version(sample_catalog(1), version)
    expected.accounts[1] = account
    expected.speed_dials.append(new_dial)
    expected.blocked_codes = [BlockedCode(account_id=2, prefix="900")]
    expected.termination_rates = [r for r in expected.termination_rates if r.id != 2]
    assert data == expected
    assert apply_changes(client, key_prefix, version, [SAMPLES["gateways"]], []) == 2
    assert read_snapshot(client, key_prefix).gateways == [Gateway(id=1, name="gw"), SAMPLES["gateways"]]
    assert apply_changes(client, key_prefix, version, [], []) == 2  # nothing to do: no new change
    # keys given as ints are accepted too (deliberately not the annotated str)
    assert apply_changes(client, key_prefix, version, [], [("gateways", 9)]) == 3  # type: ignore[list-item]
    assert read_snapshot(client, key_prefix).gateways == [Gateway(id=1, name="gw")]


def test_apply_changes_refusals(client: redis.Redis, key_prefix: str) -> None:
    with pytest.raises(SnapshotSuperseded):
        apply_changes(client, key_prefix, 1, [SAMPLES["gateways"]], [])
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    v2 = publish_snapshot(client, key_prefix, sample_catalog(2))
    with pytest.raises(SnapshotSuperseded):
        apply_changes(client, key_prefix, v1, [SAMPLES["gateways"]], [])
    with pytest.raises(ValueError, match="both"):
        apply_changes(client, key_prefix, v2, [SAMPLES["gateways"]], [("gateways", "9")])
    with pytest.raises(ValueError, match="unknown entity"):
        apply_changes(client, key_prefix, v2, [], [("nope", "1")])
    client.hset(f"{key_prefix}snapshot:{v2}:meta", "schema:gateways", "id,name")
    with pytest.raises(SchemaMismatch):
        apply_changes(client, key_prefix, v2, [SAMPLES["gateways"]], [])
    client.hset(f"{key_prefix}snapshot:{v2}:meta", "schema:gateways", ",".join(schema(Gateway)))
    assert read_snapshot(client, key_prefix) == as_version(sample_catalog(2), v2)  # nothing applied


# --- the engine-side holder -----------------------------------------------------------------


class Built:
    """Stands in for the rules' Catalog."""

    def __init__(self, data: CatalogData) -> None:
        self.data = data


@pytest.fixture
def run_holder() -> Iterator[Callable[..., SnapshotHolder[Built]]]:
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def start(holder: SnapshotHolder[Built], interval: float) -> SnapshotHolder[Built]:
        stop = threading.Event()
        thread = threading.Thread(target=holder.run, args=(stop, interval), daemon=True)
        thread.start()
        stops.append((stop, thread))
        return holder

    yield start
    for stop, thread in stops:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()


def test_holder_refresh(client: redis.Redis, key_prefix: str) -> None:
    holder = SnapshotHolder(client, key_prefix, Built)
    with pytest.raises(SnapshotUnavailable):
        holder.current  # noqa: B018
    with pytest.raises(SnapshotUnavailable):
        holder.refresh()
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    assert holder.refresh() is True
    version, built = holder.current
    assert version == v1 and built.data == as_version(sample_catalog(1), v1)
    assert holder.loaded_at is not None and holder.last_confirmed is not None
    confirmed = holder.last_confirmed
    assert holder.refresh() is False
    assert holder.last_confirmed > confirmed and holder.confirmed_age() < 5
    assert holder.current[1] is built  # no reload, same object
    apply_changes(client, key_prefix, v1, [SAMPLES["gateways"]], [])
    assert holder.refresh() is True
    assert holder.current[1] is not built and SAMPLES["gateways"] in holder.current[1].data.gateways


def test_holder_follows_pubsub(client: redis.Redis, key_prefix: str, run_holder: Any) -> None:
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    holder = run_holder(SnapshotHolder(client, key_prefix, Built), interval=3600)  # no polling
    wait_until(lambda: holder.loaded)
    assert holder.current[0] == v1  # subscribed: it subscribes, then checks
    v2 = publish_snapshot(client, key_prefix, sample_catalog(2))
    wait_until(lambda: holder.current[0] == v2)
    assert holder.current[1].data == as_version(sample_catalog(2), v2)
    apply_changes(client, key_prefix, v2, [SAMPLES["gateways"]], [])
    wait_until(lambda: holder.stamp is not None and holder.stamp.changes == 1)


def test_holder_polls_when_events_are_missed(client: redis.Redis, key_prefix: str, run_holder: Any) -> None:
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    holder = run_holder(SnapshotHolder(client, key_prefix, Built, subscribe=False), interval=0.2)
    wait_until(lambda: holder.loaded and holder.current[0] == v1)
    v2 = publish_snapshot(client, key_prefix, sample_catalog(2))
    wait_until(lambda: holder.current[0] == v2)
    confirmed = holder.last_confirmed
    wait_until(lambda: holder.last_confirmed is not None and holder.last_confirmed > confirmed)


@pytest.fixture
def named_client(redis_url: str, key_prefix: str) -> Iterator[tuple[str, redis.Redis]]:
    name = f"cgtest-holder-{key_prefix.replace(':', '-')}"
    c = redis.Redis.from_url(redis_url, client_name=name)
    yield name, c
    c.close()


def test_holder_recovers_lost_subscription(
    named_client: tuple[str, redis.Redis], client: redis.Redis, key_prefix: str, run_holder: Any
) -> None:
    """The subscription connection is killed and the event sent meanwhile is lost: reconnect + check."""
    name, holder_client = named_client
    publish_snapshot(client, key_prefix, sample_catalog(1))
    holder = SnapshotHolder(holder_client, key_prefix, Built, backoff_initial=0.05)
    run_holder(holder, interval=3600)
    wait_until(lambda: holder.loaded)

    def subscriber_ids() -> list[str]:
        return [c["id"] for c in client.client_list(_type="pubsub") if c.get("name") == name]

    wait_until(lambda: bool(subscriber_ids()))
    for client_id in subscriber_ids():
        client.client_kill_filter(_id=client_id)
    v2 = publish_snapshot(client, key_prefix, sample_catalog(2))
    wait_until(lambda: holder.current[0] == v2)
    wait_until(lambda: holder.failures == 0)


def test_holder_keeps_old_catalog_while_failing(
    client: redis.Redis, key_prefix: str, run_holder: Any, caplog: Any
) -> None:
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    broken = threading.Event()
    builds: list[int] = []

    def build(data: CatalogData) -> Built:
        builds.append(data.version)
        if broken.is_set():
            raise RuntimeError("rules refused the catalog")
        return Built(data)

    holder = SnapshotHolder(
        client, key_prefix, build, subscribe=False, backoff_initial=0.02, backoff_max=0.05
    )
    holder.refresh()
    broken.set()
    caplog.set_level(logging.DEBUG, logger="engine.state.watcher")
    run_holder(holder, interval=0.05)
    publish_snapshot(client, key_prefix, sample_catalog(2))
    wait_until(lambda: holder.failures >= 3)
    assert holder.current[0] == v1  # still deciding from the old one
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "watch failed" in warnings[0].getMessage()
    broken.clear()
    wait_until(lambda: holder.current[0] == v1 + 1 and holder.failures == 0)


def test_held_snapshot_serves_while_its_successor_loads(client: redis.Redis, key_prefix: str) -> None:
    """A full switch (here a new version whose build takes long, as a million rates do) keeps
    the held version deciding under engine.snapshot_switch_max_age instead of the 5 s bound;
    a failed load ends the grace at once, and the first load of a process has none."""
    from engine.decider import snapshot_distrust

    entered, release, fail = threading.Event(), threading.Event(), threading.Event()

    def build(data: CatalogData) -> Built:
        if data.version > v1:
            entered.set()
            release.wait(10)
            if fail.is_set():
                raise RuntimeError("the new deck does not build")
        return Built(data)

    holder = SnapshotHolder(client, key_prefix, build, subscribe=False)
    v1 = publish_snapshot(client, key_prefix, sample_catalog(1))
    holder.refresh()
    assert holder.switching_since is None  # the first load is no switch
    for attempt in ("fails", "succeeds"):
        entered.clear()
        release.clear()
        if attempt == "fails":
            fail.set()
        else:
            fail.clear()
        publish_snapshot(client, key_prefix, sample_catalog(2 if attempt == "fails" else 3))
        errors: list[BaseException] = []

        def refresh(errors: list[BaseException] = errors) -> None:
            try:
                holder.refresh()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=refresh)
        thread.start()
        assert entered.wait(10)
        assert holder.switching_since is not None and holder.current[0] == v1
        time.sleep(0.05)
        assert holder.confirmed_age() > 0.01
        assert snapshot_distrust(holder, 0.01, 600.0) is None  # the held version still decides
        unconfirmed = snapshot_distrust(holder, 0.01, 0.02)  # past the switch bound as well
        assert unconfirmed is not None and unconfirmed.startswith("snapshot unconfirmed for ")
        release.set()
        thread.join(10)
        assert holder.switching_since is None
        if attempt == "fails":
            assert len(errors) == 1 and holder.current[0] == v1
            assert snapshot_distrust(holder, 0.01, 600.0) is not None  # grace over: fail closed
        else:
            assert not errors and holder.current[0] > v1
            assert snapshot_distrust(holder, 5.0, 600.0) is None


def test_holder_recovers_within_a_second_of_redis_coming_back(
    private_redis: PrivateRedis, run_holder: Any
) -> None:
    """Issue 14 item 3: however far the retry backoff has grown during an outage, the
    holder confirms its snapshot again about one probe interval after Redis answers."""
    client = quick_client(private_redis.port)
    publish_snapshot(client, "cg:", sample_catalog(1))
    # A backoff long enough that waiting it out would fail this test by far.
    holder = SnapshotHolder(client, "cg:", Built, backoff_initial=60.0, backoff_max=60.0)
    run_holder(holder, interval=0.2)
    wait_until(lambda: holder.loaded and holder.confirmed_age() < 1)
    private_redis.stop()
    wait_until(lambda: holder.failures >= 1)  # it has entered its 60 s backoff
    time.sleep(0.5)
    private_redis.start()
    back = time.monotonic()
    wait_until(lambda: holder.last_confirmed is not None and holder.last_confirmed > back, timeout=20)
    assert holder.last_confirmed is not None
    recovered_after = holder.last_confirmed - back
    print(f"snapshot confirmed again {recovered_after:.3f} s after Redis answered")  # shown with -s
    assert recovered_after < 3.0  # about one probe interval (0.25 s); generous for a loaded machine
    wait_until(lambda: holder.failures == 0)
    client.close()


def test_holder_backoff_still_holds_while_redis_answers(client: redis.Redis, key_prefix: str) -> None:
    """A load that fails while Redis answers is not retried in a tight loop: the probe only
    cuts the wait short when Redis was unreachable and answers again."""
    publish_snapshot(client, key_prefix, sample_catalog(1))
    builds: list[float] = []

    def failing_build(data: CatalogData) -> Built:
        builds.append(time.monotonic())
        raise RuntimeError("rules refused the catalog")

    holder = SnapshotHolder(
        client, key_prefix, failing_build, subscribe=False, backoff_initial=1.0, backoff_max=1.0,
        probe_interval=0.05,
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=holder.run, args=(stop, 0.05), daemon=True)
    thread.start()
    time.sleep(2.5)
    stop.set()
    thread.join(10)
    assert 2 <= len(builds) <= 4  # one per backoff (0.8-1.2 s), not one per probe (50 ms)


# --- volume ---------------------------------------------------------------------------------


def test_200k_rates(client: redis.Redis, key_prefix: str) -> None:
    n = 200_000
    data = sample_catalog(1)
    data.termination_rates = [
        TerminationRate(
            id=i,
            trunk_id=1 + i % 7,
            prefix=f"{44_000_000 + i}",
            cost_per_minute=Decimal(i % 1000) / 10000,
            init_inc=1,
            inc=1,
        )
        for i in range(1, n + 1)
    ]
    started = time.perf_counter()
    version = publish_snapshot(client, key_prefix, data)
    published = time.perf_counter()
    raw = fetch_snapshot(client, key_prefix)
    fetched = time.perf_counter()
    back = raw.decode()
    decoded = time.perf_counter()
    size = client.memory_usage(f"{key_prefix}snapshot:{version}:termination_rates")
    assert size is not None  # the hash exists
    print(
        f"\n{n} rates: publish {published - started:.2f}s, fetch {fetched - published:.2f}s, "
        f"decode {decoded - fetched:.2f}s, Redis hash {size / 1e6:.1f} MB"
    )
    assert back == as_version(data, version)


HUB_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys, time
from decimal import Decimal
import gevent, gevent.event, redis
from engine.model import CatalogData, TerminationRate
from engine.state.snapshot import publish_snapshot
from engine.state.watcher import SnapshotHolder

url, prefix = sys.argv[1], sys.argv[2]
client = redis.Redis.from_url(url)
rates = [
    TerminationRate(id=i, trunk_id=1, prefix=str(44_000_000 + i), cost_per_minute=Decimal(i % 997) / 1000)
    for i in range(1, 150_001)
]
publish_snapshot(client, prefix, CatalogData(termination_rates=rates))

def build(data):
    return {r.prefix: r for r in data.termination_rates}  # some CPU work, like Catalog.build

gaps = []
def ticker(stop):
    last = time.monotonic()
    while not stop.is_set():
        gevent.sleep(0.005)
        now = time.monotonic()
        gaps.append(now - last)
        last = now

stop = gevent.event.Event()
tick = gevent.spawn(ticker, stop)
holder = SnapshotHolder(client, prefix, build)
runner = gevent.spawn(holder.run, stop, 60)
started = time.monotonic()
while not holder.loaded:
    gevent.sleep(0.01)
took = time.monotonic() - started
stop.set()
gevent.joinall([tick, runner], timeout=5)
print(f"{took:.3f} {max(gaps):.3f}")
"""


def test_reload_does_not_block_the_gevent_hub(redis_url: str, key_prefix: str) -> None:
    """Under monkey-patching, decode+build run in the thread pool: the hub keeps ticking."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HUB_SCRIPT), redis_url, key_prefix],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    took, max_gap = map(float, result.stdout.split())
    print(f"\nreload of 150k rates under gevent: {took:.2f}s, longest hub stall {max_gap * 1000:.0f} ms")
    assert max_gap < max(0.25, took / 3)


def test_delete_prefix_removes_exactly_the_keys_under_it(client: redis.Redis, key_prefix: str) -> None:
    inside = [f"{key_prefix}k{n}" for n in range(2500)]  # more than one batch
    for start in range(0, len(inside), 500):
        client.mset({key: "1" for key in inside[start : start + 500]})
    neighbour = key_prefix.rstrip(":") + "-other:k"  # shares the text but not the prefix
    client.set(neighbour, "1")
    try:
        assert delete_prefix(client, key_prefix) == len(inside)
        assert not list(client.scan_iter(match=f"{key_prefix}*"))
        assert client.get(neighbour) == b"1"
        assert delete_prefix(client, key_prefix) == 0
    finally:
        client.delete(neighbour)


def test_redis_key_names_are_built_only_in_engine_state_keys() -> None:
    """One source of truth for Redis names: no engine module but engine/state/keys.py
    formats a key from the prefix."""
    engine = Path(__file__).resolve().parent.parent / "engine"
    pattern = re.compile(r"""f["']\{(?:self\.)?_?prefix\}[A-Za-z]""")
    offenders = [
        f"{path.relative_to(engine)}:{n}"
        for path in engine.rglob("*.py")
        if path != engine / "state" / "keys.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
