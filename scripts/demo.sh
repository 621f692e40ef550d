#!/usr/bin/env bash
# Set everything up and run callgate with the demo data (config/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/venv.sh
DB=${CALLGATE_DEMO_DB:-callgate}
export CALLGATE_DATABASE_URL=${CALLGATE_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/$DB}
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE \"$DB\""
.venv/bin/callgate db migrate
.venv/bin/callgate load config/demo.yaml
.venv/bin/callgate sync --once
echo "callgate: serving on 127.0.0.1:8084 (Ctrl-C to stop); place a demo call with:"
echo "  .venv/bin/python -m loadtest.fsemu call --engine 127.0.0.1:8084 --from-user 1001 --dest 442071234567"
exec .venv/bin/callgate serve
