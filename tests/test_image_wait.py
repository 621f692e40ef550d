"""Engines waiting for the catalogue image of a new version instead of building it (issue 19).

The producer marks a version's image as being built (``engine.state.imageblob.mark_building``);
an engine switching to that version (or starting on it) waits for the image and fetches it,
and builds from rows when there is no mark, a stale one (the producer died: kill -9), the wait
times out, the mark goes without an image, the image is unusable, or a newer version comes
(docs/sync.md, "Waiting for the image of a new version"). Real Redis throughout.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

import engine.state.watcher as watcher
from engine.config import ConfigError, EngineSettings
from engine.rules.catalog import Catalog
from engine.state.image import ImageStore
from engine.state.imageblob import (
    building_field,
    clear_building,
    mark_building,
    poll_image,
    publish_current,
    read_manifest,
)
from engine.state.keys import image_blob_key
from engine.state.snapshot import current_stamp, publish_snapshot
from engine.state.watcher import SnapshotHolder
from tests.test_image_blob import CHUNK, FINGERPRINT, data, mapped, produce

POLL = 0.05


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher, "_MARKER_GRACE", 0.3)


def waiting_holder(client: redis.Redis, prefix: str, wait: float = 20.0) -> SnapshotHolder[Catalog]:
    images = ImageStore(None, prefix, FINGERPRINT)
    return SnapshotHolder(
        client,
        prefix,
        Catalog.build,
        subscribe=False,
        images=images,
        image_blobs=True,
        image_wait=wait,
        image_poll=POLL,
    )


def mark(client: redis.Redis, prefix: str, ttl: float = 30.0) -> None:
    stamp = current_stamp(client, prefix)
    assert stamp is not None
    assert mark_building(client, prefix, stamp.version, stamp.token, FINGERPRINT, ttl=ttl, by="test")


def later(seconds: float, action: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def switched_holder(client: redis.Redis, prefix: str, **kwargs: Any) -> SnapshotHolder[Catalog]:
    """A holder serving version 1 from its image, then version 2 published (balance 2)."""
    publish_snapshot(client, prefix, data(balance=1))
    produce(client, prefix)
    engine_holder = waiting_holder(client, prefix, **kwargs)
    assert engine_holder.refresh() and mapped(engine_holder.current[1])
    publish_snapshot(client, prefix, data(balance=2))
    return engine_holder


def balance(engine_holder: SnapshotHolder[Catalog]) -> Decimal:
    return engine_holder.current[1].accounts_by_number["1001"].balance


# --- the producer's mark ----------------------------------------------------------------------


def test_the_producer_marks_the_version_while_it_builds_and_unmarks_it(
    client: redis.Redis, key_prefix: str
) -> None:
    version = publish_snapshot(client, key_prefix, data())
    seen: list[Any] = []

    def build(catalog_data: Any) -> Catalog:
        seen.append(poll_image(client, key_prefix, version, FINGERPRINT))
        return Catalog.build(catalog_data)

    result = publish_current(
        client, key_prefix, build, ImageStore(None, key_prefix, FINGERPRINT), chunk_bytes=CHUNK, by="me"
    )
    assert result is not None and result.published
    assert seen[0].building and seen[0].marker.by == "me" and seen[0].manifest is None
    after = poll_image(client, key_prefix, version, FINGERPRINT)
    assert after.manifest is not None and after.marker is None  # published, unmarked


def test_a_failed_build_unmarks_the_version(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, data())

    def build(catalog_data: Any) -> Catalog:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        publish_current(client, key_prefix, build, ImageStore(None, key_prefix, FINGERPRINT))
    assert not client.hexists(image_blob_key(key_prefix, version), building_field(FINGERPRINT))


def test_the_mark_renews_and_expires_by_redis_clock(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, data())
    mark(client, key_prefix, ttl=0.2)
    first = poll_image(client, key_prefix, version, FINGERPRINT)
    assert first.building
    mark(client, key_prefix, ttl=0.2)  # renewed: the start is kept
    assert poll_image(client, key_prefix, version, FINGERPRINT).marker.started_ms == first.marker.started_ms  # type: ignore[union-attr]
    time.sleep(0.3)
    stale = poll_image(client, key_prefix, version, FINGERPRINT)
    assert stale.marker is not None and not stale.building


def test_a_deleted_version_is_never_marked(client: redis.Redis, key_prefix: str) -> None:
    version = publish_snapshot(client, key_prefix, data())
    assert not mark_building(client, key_prefix, version, "another token", FINGERPRINT)
    assert not client.exists(image_blob_key(key_prefix, version))


# --- the engine's wait ------------------------------------------------------------------------


def test_a_switch_waits_for_the_image_being_built(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)
    producer = later(0.5, lambda: produce(client, key_prefix))
    assert engine_holder.refresh() is True
    producer.join()
    assert mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(2)  # fetched, not built
    assert engine_holder.blob_waits == {"ready": 1} and engine_holder.blob_waited > 0
    assert engine_holder.stamp == current_stamp(client, key_prefix)


def test_the_first_start_waits_too(client: redis.Redis, key_prefix: str) -> None:
    publish_snapshot(client, key_prefix, data())
    mark(client, key_prefix)
    engine_holder = waiting_holder(client, key_prefix)
    producer = later(0.3, lambda: produce(client, key_prefix))
    assert engine_holder.refresh() is True
    producer.join()
    assert mapped(engine_holder.current[1]) and engine_holder.blob_waits == {"ready": 1}


def test_a_mark_made_just_after_the_publish_is_waited_for(client: redis.Redis, key_prefix: str) -> None:
    """The leader marks the version right after switching to it: an engine quicker than that
    waits for the mark (``_MARKER_GRACE``)."""
    engine_holder = switched_holder(client, key_prefix)

    def mark_then_produce() -> None:
        mark(client, key_prefix)
        time.sleep(0.2)
        produce(client, key_prefix)

    producer = later(0.1, mark_then_produce)
    assert engine_holder.refresh() is True
    producer.join()
    assert mapped(engine_holder.current[1]) and engine_holder.blob_waits == {"ready": 1}


def test_no_mark_builds_from_rows(client: redis.Redis, key_prefix: str) -> None:
    """No producer (sync.publish_images = false, sync --once): rows, after the grace at most."""
    engine_holder = switched_holder(client, key_prefix)
    assert engine_holder.refresh() is True
    assert not mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(2)
    assert engine_holder.blob_waits == {}  # a plain "no image", not a wait


def test_an_old_version_without_a_mark_is_not_waited_for(
    client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_snapshot(client, key_prefix, data())
    monkeypatch.setattr(watcher, "_MARKER_GRACE", 0.0)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the time module the watcher sleeps with
    engine_holder = waiting_holder(client, key_prefix)
    assert engine_holder.refresh() and not mapped(engine_holder.current[1])
    assert sleeps == [] and engine_holder.blob_waits == {}


def test_without_a_producer_a_fresh_version_is_not_waited_for(
    client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held version has no image of this code (no producer): no grace, rows at once."""
    monkeypatch.setattr(watcher, "_MARKER_GRACE", 600.0)
    publish_snapshot(client, key_prefix, data(balance=1))
    engine_holder = waiting_holder(client, key_prefix)
    assert engine_holder.refresh() and not mapped(engine_holder.current[1])
    publish_snapshot(client, key_prefix, data(balance=2))
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the time module the watcher sleeps with
    assert engine_holder.refresh() and balance(engine_holder) == Decimal(2)
    assert sleeps == [] and engine_holder.blob_waits == {}


