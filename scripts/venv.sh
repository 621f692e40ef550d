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
