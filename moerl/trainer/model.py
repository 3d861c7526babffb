"""Megatron-core GPT models with MoE layers, built from a Hugging Face config.

What a model is comes from its family module (:mod:`moerl.families`): the Megatron-free
:class:`MoEArchitecture` record, the family's own ``TransformerConfig`` settings and the router
settings that follow from its :class:`~moerl.families.base.RouterRule`. This module adds what every
family shares (dropout off, fp32 router, parallel layout, CPU/TE choice) and builds the model.

Transformer Engine layer specs are used when TE and CUDA are present, Megatron's local specs
otherwise (CPU). Routing replay is compiled into the actor (``moe_enable_routing_replay``); whether
it acts is decided per pass by ``moerl.trainer.routing_replay``.
"""

from __future__ import annotations

import torch

from moerl.families import MoEArchitecture, architecture_from_hf, family_of
from moerl.families.base import router_settings
from moerl.trainer.parallel import ParallelLayout

__all__ = ["MoEArchitecture", "architecture_from_hf", "build_gpt_model", "check_replay_config",
           "transformer_config", "validate_architecture_layout"]


def validate_architecture_layout(arch: MoEArchitecture, *, tp: int, ep: int, etp: int) -> None:
    """Raise ValueError, saying how to fix it, when the model cannot be split this way."""
    problems = []
    if arch.num_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide num_key_value_heads={arch.num_kv_heads}")
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
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    from moerl.trainer.cpu_compat import check_cpu_config

    te = use_transformer_engine()
    dispatcher = token_dispatcher or ("alltoall" if torch.cuda.is_available() else "allgather")
    check_cpu_config(token_dispatcher=dispatcher)
    extra = {}
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    settings = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.dense_ffn,
        moe_ffn_hidden_size=arch.expert_ffn, num_moe_experts=arch.num_experts,
        moe_router_topk=arch.top_k, moe_layer_freq=[int(m) for m in arch.moe_layers],
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=te,
        moe_enable_routing_replay=routing_replay, calculate_per_token_loss=True,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, sequence_parallel=layout.sp,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=True,
        params_dtype=param_dtype(bf16=bf16, fp16=fp16), bf16=bf16, fp16=fp16,
        pipeline_dtype=param_dtype(bf16=bf16, fp16=fp16),
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, **extra)
    # The family's own settings (attention shape, QK-norm, shared experts, ...) override these.
    settings.update(router_settings(arch.router))
    settings.update(family_of(arch).megatron_settings(arch))
    return (MLATransformerConfig if arch.mla else TransformerConfig)(**settings)


def check_replay_config(config) -> None:
    """Refuse Megatron router settings under which routing replay would silently do nothing
    or train a moving selection (DESIGN.md "Sigmoid and grouped routers under replay")."""
    if not config.moe_enable_routing_replay:
        return
    if getattr(config, "moe_router_fusion", False):
        raise ValueError("moe_router_fusion=True bypasses RouterReplay (the fused TE top-k kernel "
                         "never calls it): routing replay would replay nothing; turn it off")
    if config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate != 0:
        raise ValueError(f"moe_router_bias_update_rate={config.moe_router_bias_update_rate}: the "
                         "expert bias must stay frozen in RL (rate 0), or replayed and natural "
                         "selections drift apart between rollout and training")


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
    check_replay_config(config)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine(),
                                      normalization="RMSNorm")
    if arch.mla and not use_transformer_engine():
        from moerl.trainer.mla_attention import use_local_mla_core_attention

        use_local_mla_core_attention(spec)
    if arch.qk_norm_full_projection:
        from moerl.trainer.qk_norm import use_full_projection_qk_norm

        use_full_projection_qk_norm(spec)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=arch.padded_vocab_size(layout.tp),
        max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta), rotary_percent=arch.rotary_percent,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, parallel_output=True)
