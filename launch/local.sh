#!/usr/bin/env bash
# Train on this machine: sets up .venv if needed, makes the tiny warm-start checkpoint if the
# config asks for it and it is missing, then starts torchrun with as many processes as the
# config's parallel layout needs (NPROC overrides). The built-in rollout server is started by
# trainer rank 0.
#
#   launch/local.sh configs/grpo.yaml [--set section.key=value ...] [--keep-routing] ...
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: launch/local.sh CONFIG.yaml [--set section.key=value ...] [flags]" >&2
  exit 2
fi
launch/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# One OpenMP thread per process (warm start and trainer ranks): the tiny model's matmuls are far
# too small for more, and on a busy machine spinning OpenMP threads slow everything down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Checks flags, config, model and checkpoint layout; exits 2 on a mistake, before any worker.
info=$(python -m moerl.launch_info "$@")
read -r NEEDED HF_PATH MAX_OPERAND <<< "$info"
if [ ! -f "$HF_PATH/config.json" ]; then
  case "$HF_PATH" in
    *tiny_warmstart*)
      echo "moerl: no checkpoint at $HF_PATH: running the tiny-model warm start first"
      python -m moerl.warmstart --out "$HF_PATH" --max-operand "$MAX_OPERAND"
      python -m moerl.launch_info "$@" > /dev/null ;;  # the model checks, now that it exists
    *) echo "moerl: model.hf_path=$HF_PATH has no config.json" >&2; exit 2 ;;
  esac
fi
exec torchrun --standalone --nproc_per_node "${NPROC:-$NEEDED}" -m moerl.train "$@"
