"""The real processes of a chaos run, all on loopback and all its own (never the machine's servers).

* :class:`PgCluster`: ``initdb`` + ``pg_ctl`` on a free port in a temporary directory (run as the
  ``postgres`` user when the run is root's: initdb refuses root);
* :class:`RedisHa`: a primary and a replica with AOF everysec, each behind a :class:`DelayProxy`
  (every client, the replication link and the sentinels reach a data node only through its proxy:
  the nodes announce the proxy's port), and three sentinels (quorum 2);
* :class:`CallgateProcess`: ``callgate serve`` / ``callgate sync`` subprocesses that can be killed
  with SIGKILL and started again on the same port.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from loadtest.chaos.proxy import free_port

ROOT = Path(__file__).resolve().parents[2]
CALLGATE = [sys.executable, "-m", "engine.cli"]
SERVICE = "callgate"


class Unavailable(RuntimeError):
    """A program the chaos run needs is not installed (or cannot run as this user)."""


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise Unavailable(f"{name} is not installed")
    return found


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll with gevent's sleep (the emulators and proxies of this process keep running)."""
    import gevent

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        gevent.sleep(interval)


def quick_client(port: int, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip


def zset_members(client: redis.Redis, key: str) -> set[str]:
    """The members of a sorted set, read by a client that returns bytes (no decode_responses)."""
    members = cast(list[bytes], client.zrange(key, 0, -1))
    return {member.decode() for member in members}


def answers(port: int) -> bool:
    try:
        return bool(quick_client(port, 0.5).ping())
    except redis.RedisError:
        return False


def sentinels_see_everyone(sentinel_ports: list[int], service: str = SERVICE) -> bool:
    """Every sentinel knows the two others and a replica: a failover can be voted and done."""
    for port in sentinel_ports:
        try:
            state = cast(dict[str, Any], quick_client(port).sentinel_master(service))
        except redis.RedisError:
            return False
        if int(state.get("num-other-sentinels", 0)) < 2 or int(state.get("num-slaves", 0)) < 1:
            return False
    return True


# --------------------------------------------------------------------------- PostgreSQL


class PgCluster:
    def __init__(self) -> None:
        # Under /tmp itself: a 0700 directory of root's cannot be entered by `postgres`.
        self.base = Path(tempfile.mkdtemp(prefix="cg-chaos-pg-"))
        self.dir = self.base / "pgdata"
        self.port = free_port()
        self._as: list[str] = []
        if os.getuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no postgres user for initdb") from None
            self._as = ["runuser", "-u", "postgres", "--"]
            self.base.chmod(0o777)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as, *command], check=True, capture_output=True, timeout=120)

    def init(self) -> PgCluster:
        self._run(tool("initdb"), "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(
            tool("pg_ctl"), "-D", str(self.dir), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )

    def stop(self) -> None:
        self._run(tool("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        if (self.dir / "postmaster.pid").exists():
            subprocess.run(
                [*self._as, tool("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "-w", "stop"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- Redis + Sentinel


class DataNode:
    """One redis-server with AOF everysec, reached by everyone through its delaying proxy."""

    def __init__(self, directory: Path, name: str, slow_delay: float) -> None:
        self.name = name
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # the server itself; only the run's own checks use it directly
        self.public_port = free_port()  # its proxy's: everyone else's
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "loadtest.chaos.proxy", "--listen", str(self.public_port),
             "--to", str(self.port), "--delay", str(slow_delay)],
            cwd=ROOT,
        )  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def slow(self, on: bool) -> None:
        self.proxy.send_signal(signal.SIGUSR1 if on else signal.SIGUSR2)

    def stop_proxy(self) -> None:
        if self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(timeout=10)

    def start(self, replica_of: DataNode | None = None) -> None:
        command = [
            tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--replica-announce-ip", "127.0.0.1", "--replica-announce-port", str(self.public_port),
        ]  # fmt: skip
        if replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(replica_of.public_port)]
        log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: answers(self.port), 15, f"redis {self.name} answering")
        wait_for(lambda: answers(self.public_port), 15, f"redis {self.name} answering through its proxy")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to the replica."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return quick_client(self.port, timeout)

    def role(self) -> str | None:
        try:
            return str(self.client(0.5).info("replication").get("role"))
        except redis.RedisError:
            return None


class RedisHa:
    def __init__(self, directory: Path, *, slow_delay: float, down_after_ms: int = 1000) -> None:
        self.dir = directory
        self.down_after_ms = down_after_ms
        self.nodes = [DataNode(directory, "redis-a", slow_delay), DataNode(directory, "redis-b", slow_delay)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def sentinel_setting(self) -> str:
        """The value of CALLGATE_REDIS__SENTINELS."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> RedisHa:
        first, second = self.nodes
        first.start()
        second.start(replica_of=first)
        wait_for(lambda: self.in_sync(second), 90, "the replica in sync")
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {first.public_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            log = (self.dir / f"sentinel-{port}.log").open("ab")
            self.sentinels.append(
                subprocess.Popen(
                    [tool("redis-server"), str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
                )
            )
            wait_for(functools.partial(answers, port), 15, f"sentinel {port} answering")
        wait_for(self._sentinels_see_everyone, 90, "the sentinels discovering each other", 0.2)
        return self

    def in_sync(self, node: DataNode) -> bool:
        try:
            info = node.client(0.5).info("replication")
        except redis.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def _sentinels_see_everyone(self) -> bool:
        return sentinels_see_everyone(self.sentinel_ports)

    def named_primary(self) -> DataNode | None:
        """The node a majority of the sentinels... (the first that answers) names primary."""
        for port in self.sentinel_ports:
            try:
                client = quick_client(port, 0.5)
                address = cast("tuple[str, int] | None", client.sentinel_get_master_addr_by_name(SERVICE))
            except redis.RedisError:
                continue
            if address:
                return next((n for n in self.nodes if n.public_port == int(address[1])), None)
        return None

    def primary(self) -> DataNode | None:
        """The live node that is a primary, as named by the sentinels and confirmed by itself."""
        node = self.named_primary()
        if node is not None and node.alive() and node.role() == "master":
            return node
        return None

    def describe(self) -> str:
        """Each data node's replication state, for a report that something did not settle."""
        parts = []
        for node in self.nodes:
            try:
                info = node.client(0.5).info("replication")
                parts.append(f"{node.name}: {info.get('role')} link {info.get('master_link_status', '-')}")
            except redis.RedisError as exc:
                parts.append(f"{node.name}: {type(exc).__name__}")
        named = self.named_primary()
        return "; ".join(parts) + f"; the sentinels name {named.name if named else 'none'}"

    def other(self, node: DataNode) -> DataNode:
        return self.nodes[1] if node is self.nodes[0] else self.nodes[0]

    def slow(self, on: bool) -> None:
        """Every data node's proxy adds its delay (``slow_delay``) each way, or none."""
        for node in self.nodes:
            node.slow(on)

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
                process.wait()
        for node in self.nodes:
            node.kill()
            node.stop_proxy()


# --------------------------------------------------------------------------- callgate processes


class CallgateProcess:
    """``callgate serve`` or ``callgate sync`` as a subprocess; SIGKILL and start again."""

    def __init__(self, command: str, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.command = command
        self.env = dict(env)
        self.log_path = log
        self.port = port
        if port is not None:
            self.env["CALLGATE_ENGINE__LISTEN_PORT"] = str(port)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = 60.0) -> CallgateProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*CALLGATE, self.command], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        if self.command == "serve":
            wait_for(lambda: self._listening(offset), wait, f"callgate serve on {self.port}")
        return self

    def _listening(self, offset: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"callgate {self.command} exited:\n{self.log()[-3000:]}")
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return b"callgate listening on" in log.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def callgate_environment(
    database_url: str, redis: RedisHa, key_prefix: str, **overrides: str
) -> dict[str, str]:
    """The environment of every callgate process of the run: Sentinel, its own prefix, no foreign
    CALLGATE_ settings of the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLGATE_", "PROMETHEUS_MULTIPROC_DIR"))}
    if "CALLGATE_NO_SPEEDUPS" in os.environ:
        env["CALLGATE_NO_SPEEDUPS"] = os.environ["CALLGATE_NO_SPEEDUPS"]
    env.update(
        CALLGATE_CONFIG=str(ROOT / "config" / "callgate.toml"),
        CALLGATE_DATABASE_URL=database_url,
        CALLGATE_DATABASE__CONNECT_TIMEOUT="2",
        CALLGATE_REDIS_URL="redis://127.0.0.1:1/0",  # with sentinels only the db number counts
        CALLGATE_REDIS__SENTINELS=redis.sentinel_setting,
        CALLGATE_REDIS__SERVICE_NAME=SERVICE,
        CALLGATE_REDIS__KEY_PREFIX=key_prefix,
        CALLGATE_METRICS__LISTEN_PORT="0",
        CALLGATE_SYNC__METRICS_PORT="0",
        CALLGATE_SYNC__RECONNECT_MAX_DELAY="1",
    )
    env.update(overrides)
    return env
