#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the platform from its locks: requirements.lock (runtime)
# and requirements-dev.lock (test/lint tools), exact versions of every package, transitive ones
# included. requirements*.txt are the human-edited inputs; scripts/lock.sh turns them into the
# locks, and this script refuses to run when one was edited without relocking.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Stale-lock check: each lock's header records the sha256 of the requirement lines (comments and
# blank lines dropped) of the files it was generated from; scripts/lock.sh writes it the same way.
req_sha() { sed -e 's/[[:space:]]*#.*$//' -e 's/[[:space:]]*$//' -e '/^$/d' "$1" | sha256sum | cut -d' ' -f1; }
for lock in requirements.lock requirements-dev.lock; do
  [ -f "$lock" ] || { echo "error: $lock is missing: run scripts/lock.sh" >&2; exit 1; }
  grep -q '^# input-sha256: ' "$lock" || { echo "error: $lock records no input hash" >&2; exit 1; }
  while read -r _ _ src sha; do
    if [ "$(req_sha "$src")" != "$sha" ]; then
      echo "error: $src changed after $lock was generated: run scripts/lock.sh," \
        "then commit $src with the regenerated lock files" >&2
      exit 1
    fi
  done < <(grep '^# input-sha256: ' "$lock")
done

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch first and pinned: the CPU wheel; a resolver left alone would pull several GB of CUDA.
# The locks pin torch==2.13.0, which the installed 2.13.0+cpu satisfies, and list none of the
# CUDA build's nvidia-*/cuda-*/triton dependencies (see scripts/lock.sh).
.venv/bin/python -m pip install -q torch==2.13.0 -c requirements.lock
.venv/bin/python -m pip install -q -r requirements.lock -r requirements-dev.lock
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check >&2; exit 1; }

# Debian packages, each installed only when missing (one apt-get update for all of them):
# - chromium + chromedriver: the browser tests (tests/test_browser.py) and scripts/screenshots.py
#   drive Debian's chromium; nothing downloads a browser at run time;
# - redis-server: the Redis broker binary of the embedded Celery mode (PyPI's redis-server wheel
#   has no Python 3.11 build).
apt_pkgs=()
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  apt_pkgs+=(chromium chromium-driver)
fi
command -v redis-server >/dev/null 2>&1 || apt_pkgs+=(redis-server)
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # Keep maintainer scripts from starting a system redis-server on :6379 (the embedded stack
    # runs its own broker): a policy-rc.d that denies service starts, only for this install.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${apt_pkgs[@]}" >/dev/null
    [ -z "$policy" ] || rm -f "$policy"
  else
    echo "warning: ${apt_pkgs[*]} missing and not root: the browser tests and the embedded" \
      "Celery mode will be skipped" >&2
  fi
fi
echo "environment ready: $(.venv/bin/python --version), $(.venv/bin/python -m pip --version | cut -d' ' -f1-2)"
