"""The systemd units of config/systemd/ pass `systemd-analyze verify` with no warning.

verify checks every directive and that ExecStart's program exists, so the units are copied
with ExecStart pointing at this checkout's `callgate` (the units name /opt/callgate/venv).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "config" / "systemd"
INSTALLED = "/opt/callgate/venv/bin/callgate"


def units_here(tmp_path: Path) -> list[Path]:
    callgate = Path(sys.executable).with_name("callgate")
    assert callgate.exists(), "the virtualenv has no callgate script (bash scripts/venv.sh)"
    copies = []
    for unit in sorted(UNITS.iterdir()):
        name = unit.name.replace("@.service", "@1.service")  # verify an instance of the template
        copy = tmp_path / name
        copy.write_text(unit.read_text().replace(INSTALLED, str(callgate)))
        copies.append(copy)
    return copies


def test_every_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (scripts/ha-tools.sh installs it as root)")
    copies = units_here(tmp_path)
    assert {c.name for c in copies} >= {
        "callgate-serve@1.service", "callgate-sync.service", "callgate-api.service",
        "callgate-fsxml.service", "callgate.target",
    }  # fmt: skip
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, copies)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # Unknown keys and unparsable values are only warnings for verify: none is allowed.
    assert done.stderr.strip() == "", done.stderr


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a misspelt hardening option is reported."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (scripts/ha-tools.sh installs it as root)")
    unit = next(c for c in units_here(tmp_path) if c.name == "callgate-sync.service")
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sideways"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectSystem" in done.stderr or "protect system" in done.stderr


def test_the_engine_unit_runs_one_process_per_core_on_a_shared_port() -> None:
    text = (UNITS / "callgate-serve@.service").read_text()
    assert "CALLGATE_ENGINE__REUSE_PORT=true" in text
    assert "CALLGATE_METRICS__MULTIPROCESS_DIR=" in text
    assert "RuntimeDirectoryPreserve=yes" in text  # one instance stopping keeps the others' metrics
