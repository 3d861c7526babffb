#!/usr/bin/env bash
# Start an SGLang 0.5.23 rollout server for moerl (GPU clusters, or this repo's CPU machines).
#
#   MODEL=Qwen/Qwen3-30B-A3B TP=4 PORT=30000 MOERL_ROLLOUT_API_KEY=... launch/sglang_server.sh [extra sglang args]
#   MODEL=runs/tiny_warmstart/hf PYTHON=.venv-sglang/bin/python launch/sglang_server.sh   # CPU
#
# DEVICE=auto (default) picks cuda when $PYTHON's torch sees a GPU, else cpu. On cpu (SGLang's
# environment from launch/setup_sglang.sh, which also applies the CPU shims) it adds
#   SGLANG_USE_CPU_ENGINE=1 --device cpu --attention-backend torch_native --sampling-backend pytorch
#   --disable-overlap-schedule --cuda-graph-backend-{decode,prefill}=disabled --sleep-on-idle
#   (the scheduler otherwise busy-polls a core the whole time the server is up, a core the
#   trainer ranks on the same machine need; it still wakes at once on a request)
#   --max-total-tokens $MAX_TOTAL_TOKENS (8192) and MEM_FRACTION 0.6 (of host memory; the KV
#   pool is capped by --max-total-tokens, the fraction only has to exceed what is in use),
# and DTYPE defaults to float32.
# DETERMINISTIC=1 (the default on cuda) adds --enable-deterministic-inference: without it SGLang
# 0.5.23 silently ignores sampling_seed (sampling/sampling_batch_info.py), so the client's
# per-sample seeds would do nothing. It needs an attention backend SGLang supports for it (it says
# so at start-up if the chosen one is not); it cannot be enabled on cpu, where seeds are ignored
# (moerl then keeps exactly-once delivery, but not seed-reproducible samples: see README).
#
# What this turns on, and why (see moerl/rollout/protocol.py for the wire format):
#   --enable-return-routed-experts     meta_info.routed_experts: base64 int32 [P+R-1, layers, top_k]
#   --sampling-mask-max-tokens N       return_sampling_mask is per request; SGLang admits it only for
#                                      top_k = 1 or finite 1 < top_k <= N (default 4096), so the
#                                      trainer's top_k must respect N.
#   --skip-tokenizer-init              token-in/token-out, like moerl's built-in server (set
#                                      SKIP_TOKENIZER=0 to keep text in responses)
#   --weight-version                   initial weight_version reported in every meta_info
#   --api-key                          Bearer token (from $MOERL_ROLLOUT_API_KEY, never on the command
#                                      line of a shared machine: pass it through the environment)
# Keep routing (KEEP_ROUTING=1, the default) replays the server's expert ids in the trainer, so
# they must be *logical* expert ids of a single, non-disaggregated server:
#   --ep-num-redundant-experts 0, --init-expert-location trivial, no --enable-eplb
#   --disaggregation-mode null         (prefill/decode disaggregation would split a request's
#                                      routes across two servers)
# DTYPE (default bfloat16) is the serving precision: float16 rollouts are the field's other answer
# to the train/inference mismatch (10 mantissa bits against bf16's 7); moerl's built-in server
# takes the same choice as rollout.engine_dtype.
# Reproducible per-sample seeds (the client's seed=) need the PyTorch sampler: SGLang's
# FlashInfer top-k/top-p kernels reject sampling_seed. SAMPLING_BACKEND=pytorch (default here)
# selects it; set SAMPLING_BACKEND=flashinfer for speed without seeds.
#
# Weight sync (moerl.rollout.weight_sync.DistributedWeightSync, trainer rank 0 only):
#   /init_weights_update_group (backend nccl; one group per server: world = 1 + the server's TP
#   ranks, trainer rank 0, the server's ranks from rank_offset 1, group name
#   weight_update_group-<i>-<n>)
#   then per step: /pause_generation {"mode": "retract"} -> /begin_weight_update ->
#   /update_weights_from_distributed (names/dtypes/shapes, load_format "flattened_bucket") with an
#   NCCL broadcast from trainer rank 0 -> /end_weight_update -> /continue_generation.
#   MASTER_ADDR for that group must be reachable from every server node (NCCL), and the trainer
#   and SGLang must run compatible torch/NCCL builds. The disk path
#   (moerl.rollout.weight_sync.update_weights_from_disk) needs a filesystem both sides see.
set -euo pipefail

