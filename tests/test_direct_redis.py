"""engine.state.direct against the real Redis: replies, errors, and connections that go bad."""

from __future__ import annotations

import pytest
import redis

from engine.state.direct import DirectConnections


def connections(url: str, size: int = 2, **overrides) -> DirectConnections:
    pool = redis.ConnectionPool.from_url(url, **overrides)
    return DirectConnections.like(pool, size=size, checkout_timeout=0.5)


def test_replies_and_error_replies(redis_url: str, key_prefix: str) -> None:
    direct = connections(redis_url)
    key = key_prefix + "direct"
    assert direct.execute(("SET", key, "1")) == b"OK"
    assert direct.execute(("INCRBY", key, 41)) == 42
    with pytest.raises(redis.exceptions.NoScriptError):
        direct.execute(("EVALSHA", "0" * 40, 0))
    with pytest.raises(redis.ResponseError):
        direct.execute(("INCR", "not", "a", "command", "shape"))
    # an error reply leaves the connection in step with Redis
    assert direct.execute(("GET", key)) == b"42"
    direct.close()


def test_a_connection_closed_by_redis_is_retried_only_when_asked(redis_url: str) -> None:
    direct = connections(redis_url, size=1)
    admin = redis.Redis.from_url(redis_url)
    name = direct.execute(("CLIENT", "ID"))
    admin.client_kill_filter(_id=name)
    with pytest.raises(redis.ConnectionError):
        direct.execute(("PING",))
    assert direct.execute(("PING",)) in (b"PONG", "PONG")  # reconnected
    admin.client_kill_filter(_id=direct.execute(("CLIENT", "ID")))
    assert direct.execute(("PING",), retry_once=True) in (b"PONG", "PONG")
    direct.close()


def test_after_a_timeout_a_late_reply_is_never_read_as_the_next_one(redis_url: str, key_prefix: str) -> None:
    direct = connections(redis_url, size=1, socket_timeout=0.2)
    key = key_prefix + "late"
    direct.execute(("SET", key, "value"))
    with pytest.raises(redis.TimeoutError):
        direct.execute(("BLPOP", key_prefix + "empty-list", 1))
    assert direct.execute(("GET", key)) == b"value"
    direct.close()


def test_an_unreachable_redis_is_a_connection_error(unused_port: int) -> None:
    direct = connections(f"redis://127.0.0.1:{unused_port}/0", socket_connect_timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        direct.execute(("PING",), retry_once=True)


def test_size_must_be_positive(redis_url: str) -> None:
    with pytest.raises(ValueError):
        connections(redis_url, size=0)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_pipeline_returns_every_reply_in_order_with_errors_inline(redis_url: str, key_prefix: str) -> None:
    direct = connections(redis_url, size=1)
    key = key_prefix + "pipelined"
    replies = direct.execute_many([("SET", key, "1"), ("EVALSHA", "0" * 40, 0), ("INCR", key), ("GET", key)])
    assert replies[0] == b"OK" and replies[2] == 2 and replies[3] == b"2"
    assert isinstance(replies[1], redis.exceptions.NoScriptError)
    assert direct.execute(("GET", key)) == b"2"  # the connection stayed in step
    direct.close()


def _redis_py_bytes(args: tuple[object, ...], **encoding: str) -> bytes:
    connection = redis.Connection(**encoding)
    return b"".join(connection.pack_command(*args))


def test_plain_arguments_are_packed_to_the_same_bytes_as_redis_py() -> None:
    """The hiredis shortcut (no per-argument encode in Python) changes no byte on the wire."""
    import random

    direct = DirectConnections(redis.Connection, {}, size=1, checkout_timeout=0.5)
    assert direct._hiredis_pack is not None
    rng = random.Random(7)
    pieces: list[object] = [
        "EVALSHA",
        "",
        "k:1",
        "caf\u00e9",
        "\u2603" * 3,
        b"",
        b"\x00\xff",
        0,
        -1,
        2**70,
        -(2**63),
    ]
    cases: list[tuple[object, ...]] = [
        (rng.choice(["EVALSHA", "caf\u00e9", ""]), *(rng.choice(pieces) for _ in range(rng.randint(0, 60))))
        for _ in range(300)
    ]
    cases += [("SCRIPT LOAD", "return 1"), ("SET", 1.5, True), ("GET", memoryview(b"k")), ("SET", "k", None)]
    for args in cases:
        try:
            expected: object = _redis_py_bytes(args)
        except redis.DataError as exc:
            expected = exc
        try:
            got: object = b"".join(direct._pack(redis.Connection(), args))
        except redis.DataError as exc:
            got = exc
        assert type(got) is type(expected) and str(got) == str(expected), args


def test_another_encoding_keeps_redis_py_s_packer() -> None:
    direct = DirectConnections(redis.Connection, {"encoding": "latin-1"}, size=1, checkout_timeout=0.5)
    assert direct._hiredis_pack is None
    args = ("SET", "caf\u00e9", 1)
    assert b"".join(direct._pack(redis.Connection(encoding="latin-1"), args)) == _redis_py_bytes(
        args, encoding="latin-1"
    )
