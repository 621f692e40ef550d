"""Test support: `wait_until`, and real `callgate serve` processes on the run's PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gevent
import gevent.subprocess
import psycopg
import redis

from engine.config import Config, load_config
from engine.db.fixtures import load_document
from engine.db.migrate import migrate
from engine.state.keys import limits_registry_key
from engine.sync import publish_once

ROOT = Path(__file__).resolve().parent.parent
CALLGATE = [sys.executable, "-m", "engine.cli"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll `predicate` until it returns something true, and return that; fail after `timeout` s.

    The one polling helper of the tests. It sleeps with gevent, so emulators and servers running
    in this process keep answering; threads keep running too. Deadlines are generous on purpose:
    the machine running the suite may be busy. `predicate` may raise to stop early (a process
    that died, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        gevent.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def engine_environment(
    database_url: str, redis_url: str, key_prefix: str, **overrides: str
) -> dict[str, str]:
    # Nothing of the shell's deployment settings (tests/conftest.py removes them too).
    foreign = ("CALLGATE_", "PROMETHEUS_MULTIPROC_DIR")
    env = {name: value for name, value in os.environ.items() if not name.startswith(foreign)}
    if "CALLGATE_NO_SPEEDUPS" in os.environ:  # the suite's fallback pass (scripts/test.sh)
        env["CALLGATE_NO_SPEEDUPS"] = os.environ["CALLGATE_NO_SPEEDUPS"]
    env.update(
        CALLGATE_CONFIG=str(ROOT / "config" / "callgate.toml"),
        # Load shedding answers ENGINE_DEGRADED when the hub lags: tests of behaviour on a
        # shared, busy machine turn it off (tests/call/test_shedding_driver.py tests it).
        # The same for the wait since accept (0.2 s by default), which a loaded CI host exceeds.
        CALLGATE_ENGINE__SHED_LOOP_LAG="0",
        CALLGATE_ENGINE__SHED_BACKLOG="0",
        CALLGATE_ENGINE__SHED_ACCEPT_WAIT="0",
        CALLGATE_DATABASE_URL=database_url,
        CALLGATE_REDIS_URL=redis_url,
        CALLGATE_REDIS__KEY_PREFIX=key_prefix,
        CALLGATE_METRICS__LISTEN_PORT="0",
    )
    env.update(overrides)
    return env


def config_for(env: Mapping[str, str]) -> Config:
    return load_config(environ=env)


def prepare_database(database_url: str, document: Mapping[str, Any]) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        load_document(conn, document)


def publish(env: Mapping[str, str]) -> int:
    version, _counts = publish_once(config_for(env))
    return version


def counted_calls(env: Mapping[str, str]) -> int:
    """How many calls the engines sharing `env`'s Redis and key prefix count as up."""
    with contextlib.closing(redis.Redis.from_url(env["CALLGATE_REDIS_URL"])) as client:
        return int(client.zcard(limits_registry_key(env["CALLGATE_REDIS__KEY_PREFIX"])))


def is_counted(env: Mapping[str, str], call_uuid: str) -> bool:
    """Whether an engine sharing `env`'s Redis and key prefix admitted this call and counts it."""
    with contextlib.closing(redis.Redis.from_url(env["CALLGATE_REDIS_URL"])) as client:
        return client.zscore(limits_registry_key(env["CALLGATE_REDIS__KEY_PREFIX"]), call_uuid) is not None


def wait_all_released(env: Mapping[str, str], timeout: float = 15.0) -> None:
    """Wait until every call is released: an engine releases a call's slots after its hangup, in
    its next release batch, so the emulator's call can end before the account may call again."""
    wait_until(lambda: counted_calls(env) == 0, timeout, what="every call released")


def run_cli(args: list[str], env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `callgate …`; cooperative, so emulators serving in this process keep answering."""
    done: subprocess.CompletedProcess[str] = gevent.subprocess.run(
        [*CALLGATE, *args], env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return done


@dataclass
class EngineProcess:
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, log_path: Path, wait: float = 15.0) -> EngineProcess:
        self.log_path = log_path
        env = {**self.env, "CALLGATE_ENGINE__LISTEN_PORT": str(self.port)}
        with log_path.open("wb") as log:
            self.process = subprocess.Popen([*CALLGATE, "serve"], env=env, cwd=ROOT, stdout=log, stderr=log)
        self._wait_listening(wait)
        return self

    def _wait_listening(self, wait: float) -> None:
        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"callgate serve exited early:\n{self.log()}")
            return "callgate listening on" in self.log()

        try:
            wait_until(listening, wait, interval=0.05, what="callgate serve listening")
        except AssertionError:
            raise RuntimeError(f"callgate serve did not listen within {wait}s:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SlowToConnect(redis.Connection):
    """A real Redis connection that takes 0.5 s (cooperatively) to connect: it holds a
    connection busy, or a pipeline's sender in flight, while a test does something else."""

    def connect(self) -> None:
        gevent.sleep(0.5)
        super().connect()
