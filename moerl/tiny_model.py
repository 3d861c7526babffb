"""Tiny Qwen3-MoE checkpoints in Hugging Face format, for CPU runs and tests.

The model is deliberately small enough to train on a laptop CPU in minutes, but keeps every
feature of the real family that the trainer must get right: GQA, per-head QK-norm, RoPE, a dense
layer among MoE layers (``mlp_only_layers``), top-k softmax routing with ``norm_topk_prob``.
The warm-started model of the main job and of most end-to-end tests is the all-MoE ``tiny_moe``
variant (``moerl.warmstart``), which a real SGLang server can serve; the default checkpoint of
:func:`create_tiny_hf_model` keeps its dense layer for the tests of dense-layer handling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_QWEN3_MOE: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,  # dense-layer MLP width
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[0],  # layer 0 is dense: exercises dense rows in routed_experts
    decoder_sparse_step=1,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


# Named variants (overrides of TINY_QWEN3_MOE). "wide" has more MoE layers and experts, so more
# routing decisions per token sit near a tie and a bf16 engine flips more of them: a CPU-sized
# stand-in for the routing fragility of large MoEs (Qwen3-30B-A3B: 48 MoE layers, 128 experts).
# The "_moe" variants have no dense layer: SGLang 0.5.23 builds every Qwen3-MoE layer as MoE and
# ignores mlp_only_layers, so only these can be served by a real SGLang server (released Qwen3-MoE
# checkpoints have no dense layers either).
# "deep_moe" is the fragile one of the second comparison: 12 MoE layers of 64 experts, top-8,
# all MoE (so SGLang serves it). DESIGN.md's measurement puts a random 12 / 64 top-8 model at
# ~58% of tokens rerouted between bf16 and fp32; narrow experts keep it at ~1M parameters so a
# CPU step stays cheap. "deep_moe24" is the same with 24 MoE layers: the depth at which a bf16
# forward reroutes a majority of tokens in at least one layer (tools/route_depth.py: ~83% on a
# random model against ~50% at 12), at about twice the cost per step. "deep_moe128" is the full
# comparison's model: 12 MoE layers of 128 experts (Qwen3-30B-A3B's count), top-16. With twice
# the experts and twice the top-k, the 16th and 17th router scores sit closer together, so a bf16
# engine flips ~11% of a random model's routing decisions (the R3 paper's ~10%) and ~6.7% of the
# warm start's, and reroutes a majority of tokens at 12 layers (~75% random, ~55% warm-started)
# for ~1.6x the time per RL step of deep_moe (8.5 s against 5.4 s here) instead of deep_moe24's
# ~1.7-2x.
_WIDE = dict(num_hidden_layers=5, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=16)
_DEEP = dict(num_hidden_layers=12, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=8,
             mlp_only_layers=[])
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "wide": _WIDE,
    "tiny_moe": dict(mlp_only_layers=[]),
    "wide_moe": dict(_WIDE, mlp_only_layers=[]),
    "deep_moe": _DEEP,
    "deep_moe24": dict(_DEEP, num_hidden_layers=24),
    "deep_moe128": dict(_DEEP, num_experts=128, num_experts_per_tok=16),
}


def create_tiny_hf_model(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.02,
                         **overrides: Any) -> Path:
    """Write a randomly initialised tiny Qwen3-MoE (config.json + model.safetensors) to ``out_dir``.

    ``overrides`` replace entries of :data:`TINY_QWEN3_MOE`. The weights are saved with
    ``save_pretrained``, so experts are stored per expert (``mlp.experts.{e}.gate_proj.weight``),
    exactly as released Qwen3-MoE checkpoints are on disk.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = {**TINY_QWEN3_MOE, **overrides}
    rope_theta = fields.pop("rope_theta")
    config = Qwen3MoeConfig(**fields, initializer_range=init_std,
                            rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).float()
    # Router weights initialise to zero in transformers (all experts tie); random routers make
    # routing decisions non-trivial, which is the point of a routing-replay test model.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0 / fields["hidden_size"] ** 0.5)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out
