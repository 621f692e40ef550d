"""Packing the limits acquire (EVALSHA with ~77 keys and arguments) into RESP bytes, no Redis.

Round 3: redis-py encodes each argument in Python before hiredis packs them; the engine's
direct connections hand plain arguments to hiredis at once (engine/state/direct.py).
"""

from __future__ import annotations

import pytest
import redis

from engine.state.direct import DirectConnections

pytestmark = pytest.mark.benchmark(group="redis-pack")

UUID = "0b9f2c1e-7d7a-4c3e-9a55-1f0e0c9d8b7a"


def acquire_command() -> tuple[object, ...]:
    """The shape of an accepted call's acquire: registry and call keys, two keys per limited
    account level and trunk, three per funds level; the script's numeric arguments."""
    keys = ["callgate:limits:calls", f"callgate:limits:call:{UUID}"]
    keys += [f"callgate:limits:{kind}:acct:{n}" for n in range(7) for kind in ("ch", "cps")]
    keys += [f"callgate:funds:{kind}:{n}" for n in range(2) for kind in ("acct", "res", "amt")]
    args: list[object] = ["", 3_900_000, UUID, 2, 5, 1000, 60_000, "0", 100, 10, 100, 10]
    args += [x for trunk in range(5) for x in (1000, 100, "1", trunk)]
    args += [2, 3601, 300_000, 7_200_000, *range(16)]
    return ("EVALSHA", "a" * 40, len(keys), *keys, *args)


def test_pack_acquire_with_redis_py(benchmark) -> None:
    connection = redis.Connection()
    command = acquire_command()
    assert benchmark(lambda: connection.pack_command(*command))


def test_pack_acquire_direct(benchmark) -> None:
    connection = redis.Connection()
    direct = DirectConnections(redis.Connection, {}, size=1, checkout_timeout=0.5)
    command = acquire_command()
    packed = benchmark(lambda: direct._pack(connection, command))
    assert b"".join(packed) == b"".join(connection.pack_command(*command))
