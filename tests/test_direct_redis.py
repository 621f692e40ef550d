"""engine.state.direct against the real Redis: replies, errors, and connections that go bad."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import redis

from engine.state.direct import DirectConnections
from tests.support import SlowToConnect


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


# ------------------------------------------------------------------- gathering: one turn, one pipeline


def gathered(direct: DirectConnections, commands: Sequence[tuple[object, ...]]) -> list[object]:
    """Each command from a greenlet of its own, all started in one turn of the loop: what each
    returned, or the exception it raised."""
    import gevent

    def run(args: tuple[object, ...]) -> object:
        try:
            return direct.execute_gathered(args)
        except redis.RedisError as error:
            return error

    glets = [gevent.spawn(run, args) for args in commands]
    gevent.joinall(glets, timeout=10, raise_error=True)
    return [glet.value for glet in glets]


def test_commands_of_one_turn_share_one_round_trip_and_each_gets_its_own_reply(
    redis_url: str, key_prefix: str
) -> None:
    direct = connections(redis_url, size=4)
    replies = gathered(direct, [("ECHO", f"call-{n}") for n in range(6)] + [("CLIENT", "ID")] * 3)
    assert replies[:6] == [f"call-{n}".encode() for n in range(6)]
    assert len(set(replies[6:])) == 1  # one connection carried the whole turn
    later = gathered(direct, [("CLIENT", "ID")] * 2)
    assert later[0] == later[1] == replies[6]  # and went back to the idle ones
    assert direct.execute_gathered(("ECHO", "alone")) == b"alone"  # a turn of one
    direct.close()


def test_an_error_reply_raises_only_in_its_own_caller(redis_url: str, key_prefix: str) -> None:
    direct = connections(redis_url)
    key = key_prefix + "gathered-error"
    replies = gathered(direct, [("SET", key, "7"), ("EVALSHA", "0" * 40, 0), ("INCR", key)])
    assert replies[0] == b"OK" and replies[2] == 8
    assert isinstance(replies[1], redis.exceptions.NoScriptError)
    direct.close()


def test_a_caller_interrupted_before_its_turn_ends_is_left_out(redis_url: str, key_prefix: str) -> None:
    """The first caller of a turn is interrupted while it waits: the next one sends, without it."""
    import gevent
    from greenlet import GreenletExit, getcurrent

    direct = connections(redis_url)
    first, second = key_prefix + "left-out", key_prefix + "sent"
    a = gevent.spawn(direct.execute_gathered, ("INCR", first))
    b = gevent.spawn(direct.execute_gathered, ("INCR", second))

    def interrupt_a() -> None:
        # Both have joined the turn and wait; the turn ends after this greenlet yields.
        gevent.get_hub().loop.run_callback(getcurrent().switch)  # resume here once a is gone
        a.throw(GreenletExit)

    gevent.spawn(interrupt_a).join(timeout=5)
    assert b.get(timeout=5) == 1
    assert a.dead and isinstance(a.value, GreenletExit)
    assert direct.execute(("GET", second)) == b"1"
    assert direct.execute(("EXISTS", first)) == 0  # never sent
    direct.close()


def test_a_failed_round_trip_raises_in_every_caller_of_the_turn(unused_port: int) -> None:
    import socket

    with socket.socket() as mute:  # accepts, never answers
        mute.bind(("127.0.0.1", unused_port))
        mute.listen()
        direct = connections(f"redis://127.0.0.1:{unused_port}/0", socket_timeout=0.2)
        replies = gathered(direct, [("PING",)] * 3)
    assert all(isinstance(reply, redis.TimeoutError) for reply in replies), replies
    assert len({id(reply) for reply in replies}) == 3  # each raised an exception of its own


def test_when_the_sender_is_interrupted_the_others_learn_their_command_may_have_run(
    redis_url: str,
) -> None:
    import gevent

    pool = redis.ConnectionPool.from_url(redis_url)
    direct = DirectConnections(SlowToConnect, pool.connection_kwargs, size=1, checkout_timeout=1)

    def sender() -> object:
        with gevent.Timeout(0.05, False):  # the call's deadline, while the pipeline connects
            return direct.execute_gathered(("PING",))
        return "interrupted"

    first = gevent.spawn(sender)
    other = gevent.spawn(direct.execute_gathered, ("PING",))
    assert first.get(timeout=5) == "interrupted"
    with pytest.raises(redis.TimeoutError, match="may have run"):
        other.get(timeout=5)
    direct.close()


def test_another_thread_executes_alone(redis_url: str) -> None:
    """Gathering belongs to one hub; a caller on another thread's hub gets a plain round trip."""
    import threading

    direct = connections(redis_url)
    assert direct.execute_gathered(("ECHO", "engine")) == b"engine"
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(direct.execute_gathered(("ECHO", "other"))))
    thread.start()
    thread.join(timeout=5)
    assert seen == [b"other"]
    direct.close()
