"""The load-test harness, the FreeSWITCH emulator and the benchmarks (docs/performance.md).

Not part of the wheel: it runs from a checkout of the repository. Its child processes
(``python -m loadtest...``) are given the checkout on ``PYTHONPATH`` by :func:`child_env`, so
they import this package whatever their working directory is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with the checkout first on PYTHONPATH."""
    result = dict(os.environ if env is None else env)
    paths = [str(REPO_ROOT), *filter(None, result.get("PYTHONPATH", "").split(os.pathsep))]
    result["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return result
