#!/usr/bin/env bash
# Train across nodes with torchrun's c10d rendezvous (NCCL). Run this on every training node:
#
#   MASTER_ADDR=node0 NNODES=2 NPROC_PER_NODE=8 launch/multinode.sh \
#       configs/grpo.yaml configs/models/qwen3_30b_a3b_2x8.yaml --keep-routing
#
# The rollout servers run separately (launch/sglang_server.sh on the inference nodes) and are
# reached through rollout.url; trainer rank 0 pushes weights to them over NCCL
# (update_weights_from_distributed), so the rollout nodes must reach MASTER_ADDR.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the first training node}"
: "${NNODES:?set NNODES}"
export NPROC_PER_NODE=${NPROC_PER_NODE:-8}  # read by moerl.launch_info too
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-moerl-$(date +%Y%m%d)}
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
python -m moerl.launch_info "$@" > /dev/null  # validate the config on every node first
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  -m moerl.train "$@"
