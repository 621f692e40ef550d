"""The CDR insertion benchmark itself runs and checks what it measures (its speed is not asserted)."""

from __future__ import annotations

import json

import pytest

from loadtest import cdr_insert
from tests.conftest import PG_ADMIN_URL


def test_benchmark_writes_every_call_and_keeps_the_ledger(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cdr_insert.main(
        [
            "--pg-admin",
            PG_ADMIN_URL,
            "--redis",
            redis_url,
            "--calls",
            "600",
            "--customers",
            "20",
            "--resellers",
            "2",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["cdr_rows"], report["ledger_mismatches"]) == (600, 0)
    assert report["cdr_write_calls_per_s"] > 0


@pytest.mark.e2e
def test_funds_cost_benchmark_runs_on_a_private_redis(capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from loadtest import funds_cost

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    assert funds_cost.main(["--calls", "200", "--accounts", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chain_3"]["reserve_redis_cpu_us"] > 0 and report["baseline_evalsha"]["redis_cpu_us"] >= 0
