#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a local .venv, torch 2.13.0 first (so the CPU build is
# used where it is the one on offer, and pip never pulls a newer CUDA build), then moerl itself
# with its test extra. Re-running after a pyproject.toml change reinstalls; otherwise it is a
# no-op that takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "moerl setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "moerl setup: installing torch==2.13.0"
  python -m pip install -q torch==2.13.0
fi
stamp=.venv/.moerl-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "moerl setup: installing moerl and its dependencies"
  python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
