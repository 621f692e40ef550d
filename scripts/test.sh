#!/usr/bin/env bash
# The test suite, exactly as CI runs it: services, virtualenv, lint, types, tests.
#   bash scripts/test.sh [pytest args]          everything (.ci/run calls exactly this)
#   bash scripts/test.sh --fast [pytest args]   the developer loop: no server started, no lint,
#                                               only the tests marked neither e2e nor slow
#                                               (docs/testing.md)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
  shift
  [ -x .venv/bin/python ] || bash scripts/venv.sh
  exec .venv/bin/python -m pytest -m "not e2e and not slow" "$@"
fi
bash scripts/services.sh
bash scripts/venv.sh
bash scripts/tools.sh
bash scripts/browser.sh
.venv/bin/ruff check .
.venv/bin/mypy  # pyproject.toml [tool.mypy]: strict for esl, call, rules, decider, state
exec .venv/bin/python -m pytest "$@"
