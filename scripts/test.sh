#!/usr/bin/env bash
# The test suite, exactly as CI runs it: services, virtualenv, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/venv.sh
bash scripts/tools.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
