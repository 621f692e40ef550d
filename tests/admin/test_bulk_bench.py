"""The bulk benchmark (loadtest/admin_bulk.py) at a tiny size, so that it keeps working.

The full size (10,000 accounts with PINs, a 100,000-row import) is an opt-in benchmark:
`python -m loadtest.admin_bulk` (docs/admin.md, Measured). Here only its checks are tested:
they pass on a healthy run and report a failure when a property does not hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import admin_bulk


@pytest.mark.timeout(300)
def test_bulk_benchmark_runs_and_its_checks_hold_at_a_tiny_size(fresh_pg_url: str, tmp_path: Path) -> None:
    result = admin_bulk.run(fresh_pg_url, 200, 300, 1_500, rss_margin_mib=24, workdir=tmp_path)
    assert result.failures == []
    assert [step.name for step in result.steps] == [
        "mass create 200 accounts with PINs",
        "import 300 rows",
        "import 1500 rows",
    ]
    assert all(step.seconds > 0 and step.max_rss_mib > 0 for step in result.steps)


@pytest.mark.timeout(300)
def test_bulk_benchmark_reports_memory_that_grows_with_the_file(fresh_pg_url: str, tmp_path: Path) -> None:
    # A negative margin means "the big import must use less memory than the small one minus 1 TiB".
    result = admin_bulk.run(fresh_pg_url, 10, 10, 20, rss_margin_mib=-(1 << 20), workdir=tmp_path)
    assert len(result.failures) == 1 and result.failures[0].startswith("peak memory grew with the file")
