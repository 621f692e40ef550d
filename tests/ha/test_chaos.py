"""The CI-sized chaos run (issue 17 item 5, and issue 13's crash list with engine processes under
load): ``python -m loadtest.chaos --short`` as a subprocess, its JSON report asserted.

The run starts its own PostgreSQL cluster, Redis primary + replica + three sentinels, two
``callgate serve``, ``callgate sync`` and two emulated switches, keeps calls going, and injects:
an engine killed with calls up, a Sentinel failover, Redis restarted on its AOF with calls up, the
sync worker killed mid burst of CDRs and admin changes, PostgreSQL stopped and started, a switch's
inbound socket closed during a reconciliation, a slow Redis path, and duplicated
CHANNEL_HANGUP_COMPLETE events. What is asserted is in the test below; the method is in
loadtest/chaos/run.py and docs/high-availability.md.

The pure part (how an unchecked bridge, an unbilled call and a refusal window are counted) is
tested without any process, so the detector is shown to fail when it should.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.chaos.load import CallRecord
from loadtest.chaos.run import FaultResult, summarise, unchecked
from tests.support import ROOT

# Faults where a loss is the documented outcome, not a defect: calls up on a killed engine are not
# billed (their hangup is never seen); a failover may lose the primary's last settles.
MAY_LOSE_BILLING = {"engine_kill", "redis_failover"}


def record(uuid: str, started: float, outcome: str = "BRIDGED", ended: float | None = None) -> CallRecord:
    answered = outcome == "BRIDGED"
    end = ended if ended is not None else started + 2
    return CallRecord(uuid, "alice", 0, started, end, outcome, answered, 2 if answered else 0)


def test_the_accounting_reports_a_bridge_no_registry_held_and_the_refusal_window() -> None:
    records = [
        record("before", 1.0, ended=12.0),  # up when the fault came: counted in its unchecked/unbilled check
        record("checked", 10.5),
        record("refused-1", 10.6, "ENGINE_DEGRADED"),
        record("refused-2", 12.0, "ENGINE_DEGRADED"),
        record("limit", 12.5, "CONCURRENT_LIMIT"),
        record("unchecked", 13.0),
        record("later", 30.0),  # outside the window
    ]
    result = FaultResult("f", "f", injected_at=10.0, window_end=20.0, recovery="first bridged call after")
    summarise([result], records, seen={"checked", "later"}, cdrs={"checked", "unchecked", "later"})
    assert [r.uuid for r in unchecked(records, {"checked", "later"})] == ["before", "unchecked"]
    assert (result.calls, result.bridged, result.business_rejects) == (5, 2, 1)
    assert result.unchecked_bridges == 2  # "before" (up at the injection) and "unchecked"
    assert (result.wrongly_refused, result.refused_for_s, result.recovered_after_s) == (2, 2.0, 3.0)
    assert result.unbilled_answered == 1  # "before" has no CDR


def run_chaos(out: Path, timeout: float = 540) -> subprocess.CompletedProcess[str]:
    """The run in a session of its own: if it overruns, SIGTERM lets it tear its processes down,
    and whatever is left of its group is killed, so no server outlives the test."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.chaos", "--short", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)  # the run is bounded by its own timings (3-4 minutes on a busy 2-core machine)
def test_the_short_chaos_run_bridges_nothing_unchecked_and_keeps_the_ledger_exact(tmp_path: Path) -> None:
    for program in ("redis-server", "initdb", "pg_ctl"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    done = run_chaos(tmp_path)
    report_path = tmp_path / "chaos.json"
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-5000:]
    data = json.loads(report_path.read_text())
    print("\n" + (tmp_path / "chaos.md").read_text())
    faults = {f["name"]: f for f in data["faults"]}
    assert set(faults) == {
        "engine_kill", "redis_failover", "redis_restart", "sync_kill", "pg_stop",
        "inbound_unreachable", "redis_slow", "duplicate_hangup",
    }  # fmt: skip
    final = data["final"]
    # Never a call bridged without its limits/funds script having run and succeeded.
    assert final["unchecked_bridges"] == 0
    assert all(f["unchecked_bridges"] == 0 for f in faults.values())
    # The ledger equation, to the cent, for every account, after every fault and at the end; and
    # Redis never counts a debit PostgreSQL does not have (a duplicated hangup settled twice).
    assert final["ledger_exact"] and not final["spent_over_recorded"], final
    for fault in faults.values():
        assert fault["ledger_exact"] and not fault["spent_over_recorded"], fault
    # One reconciliation after each fault: counters and reservations equal the live calls.
    for fault in faults.values():
        assert fault["counters_equal"] and fault["reservations_equal"], fault
    assert final["counted_after_all_ended"] == 0 and final["reserved_after_all_ended"] == 0
    # Nothing is refused while only the sync worker, PostgreSQL or a switch's inbound socket is
    # away, or an engine (the switch moves to the next one); refusals around Redis faults end.
    for name in ("engine_kill", "sync_kill", "pg_stop", "inbound_unreachable", "duplicate_hangup"):
        assert faults[name]["wrongly_refused"] == 0, faults[name]
    for name in ("redis_failover", "redis_restart", "redis_slow"):
        assert faults[name]["recovered_after_s"] is not None, faults[name]
    # Calls are billed, through every fault but the two whose loss is documented.
    for name, fault in faults.items():
        if name not in MAY_LOSE_BILLING:
            assert fault["unbilled_answered"] == 0, fault
    assert not any(note.startswith(("DEFECT", "TIMEOUT")) for f in faults.values() for note in f["notes"]), (
        faults
    )
    # Duplicated CHANNEL_HANGUP_COMPLETE: one CDR and one debit per call (else a DEFECT note above).
    duplicated = re.search(r"(\d+) calls with a duplicated hangup: (\d+) CDRs, (\d+) debits",
                           " ".join(faults["duplicate_hangup"]["notes"]))  # fmt: skip
    assert duplicated is not None and int(duplicated[1]) > 0
    assert duplicated[1] == duplicated[2] == duplicated[3]
    # The load was real: rejects in the mix, prepaid accounts running out of funds.
    outcomes = final["outcomes"]
    assert outcomes.get("BRIDGED", 0) > 200 and outcomes.get("CONCURRENT_LIMIT", 0) > 0
    assert final["prepaid_refused_no_funds"] > 0
    assert data["passed"] and done.returncode == 0, done.stderr[-3000:]
