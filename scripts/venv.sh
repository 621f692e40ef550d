#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install callgate with its test tools, quietly and idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "callgate needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv 2>/dev/null || {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null || { echo "python3-venv is missing" >&2; exit 1; }
    apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null
    "$PYTHON" -m venv .venv
  }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# setup.py builds the compiled ESL framer (engine/esl/_speedups.c) with the machine's C compiler;
# the build is optional, so say so when it fell back to the pure-Python parser, and why.
.venv/bin/python - <<'PY' >&2
from engine.esl.protocol import speedups_status
status = speedups_status()
if status["implementation"] != "compiled" and "forced" not in status["reason"]:
    print(f"note: callgate runs its pure-Python ESL parser: {status['reason']}")
PY
