#!/usr/bin/env bash
# The test command, in two steps, each after the same idempotent set-up as the main job:
#   1. the whole suite in .venv, the primary stack (Python 3.12, megatron-core 0.19);
#   2. the tests marked `compat` in .venv-mcore016 (Python 3.10/3.11, megatron-core 0.16.1): HF
#      parity at TP=2/EP=2, routing-replay exactness, an end-to-end RL run, the CPU patches and
#      Megatron-internal guards. Skipped when .venv is that stack already (no Python 3.12 here),
#      or with MOERL_TEST_COMPAT=0.
# Fails when any test fails or when a step ran no test. Extra arguments go to pytest in both steps
# (e.g. -k routing, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
failed=0

# pytest in venv $1 (activated: tests start python and torchrun processes) with the remaining
# arguments; non-zero when a test failed or none ran.
run_pytest() {
  local venv=$1 status
  shift
  set +e
  # shellcheck disable=SC1091
  (. "$venv/bin/activate" && python -m pytest "$@")
  status=$?
  set -e
  if [ "$status" -eq 5 ]; then
    echo "tools/test.sh: no tests ran in $venv" >&2
    return 1
  fi
  return "$status"
}

launch/setup.sh
# A real SGLang server's CPU environment and the tests that run it (marker `sglang`; README:
# time and disk); MOERL_SKIP_SGLANG=1 skips both.
main_marker=()
if [ "${MOERL_SKIP_SGLANG:-0}" = 1 ]; then
  main_marker=(-m "not sglang")
else
  launch/setup_sglang.sh
  export MOERL_REQUIRE_SGLANG=1
fi
run_pytest .venv ${main_marker[@]+"${main_marker[@]}"} "$@" || failed=1

if [ "${MOERL_TEST_COMPAT:-1}" = "0" ]; then
  echo "tools/test.sh: MOERL_TEST_COMPAT=0: megatron-core 0.16.1 compatibility tests skipped"
elif .venv/bin/python -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
  echo "tools/test.sh: .venv is Python < 3.12 with megatron-core 0.16.1 already: no compat step"
else
  launch/setup.sh --compat
  run_pytest .venv-mcore016 -m compat "$@" || failed=1
fi
exit "$failed"
