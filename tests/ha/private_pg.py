"""A PostgreSQL cluster of a test's own (initdb + pg_ctl on a free port in a temporary
directory), that can be stopped and started: never the shared server on 5432.

initdb and postgres refuse to run as root: as root they run as the `postgres` user (runuser).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.private_redis import free_port


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


class PrivatePostgres:
    def __init__(self) -> None:
        # Under /tmp itself: pytest's tmp_path (0700, root's) cannot be entered by `postgres`.
        self.base = Path(tempfile.mkdtemp(prefix="cg-pg-"))
        self.dir = self.base / "pgdata"
        self.port = free_port()
        self._as: list[str] = []
        if os.getuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user for initdb")
            self._as = ["runuser", "-u", "postgres", "--"]
            self.base.chmod(0o777)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as, *command], check=True, capture_output=True, timeout=120)

    def init(self) -> PrivatePostgres:
        self._run(_tool("initdb"), "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(
            _tool("pg_ctl"), "-D", str(self.dir), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )

    def stop(self) -> None:
        self._run(_tool("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        if (self.dir / "postmaster.pid").exists():
            subprocess.run(
                [*self._as, _tool("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "-w", "stop"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(self.base, ignore_errors=True)
