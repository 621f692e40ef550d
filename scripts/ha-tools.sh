#!/usr/bin/env bash
# Tools the high-availability tests (tests/ha/) use besides Python:
# - systemd-analyze (Debian package `systemd`), which verifies the units in config/systemd/;
# - redis-server, which also runs the sentinels (`redis-server <file> --sentinel`).
# Installs systemd with apt-get when it is missing and this is root; otherwise says how, and the
# tests needing it skip with that reason. Nothing is started: only the binaries are wanted.
set -euo pipefail

say() { printf 'ha-tools: %s\n' "$*" >&2; }

if command -v systemd-analyze >/dev/null 2>&1; then
  say "systemd-analyze present ($(systemd-analyze --version 2>&1 | head -n1))"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  say "systemd-analyze is missing: install it with 'sudo apt-get install systemd'"
  say "(the systemd unit tests will be skipped)"
  exit 0
fi
say "installing systemd-analyze (Debian package systemd) with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends systemd >/dev/null
command -v systemd-analyze >/dev/null 2>&1 || { say "the install did not provide systemd-analyze"; exit 1; }
