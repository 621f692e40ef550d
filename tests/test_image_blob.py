"""Catalogue images published through Redis (engine.state.imageblob), with real Redis.

The producer builds the current version's image and stores it in chunks; an engine's holder
without a local image fetches, checks and serves it, or, for every failure mode of the
fetch, loads the rows as before (docs/sync.md, "Catalogue images in Redis").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import engine.model
import engine.rules
import engine.state.watcher as watcher
from engine.model import Account, AccountKind, CatalogData, OriginationRate, RateGroup, SipDevice
from engine.rules.catalog import Catalog
from engine.state.image import ImageStore, code_fingerprint
from engine.state.imageblob import blob_chunks, publish_current, read_manifest
from engine.state.keys import image_blob_key, meta_key
from engine.state.snapshot import current_stamp, publish_snapshot
from engine.state.watcher import SnapshotHolder
from tests.private_redis import PrivateRedis, private_redis_fixture  # noqa: F401

FINGERPRINT = code_fingerprint([engine.model, engine.rules])
CHUNK = 4096  # small chunks: a test image of ~100 KB has dozens


def data(balance: int = 1) -> CatalogData:
    accounts = [
        Account(
            i, f"{1000 + i}", AccountKind.CUSTOMER, None, True, False, False, Decimal(balance), Decimal(0), 1
        )
        for i in range(1, 400)
    ]
    return CatalogData(
        version=1,
        accounts=accounts,
        sip_devices=[SipDevice(i, i, f"dev{i}") for i in range(1, 400)],
        rate_groups=[RateGroup(1, "retail")],
        origination_rates=[OriginationRate(i, str(i), Decimal("0.01"), rate_group_id=1) for i in range(400)],
    )


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    # No retries: a connection killed mid-fetch is a failure, as a Redis restart would be.
    client = redis.Redis.from_url(redis_url, socket_timeout=30, retry=Retry(NoBackoff(), 0))
    yield client
    client.close()


def produce(client: redis.Redis, prefix: str, fingerprint: str = FINGERPRINT, **kwargs: Any) -> Any:
    result = publish_current(
        client, prefix, Catalog.build, ImageStore(None, prefix, fingerprint), chunk_bytes=CHUNK, **kwargs
    )
    assert result is not None
    return result


def holder(client: redis.Redis, prefix: str, directory: Path | None = None) -> SnapshotHolder[Catalog]:
    images = ImageStore(directory, prefix, FINGERPRINT)
    return SnapshotHolder(client, prefix, Catalog.build, subscribe=False, images=images, image_blobs=True)


def mapped(catalog: Catalog) -> bool:
    """Served from an image (views of a buffer or a mapping), not built from decoded rows."""
    return isinstance(catalog.accounts._records, memoryview)


def same(a: Catalog, b: Catalog) -> bool:
    return a.accounts == b.accounts and a.devices == b.devices and a.group_rates == b.group_rates


def rows_built(client: redis.Redis, prefix: str) -> Catalog:
    plain = SnapshotHolder(client, prefix, Catalog.build, subscribe=False)
    plain.refresh()
    return plain.current[1]


def test_a_new_host_starts_from_the_published_image(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, data())
    result = produce(client, key_prefix)
    assert result.published and result.stamp.version == version and result.chunks > 10
    assert client.hlen(image_blob_key(key_prefix, version)) == result.chunks + 1  # chunks + manifest
    engine_holder = holder(client, key_prefix)  # no image directory: read from memory
    assert engine_holder.refresh() is True
    catalog = engine_holder.current[1]
    assert mapped(catalog) and engine_holder.blob_fetches == 1 and engine_holder.blob_failures == 0
    assert same(catalog, rows_built(client, key_prefix))
    assert engine_holder.stamp == current_stamp(client, key_prefix) and engine_holder.confirmed_age() < 5
    again = produce(client, key_prefix)  # the producer run twice: nothing built again
    assert not again.published and again.size == result.size


def test_the_fetched_image_is_written_for_the_hosts_other_processes(
    client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    publish_snapshot(client, key_prefix, data())
    produce(client, key_prefix)
    first = holder(client, key_prefix, tmp_path)
    assert first.refresh() and first.blob_fetches == 1 and mapped(first.current[1])
    assert len(list(tmp_path.glob("*.img"))) == 1
    second = holder(client, key_prefix, tmp_path)  # another process of the host: maps the file
    assert second.refresh() and second.blob_fetches == 0 and same(second.current[1], first.current[1])


def test_an_image_of_other_code_is_ignored(client: redis.Redis, key_prefix: str) -> None:
    publish_snapshot(client, key_prefix, data())
    produce(client, key_prefix, fingerprint="other code")
    engine_holder = holder(client, key_prefix)
    assert engine_holder.refresh() and engine_holder.blob_fetches == 1
    assert not mapped(engine_holder.current[1])  # built from the rows
    assert engine_holder.blob_failures == 0


def test_no_image_yet_loads_the_rows(client: redis.Redis, key_prefix: str) -> None:
    publish_snapshot(client, key_prefix, data())
    engine_holder = holder(client, key_prefix)
    assert (
        engine_holder.refresh() and not mapped(engine_holder.current[1]) and engine_holder.blob_fetches == 1
    )


@pytest.mark.parametrize("damage", ["chunk missing", "chunk short", "byte flipped", "manifest garbage"])
def test_a_damaged_image_loads_the_rows(client: redis.Redis, key_prefix: str, damage: str) -> None:
    version = publish_snapshot(client, key_prefix, data())
    produce(client, key_prefix)
    manifest = read_manifest(client, key_prefix, version, FINGERPRINT)
    assert manifest is not None
    key, field = image_blob_key(key_prefix, version), manifest.chunk_field(manifest.chunks // 2)
    stored = client.hget(key, field)
    assert isinstance(stored, bytes)
    chunk = bytearray(stored)
    if damage == "chunk missing":
        client.hdel(key, field)
    elif damage == "chunk short":
        client.hset(key, field, bytes(chunk[:-1]))
    elif damage == "byte flipped":
        chunk[100] ^= 0x10
        client.hset(key, field, bytes(chunk))
    else:
        client.hset(key, FINGERPRINT, "{not json")
    engine_holder = holder(client, key_prefix)
    assert engine_holder.refresh() is True
    assert not mapped(engine_holder.current[1]) and same(
        engine_holder.current[1], rows_built(client, key_prefix)
    )
    assert engine_holder.blob_failures == (0 if damage == "manifest garbage" else 1)


def test_a_damaged_image_is_not_left_in_the_image_directory(
    client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    version = publish_snapshot(client, key_prefix, data())
    produce(client, key_prefix)
    manifest = read_manifest(client, key_prefix, version, FINGERPRINT)
    assert manifest is not None
    key, field = image_blob_key(key_prefix, version), manifest.chunk_field(1)
    stored = client.hget(key, field)
    assert isinstance(stored, bytes)
    chunk = bytearray(stored)
    chunk[7] ^= 0x01
    client.hset(key, field, bytes(chunk))
    engine_holder = holder(client, key_prefix, tmp_path)
    assert engine_holder.refresh() and engine_holder.blob_failures == 1
    # the file that failed its CRC was removed; the one written after the load from rows is mapped
    files = list(tmp_path.glob("*.img"))
    assert len(files) == 1 and mapped(engine_holder.current[1])


def during_fetch(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` once, after the first chunk of a fetch was read."""
    original = blob_chunks  # what the watcher calls (patched below in its namespace)

    def chunks(*args: Any) -> Iterator[bytes]:
        for index, chunk in enumerate(original(*args)):
            yield chunk
            if index == 0:
                action()

    monkeypatch.setattr(watcher, "blob_chunks", chunks)