MODEL="${MODEL:?set MODEL to a Hugging Face MoE checkpoint (path or hub id)}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-30000}"
TP="${TP:-1}"
EP="${EP:-1}"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-auto}"
if [[ "$DEVICE" == auto ]]; then
  if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DEVICE=cuda
  else
    DEVICE=cpu
  fi
fi
if [[ "$DEVICE" == cpu ]]; then
  DTYPE="${DTYPE:-float32}"
  # A fraction of host memory that must exceed what is already in use at start-up (SGLang
  # refuses to start otherwise); the KV pool itself is capped by --max-total-tokens.
  MEM_FRACTION="${MEM_FRACTION:-0.6}"
  DETERMINISTIC="${DETERMINISTIC:-0}"
else
  DTYPE="${DTYPE:-bfloat16}"
  MEM_FRACTION="${MEM_FRACTION:-0.85}"
  DETERMINISTIC="${DETERMINISTIC:-1}"
fi
MAX_TOTAL_TOKENS="${MAX_TOTAL_TOKENS:-8192}"
case "$DTYPE" in
  bfloat16|float16|float32|auto) ;;
  *) echo "DTYPE=$DTYPE is not a serving dtype: use bfloat16, float16 (FP16 rollouts)," \
          "float32 or auto" >&2
     exit 2 ;;
esac
SAMPLING_MASK_MAX_TOKENS="${SAMPLING_MASK_MAX_TOKENS:-4096}"
SAMPLING_BACKEND="${SAMPLING_BACKEND:-pytorch}"
KEEP_ROUTING="${KEEP_ROUTING:-1}"
SKIP_TOKENIZER="${SKIP_TOKENIZER:-1}"
WEIGHT_VERSION="${WEIGHT_VERSION:-default}"

if ! "$PYTHON" -c "import sglang, sys; sys.exit(sglang.__version__ != '0.5.23')" 2>/dev/null; then
  echo "sglang==0.5.23 is required (pip install 'moerl[sglang]'); the wire contract is pinned to it" >&2
  exit 2
fi

args=(
  -m sglang.launch_server
  --model-path "$MODEL"
  --host "$HOST" --port "$PORT"
  --tp-size "$TP" --ep-size "$EP"
  --dtype "$DTYPE"
  --mem-fraction-static "$MEM_FRACTION"
  --enable-return-routed-experts
  --sampling-mask-max-tokens "$SAMPLING_MASK_MAX_TOKENS"
  --sampling-backend "$SAMPLING_BACKEND"
  --weight-version "$WEIGHT_VERSION"
)
if [[ "$DEVICE" == cpu ]]; then
  if [[ "$DETERMINISTIC" == 1 ]]; then
    echo "DETERMINISTIC=1 is not possible on cpu: SGLang's deterministic inference needs a GPU" \
         "attention backend (set DETERMINISTIC=0; seeds are then ignored by SGLang)" >&2
    exit 2
  fi
  export SGLANG_USE_CPU_ENGINE=1
  args+=(--device cpu --attention-backend torch_native --disable-overlap-schedule
         --cuda-graph-backend-decode=disabled --cuda-graph-backend-prefill=disabled
         --sleep-on-idle --max-total-tokens "$MAX_TOTAL_TOKENS")
elif [[ "$DETERMINISTIC" == 1 ]]; then
  args+=(--enable-deterministic-inference)
fi
if [[ "$SKIP_TOKENIZER" == 1 ]]; then
  args+=(--skip-tokenizer-init)
fi
if [[ -n "${MOERL_ROLLOUT_API_KEY:-}" ]]; then
  args+=(--api-key "$MOERL_ROLLOUT_API_KEY")
fi

extra=("$@")
if [[ "$KEEP_ROUTING" == 1 ]]; then
  for a in ${extra[@]+"${extra[@]}"}; do
    case "$a" in
      --enable-eplb|--ep-num-redundant-experts*|--init-expert-location*|--disaggregation-mode*)
        echo "KEEP_ROUTING=1 needs logical expert ids on one non-disaggregated server: '$a' is" \
             "not allowed (set KEEP_ROUTING=0 to run without routing replay)" >&2
        exit 2 ;;
    esac
  done
  args+=(--ep-num-redundant-experts 0 --init-expert-location trivial --disaggregation-mode null)
fi

shown=()
for a in "${args[@]}"; do
  if [[ -n "${MOERL_ROLLOUT_API_KEY:-}" && "$a" == "$MOERL_ROLLOUT_API_KEY" ]]; then a='***'; fi
  shown+=("$a")
done
echo "+ $PYTHON ${shown[*]} ${extra[*]:-}" >&2
exec "$PYTHON" "${args[@]}" ${extra[@]+"${extra[@]}"}
