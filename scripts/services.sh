#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer: reuse running
# servers, start installed ones, or install them with apt-get (as root only).
set -euo pipefail

PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_PORT=6379

say() { printf 'services: %s\n' "$*" >&2; }
fail() { say "$*"; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

apt_install() {
  is_root || fail "$1 is missing; install it (apt-get install $*) or run this as root"
  command -v apt-get >/dev/null || fail "$1 is missing and apt-get is not available"
  say "installing $* with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }

trust_local_tcp() {
  # Only for a cluster this script just installed: let the developer connect as postgres over TCP.
  local hba
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n1)
  sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
}

start_postgres() {
  if pg_up; then return; fi
  local installed_now=0
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql postgresql-client
    installed_now=1
  fi
  is_root || fail "PostgreSQL is not running on $PG_HOST:$PG_PORT; start it (pg_ctlcluster <version> main start)"
  [ "$installed_now" = 1 ] && trust_local_tcp
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
  for _ in $(seq 1 50); do pg_up && return; sleep 0.2; done
  fail "PostgreSQL did not come up on $PG_HOST:$PG_PORT"
}

redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

start_redis() {
  if command -v redis-cli >/dev/null && redis_up; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  if redis_up; then return; fi
  mkdir -p /tmp/callgate-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /tmp/callgate-redis --logfile /tmp/callgate-redis/redis.log
  for _ in $(seq 1 50); do redis_up && return; sleep 0.1; done
  fail "Redis did not come up on 127.0.0.1:$REDIS_PORT"
}

command -v pg_isready >/dev/null || apt_install postgresql-client
start_postgres
start_redis
say "PostgreSQL and Redis are up"
