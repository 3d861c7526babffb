"""GLM-4.5 / 4.6 (``glm4_moe``): GQA with q/k/v bias, partial rotary (``partial_rotary_factor``,
rotate-half on the leading dims) and optional per-head QK-norm; ``first_k_dense_replace`` dense
layers; a shared expert; the DeepSeek-V3 router (sigmoid + expert bias, grouped top-k, routed
scaling factor). The MTP layer (``num_nextn_predict_layers``) is not part of the policy."""

from __future__ import annotations

from typing import Any

from moerl.families.base import (
    Family, MoEArchitecture, Unit, common_fields, decoder_units, gqa_attention_units,
    routed_expert_units, router_units, shared_expert_units, sigmoid_router_rule)


def read(cfg: dict[str, Any]) -> MoEArchitecture:
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"glm4_moe: rope_type {rope.get('rope_type')!r} is not supported")
    return MoEArchitecture(
        **common_fields(cfg, family="glm4_moe"), expert_ffn=cfg["moe_intermediate_size"],
        num_experts=cfg["n_routed_experts"], router=sigmoid_router_rule(cfg, "glm4_moe"),
        qk_norm=bool(cfg.get("use_qk_norm")), qkv_bias=bool(cfg.get("attention_bias")),
        shared_expert_ffn=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        rotary_percent=float(rope.get("partial_rotary_factor",
                                      cfg.get("partial_rotary_factor", 1.0))),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0))


def megatron_settings(arch: MoEArchitecture) -> dict[str, Any]:
    settings: dict[str, Any] = {"qk_layernorm": arch.qk_norm, "add_qkv_bias": arch.qkv_bias}
    if arch.shared_expert_ffn:
        settings["moe_shared_expert_intermediate_size"] = arch.shared_expert_ffn
    return settings


def units(arch: MoEArchitecture) -> list[Unit]:
    def moe(meg: str, hf: str) -> list[Unit]:
        shared = shared_expert_units(arch, meg, f"{hf}.shared_experts") if arch.shared_expert_ffn \
            else []
        return router_units(arch, meg, f"{hf}.gate") + routed_expert_units(arch, meg, hf) + shared

    def attention(meg: str, attn: str) -> list[Unit]:
        return gqa_attention_units(arch, meg, attn, qkv_bias=arch.qkv_bias)

    return decoder_units(arch, attention=attention, moe_block=moe)


FAMILY = Family(name="glm4_moe", model_types=("glm4_moe",), read=read,
                megatron_settings=megatron_settings, units=units)
