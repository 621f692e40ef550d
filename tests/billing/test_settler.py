"""The hangup side's batching: settlements queued without blocking, sent in batches, retried while
Redis is away (real Redis; an unreachable one on a closed port), dropped only when the queue is full."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import redis
from prometheus_client import CollectorRegistry

from engine.billing.funds import Funds, FundsUnavailable, Settlement, cdr_stream
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


class _Later:
    """A deferred settlement (engine.billing.settler.Deferred), computed once like
    engine.billing.live.PendingSettlement; counts its computations."""

    def __init__(self, item: Settlement | None, uuid: str) -> None:
        self.item, self.uuid, self.computed = item, uuid, 0

    def resolve(self) -> Settlement | None:
        self.computed = 1
        return self.item


def test_deferred_settlements_go_in_chunks_each_after_an_idle_wait_within_one_deadline(
    client: redis.Redis, key_prefix: str
) -> None:
    """engine.hangup_idle_wait: 40 deferred hangups in one batch are computed and sent 16 at a
    time, each chunk after a wait for an idle hub; the waits share the batch's deadline. Redis
    failing on the second chunk: the retry sends what was left, nothing twice."""
    sent: list[list[str]] = []

    class FailsOnce(Funds):
        failed = False

        def settle_many(self, items):
            if len(sent) == 1 and not self.failed:
                FailsOnce.failed = True
                raise FundsUnavailable("Redis away for a moment")
            sent.append([item.uuid for item in items])
            return super().settle_many(items)

    waits: list[float] = []
    settler = Settler(
        FailsOnce(client, key_prefix), retry_max=0.05, wait_for_idle=waits.append, idle_wait=0.5
    )
    later = [_Later(settlement(f"d{i}", [(1, "0.25")]), f"d{i}") for i in range(39)]
    unbillable = _Later(None, "broken")
    for item in [*later[:20], unbillable, *later[20:]]:
        assert settler.put(item)
    stop = threading.Event()
    thread = threading.Thread(target=settler.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: settler.pending == 0 and settler.settled == 39)
    finally:
        stop.set()
        thread.join(10)
    assert [len(chunk) for chunk in sent] == [16, 15, 8]  # the unbillable one dropped from its chunk
    assert sorted(uuid for chunk in sent for uuid in chunk) == sorted(item.uuid for item in later)
    assert (settler.settled, settler.repeated, settler.dropped) == (39, 0, 0)
    # One wait per chunk sent or tried: two in the attempt that failed, two in its retry; each
    # attempt's waits count down to the same deadline.
    assert len(waits) == 4 and all(0 <= bound <= 0.5 for bound in waits)
    assert waits[0] >= waits[1] and waits[2] >= waits[3]
    assert all(item.computed == 1 for item in [*later, unbillable])
    assert Funds(client, key_prefix).account(1).spent == D("9.75")


def test_without_idle_waits_a_batch_goes_whole(client: redis.Redis, key_prefix: str) -> None:
    sizes: list[int] = []

    class Counting(Funds):
        def settle_many(self, items):
            sizes.append(len(items))
            return super().settle_many(items)

    settler = Settler(Counting(client, key_prefix))
    for i in range(40):
        settler.put(_Later(settlement(f"w{i}", [(1, "1")]), f"w{i}"))
    stop = threading.Event()
    stop.set()
    settler.run(stop)  # what is queued gets its one attempt
    assert sizes == [40] and settler.settled == 40


def test_a_deferred_settlement_dropped_or_not_sent_is_logged_with_its_cdr(
    client: redis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settler = Settler(Funds(client, key_prefix), queue_size=1)
    assert settler.put(settlement("a", [(1, "1")]))
    assert not settler.put(_Later(settlement("late", [(1, "1")]), "late"))
    assert not settler.put(_Later(None, "unbillable"))
    dropped = [r.message for r in caplog.records if "settlement dropped" in r.message]
    assert '"uuid": "late"' in dropped[0] and "(not billable)" in dropped[1]

    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    stopping = Settler(Funds(unreachable, key_prefix))
    stopping.put(_Later(settlement("never", [(1, "1")]), "never"))
    stop = threading.Event()
    stop.set()
    stopping.run(stop)  # one attempt at stop: Redis away, so the CDR is logged whole
    assert stopping.dropped == 1
    assert any("not sent at shutdown" in r.message and '"uuid": "never"' in r.message for r in caplog.records)
