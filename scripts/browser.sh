#!/usr/bin/env bash
# The browser of the web admin's tests (tests/web/): Debian's `chromium`, driven by Playwright with
# executable_path (browser downloads are not possible here: `playwright install` is never run).
# Installs it with apt-get when running as root and it is missing; otherwise says so and returns 0:
# the browser tests then skip with the reason (tests/web/conftest.py).
set -euo pipefail
BROWSER=${CALLGATE_TEST_CHROMIUM:-/usr/bin/chromium}
[ -x "$BROWSER" ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium fonts-dejavu-core; } >/dev/null 2>&1 \
    || echo "apt-get could not install chromium: the browser tests will skip" >&2
else
  echo "$BROWSER is missing and this is not root: the browser tests will skip" >&2
fi
exit 0
