"""Test support: run a real `callgate serve` process against the test run's PostgreSQL and Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gevent.subprocess
import psycopg

from engine.config import Config, load_config
from engine.db.fixtures import load_document
from engine.db.migrate import migrate
from engine.sync import publish_once

ROOT = Path(__file__).resolve().parent.parent
CALLGATE = [sys.executable, "-m", "engine.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_environment(
    database_url: str, redis_url: str, key_prefix: str, **overrides: str
) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CALLGATE_")}
    env.update(
        CALLGATE_CONFIG=str(ROOT / "config" / "callgate.toml"),
        CALLGATE_DATABASE_URL=database_url,
        CALLGATE_REDIS_URL=redis_url,
        CALLGATE_REDIS__KEY_PREFIX=key_prefix,
        CALLGATE_METRICS__LISTEN_PORT="0",
    )
    env.update(overrides)
    return env


def config_for(env: Mapping[str, str]) -> Config:
    return load_config(environ=env)


def prepare_database(database_url: str, document: Mapping) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        load_document(conn, document)


def publish(env: Mapping[str, str]) -> int:
    version, _counts = publish_once(config_for(env))
    return version


def run_cli(args: list[str], env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `callgate …`; cooperative, so emulators serving in this process keep answering."""
    return gevent.subprocess.run(
        [*CALLGATE, *args], env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class EngineProcess:
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self, log_path: Path, wait: float = 15.0) -> EngineProcess:
        self.log_path = log_path
        env = {**self.env, "CALLGATE_ENGINE__LISTEN_PORT": str(self.port)}
        with log_path.open("wb") as log:
            self.process = subprocess.Popen([*CALLGATE, "serve"], env=env, cwd=ROOT, stdout=log, stderr=log)
        self._wait_listening(wait)
        return self

    def _wait_listening(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"callgate serve exited early:\n{self.log()}")
            if "callgate listening on" in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"callgate serve did not listen within {wait}s:\n{self.log()}")

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
