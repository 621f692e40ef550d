"""Bulk customer management at scale: mass create and a 100k-row CSV import (docs/admin.md).

    python -m loadtest.admin_bulk                      # 10,000 accounts with PINs; 10k and 100k-row imports
    python -m loadtest.admin_bulk --accounts 2000 --small-rows 2000 --big-rows 20000 --json out.json

An opt-in benchmark, not part of the test suite (``scripts/test.sh``): the full size takes a
minute or more on a 2-core machine. ``tests/admin/test_bulk_bench.py`` runs it at a tiny size
so that it keeps working.

Each run creates a private database ``callgate_bench_<random>`` on the PostgreSQL server of
``--admin-url`` (dropped afterwards), loads a one-rate-group catalogue, and drives the real
``callgate admin`` command in child processes, as an operator would:

* ``customer mass-create --count N --generate-pin``: the time, and that N accounts exist;
* ``customer import`` of a small and a big file (ASTPP's header, no passwords, ``--progress``):
  the time and the child's peak memory (max RSS) for each, that every row was imported and
  reported, that the progress bar reached 100 %, and that the big file's peak memory stays
  within ``--rss-margin-mib`` of the small one's (nothing grows with the file).

Times are reported, never checked: speed is measured, not tested. The properties (counts,
report, bounded memory) are checked; the exit status is 1 when one of them does not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from loadtest import REPO_ROOT

# The ASTPP customer-import header (docs/admin.md, Import).
HEADER = [
    "Account",
    "Password",
    "First Name",
    "Last Name",
    "Company",
    "Phone",
    "Mobile",
    "Email",
    "Address",
    "City",
    "Province/State",
    "Zip/Postal Code",
    "Balance",
    "Credit Limit",
    "SIP Username",
    "SIP Password",
    "Concurrent Calls",
    "CPS",
]
CATALOGUE = {"rate_groups": [{"name": "retail", "rates": [{"prefix": "44", "cost_per_minute": "0.0100"}]}]}
MASS_PREFIX, SMALL_START, BIG_START = "7", 5_500_000_000, 5_600_000_000


@dataclass
class Step:
    name: str
    seconds: float
    max_rss_mib: float
    stderr_tail: str = field(repr=False, default="")


@dataclass
class Result:
    accounts: int
    small_rows: int
    big_rows: int
    steps: list[Step] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        for step in data["steps"]:
            step.pop("stderr_tail")
        return data


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A database private to this run, dropped afterwards whatever happens."""
    name = f"callgate_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def callgate(env: dict[str, str], *args: str, timeout: float = 3600) -> tuple[float, float, str]:
    """Run `callgate ARGS` in a child process: (seconds, peak RSS in MiB, stderr). Fails on exit != 0."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            _pid, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"callgate {' '.join(args[:3])} exited {child.returncode}:\n{stderr[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024, stderr


def write_csv(path: Path, rows: int, start: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i in range(rows):
            n = start + i
            contact = [n, "", f"First{i}", "Last", "Bulk Co", "+44 20 7946 0000", "", f"bulk{n}@big.example"]
            writer.writerow([*contact, "1 Road", "London", "", "N1", f"{i % 100}.50", "0", "", "", "2", "1"])


def count_accounts(url: str, prefix: str, length: int) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM accounts WHERE number LIKE %s AND char_length(number) = %s",
            [prefix + "%", length],
        ).fetchone()
    return int(row[0]) if row else 0


def run(
    url: str, accounts: int, small_rows: int, big_rows: int, rss_margin_mib: float, workdir: Path
) -> Result:
    """The benchmark on the empty database `url` (which it migrates and fills)."""
    result = Result(accounts, small_rows, big_rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    env.update(CALLGATE_CONFIG=str(REPO_ROOT / "config" / "callgate.toml"), CALLGATE_DATABASE_URL=url)
    catalogue = workdir / "catalogue.json"
    catalogue.write_text(json.dumps(CATALOGUE))
    callgate(env, "db", "migrate")
    callgate(env, "load", str(catalogue))

    seconds, rss, stderr = callgate(
        env, "admin", "customer", "mass-create", "--count", str(accounts), "--prefix", MASS_PREFIX,
        "--account-length", "10", "--rate-group", "retail", "--generate-pin", "--balance", "5",
        "--output", str(workdir / "cards.csv"),
    )  # fmt: skip
    result.steps.append(Step(f"mass create {accounts} accounts with PINs", seconds, rss, stderr[-500:]))
    created = count_accounts(url, MASS_PREFIX, 10)
    if created != accounts:
        result.failures.append(f"mass create: {created} accounts exist, {accounts} expected")

    imports = []
    for label, rows, start in (("small", small_rows, SMALL_START), ("big", big_rows, BIG_START)):
        source, report = workdir / f"{label}.csv", workdir / f"{label}-report.csv"
        write_csv(source, rows, start)
        seconds, rss, stderr = callgate(
            env, "admin", "customer", "import", str(source), "--default", "rate_group=retail",
            "--report", str(report), "--progress",
        )  # fmt: skip
        result.steps.append(Step(f"import {rows} rows", seconds, rss, stderr[-500:]))
        imports.append(rss)
        if f"{rows} rows: imported {rows}, failed 0" not in stderr:
            result.failures.append(f"import of {rows} rows: summary missing: {stderr[-300:]!r}")
        if "importing" not in stderr or "100%" not in stderr:
            result.failures.append(f"import of {rows} rows: no progress bar reaching 100 %")
        with report.open() as lines:
            reported = sum(1 for _ in lines) - 1
        if reported != rows:
            result.failures.append(f"import of {rows} rows: {reported} rows reported")
        imported = count_accounts(url, str(start)[:2], 10)
        if imported != rows:
            result.failures.append(f"import of {rows} rows: {imported} accounts exist")
    small_rss, big_rss = imports
    if big_rss > small_rss + rss_margin_mib:
        result.failures.append(
            f"peak memory grew with the file: {small_rss:.0f} MiB for {small_rows} rows,"
            f" {big_rss:.0f} MiB for {big_rows} rows (margin {rss_margin_mib} MiB)"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.admin_bulk", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--accounts", type=int, default=10_000, help="mass create size (default 10000)")
    parser.add_argument("--small-rows", type=int, default=10_000, help="rows of the small import")
    parser.add_argument("--big-rows", type=int, default=100_000, help="rows of the big import")
    parser.add_argument("--rss-margin-mib", type=float, default=24.0, help="allowed peak-memory growth")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    sizes = (args.accounts, args.small_rows, args.big_rows)
    workdir = tempfile.TemporaryDirectory(prefix="callgate-admin-bulk-")
    with workdir as tmp, scratch_database(args.admin_url) as url:
        result = run(url, *sizes, args.rss_margin_mib, Path(tmp))
    for step in result.steps:
        print(f"{step.name:45} {step.seconds:8.1f} s   max RSS {step.max_rss_mib:6.0f} MiB")
    for failure in result.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
