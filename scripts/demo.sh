#!/usr/bin/env bash
# Set everything up and run callgate with the demo data (config/demo.yaml):
# PostgreSQL and Redis, the virtualenv, the database named by CALLGATE_DATABASE_URL (created if
# missing, then migrated and loaded), a first snapshot, the live sync worker (so admin changes
# reach the engine), and the engine in the foreground. Ctrl-C stops both.
#
#   CALLGATE_DATABASE_URL   default postgresql://postgres@127.0.0.1:5432/callgate
#   CALLGATE_CONFIG and CALLGATE_<SECTION>__<KEY> as for every callgate command,
#   e.g. CALLGATE_ENGINE__LISTEN_PORT=9084 CALLGATE_REDIS__KEY_PREFIX=demo:
#   CALLGATE_DEMO_SKIP_SETUP=1  services and virtualenv are ready: skip services.sh and venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CALLGATE_DEMO_SKIP_SETUP:-}" ]; then
  bash scripts/services.sh
  bash scripts/venv.sh
fi
export CALLGATE_DATABASE_URL=${CALLGATE_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/callgate}
PY=.venv/bin/python

# The database the URL names, on the server the URL names (through its maintenance database).
$PY - <<'EOF'
import os

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

url = os.environ["CALLGATE_DATABASE_URL"]
name = conninfo_to_dict(url).get("dbname") or "postgres"
with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        print(f"demo: created database {name}")
EOF
.venv/bin/callgate db migrate
.venv/bin/callgate load config/demo.yaml
.venv/bin/callgate sync --once

.venv/bin/callgate sync &
SYNC_PID=$!
trap 'kill "$SYNC_PID" 2>/dev/null || true; wait "$SYNC_PID" 2>/dev/null || true' EXIT INT TERM

ENGINE=$($PY -c 'from engine.config import load_config; e = load_config().engine; print(f"{e.listen_host}:{e.listen_port}")')
cat <<EOF
callgate: serving on $ENGINE (Ctrl-C to stop); the sync worker (pid $SYNC_PID) carries admin changes to it.
A first call (demo call 1 in config/demo.yaml: SIP user alice dials a London number; ACCEPTED, bridged):
  $PY -m loadtest.fsemu call --engine $ENGINE --auth-user alice --cid 442079460001 --dest 00442079460123
EOF
.venv/bin/callgate serve
