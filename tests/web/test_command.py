"""`callgate web` as an operator runs it: a process that serves the sign-in page and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support import wait_until

CALLGATE = Path(sys.executable).with_name("callgate")


def test_callgate_web_serves_and_stops_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    process = subprocess.Popen(
        [str(CALLGATE), "web", "--host", "127.0.0.1", "--port", "0"],
        env={**os.environ, **env, "CALLGATE_WEB__SECRET_KEY": "s" * 40},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "callgate web admin listening on http://127.0.0.1:PORT/"
        assert "listening on http://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        with urllib.request.urlopen(url + "login", timeout=10) as response:
            page = response.read().decode()
        assert response.status == 200 and 'name="csrf"' in page
        assert "s" * 40 not in page
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: process.poll() is not None, timeout=20)
        assert process.returncode == 0
        assert process.stderr is not None and "s" * 40 not in process.stderr.read()  # the key is never logged
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
