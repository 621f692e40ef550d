"""``Funds.settle_many`` on the engine's direct connections (engine.state.direct) against the
redis-py pipeline it replaces, on the real Redis: the same bytes on the wire, the same replies,
the same Redis state afterwards, the same failures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, ClassVar

import pytest
import redis

from engine.billing.funds import Funds, FundsLevel, FundsUnavailable, Settlement, call_key, cdr_stream
from engine.billing.rating import Tariff
from engine.state.direct import DirectConnections

D = Decimal
TARIFF = Tariff(cost_per_minute=D("1.00"), init_inc=60, inc=60)


class Recording(redis.Connection):
    """A redis-py connection that keeps every byte it writes after ``start``."""

    sent: ClassVar[list[bytes]] = []
    recording: ClassVar[bool] = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if Recording.recording:
            pieces = [command] if isinstance(command, bytes | str) else list(command)
            Recording.sent += [p.encode() if isinstance(p, str) else bytes(p) for p in pieces]
        super().send_packed_command(command, check_health)


def kwargs(redis_url: str) -> dict[str, Any]:
    pool = redis.ConnectionPool.from_url(redis_url)
    return dict(pool.connection_kwargs)


def both(redis_url: str, prefix: str) -> tuple[Funds, Funds, redis.Redis]:
    pool = redis.ConnectionPool(connection_class=Recording, **kwargs(redis_url))
    client = redis.Redis(connection_pool=pool)
    direct = DirectConnections(Recording, kwargs(redis_url), size=2, checkout_timeout=1.0)
    return Funds(client, prefix), Funds(client, prefix, direct=direct), client


def settlements() -> list[Settlement]:
    items = [
        Settlement("call-a", ((1, D("0"), D("1.00")),), {"uuid": "call-a", "billsec": 42}),
        Settlement(
            "call-b",
            ((1, D("0.5"), D("2.123456")), (2, D("0"), D("1.9")), (3, D("10"), D("0.000001"))),
            {"uuid": "call-b", "caller": "caf\u00e9 \u2603", "cost": D("2.123456"), "x": None},
        ),
        Settlement("call-c", (), {}),
    ]
    return [*items, items[0], Settlement("call-d", ((2, D("0"), D("0")),), {"n": 1})]


def state(client: redis.Redis, prefix: str) -> dict[bytes | tuple[bytes, str], Any]:
    """Every key under ``prefix`` with its content (stream entries without their ids)."""
    out: dict[bytes | tuple[bytes, str], Any] = {}
    for key in sorted(client.scan_iter(match=prefix + "*")):
        kind = client.type(key)
        if kind == b"hash":
            out[key] = client.hgetall(key)
        elif kind == b"zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            entries = client.xrange(key)
            assert entries is not None
            out[key] = [fields for _, fields in entries]
        elif kind == b"string":
            out[key] = client.get(key)
        else:
            out[key] = kind
        out[(key, "expires")] = client.pttl(key) > 0
    return out


NOW_MS = int(time.time() * 1000)


def run(funds: Funds, items: Sequence[Settlement]) -> tuple[list[bool], bytes]:
    for account in (1, 2, 3):  # reservations to release, the same for both paths
        level = FundsLevel(account, D("50"), D("0"), TARIFF)
        funds.reserve(f"call-{'abcd'[account - 1]}", [level], 120, now_ms=NOW_MS)
    if funds._direct is not None:  # connected (its handshake) before the recording starts
        funds._direct.execute(("PING",))
    Recording.sent = []
    Recording.recording = True
    try:
        results = funds.settle_many(items)
    finally:
        Recording.recording = False
    return results, b"".join(Recording.sent)


def test_the_direct_settle_sends_the_same_bytes_and_leaves_the_same_state(
    redis_url: str, key_prefix: str
) -> None:
    plain, direct, client = both(redis_url, key_prefix)
    items = settlements()
    expected, expected_bytes = run(plain, items)
    expected_state = state(client, key_prefix)
    assert expected == [True, True, True, False, True]
    assert client.xlen(cdr_stream(key_prefix)) == 4
    client.delete(*client.scan_iter(match=key_prefix + "*"))
    got, got_bytes = run(direct, items)
    assert got == expected
    assert got_bytes == expected_bytes
    assert got_bytes.startswith(b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n")
    assert got_bytes.count(b"$7\r\nEVALSHA\r\n") == len(items)
    assert state(client, key_prefix) == expected_state
    # settled twice is once, on either path
    assert direct.settle_many(items) == [False] * len(items)
    assert plain.settle_many(items[:1]) == [False]
    assert client.xlen(cdr_stream(key_prefix)) == 4


def test_a_redis_without_the_script_is_loaded_in_the_same_write(redis_url: str, key_prefix: str) -> None:
    _, direct, client = both(redis_url, key_prefix)
    client.script_flush()
    assert direct.settle_many(settlements()[:1]) == [True]


def test_an_error_reply_fails_the_batch_as_before(redis_url: str, key_prefix: str) -> None:
    plain, direct, client = both(redis_url, key_prefix)
    item = settlements()[0]
    client.set(call_key(key_prefix, item.uuid), "not a hash")  # the script hits WRONGTYPE
    for funds in (plain, direct):
        with pytest.raises(FundsUnavailable, match=r"WRONGTYPE|ResponseError"):
            funds.settle_many([item])


def test_a_lost_connection_is_retried_once_and_redis_away_is_funds_unavailable(
    redis_url: str, key_prefix: str
) -> None:
    _, direct, client = both(redis_url, key_prefix)
    items = settlements()
    assert direct.settle_many(items[:1]) == [True]
    connections = direct._direct
    assert connections is not None
    client.client_kill_filter(_id=connections.execute(("CLIENT", "ID")))  # Redis drops it while idle
    assert direct.settle_many(items[1:2]) == [True]
    dead = DirectConnections(redis.Connection, {"port": 1, "socket_connect_timeout": 0.5}, 1, 0.5)
    with pytest.raises(FundsUnavailable, match="ConnectionError"):
        Funds(client, key_prefix, direct=dead).settle_many(items[:1])
