"""Will it fit? Per-GPU memory and rollout payload of a moerl config, before launching.

    python tools/plan.py configs/grpo.yaml configs/models/qwen3_30b_a3b_2x8.yaml \\
        --hf-config configs/models/qwen3_30b_a3b.hf_config.json --world 16

Prints a table and (``--json``) one JSON object. The model comes from ``--hf-config`` or
``model.hf_path/config.json``; the layout from ``parallel.*`` and ``--world`` (the number of
training GPUs, default ``lcm(tp, ep*etp)``).

Per GPU, with P_dense / P_expert the parameters this GPU holds (dense weights split by TP, norms
and routers replicated; E/EP experts each split by ETP):
  weights         2 B/param (bf16) or 4 B/param (fp32)
  gradients       4 B/param (Megatron keeps fp32 ``main_grad``: grad_reduce_in_fp32)
  optimizer       fp32 main weights (bf16 only) + Adam m and v: 12 B/param (bf16) or 8 (fp32),
                  divided by the data-parallel size of the parameter (dense: world/TP; experts:
                  world/(EP*ETP)) with the distributed optimizer
  reference       a second copy of the weights (moerl keeps the reference for weight swap)
  activations     one micro-batch: with full recomputation each layer's input [s, b, h]/TP is
                  kept, plus one layer's working set while it recomputes (Korthikanti et al.
                  2022: 11 sbh/TP bytes for attention with flash attention, no s^2 term; the MoE
                  MLP holds the dispatched tokens, top_k * tokens/EP rows of 2h + 6I bytes in bf16,
                  and fp32 router logits); plus fp32 logits and their gradient, 8 sbV/TP bytes.
That reproduces Megatron's published per-parameter costs (docs: distributed optimizer):
18 B/param for bf16 weights with fp32 grads, 6 + 12/d with the distributed optimizer.

Rollout payload per RL step (prompts_per_step * group_size samples of P prompt + R response
tokens): routes are int32 [P+R-1, num_hidden_layers, top_k] per sample, base64 in JSON on the
wire (4/3 of the raw bytes) and int32 in host memory (``routes_host_smallest_MiB``: what the
smallest integer type holding the expert ids would take, 1 byte up to 256 experts); sampling masks are one list of kept token
ids per generated token (JSON digits on the wire, int32 CSR plus int64 offsets in host memory).

Time and GPU-hours of the run (``training.steps`` RL steps, synchronous: rollout, then training;
both GPU pools are held for the whole run), from an explicit cost model whose assumptions are
flags to replace with your own measurements:
  training        model FLOPs per token of one forward = 2 * active parameters + causal
                  attention (2 * layers * heads * (qk + v head dims) * mean context, the mean
                  context being half the sequence); per RL step the trainer runs one forward for
                  pi_old, one for the reference when ``algorithm.kl_coef`` > 0, and per epoch a
                  forward and backward (3 forwards) plus one more with ``model.recompute``; over
                  samples * (prompt + mean response) tokens; at ``--train-mfu`` of ``--gpu-tflops``
                  (H100 SXM bf16 dense: 989) on ``--world`` GPUs.
  rollout         samples * mean response tokens at ``--rollout-tokens-per-gpu-s`` decode
                  throughput per inference GPU on ``--rollout-gpus`` GPUs (prefill and the
                  weight push are not counted).
The mean response defaults to ``rollout.max_new_tokens`` (an upper bound: pass
``--mean-response-len``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moerl.config import add_cli_arguments, config_from_args  # noqa: E402
from moerl.trainer.model import MoEArchitecture, architecture_from_hf  # noqa: E402

GiB = 2**30


def _attention_per_layer(arch: MoEArchitecture) -> tuple[int, int]:
    """(projection parameters, norm parameters) of one attention block: GQA or MLA."""
    h = arch.hidden_size
    if arch.mla is None:
        hd = arch.head_dim
        proj = h * (arch.num_heads + 2 * arch.num_kv_heads) * hd + arch.num_heads * hd * h
        if arch.qkv_bias:
            proj += (arch.num_heads + 2 * arch.num_kv_heads) * hd
        return proj, (2 * hd if arch.qk_norm else 0)
    m, heads = arch.mla, arch.num_heads
    q_out = heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
    q = h * q_out if m.q_lora_rank is None else h * m.q_lora_rank + m.q_lora_rank * q_out
    kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * heads * (
        m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + heads * m.v_head_dim * h, m.kv_lora_rank + (m.q_lora_rank or 0)


def parameter_counts(arch: MoEArchitecture) -> dict[str, int]:
    """Whole-model parameter counts by kind (HF tensors, no padding, no MTP layers)."""
    h = arch.hidden_size
    attn, attn_norms = _attention_per_layer(arch)
    num_moe = sum(arch.moe_layers)
    num_dense = arch.num_layers - num_moe
    embed = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    router = arch.num_experts * (h + (1 if arch.router.expert_bias else 0))
    return {
        "embedding_and_head": embed,
        "attention": arch.num_layers * attn,
        "norms": arch.num_layers * (2 * h + attn_norms) + h,
        "routers": num_moe * (router + (h if arch.shared_expert_gate else 0)),
        "dense_mlp": num_dense * 3 * h * arch.dense_ffn,
        "shared_experts": num_moe * 3 * h * arch.shared_expert_ffn,
        "experts": num_moe * arch.num_experts * 3 * h * arch.expert_ffn,
    }


def active_parameters(arch: MoEArchitecture) -> int:
    counts = parameter_counts(arch)
    per_expert = 3 * arch.hidden_size * arch.expert_ffn
    return (sum(counts.values()) - counts["experts"]
            + sum(arch.moe_layers) * arch.top_k * per_expert)


def per_gpu_parameters(arch: MoEArchitecture, *, tp: int, ep: int, etp: int) -> tuple[int, int]:
    """(dense, expert) parameters held by one GPU."""
    c = parameter_counts(arch)
    dense = (c["embedding_and_head"] + c["attention"] + c["dense_mlp"] + c["shared_experts"]
             ) / tp + c["norms"] + c["routers"]
    expert = c["experts"] / (ep * etp)
    return int(dense), int(expert)


def memory_per_gpu(arch: MoEArchitecture, *, tp: int, ep: int, etp: int, world: int, bf16: bool,
                   distributed_optimizer: bool, micro_batch: int, seq_len: int,
                   recompute: bool) -> dict[str, float]:
    dense, expert = per_gpu_parameters(arch, tp=tp, ep=ep, etp=etp)
    params = dense + expert
    weight_b = 2 if bf16 else 4
    optim_b = 12 if bf16 else 8
    dp, edp = world // tp, world // (ep * etp)
    if distributed_optimizer:
        optimizer = dense * optim_b / dp + expert * optim_b / edp
    else:
        optimizer = params * optim_b
    h, s, b = arch.hidden_size, seq_len, micro_batch
    act_b = 2 if bf16 else 4
    tokens = s * b
    layer_inputs = arch.num_layers * tokens * h * act_b / tp
    attention = 11 * tokens * h * (act_b / 2) / tp
    dispatched = arch.top_k * tokens / ep * (2 * h + 6 * arch.expert_ffn) * (act_b / 2)
    router = tokens / tp * arch.num_experts * 4
    one_layer = attention + dispatched + router
    layers = layer_inputs + one_layer if recompute else arch.num_layers * one_layer
    logits = 8 * tokens * arch.vocab_size / tp
    out = {
        "params_per_gpu": params,
        "weights_GiB": params * weight_b / GiB,
        "gradients_GiB": params * 4 / GiB,
        "optimizer_GiB": optimizer / GiB,
        "reference_weights_GiB": params * weight_b / GiB,
        "activations_GiB": (layers + logits) / GiB,
    }
    out["total_GiB"] = sum(v for k, v in out.items() if k.endswith("GiB"))
    out["bytes_per_param_train_state"] = (params * (weight_b + 4) + optimizer) / params
    return out


def smallest_id_bytes(num_experts: int) -> int:
    """Bytes of the smallest unsigned integer type holding ids ``0 .. num_experts - 1``."""
    return next(b for b in (1, 2, 4) if num_experts <= 256 ** b)


def rollout_payload(arch: MoEArchitecture, *, samples: int, prompt_len: int, response_len: int,
                    kept_ids: float) -> dict[str, float]:
    routed = prompt_len + response_len - 1
    route_raw = samples * routed * arch.num_layers * arch.top_k * 4
    kept = samples * response_len * kept_ids
    id_digits = len(str(arch.vocab_size - 1))
    info_bits = routed * sum(arch.moe_layers) * arch.top_k * math.log2(arch.num_experts)
    id_bytes = smallest_id_bytes(arch.num_experts)
    return {
        "samples": samples,
        "routes_wire_MiB": route_raw * 4 / 3 / 2**20,
        "routes_host_MiB": route_raw / 2**20,
        # With the smallest integer type that holds the expert ids (moerl's host batch still
        # keeps int32 routes today).
        "routes_host_smallest_MiB": route_raw / 4 * id_bytes / 2**20,
        "route_id_bytes_smallest": id_bytes,
        "routes_information_MiB": samples * info_bits / 8 / 2**20,
        "mask_wire_MiB": kept * (id_digits + 2) / 2**20,
        "mask_host_MiB": (kept * 4 + samples * (response_len + 1) * 8) / 2**20,
        "route_bytes_per_token_wire": arch.num_layers * arch.top_k * 4 * 4 / 3,
    }


def forward_flops_per_token(arch: MoEArchitecture, *, context: float) -> float:
    """Model FLOPs of one forward for one token that attends to ``context`` earlier tokens."""
    if arch.mla is None:
        qk = v = arch.head_dim
    else:
        qk, v = arch.mla.qk_nope_head_dim + arch.mla.qk_rope_head_dim, arch.mla.v_head_dim
    attention = 2 * arch.num_layers * arch.num_heads * (qk + v) * context
    return 2 * active_parameters(arch) + attention


def run_cost(arch: MoEArchitecture, *, samples: int, prompt_len: int, mean_response_len: float,
             steps: int, epochs: int, recompute: bool, reference: bool, world: int,
             rollout_gpus: int, gpu_tflops: float, train_mfu: float,
             rollout_tokens_per_gpu_s: float) -> dict[str, float]:
    """Seconds per RL step and GPU-hours of ``steps`` steps (the module docstring's model)."""
    seq = prompt_len + mean_response_len
    train_tokens = samples * seq
    forwards = 1 + int(reference) + epochs * (3 + int(recompute))
    train_flops = forwards * train_tokens * forward_flops_per_token(arch, context=seq / 2)
    train_s = train_flops / (world * gpu_tflops * 1e12 * train_mfu)
    rollout_s = samples * mean_response_len / (rollout_gpus * rollout_tokens_per_gpu_s)
    step_s = train_s + rollout_s
    return {"train_PFLOP_per_step": train_flops / 1e15, "train_s_per_step": train_s,
            "rollout_s_per_step": rollout_s, "step_s": step_s, "steps": steps,
            "run_hours": steps * step_s / 3600,
            "gpu_hours": steps * step_s * (world + rollout_gpus) / 3600}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_arguments(parser)
    parser.add_argument("--hf-config", type=Path, help="HF config.json of the model")
    parser.add_argument("--world", type=int, help="training GPUs (default lcm(tp, ep*etp))")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--seq-len", type=int, help="training sequence length "
                        "(default prompt-len + rollout.max_new_tokens)")
    parser.add_argument("--kept-ids", type=float, default=20.0,
                        help="mean kept token ids per generated token (sampling mask width)")
    parser.add_argument("--gpu-GiB", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--mean-response-len", type=float,
                        help="mean generated tokens per sample (default rollout.max_new_tokens, "
                             "an upper bound)")
    parser.add_argument("--rollout-gpus", type=int,
                        help="inference GPUs serving the rollouts (default: --world)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOP/s of one GPU (H100 SXM: 989)")
    parser.add_argument("--train-mfu", type=float, default=0.25,
                        help="assumed model-FLOPs utilisation of training")
    parser.add_argument("--rollout-tokens-per-gpu-s", type=float, default=2000.0,
                        help="assumed decode throughput per inference GPU, tokens/s (measure "
                             "yours on the inference engine at the run's batch size)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    hf_config = args.hf_config or Path(cfg.model.hf_path) / "config.json"
    if not hf_config.is_file():
        print(f"plan: no {hf_config}; pass --hf-config (e.g. "
              f"configs/models/qwen3_30b_a3b.hf_config.json)", file=sys.stderr)
        return 2
    arch = architecture_from_hf(json.loads(hf_config.read_text()))
    p = cfg.parallel
    world = args.world or math.lcm(p.tp, p.ep * p.etp)
    if world % p.tp or world % (p.ep * p.etp):
        print(f"plan: world {world} does not fit tp={p.tp}, ep*etp={p.ep * p.etp}",
              file=sys.stderr)
        return 2
    seq_len = args.seq_len or args.prompt_len + cfg.rollout.max_new_tokens
    counts = parameter_counts(arch)
    memory = memory_per_gpu(arch, tp=p.tp, ep=p.ep, etp=p.etp, world=world,
                            # fp16 holds the same 2-byte weights + fp32 mains as bf16
                            bf16=cfg.model.dtype in ("bfloat16", "float16"),
                            distributed_optimizer=p.distributed_optimizer,
                            micro_batch=cfg.training.micro_batch_size, seq_len=seq_len,
                            recompute=cfg.model.recompute)
    payload = rollout_payload(arch, samples=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
                              prompt_len=args.prompt_len, response_len=cfg.rollout.max_new_tokens,
                              kept_ids=args.kept_ids)
    report = {"model": {"total_params": sum(counts.values()), "active_params":
                        active_parameters(arch), **counts},
              "layout": {"world": world, "tp": p.tp, "ep": p.ep, "etp": p.etp,
                         "dp": world // p.tp, "expert_dp": world // (p.ep * p.etp),
                         "distributed_optimizer": p.distributed_optimizer,
                         "micro_batch": cfg.training.micro_batch_size, "seq_len": seq_len},
              "memory_per_gpu": memory, "fits": memory["total_GiB"] <= args.gpu_GiB,
              "rollout_payload_per_step": payload,
              "time": run_cost(
                  arch, samples=payload["samples"], prompt_len=args.prompt_len,
                  mean_response_len=args.mean_response_len or cfg.rollout.max_new_tokens,
                  steps=cfg.training.steps, epochs=cfg.training.epochs,
                  recompute=cfg.model.recompute, reference=cfg.algorithm.kl_coef > 0,
                  world=world, rollout_gpus=args.rollout_gpus or world,
                  gpu_tflops=args.gpu_tflops, train_mfu=args.train_mfu,
                  rollout_tokens_per_gpu_s=args.rollout_tokens_per_gpu_s)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["model"]
    print(f"model: {m['total_params'] / 1e9:.2f}B parameters, {m['active_params'] / 1e9:.2f}B "
          f"active per token")
    lay = report["layout"]
    print(f"layout: world {world} = TP {p.tp} x DP {lay['dp']}; experts EP {p.ep} x ETP {p.etp} "
          f"x expert-DP {lay['expert_dp']}; micro-batch {lay['micro_batch']} x {seq_len} tokens")
    print("per GPU:")
    for key, value in memory.items():
        if key.endswith("GiB"):
            print(f"  {key[:-4]:<22} {value:8.2f} GiB")
    print(f"  ({memory['params_per_gpu'] / 1e9:.2f}B parameters, "
          f"{memory['bytes_per_param_train_state']:.1f} B/param of training state)")
    print(f"  {'fits in ' + str(args.gpu_GiB) + ' GiB' if report['fits'] else 'DOES NOT FIT in ' + str(args.gpu_GiB) + ' GiB'}")
    print(f"rollout payload per step ({payload['samples']} samples, {args.prompt_len}+"
          f"{cfg.rollout.max_new_tokens} tokens, {args.kept_ids:g} kept ids/token):")
    for key in ("routes_wire_MiB", "routes_host_MiB", "routes_information_MiB", "mask_wire_MiB",
                "mask_host_MiB"):
        print(f"  {key[:-4]:<22} {payload[key]:10.1f} MiB")
    t = report["time"]
    print(f"time (assumed: {args.train_mfu:g} MFU of {args.gpu_tflops:g} TFLOP/s, "
          f"{args.rollout_tokens_per_gpu_s:g} rollout tokens/s per GPU): "
          f"{t['train_s_per_step']:.0f} s training + {t['rollout_s_per_step']:.0f} s rollout "
          f"per step; {t['steps']} steps: {t['run_hours']:.1f} h on {world} + "
          f"{args.rollout_gpus or world} GPUs = {t['gpu_hours']:.0f} GPU-hours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
