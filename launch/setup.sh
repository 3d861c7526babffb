#!/usr/bin/env bash
# Idempotent set-up on a fresh machine.
#
#   launch/setup.sh           .venv, the primary stack: Python 3.12 with megatron-core 0.19 where
#                             the machine has a Python 3.12 (on PATH, or installed by pyenv, even
#                             when it is not pyenv's active version); else python3 (3.10 or 3.11)
#                             with megatron-core 0.16.1. PYTHON=/path/to/python chooses.
#   launch/setup.sh --compat  .venv-mcore016: Python 3.11 (or 3.10) with megatron-core 0.16.1, where
#                             tools/test.sh runs the compatibility tests. COMPAT_PYTHON chooses.
#   launch/setup.sh --print-python-version
#                             prints the Python version .venv is (or will be) built on, e.g. 3.12,
#                             and sets up nothing (tools/test.sh decides on the compat step early).
#
# torch 2.13.0 goes in first: a local CPU wheel if pip's find-links has one for this Python; else,
# on 3.10/3.11, the CPU build from the PyTorch CPU index (a 3.10/3.11 venv never gets the CUDA
# build), and on 3.12 PyPI's build (CUDA, which runs on CPU; PyPI has no CPU wheel for it). Then
# moerl with its test extra: pyproject.toml's environment markers pick the megatron-core release
# for the venv's Python. A stamp (pyproject.toml's hash) makes a re-run a no-op of a second; a
# changed pyproject.toml reinstalls; a venv on another Python than the chosen one is rebuilt.
# On 3.12 both installs go through uv (installed into the venv first; pip where that fails):
# it fetches PyPI's CUDA torch and its ~20 nvidia wheels in parallel (measured on this 2-core
# machine, fresh cache: 36 s, against pip's 2m15s). On 3.10/3.11 pip installs, since it is pip's
# configuration that knows the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
PYENV_VERSIONS=${PYENV_ROOT:-$HOME/.pyenv}/versions

# The first candidate that runs and is Python $1.$2 (pyenv's shims exist for every installed
# version but fail for the inactive ones, hence the direct paths).
find_python() {
  local major=$1 minor=$2 candidate
  for candidate in "python$major.$minor" /usr/bin/python"$major.$minor" \
      /usr/local/bin/python"$major.$minor" "$PYENV_VERSIONS/$major.$minor".*/bin/python"$major.$minor" \
      python3; do
    if "$candidate" -c "import sys, venv; sys.exit(sys.version_info[:2] != ($major, $minor))" \
        2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

python_minor() {  # "3.12" for the interpreter $1
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

if [ "${1:-}" = "--compat" ]; then
  VENV=.venv-mcore016
  PY=${COMPAT_PYTHON:-$(find_python 3 11 || find_python 3 10 || true)}
  if [ -z "$PY" ]; then
    echo "moerl setup: no Python 3.10 or 3.11 found for $VENV (megatron-core 0.16.1 needs one);" \
         "set COMPAT_PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
else
  VENV=.venv
  PY=${PYTHON:-$(find_python 3 12 || echo python3)}
fi
want_minor=$(python_minor "$PY")
if [ "${1:-}" = "--print-python-version" ]; then
  echo "$want_minor"
  exit 0
fi
case "$want_minor" in
  3.10|3.11|3.12) ;;
  *) echo "moerl setup: $PY is Python $want_minor; moerl needs 3.12 (megatron-core 0.19) or" \
          "3.10/3.11 (megatron-core 0.16.1)" >&2
     exit 1 ;;
esac
if [ -x "$VENV/bin/python" ] && [ "$(python_minor "$VENV/bin/python")" != "$want_minor" ]; then
  echo "moerl setup: $VENV is Python $(python_minor "$VENV/bin/python"), wanted $want_minor: rebuilding it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "moerl setup: creating $VENV with $("$PY" --version) ($PY)"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# venv_install ARGS...: uv on 3.12 (fetched into the venv on first use), else pip.
venv_install() {
  if [ "$want_minor" = "3.12" ] && { [ -x "$VENV/bin/uv" ] || python -m pip install -q uv; }; then
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "$@"
  else
    python -m pip install -q "$@"
  fi
}
if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "moerl setup: installing torch==$TORCH_VERSION into $VENV"
  if ! python -m pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    if [ "$want_minor" = "3.12" ]; then
      venv_install "torch==$TORCH_VERSION"
    else
      python -m pip install -q "torch==$TORCH_VERSION+cpu" \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
  fi
fi
stamp=$VENV/.moerl-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "moerl setup: installing moerl and its dependencies into $VENV"
  venv_install -e '.[test]'
  echo "$want" > "$stamp"
  python -c "import importlib.metadata as m, sys; print('moerl setup: $VENV = Python', sys.version.split()[0], '+ torch', m.version('torch'), '+ megatron-core', m.version('megatron-core'))"
fi
