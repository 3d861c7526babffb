"""Qwen3-MoE (``qwen3_moe``): GQA with per-head QK-norm, RoPE, SwiGLU experts, softmax top-k router
(renormalised iff ``norm_topk_prob``), dense layers via ``mlp_only_layers``/``decoder_sparse_step``."""

from __future__ import annotations

from typing import Any

from moerl.families.base import (
    Family, MoEArchitecture, RouterRule, Unit, common_fields, decoder_units, gqa_attention_units,
    require_default_rope, routed_expert_units, router_units)


def read(cfg: dict[str, Any]) -> MoEArchitecture:
    require_default_rope(cfg, "qwen3_moe")
    # transformers 5 writes num_local_experts; older configs num_experts.
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    return MoEArchitecture(
        **common_fields(cfg, family="qwen3_moe"), expert_ffn=cfg["moe_intermediate_size"],
        num_experts=num_experts, qk_norm=True,
        router=RouterRule(score="softmax", norm_topk_prob=bool(cfg.get("norm_topk_prob", False))))


def megatron_settings(arch: MoEArchitecture) -> dict[str, Any]:
    return {"qk_layernorm": True}


def units(arch: MoEArchitecture) -> list[Unit]:
    def moe(meg: str, hf: str) -> list[Unit]:
        return router_units(arch, meg, f"{hf}.gate") + routed_expert_units(arch, meg, hf)

    return decoder_units(arch, attention=lambda meg, attn: gqa_attention_units(arch, meg, attn),
                         moe_block=moe)


FAMILY = Family(name="qwen3_moe", model_types=("qwen3_moe",), read=read,
                megatron_settings=megatron_settings, units=units)
