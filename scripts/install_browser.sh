#!/usr/bin/env bash
# Install what the browser tests need (tests/server/test_page_browser.py):
# Chromium from the system packages (Playwright's own browser download does
# not work on these machines) and the Python playwright package. Idempotent.
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
  echo "chromium: $("$CHROMIUM" --version 2>/dev/null || echo present) ($CHROMIUM)"
else
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
      echo "need root (or sudo) to apt-get install chromium" >&2; exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update
  $sudo apt-get install -y chromium
  echo "chromium: $("$CHROMIUM" --version)"
fi

PY="${PYTHON:-python3}"
if "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "playwright: $("$PY" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
  # Also in the project's test extras: pip install -e ".[test]"
  "$PY" -m pip install "playwright>=1.45"
fi
# No `playwright install`: the tests launch the system Chromium via executable_path.
