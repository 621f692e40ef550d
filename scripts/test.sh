#!/usr/bin/env bash
# The test suite, exactly as CI runs it: services, virtualenv, lint, types, tests (twice: see below).
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
bash scripts/ha-tools.sh
bash scripts/browser.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # pyproject.toml [tool.mypy]: engine, loadtest and tests; strict for esl, call, rules, decider, state
.venv/bin/python -m pytest "$@"
# The micro-benchmarks, each once as a plain test (--benchmark-disable: nothing timed), so that
# what they check still holds; timing them is opt-in (docs/testing.md).
.venv/bin/python -m pytest loadtest/bench --benchmark-disable -q
# The whole suite again on the pure-Python ESL parser, the fallback a machine without a C
# compiler runs (engine/esl/_speedups.c is optional; docs/performance.md). The first pass ran
# the compiled one (tests/test_speedups_build.py fails if the set-up command did not build it).
echo "== the same suite on the pure-Python parser (CALLGATE_NO_SPEEDUPS=1) =="
CALLGATE_NO_SPEEDUPS=1 exec .venv/bin/python -m pytest "$@"
