#!/usr/bin/env bash
# The test command. After the same idempotent set-up as the main job (.venv, the primary stack:
# Python 3.12, megatron-core 0.19) it runs:
#   1. the whole suite in .venv except the tests marked `sglang`;
#   2. the `sglang` tests (real SGLang 0.5.23 servers from .venv-sglang) in .venv;
#   3. the tests marked `compat` in .venv-mcore016 (Python 3.10/3.11, megatron-core 0.16.1): HF
#      parity at TP=2/EP=2, routing-replay exactness, an end-to-end RL run, the CPU patches and
#      Megatron-internal guards. It runs in the background as soon as its own set-up is done,
#      usually while .venv's set-up is still downloading (CPU the other steps cannot use yet);
#      its output is printed after step 2's.
# Steps 1 and 2 run in $MOERL_TEST_WORKERS pytest-xdist workers (default 2; 1: one process).
# The set-ups of steps 2 and 3 (launch/setup_sglang.sh, launch/setup.sh --compat: downloads and
# unpacking, minutes on a fresh machine, a second once stamped) run in the background from the
# start, beside .venv's; their logs are printed if they fail. MOERL_SKIP_SGLANG=1 skips step 2
# and its set-up; MOERL_TEST_COMPAT=0 skips step 3 (it is skipped anyway when .venv is that
# stack already: no Python 3.12 here). One warm-started model (tests/conftest.py) is cached for
# all steps in a temporary folder ($MOERL_TEST_CACHE) that is removed at the end. The suite's
# torchrun launches go through a fork server (tests/forkserver.py; MOERL_TEST_LAUNCHER=torchrun:
# real torchrun).
#
# Fails when any test fails or a set-up fails, and when a step ran no test. Extra arguments go to
# pytest in every step (e.g. -x, -k routing; with -k, a step that selects nothing is not a
# failure as long as some step ran tests). An -m of your own replaces the steps: one pytest run in
# .venv with your arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
failed=0
ran_tests=0
strict=1  # without arguments every step must run tests
[ $# -eq 0 ] || strict=0

# pytest in venv $1 (activated: tests start python and torchrun processes) with the remaining
# arguments; non-zero when a test failed, or when none ran and $strict says every step must.
run_pytest() {
  local venv=$1 status
  shift
  set +e
  # shellcheck disable=SC1091
  # --durations: the slowest tests of each step in the log, to keep the whole under 30 minutes.
  (. "$venv/bin/activate" && python -m pytest --durations=15 "$@")
  status=$?
  set -e
  if [ "$status" -eq 5 ]; then
    echo "tools/test.sh: no tests ran in $venv ($*)" >&2
    [ "$strict" = 1 ] && return 1
    return 0
  fi
  [ "$status" -eq 0 ] && ran_tests=1
  return "$status"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/moerl-test.XXXXXX")
export MOERL_TEST_CACHE=$work/cache
mkdir -p "$MOERL_TEST_CACHE"
bg_pids=()
cleanup() {
  local pid
  for pid in ${bg_pids[@]+"${bg_pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

own_marker=0
for arg in "$@"; do
  if [ "$arg" = "-m" ] || [[ "$arg" == -m?* ]]; then
    own_marker=1
  fi
done
if [ "$own_marker" = 1 ]; then
  launch/setup.sh
  run_pytest .venv "$@" || failed=1
  [ "$ran_tests" = 1 ] || failed=1
  exit "$failed"
fi

# Set-ups other than .venv's run in the background; each writes its log and exit status in $work.
background_setup() {  # NAME COMMAND...
  local name=$1
  shift
  ( set +e; "$@" > "$work/$name.log" 2>&1; echo $? > "$work/$name.status" ) &
  bg_pids+=("$!")
}
# 0 when background set-up $1 finished well; else prints its log and fails.
await_setup() {
  local name=$1 pid=$2
  wait "$pid" || true
  if [ "$(cat "$work/$name.status" 2>/dev/null)" = 0 ]; then
    cat "$work/$name.log"
    return 0
  fi
  echo "tools/test.sh: $name set-up failed; its log:" >&2
  cat "$work/$name.log" >&2
  return 1
}

sglang=1
[ "${MOERL_SKIP_SGLANG:-0}" = 1 ] && sglang=0
sglang_pid= compat_pid=
if [ "$sglang" = 1 ]; then  # independent of .venv: it starts at once
  background_setup sglang launch/setup_sglang.sh
  sglang_pid=${bg_pids[-1]}
fi
compat=1
if [ "${MOERL_TEST_COMPAT:-1}" = "0" ]; then
  compat=0
  echo "tools/test.sh: MOERL_TEST_COMPAT=0: megatron-core 0.16.1 compatibility tests skipped"
elif [ "$(launch/setup.sh --print-python-version)" != "3.12" ]; then
  compat=0
  echo "tools/test.sh: .venv is Python < 3.12 with megatron-core 0.16.1 already: no compat step"
fi
if [ "$compat" = 1 ]; then  # its set-up, then its tests, beside .venv's set-up and step 1
  (
    set +e
    launch/setup.sh --compat > "$work/compat.log" 2>&1
    echo $? > "$work/compat.status"
    if [ "$(cat "$work/compat.status")" = 0 ]; then
      run_pytest .venv-mcore016 -m compat "$@" > "$work/compat-tests.log" 2>&1
      echo "$? $ran_tests" > "$work/compat-tests.status"
    fi
  ) &
  compat_pid=$!
  bg_pids+=("$compat_pid")
fi
launch/setup.sh

# Step 1 in $MOERL_TEST_WORKERS pytest processes (pytest-xdist, one test file per worker at a
# time; 1: a single process): one process left the 2 cores idle 41% of the time (tests waiting on
# servers, timeouts and their peers), measured.
workers=${MOERL_TEST_WORKERS:-2}
parallel=()
# --no-loadscope-reorder: files in collection order (tests/conftest.py puts the longest first;
# xdist's own reorder puts the files with the most tests first, whatever their length).
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
run_pytest .venv -m "not sglang" ${parallel[@]+"${parallel[@]}"} "$@" || failed=1

# The SGLang step's time goes mostly to SGLang start-ups, each a single busy process, so it too
# runs in $MOERL_TEST_WORKERS workers.
if [ "$sglang" = 1 ]; then
  if await_setup sglang "$sglang_pid"; then
    # A module, or a class, at a time (each family check is a class with a server of its own;
    # a module's tests may share one).
    sglang_parallel=()
    [ "$workers" -gt 1 ] && sglang_parallel=(-n "$workers" --dist loadscope --no-loadscope-reorder)
    MOERL_REQUIRE_SGLANG=1 run_pytest .venv -m sglang \
      ${sglang_parallel[@]+"${sglang_parallel[@]}"} "$@" || failed=1
  else
    failed=1
  fi
else
  echo "tools/test.sh: MOERL_SKIP_SGLANG=1: the real-SGLang tests skipped"
fi

if [ -n "$compat_pid" ]; then
  if await_setup compat "$compat_pid"; then
    echo "tools/test.sh: the compatibility step (.venv-mcore016, -m compat):"
    cat "$work/compat-tests.log"
    read -r compat_status compat_ran < "$work/compat-tests.status" || compat_status=1
    [ "${compat_status:-1}" = 0 ] || failed=1
    [ "${compat_ran:-0}" = 1 ] && ran_tests=1
  else
    failed=1
  fi
fi
if [ "$ran_tests" = 0 ]; then
  echo "tools/test.sh: no step ran a test" >&2
  failed=1
fi
exit "$failed"
