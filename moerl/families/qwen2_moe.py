"""Qwen1.5/Qwen2-MoE (``qwen2_moe``): GQA with q/k/v bias (``qkv_bias``), RoPE, no QK-norm; a
softmax top-k router (renormalised iff ``norm_topk_prob``, off in the released checkpoints); a shared
expert whose output is scaled by its own sigmoid gate ``sigmoid(h . shared_expert_gate)``; dense
layers via ``mlp_only_layers``/``decoder_sparse_step``."""

from __future__ import annotations

from typing import Any

from moerl.families.base import (
    Family, MoEArchitecture, RouterRule, Unit, common_fields, decoder_units, glu_units,
    gqa_attention_units, require_default_rope, routed_expert_units, router_units)


def read(cfg: dict[str, Any]) -> MoEArchitecture:
    require_default_rope(cfg, "qwen2_moe")
    if cfg.get("use_sliding_window"):
        raise ValueError("qwen2_moe: use_sliding_window=true is not supported")
    return MoEArchitecture(
        **common_fields(cfg, family="qwen2_moe"), expert_ffn=cfg["moe_intermediate_size"],
        num_experts=cfg.get("num_experts") or cfg.get("num_local_experts"),
        router=RouterRule(score="softmax", norm_topk_prob=bool(cfg.get("norm_topk_prob", False))),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        shared_expert_ffn=cfg.get("shared_expert_intermediate_size") or 0,
        shared_expert_gate=bool(cfg.get("shared_expert_intermediate_size")))


def megatron_settings(arch: MoEArchitecture) -> dict[str, Any]:
    settings: dict[str, Any] = {"add_qkv_bias": arch.qkv_bias}
    if arch.shared_expert_ffn:
        settings.update(moe_shared_expert_intermediate_size=arch.shared_expert_ffn,
                        moe_shared_expert_gate=True)
    return settings


def units(arch: MoEArchitecture) -> list[Unit]:
    h = arch.hidden_size

    def moe(meg: str, hf: str) -> list[Unit]:
        units = router_units(arch, meg, f"{hf}.gate") + routed_expert_units(arch, meg, hf)
        if arch.shared_expert_ffn:
            units += glu_units(f"{meg}.shared_experts", f"{hf}.shared_expert",
                               ("gate_proj", "up_proj", "down_proj"), arch.shared_expert_ffn, h)
            units.append(Unit(f"{meg}.shared_experts.gate_weight",
                              ((f"{hf}.shared_expert_gate.weight", (1, h)),), "none"))
        return units

    def attention(meg: str, attn: str) -> list[Unit]:
        return gqa_attention_units(arch, meg, attn, qkv_bias=arch.qkv_bias)

    return decoder_units(arch, attention=attention, moe_block=moe)


FAMILY = Family(name="qwen2_moe", model_types=("qwen2_moe",), read=read,
                megatron_settings=megatron_settings, units=units)
