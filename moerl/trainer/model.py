"""Megatron-core GPT models with MoE layers, built from a Hugging Face config.

A model family is a row of :data:`FAMILIES`: the HF config keys and on-disk tensor names that
differ between families, nothing else. The first family is Qwen3-MoE (RMSNorm, per-head QK-norm,
GQA, RoPE, SwiGLU experts, softmax top-k router with ``norm_topk_prob``, dense layers via
``mlp_only_layers``/``decoder_sparse_step``); Mixtral is the second row (no QK-norm, every layer
MoE, experts named ``w1/w3/w2``, always-renormalised top-k). A family with shared experts
(DeepSeek-V2-style, Qwen2-MoE) adds its shared-expert keys to a row.

Transformer Engine layer specs are used when TE and CUDA are present, Megatron's local specs
otherwise (CPU). Routing replay is compiled into the actor (``moe_enable_routing_replay``); whether
it acts is decided per pass by ``moerl.trainer.routing_replay``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moerl.rollout.protocol import MoeLayout
from moerl.trainer.parallel import ParallelLayout


@dataclass(frozen=True)
class FamilySpec:
    """What differs between MoE model families, as HF config keys and HF tensor-name pieces."""

    model_types: tuple[str, ...]
    num_experts_keys: tuple[str, ...]  # first present wins (transformers 5 writes num_local_experts)
    expert_ffn_key: str
    qk_norm: bool
    # HF renormalises the top-k softmax weights iff this is true; None: read "norm_topk_prob".
    always_norm_topk: bool | None
    mlp: str  # module holding router and experts in HF names
    expert_proj: tuple[str, str, str]  # (gate, up, down) per-expert names on disk
    dense_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    attn_proj: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")


FAMILIES: dict[str, FamilySpec] = {
    "qwen3_moe": FamilySpec(
        model_types=("qwen3_moe",), num_experts_keys=("num_experts", "num_local_experts"),
        expert_ffn_key="moe_intermediate_size", qk_norm=True, always_norm_topk=None, mlp="mlp",
        expert_proj=("gate_proj", "up_proj", "down_proj")),
    "mixtral": FamilySpec(
        model_types=("mixtral",), num_experts_keys=("num_local_experts",),
        expert_ffn_key="intermediate_size", qk_norm=False, always_norm_topk=True,
        mlp="block_sparse_moe", expert_proj=("w1", "w3", "w2")),
}


@dataclass(frozen=True)
class MoEArchitecture:
    """The facts about a model that the trainer, bridge, replay and planner all need."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_ffn: int  # MLP width of dense layers
    expert_ffn: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[bool, ...]  # per hidden layer: True if MoE, False if dense
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @property
    def spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]


def architecture_from_hf(hf_config: Any) -> MoEArchitecture:
    """Read an HF config (``transformers`` config object or its dict) into :class:`MoEArchitecture`."""
    cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = cfg.get("model_type")
    family = next((name for name, spec in FAMILIES.items() if model_type in spec.model_types), None)
    if family is None:
        supported = sorted(t for spec in FAMILIES.values() for t in spec.model_types)
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {supported}")
    spec = FAMILIES[family]
    num_layers = cfg["num_hidden_layers"]
    # Which layers are MoE is a per-family rule of the HF modelling code; the rollout protocol
    # needs the same fact to validate routes, so both read it from one place.
    moe_ids = set(MoeLayout.from_hf_config(cfg).moe_layers)
    moe_layers = tuple(i in moe_ids for i in range(num_layers))
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    norm_topk = spec.always_norm_topk
    if norm_topk is None:
        norm_topk = bool(cfg.get("norm_topk_prob", False))
    heads = cfg["num_attention_heads"]
    return MoEArchitecture(
        family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=num_layers, num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        dense_ffn=cfg["intermediate_size"], expert_ffn=cfg[spec.expert_ffn_key],
        num_experts=next(cfg[k] for k in spec.num_experts_keys if cfg.get(k) is not None), top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=norm_topk, moe_layers=moe_layers,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=bool(cfg.get("tie_word_embeddings")),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096))


