"""scripts/demo.sh: the database the URL names, a first call that works, admin changes reaching it.

Runs the real script (services and virtualenv setup skipped: they are up) on a private database,
Redis prefix and port, places the call it prints, then changes the customer with the CLI.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import redis

from tests.admin.conftest import ROOT
from tests.conftest import PG_ADMIN_URL, RUN_ID


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        assert process.poll() is None, content
        assert time.monotonic() < deadline, content
        time.sleep(0.2)


def _call(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_creates_the_named_database_and_prints_a_call_that_is_accepted(redis_url, tmp_path):
    name = f"callgate_test_{RUN_ID}_demo{secrets.token_hex(3)}"  # this run's data, as every test's
    admin_url = PG_ADMIN_URL
    url = f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"
    prefix = f"cgtest:{RUN_ID}:demo{secrets.token_hex(3)}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")} | {
        "CALLGATE_DATABASE_URL": url,
        "CALLGATE_REDIS_URL": redis_url,
        "CALLGATE_REDIS__KEY_PREFIX": prefix,
        "CALLGATE_ENGINE__LISTEN_PORT": str(_free_port()),
        "CALLGATE_METRICS__LISTEN_PORT": "0",
        "CALLGATE_SYNC__METRICS_PORT": "0",
        "CALLGATE_DEMO_SKIP_SETUP": "1",
    }
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            ["bash", "scripts/demo.sh"], env=env, cwd=ROOT, stdout=out, stderr=out, start_new_session=True
        )
    try:
        content = _wait_for(log, "callgate listening on", demo)
        assert f"created database {name}" in content
        command = next(line.strip() for line in content.splitlines() if "loadtest.fsemu call" in line)
        argv = shlex.split(command)
        assert f"127.0.0.1:{env['CALLGATE_ENGINE__LISTEN_PORT']}" in argv  # the port in use
        first = _call(argv, env)
        assert "callgate_account=1000000001" in first and "200 OK" in first, first
        assert "callgate_reason=ACCEPTED" in first  # every outcome names its reason (issue 14)
        # the sync worker carries an admin change to the engine
        changed = subprocess.run(
            [".venv/bin/callgate", "admin", "customer", "update", "1000000001", "--status", "inactive"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        deadline = time.monotonic() + 20
        while "callgate_reason=" not in (after := _call(argv, env)) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert re.search(r"callgate_reason=AUTHENTICATION_FAIL", after), after
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
