"""Mixtral (``mixtral``): GQA without QK-norm, every layer MoE, experts ``w1/w3/w2`` under
``block_sparse_moe``, softmax top-k always renormalised."""

from __future__ import annotations

from typing import Any

from moerl.families.base import (
    Family, MoEArchitecture, RouterRule, Unit, common_fields, decoder_units, gqa_attention_units,
    require_default_rope, routed_expert_units, router_units)

_MOE = "block_sparse_moe"


def read(cfg: dict[str, Any]) -> MoEArchitecture:
    require_default_rope(cfg, "mixtral")
    # Mixtral's intermediate_size is the expert width (it has no dense layers).
    return MoEArchitecture(
        **common_fields(cfg, family="mixtral"), expert_ffn=cfg["intermediate_size"],
        num_experts=cfg["num_local_experts"],
        router=RouterRule(score="softmax", norm_topk_prob=True))


def megatron_settings(arch: MoEArchitecture) -> dict[str, Any]:
    return {}


def units(arch: MoEArchitecture) -> list[Unit]:
    def moe(meg: str, hf: str) -> list[Unit]:
        return (router_units(arch, meg, f"{hf}.gate")
                + routed_expert_units(arch, meg, hf, ("w1", "w3", "w2")))

    return decoder_units(arch, attention=lambda meg, attn: gqa_attention_units(arch, meg, attn),
                         moe_block=moe, moe_module=_MOE)


FAMILY = Family(name="mixtral", model_types=("mixtral",), read=read,
                megatron_settings=megatron_settings, units=units, moe_module=_MOE)
