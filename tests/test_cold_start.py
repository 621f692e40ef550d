"""While the engine loads its first snapshot it does not listen: FreeSWITCH's connection is
refused at once (it moves on to the next engine) instead of waiting in a backlog for a
process that cannot decide yet. Redis is reached through a gate (a real TCP relay) that the
test holds closed, so the engine is provably in the middle of its initial load.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from loadtest.fsemu import CallSpec, place_call
from tests.support import CALLGATE, ROOT, EngineProcess, engine_environment, free_port, wait_until
from tests.test_engine_e2e import CATALOGUE, prepare_database, publish


class RedisGate:
    """A TCP relay to Redis that passes nothing until :meth:`open` (then everything)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.opened = threading.Event()
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self) -> None:
        self.opened.set()

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        self.opened.wait()
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture()
def environment(pg_url: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    env = engine_environment(pg_url, redis_url, key_prefix)
    prepare_database(pg_url, CATALOGUE)
    publish(env)
    return env


def test_engine_refuses_connections_until_its_snapshot_is_loaded(
    environment: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    parsed = urlparse(redis_url)
    gate = RedisGate((parsed.hostname or "127.0.0.1", parsed.port or 6379))
    port = free_port()
    env = {
        **environment,
        "CALLGATE_REDIS_URL": f"redis://127.0.0.1:{gate.port}{parsed.path or '/0'}",
        "CALLGATE_REDIS__SOCKET_TIMEOUT": "60",  # the load waits for the gate rather than failing
        "CALLGATE_ENGINE__LISTEN_PORT": str(port),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*CALLGATE, "serve"], env=env, cwd=ROOT, stdout=log, stderr=log)
    engine = EngineProcess(env, port=port, process=process, log_path=log_path)
    try:
        wait_until(lambda: gate.connections > 0, 30, interval=0.05, what="the engine reaching Redis")
        for _ in range(5):  # the engine is blocked in its initial load: nothing listens
            assert refused(port), engine.log()[-2000:]
            time.sleep(0.1)
        assert process.poll() is None and "callgate listening on" not in engine.log()
        gate.open()
        wait_until(lambda: "callgate listening on" in engine.log(), 30, interval=0.05, what="listening")
        spec = CallSpec(sip_auth_username="alice", destination="442071234567", hold_seconds=0.1)
        result = place_call("127.0.0.1", port, spec, timeout=10)
        assert result.error is None, engine.log()[-3000:]
        assert result.executed[-1][0] == "bridge", (result.variables, engine.log()[-3000:])
        assert result.variables.get("callgate_reason") == "ACCEPTED"
    finally:
        engine.stop()
        gate.close()