def test_redis_failing_mid_fetch_is_a_failed_load(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "cg:"
    client = redis.Redis.from_url(private_redis.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        publish_snapshot(client, prefix, data())
        produce(client, prefix)
        engine_holder = holder(client, prefix)
        during_fetch(monkeypatch, private_redis.stop)  # Redis saves and exits mid-fetch
        with pytest.raises(redis.ConnectionError):
            engine_holder.refresh()
        assert not engine_holder.loaded  # nothing half-fetched is served; the watcher retries
        monkeypatch.undo()
        private_redis.start()
        assert engine_holder.refresh() and mapped(engine_holder.current[1])
        assert engine_holder.blob_fetches == 2 and engine_holder.blob_failures == 0
    finally:
        client.close()


def test_a_new_version_while_fetching(
    client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = publish_snapshot(client, key_prefix, data(balance=1))
    produce(client, key_prefix)
    engine_holder = holder(client, key_prefix)
    newer: list[int] = []
    # the old version (and its image) deleted at once: the fetch finds a chunk missing
    during_fetch(
        monkeypatch,
        lambda: newer.append(
            publish_snapshot(client, key_prefix, data(balance=2), keep_previous=0, grace_seconds=0)
        ),
    )
    assert engine_holder.refresh() is True
    assert engine_holder.blob_failures == 1 and not client.exists(image_blob_key(key_prefix, first))
    assert engine_holder.current[0] == newer[0]  # loaded from the rows of the new version
    assert engine_holder.current[1].accounts_by_number["1001"].balance == Decimal(2)


def test_a_new_version_while_fetching_that_keeps_the_old_one(
    client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = publish_snapshot(client, key_prefix, data(balance=1))
    produce(client, key_prefix)
    engine_holder = holder(client, key_prefix)
    newer: list[int] = []
    during_fetch(monkeypatch, lambda: newer.append(publish_snapshot(client, key_prefix, data(balance=2))))
    assert engine_holder.refresh() is True  # the fetched version, whole and consistent
    assert engine_holder.current[0] == first and mapped(engine_holder.current[1])
    # confirmed when the fetch began (it was current then); the watcher checks again at once
    assert engine_holder.confirmed_age() < 5
    monkeypatch.undo()
    assert engine_holder.refresh() is True and engine_holder.current[0] == newer[0]  # then the new one
    assert engine_holder.current[1].accounts_by_number["1001"].balance == Decimal(2)


def test_only_the_current_versions_image_is_kept(client: redis.Redis, key_prefix: str) -> None:
    first = publish_snapshot(client, key_prefix, data(balance=1))
    produce(client, key_prefix)
    old = read_manifest(client, key_prefix, first, FINGERPRINT)
    assert old is not None
    again = produce(client, key_prefix, force=True)  # a new blob of the same version: a new nonce
    new = read_manifest(client, key_prefix, first, FINGERPRINT)
    assert again.published and new is not None and new.nonce != old.nonce
    assert client.hlen(image_blob_key(key_prefix, first)) == new.chunks + 1  # the old chunks are gone
    second = publish_snapshot(client, key_prefix, data(balance=2))  # keeps `first` (grace, previous)
    assert client.exists(image_blob_key(key_prefix, first))
    produce(client, key_prefix)
    assert not client.exists(image_blob_key(key_prefix, first))  # only the current version's image
    assert client.exists(image_blob_key(key_prefix, second))
    third = publish_snapshot(client, key_prefix, data(balance=3), keep_previous=0, grace_seconds=0)
    assert not client.exists(image_blob_key(key_prefix, second))  # deleted with its version
    assert third > second


def test_an_image_is_never_written_into_a_deleted_version(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, data())
    images = ImageStore(None, key_prefix, FINGERPRINT)

    def build_while_deleted(built: CatalogData) -> Catalog:
        client.delete(meta_key(key_prefix, version))  # the version deleted while its image is built
        return Catalog.build(built)

    assert publish_current(client, key_prefix, build_while_deleted, images, chunk_bytes=CHUNK) is None
    assert not client.exists(image_blob_key(key_prefix, version))  # no hash without its version


def test_the_producer_of_a_superseded_version_does_nothing(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, data())
    images = ImageStore(None, key_prefix, FINGERPRINT)
    assert publish_current(client, key_prefix, Catalog.build, images, version=version - 1) is None
    assert not client.exists(image_blob_key(key_prefix, version))


def test_the_chunk_sweep_reads_and_probes(redis_url: str) -> None:
    """loadtest.memory --chunk-sweep: a baseline row and a row per chunk size, its key removed."""
    from loadtest.memory import chunk_sweep

    rows = chunk_sweep(redis_url, [0, 1], total_mib=2)
    assert [(row["chunk_mib"], row["chunks"]) for row in rows] == [(0, 0), (1, 2)]
    assert all(row["redis_latency_ms"]["samples"] > 0 for row in rows)
    client = redis.Redis.from_url(redis_url)
    assert not client.keys("cgmemory:chunk-sweep:*")
    client.close()


def test_the_processes_of_a_host_fetch_an_image_once(
    client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """With an image directory, one process fetches while the host's others wait for its file
    (a lock file, flock); a waiter then maps that file instead of fetching again."""
    version = publish_snapshot(client, key_prefix, data())
    produce(client, key_prefix)
    store = ImageStore(tmp_path, key_prefix, FINGERPRINT)
    waiter = holder(client, key_prefix, tmp_path)
    stamp = current_stamp(client, key_prefix)
    assert stamp is not None
    with store.host_lock() as waited:  # "another process" fetching
        assert not waited
        thread = threading.Thread(target=waiter.refresh, daemon=True)
        thread.start()
        time.sleep(0.3)  # lets the waiter reach the lock (not an assert on time)
        assert not waiter.loaded
        manifest = read_manifest(client, key_prefix, version, FINGERPRINT)
        assert manifest is not None
        chunks = blob_chunks(client, key_prefix, version, manifest)
        assert store.write_chunks(stamp, chunks) is not None
    thread.join(30)
    assert waiter.loaded and waiter.blob_fetches == 0 and mapped(waiter.current[1])
    with store.host_lock() as waited:  # released by the waiter
        assert not waited