def validate_architecture_layout(arch: MoEArchitecture, *, tp: int, ep: int, etp: int) -> None:
    """Raise ValueError, saying how to fix it, when the model cannot be split this way."""
    problems = []
    if arch.num_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide num_key_value_heads={arch.num_kv_heads}")
    if arch.vocab_size % tp:
        problems.append(f"parallel.tp={tp} does not divide vocab_size={arch.vocab_size}")
    if arch.num_experts % ep:
        problems.append(f"parallel.ep={ep} does not divide num_experts={arch.num_experts}")
    if arch.expert_ffn % etp:
        problems.append(f"parallel.etp={etp} does not divide the expert FFN width {arch.expert_ffn}")
    if arch.dense_ffn % tp and not all(arch.moe_layers):
        problems.append(f"parallel.tp={tp} does not divide intermediate_size={arch.dense_ffn}")
    if problems:
        raise ValueError("model/parallel layout mismatch: " + "; ".join(problems))


def use_transformer_engine() -> bool:
    """TE layer specs need both the package and a GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(arch: MoEArchitecture, layout: ParallelLayout, *, bf16: bool,
                       recompute: bool = False, token_dispatcher: str | None = None,
                       routing_replay: bool = True, fp16: bool = False):
    """Megatron ``TransformerConfig`` for ``arch`` under ``layout``.

    Dropout is off (RL on a pretrained policy); the router computes in fp32 with no auxiliary
    load-balancing loss (the policy-gradient objective alone trains the router).
    ``calculate_per_token_loss`` makes Megatron DDP *sum* gradients over data-parallel ranks
    instead of averaging: moerl's losses are already divided by global (all-rank) denominators
    (``moerl.algos.aggregation``), so the sum is the full-batch gradient.
    ``routing_replay=False`` builds a model without ``RouterReplay`` instances (the PPO critic:
    megatron keeps one process-global list of them, which must hold the actor's only).
    ``fp16`` (GPU only) holds the parameters in float16; the optimizer then scales the loss.
    """
    from megatron.core.transformer import TransformerConfig

    from moerl.trainer.cpu_compat import check_cpu_config

    te = use_transformer_engine()
    dispatcher = token_dispatcher or ("alltoall" if torch.cuda.is_available() else "allgather")
    check_cpu_config(token_dispatcher=dispatcher)
    extra = {}
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.dense_ffn,
        moe_ffn_hidden_size=arch.expert_ffn, num_moe_experts=arch.num_experts,
        moe_router_topk=arch.top_k, moe_layer_freq=[int(m) for m in arch.moe_layers],
        # Top-k on logits then softmax over the k == softmax, top-k, renormalise (norm_topk_prob).
        moe_router_pre_softmax=not arch.norm_topk_prob, moe_router_score_function="softmax",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=te,
        moe_enable_routing_replay=routing_replay, calculate_per_token_loss=True,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, qk_layernorm=arch.spec.qk_norm,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, sequence_parallel=layout.sp,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=True,
        params_dtype=param_dtype(bf16=bf16, fp16=fp16), bf16=bf16, fp16=fp16,
        pipeline_dtype=param_dtype(bf16=bf16, fp16=fp16),
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, **extra)


def param_dtype(*, bf16: bool, fp16: bool) -> torch.dtype:
    """The trainer's parameter dtype for its precision flags."""
    if bf16 and fp16:
        raise ValueError("choose one of bf16 and fp16")
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def build_gpt_model(arch: MoEArchitecture, layout: ParallelLayout, *, bf16: bool = False,
                    recompute: bool = False, token_dispatcher: str | None = None,
                    routing_replay: bool = True, fp16: bool = False):
    """Build this rank's shard of the Megatron ``GPTModel`` (randomly initialised; load weights
    with ``moerl.trainer.hf_bridge``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    validate_architecture_layout(arch, tp=layout.tp, ep=layout.ep, etp=layout.etp)
    config = transformer_config(arch, layout, bf16=bf16, recompute=recompute,
                                token_dispatcher=token_dispatcher, routing_replay=routing_replay,
                                fp16=fp16)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine(),
                                      normalization="RMSNorm")
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta), rotary_percent=1.0,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, parallel_output=True)
