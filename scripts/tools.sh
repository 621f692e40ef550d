#!/usr/bin/env bash
# Tools the test suite uses besides Python: promtool (Debian package `prometheus`), which checks the
# alerting rules (config/prometheus/alerts.yml) and the /metrics output.
# Installs what is missing with apt-get when running as root; otherwise says how, and leaves the
# tests that need the tool to skip with that reason. A failed install as root is an error.
set -euo pipefail

say() { printf 'tools: %s\n' "$*" >&2; }

if command -v promtool >/dev/null 2>&1; then
  say "promtool present ($(promtool --version 2>&1 | head -n1))"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  say "promtool is missing and this is not root: install it with 'sudo apt-get install prometheus'"
  say "(the promtool tests will be skipped)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "promtool is missing and apt-get is not available: install promtool (Prometheus 2.x) by hand"
  say "(the promtool tests will be skipped)"
  exit 0
fi

say "installing promtool (Debian package prometheus) with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# Only the binary is wanted: no service is started where there is no init system, and
# policy-rc.d keeps a systemd host from starting one during the install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null 2>&1 || { say "apt-get installed prometheus but promtool is not on PATH"; exit 1; }
say "promtool installed ($(promtool --version 2>&1 | head -n1))"
