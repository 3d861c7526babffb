#!/usr/bin/env bash
# moerl's GPU check on one CUDA GPU: one command, one JSON summary line on stdout (see
# tools/gpu_check.py for the checks). On a machine without network, the Python packages that are
# missing (megatron-core) come from wheels in .whl/ (tools/gpu_wheels.sh fetches them where pip
# works); moerl itself runs from this checkout.
#
#   tools/gpu_check.sh [OUT_DIR] [--only CHECK ...]
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
OUT_DIR="${1:-${OUT:-/tmp}/moerl_gpu_check}"
shift || true
PY="${PYTHON:-python3}"
SITE=/tmp/moerl_gpu_site
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo '{"all_ok": false, "error": "megatron-core is not importable and .whl/ holds no wheels: run tools/gpu_wheels.sh where pip works"}'
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >&2 || { echo '{"all_ok": false, "error": "installing .whl/ failed"}'; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_check.py --out "$OUT_DIR" "$@"
