"""Bulk operations at scale: 10,000 accounts all-or-nothing, a 100k-row import in bounded memory.

Times are printed (run with -s), never asserted: speed is measured, not tested.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.admin import schemas as s
from tests.admin.conftest import ROOT, query

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


@pytest.mark.timeout(300)
def test_mass_create_of_10000_accounts_with_pins(service, db_url):
    started = time.perf_counter()
    result = service.mass_create(
        s.MassCreate(
            count=10000, prefix="7", account_length=10, rate_group="retail", generate_pin=True, balance="5"
        )
    )
    elapsed = time.perf_counter() - started
    print(f"\nmass create: 10000 accounts with PINs in {elapsed:.1f} s")
    assert result.count == 10000 and len({a.number for a in result.accounts}) == 10000
    assert query(
        db_url, "SELECT count(*) FROM accounts WHERE number LIKE '7%%' AND char_length(number) = 10"
    ) == [(10000,)]


def _write(path: Path, rows: int, start: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i in range(rows):
            n = start + i
            writer.writerow(
                [
                    str(n),
                    "",
                    f"First{i}",
                    "Last",
                    "Bulk Co",
                    "+44 20 7946 0000",
                    "",
                    f"bulk{n}@big.example",
                    "1 Road",
                    "London",
                    "",
                    "N1",
                    f"{i % 100}.50",
                    "0",
                    "",
                    "",
                    "2",
                    "1",
                ]
            )


def _import(env: dict[str, str], path: Path, report: Path) -> tuple[float, int, str]:
    code = (
        "import resource, sys; from engine.admin.cli import main; rc = main(sys.argv[1:]); "
        "print('maxrss-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr);"
        " sys.exit(rc)"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")} | env
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "admin",
            "customer",
            "import",
            str(path),
            "--default",
            "rate_group=retail",
            "--report",
            str(report),
            "--progress",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    rss = int(re.search(r"maxrss-kb (\d+)", done.stderr).group(1))
    return elapsed, rss, done.stderr


@pytest.mark.timeout(900)
def test_a_100k_row_import_streams_with_a_progress_bar_in_bounded_memory(env, db_url, tmp_path: Path):
    small, big = tmp_path / "10k.csv", tmp_path / "100k.csv"
    _write(small, 10_000, 5_500_000_000)
    _write(big, 100_000, 5_600_000_000)
    small_time, small_rss, _ = _import(env, small, tmp_path / "10k-report.csv")
    big_time, big_rss, stderr = _import(env, big, tmp_path / "100k-report.csv")
    print(
        f"\nimport: 10k rows {small_time:.1f} s, max RSS {small_rss // 1024} MiB;"
        f" 100k rows {big_time:.1f} s, max RSS {big_rss // 1024} MiB"
    )
    assert "100000 rows: imported 100000, failed 0" in stderr
    assert "importing" in stderr and "100%" in stderr  # the progress bar
    with (tmp_path / "100k-report.csv").open() as report:
        assert sum(1 for _ in report) == 100_001
    assert query(
        db_url, "SELECT count(*) FROM accounts WHERE number LIKE '56%%' AND char_length(number) = 10"
    ) == [(100_000,)]
    # ten times the rows, (almost) the same memory: nothing grows with the file
    assert big_rss < small_rss + 24 * 1024, (small_rss, big_rss)
