#!/usr/bin/env bash
# Make Debian's Chromium available for the end-to-end browser tests.
# Idempotent: does nothing when /usr/bin/chromium exists. Without root/apt it explains
# and returns 0 so the unit tests still run; the browser tests then skip with this reason
# (under CI=true they fail instead, see tests/conftest.py).
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "bnviz: apt-get not found; browser tests will be skipped (install Chromium at /usr/bin/chromium to run them)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "bnviz: not root and no passwordless sudo; run 'sudo apt-get install -y chromium' to enable the browser tests" >&2
    exit 0
  fi
fi
echo "bnviz: installing Debian chromium for the browser tests (about 40 s, once)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || echo "bnviz: apt-get install chromium failed; browser tests will be skipped" >&2
exit 0
