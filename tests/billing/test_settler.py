"""The hangup side's batching: settlements queued without blocking, sent in batches, retried while
Redis is away (real Redis; an unreachable one on a closed port), dropped only when the queue is full."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import redis
from prometheus_client import CollectorRegistry

from engine.billing.funds import Funds, cdr_stream
from engine.billing.settler import Settler
from tests.billing.conftest import settlement

D = Decimal


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_queued_settlements_are_sent_in_batches_and_duplicates_ignored(
    client: redis.Redis, key_prefix: str
) -> None:
    registry = CollectorRegistry()
    settler = Settler(Funds(client, key_prefix), batch_size=50, registry=registry)
    stop = threading.Event()
    thread = threading.Thread(target=settler.run, args=(stop,))
    thread.start()
    try:
        for i in range(300):
            assert settler.put(settlement(f"s{i}", [(1, "0.10")]))
        settler.put(settlement("s0", [(1, "0.10")]))  # a duplicate hangup
        wait_for(lambda: settler.pending == 0 and settler.settled + settler.repeated == 301)
    finally:
        stop.set()
        thread.join(10)
    assert (settler.settled, settler.repeated) == (300, 1)
    assert client.xlen(cdr_stream(key_prefix)) == 300
    assert Funds(client, key_prefix).account(1).spent == D("30")
    assert registry.get_sample_value("callgate_settlements_total") == 300


def test_redis_away_then_back_nothing_lost(redis_url: str, key_prefix: str) -> None:
    url = {"redis": redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)}

    class Switchable(Funds):
        def settle_many(self, items):  # the client is swapped when "Redis comes back"
            self._client = url["redis"]
            return super().settle_many(items)

    settler = Settler(Switchable(url["redis"], key_prefix), retry_max=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=settler.run, args=(stop,))
    thread.start()
    try:
        for i in range(20):
            settler.put(settlement(f"r{i}", [(1, "1")]))
        wait_for(lambda: settler.failures >= 3)
        assert settler.pending == 20
        url["redis"] = redis.Redis.from_url(redis_url)
        wait_for(lambda: settler.pending == 0)
    finally:
        stop.set()
        thread.join(10)
    assert settler.settled == 20
    assert Funds(redis.Redis.from_url(redis_url), key_prefix).account(1).spent == D("20")


def test_a_full_queue_drops_and_logs_the_cdr(
    client: redis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settler = Settler(Funds(client, key_prefix), queue_size=2)
    assert settler.put(settlement("a", [(1, "1")]))
    assert settler.put(settlement("b", [(1, "1")]))
    assert not settler.put(settlement("c", [(1, "1")]))
    assert settler.dropped == 1
    assert any("settlement dropped" in r.message and '"uuid": "c"' in r.message for r in caplog.records)
