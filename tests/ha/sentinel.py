"""A Redis primary, one replica and three sentinels of a test's own, on free loopback ports.

Debian ships no separate ``redis-sentinel`` binary in every package version; ``redis-server
<file> --sentinel`` is the same program, so that is what runs. The sentinels declare the primary
down after ``down_after_ms`` and elect a new one at once (quorum 2 of 3).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import cast

import pytest
import redis

from loadtest.chaos.cluster import sentinels_see_everyone
from tests.private_redis import free_port, quick_client
from tests.support import wait_until

SERVICE = "callgate"


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("redis-server is not installed")
    return found


class SentinelCluster:
    def __init__(self, directory: Path, *, down_after_ms: int = 1000, appendonly: bool = True) -> None:
        self.dir = directory
        self.down_after_ms = down_after_ms
        self.appendonly = appendonly
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """The value of CALLGATE_REDIS__SENTINELS."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> SentinelCluster:
        self._data_node(self.primary_port)
        self._data_node(self.replica_port, replica_of=self.primary_port)
        replica = quick_client(self.replica_port)
        wait_until(
            lambda: replica.info("replication").get("master_link_status") == "up",
            timeout=20,
            interval=0.1,
            what="the replica in sync",
        )
        for port in self.sentinel_ports:
            self._sentinel(port)
        wait_until(
            self._sentinels_see_everyone,
            timeout=30,
            interval=0.2,
            what="the sentinels discovering each other",
        )
        return self

    def _data_node(self, port: int, replica_of: int | None = None) -> None:
        node_dir = self.dir / f"redis-{port}"
        node_dir.mkdir(exist_ok=True)
        command = [
            redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
        ]  # fmt: skip
        if replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(port, command)

    def _sentinel(self, port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self._spawn(port, [redis_server(), str(conf), "--sentinel"])

    def _spawn(self, port: int, command: list[str]) -> None:
        log = (self.dir / f"{port}.log").open("wb")
        self.processes[port] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        probe = quick_client(port)

        def answers() -> bool:
            try:
                return bool(probe.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout=10, interval=0.05, what=f"redis on port {port} answering")
        probe.close()

    def _sentinels_see_everyone(self) -> bool:
        return sentinels_see_everyone(self.sentinel_ports, SERVICE)

    def primary(self) -> int | None:
        """The port the sentinels name as primary (None if none answers)."""
        for port in self.sentinel_ports:
            try:
                # A plain client's reply: (host, port) or None (the bool is the Sentinel pool's).
                address = cast(
                    "tuple[bytes, int] | None", quick_client(port).sentinel_get_master_addr_by_name(SERVICE)
                )
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def kill(self, port: int) -> None:
        """SIGKILL: no shutdown save, no goodbye to the replica."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def client(self, port: int) -> redis.Redis:
        return quick_client(port, timeout=2.0)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