def test_a_stale_mark_builds_from_rows(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix, ttl=0.3)  # never renewed
    assert engine_holder.refresh() is True
    assert not mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(2)
    assert engine_holder.blob_waits == {"stale": 1}


def test_a_mark_removed_without_an_image_builds_from_rows(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)
    version = engine_holder.stamp.version + 1  # type: ignore[union-attr]
    remover = later(0.3, lambda: clear_building(client, key_prefix, version, FINGERPRINT))
    assert engine_holder.refresh() is True
    remover.join()
    assert not mapped(engine_holder.current[1]) and engine_holder.blob_waits == {"abandoned": 1}


def test_the_wait_times_out(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix, wait=0.4)
    mark(client, key_prefix)  # alive (30 s), but nothing comes
    assert engine_holder.refresh() is True
    assert not mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(2)
    assert engine_holder.blob_waits == {"timeout": 1}


def test_an_unusable_image_after_the_wait_builds_from_rows(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)

    def produce_damaged() -> None:
        result = produce(client, key_prefix)
        manifest = read_manifest(client, key_prefix, result.stamp.version, FINGERPRINT)
        assert manifest is not None
        client.hdel(image_blob_key(key_prefix, result.stamp.version), manifest.chunk_field(1))

    producer = later(0.3, produce_damaged)
    assert engine_holder.refresh() is True
    producer.join()
    assert not mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(2)
    assert engine_holder.blob_waits == {"ready": 1} and engine_holder.blob_failures == 1


