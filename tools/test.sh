#!/usr/bin/env bash
# The whole test suite, after the same idempotent set-up as the main job. Fails when any test
# fails or when no test ran. Extra arguments go to pytest (e.g. -k routing, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
# A real SGLang server's CPU environment and the tests that run it (marker `sglang`; README:
# time and disk); MOERL_SKIP_SGLANG=1 skips both.
if [ "${MOERL_SKIP_SGLANG:-0}" = 1 ]; then set -- -m "not sglang" "$@"; else
  launch/setup_sglang.sh
  export MOERL_REQUIRE_SGLANG=1
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "tools/test.sh: no tests ran" >&2
  exit 1
fi
exit "$status"
