#!/usr/bin/env bash
# Idempotent set-up of a real SGLang 0.5.23 server's CPU environment in its own venv
# (.venv-sglang; SGLANG_VENV overrides), for the tests marked `sglang` and for
# `rollout.server: sglang` on a machine without CUDA. GPU clusters install `moerl[sglang]` instead.
#
#   launch/setup_sglang.sh          # ~3 min and ~3.5 GB the first time; a second when done
#
# Its own venv because SGLang pins torch==2.14.1, its own transformers and many packages; it runs
# on the CPU torch==2.13.0 wheel, and torch is constrained so pip never swaps in a CUDA build.
# Steps: torch (CPU) -> sglang==0.5.23 --no-deps -> SGLang's own requirements minus the CUDA/kernel
# packages (launch/sglang_cpu/shims.py requirements) -> the CPU shims (shims.py apply, which also
# checks them). A stamp (hash of this script and the shims) makes a re-run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SGLANG_VENV:-.venv-sglang}
PYTHON=${SGLANG_PYTHON:-python3.11}
SHIMS=launch/sglang_cpu
stamp="$VENV/.moerl-sglang-installed"
want=$(cat "$0" "$SHIMS"/shims.py "$SHIMS"/sgl_kernel/__init__.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" == "$want" ]; then
  exit 0
fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "moerl setup_sglang: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
constraints="$VENV/moerl-constraints.txt"
printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$constraints"
pip_install() { PIP_CONSTRAINT="$constraints" "$py" -m pip install -q --disable-pip-version-check "$@"; }
echo "moerl setup_sglang: torch 2.13.0 (CPU), sglang 0.5.23 and its CPU requirements"
pip_install torch==2.13.0 packaging
pip_install --no-deps sglang==0.5.23
reqs="$VENV/moerl-sglang-requirements.txt"
"$py" "$SHIMS"/shims.py requirements > "$reqs"
pip_install -r "$reqs"
"$py" "$SHIMS"/shims.py apply
# A new file, not a write into the old one: hard-linked venv copies share the old one.
echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
echo "moerl setup_sglang: done in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) in $VENV"