def test_a_newer_version_supersedes_the_wait(client: redis.Redis, key_prefix: str) -> None:
    """Waiting for version 2's image, version 3 comes (marked too): its image is waited for."""
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)

    def newer() -> None:
        publish_snapshot(client, key_prefix, data(balance=3))
        mark(client, key_prefix)
        time.sleep(0.3)
        produce(client, key_prefix)

    producer = later(0.3, newer)
    assert engine_holder.refresh() is True
    producer.join()
    assert mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(3)
    assert engine_holder.blob_waits == {"superseded": 1, "ready": 1}


def test_a_newer_version_without_a_mark_is_built_from_rows(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)
    later(0.3, lambda: publish_snapshot(client, key_prefix, data(balance=3))).join(0)
    assert engine_holder.refresh() is True
    assert not mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(3)
    assert engine_holder.blob_waits == {"superseded": 1}


def test_the_held_version_is_kept_and_switching_while_waiting(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)
    during: list[Any] = []

    def look_then_produce() -> None:
        time.sleep(0.3)
        during.append((balance(engine_holder), engine_holder.switching_since))
        produce(client, key_prefix)

    producer = later(0, look_then_produce)
    assert engine_holder.refresh() is True
    producer.join()
    assert during[0][0] == Decimal(1) and during[0][1] is not None  # the held one decides meanwhile
    assert engine_holder.switching_since is None and balance(engine_holder) == Decimal(2)


def test_stopping_ends_the_wait(client: redis.Redis, key_prefix: str) -> None:
    engine_holder = switched_holder(client, key_prefix)
    mark(client, key_prefix)
    stop = threading.Event()
    runner = threading.Thread(target=engine_holder.run, args=(stop, 0.1), daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while not engine_holder.switching_since and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine_holder.switching_since is not None  # waiting
    stop.set()
    runner.join(5)
    assert not runner.is_alive() and balance(engine_holder) == Decimal(1)
    assert engine_holder.blob_waits == {"stopping": 1}


# --- the producer killed (kill -9) ------------------------------------------------------------


def _slow_producer(url: str, prefix: str) -> None:
    """A producer whose build never ends (run in a child process, then killed)."""
    client = redis.Redis.from_url(url)

    def build(catalog_data: Any) -> Catalog:
        time.sleep(600)
        raise AssertionError("killed before")

    publish_current(client, prefix, build, ImageStore(None, prefix, FINGERPRINT), by="doomed", marker_ttl=0.6)


def test_a_producer_killed_mid_build_is_not_waited_for(
    client: redis.Redis, key_prefix: str, redis_url: str
) -> None:
    engine_holder = switched_holder(client, key_prefix)
    version = engine_holder.stamp.version + 1  # type: ignore[union-attr]
    child = multiprocessing.get_context("spawn").Process(target=_slow_producer, args=(redis_url, key_prefix))
    child.start()
    try:
        deadline = time.monotonic() + 30
        while not poll_image(client, key_prefix, version, FINGERPRINT).building:
            assert time.monotonic() < deadline, "the producer never marked the version"
            time.sleep(0.05)
        time.sleep(0.5)  # renewed meanwhile (every 0.1 s): still alive
        assert poll_image(client, key_prefix, version, FINGERPRINT).building
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        assert engine_holder.refresh() is True
    finally:
        child.kill()
        child.join(5)
    assert not mapped(engine_holder.current[1]) and balance(engine_holder) == Decimal(2)
    assert engine_holder.blob_waits == {"stale": 1}


# --- the setting ------------------------------------------------------------------------------


def test_the_wait_is_bounded_by_the_switch_bound() -> None:
    assert EngineSettings().snapshot_image_wait <= EngineSettings().snapshot_switch_max_age / 2
    EngineSettings(snapshot_image_wait=0.0)
    with pytest.raises(ConfigError):
        EngineSettings(snapshot_image_wait=301.0, snapshot_switch_max_age=600.0)
    with pytest.raises(ConfigError):
        EngineSettings(snapshot_image_wait=-1.0)
