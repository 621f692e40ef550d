"""A single Redis with AOF (appendfsync everysec) killed with SIGKILL and restarted while calls
are up: calls are refused ENGINE_DEGRADED while it is down and accepted again once it is back,
the calls that were up are still counted (the AOF), and one reconciliation leaves the counters
equal to the switch's live channels. Also: the engine's direct connections, all left idle on the
old server's sockets, answer the first commands after a restart.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import gevent
import pytest
import redis

from engine.state.direct import DirectConnections
from engine.state.keys import limits_registry_key
from loadtest.chaos.cluster import zset_members
from loadtest.fsemu import InboundServer, Switch, place_call
from tests.ha.sentinel import redis_server
from tests.private_redis import PrivateRedis, free_port, private_redis_fixture, quick_client  # noqa: F401
from tests.support import EngineProcess, engine_environment, prepare_database, publish, run_cli, wait_until
from tests.test_limits_e2e import CATALOGUE, spec


class AofRedis:
    """redis-server with AOF everysec in a directory of its own, restartable on the same port."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = quick_client(self.port)

        def answers() -> bool:
            try:
                return bool(probe.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout=15, interval=0.05, what="redis-server answering")

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_direct_connections_drop_every_stale_connection_at_the_first_failure(
    private_redis: PrivateRedis,
) -> None:
    client = redis.Redis.from_url(private_redis.url)
    direct = DirectConnections.like(client.connection_pool, size=4, checkout_timeout=2)

    def nested(depth: int) -> None:
        """Hold a connection while taking the next: ``depth`` connections opened, then left idle."""
        direct._on_a_connection(lambda _connection: nested(depth - 1) if depth > 1 else None)

    nested(4)
    assert len(direct._idle) == 4 and all(c._sock is not None for c in direct._idle)
    private_redis.stop()
    private_redis.start()
    # Every connection's socket died with the server: each command still gets its reply (redis-py
    # reconnects a connection whose socket was closed; the direct connections retry once).
    assert direct.execute(("PING",), retry_once=True) == b"PONG"
    for _ in range(4):
        assert direct.execute(("PING",)) == b"PONG"
    direct.close()
    client.close()


@pytest.mark.slow
def test_a_crashed_redis_with_aof_comes_back_with_its_counters(
    module_pg_url: str, module_key_prefix: str, tmp_path: Path
) -> None:
    server = AofRedis(tmp_path)
    server.start()
    env = engine_environment(
        module_pg_url,
        server.url,
        module_key_prefix,
        CALLGATE_REDIS__SOCKET_TIMEOUT="1",
        CALLGATE_ENGINE__DECISION_DEADLINE="3",
    )
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)
    registry = limits_registry_key(module_key_prefix)
    switch = Switch()
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    try:
        with InboundServer(switch, host="127.0.0.1") as inbound:
            held = [
                gevent.spawn(
                    place_call, "127.0.0.1", engine.port, spec("fifty", 20.0), timeout=40, switch=switch
                )
                for _ in range(3)
            ]
            probe = quick_client(server.port, timeout=2)
            wait_until(lambda: probe.zcard(registry) == 3, timeout=20, interval=0.05, what="3 calls counted")
            gevent.sleep(1.5)  # > 1 s: the AOF has been written (everysec)
            server.crash()
            during = place_call("127.0.0.1", engine.port, spec("fifty", 0.1), timeout=20, switch=switch)
            assert during.variables.get("callgate_reason") == "ENGINE_DEGRADED"
            server.start()
            back = time.monotonic()
            # Accepted again within seconds, with no engine restart.
            while True:
                after = place_call("127.0.0.1", engine.port, spec("fifty", 0.1), timeout=20, switch=switch)
                if after.bridged_target is not None:
                    break
                assert time.monotonic() - back < 10, after.variables
                gevent.sleep(0.1)
            print(f"\naccepted again {time.monotonic() - back:.2f}s after redis-server answered")
            probe = quick_client(server.port, timeout=2)
            counted = zset_members(probe, registry)
            assert {call.value is None for call in held} == {True}  # still up
            assert len(counted) >= 3, counted  # the three held calls survived the crash (AOF)
            result = run_cli(
                ["reconcile", "--switch", f"127.0.0.1:{inbound.address[1]}", "--grace", "0"], env
            )
            assert result.returncode == 0, result.stderr
            assert zset_members(probe, registry) == set(switch.live_uuids())
            for call in held:
                call.kill()
    finally:
        engine.stop()
        server.stop()
