"""OLMoE (``olmoe``): GQA with one RMSNorm over the full query projection and one over the full key
projection (not per head; see ``moerl.trainer.qk_norm``), RoPE, SwiGLU experts (``intermediate_size``
wide; every layer is MoE, no shared expert) and a softmax top-k router (top-8 of 64 in
OLMoE-1B-7B), renormalised iff ``norm_topk_prob`` (off in the released checkpoints).

Refused: ``clip_qkv`` (Megatron has no QKV clamp), ``attention_bias``, a ``head_dim`` other than
``hidden_size / num_attention_heads`` (transformers sizes the norms by that quotient), RoPE
scaling."""

from __future__ import annotations

from typing import Any

from moerl.families.base import (
    Family, MoEArchitecture, RouterRule, common_fields, require_default_rope)
from moerl.families.qwen3_moe import megatron_settings as qwen3_megatron_settings
from moerl.families.qwen3_moe import units as qwen3_units


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    if cfg.get("clip_qkv") is not None:
        raise ValueError(f"olmoe: clip_qkv={cfg['clip_qkv']} is not supported (Megatron has no "
                         "QKV clamp); use a checkpoint trained without it (clip_qkv null)")
    if cfg.get("attention_bias"):
        raise ValueError("olmoe: attention_bias=true is not supported")
    head_dim, natural = cfg.get("head_dim"), cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim not in (None, natural):
        raise ValueError(f"olmoe: head_dim={head_dim} differs from hidden_size / "
                         f"num_attention_heads = {natural}, which transformers' OLMoE assumes")
    require_default_rope(cfg, "olmoe")


def read(cfg: dict[str, Any]) -> MoEArchitecture:
    _refuse_unsupported(cfg)
    return MoEArchitecture(
        **common_fields(cfg, family="olmoe"), expert_ffn=cfg["intermediate_size"],
        num_experts=cfg.get("num_experts") or cfg.get("num_local_experts"),
        router=RouterRule(score="softmax", norm_topk_prob=bool(cfg.get("norm_topk_prob", False))),
        qk_norm=True, qk_norm_full_projection=True)


# Megatron settings and tensor map are Qwen3-MoE's: same names, same layout, no dense layers; the
# QK-norm weights' full-projection sizes and the model builder's norm follow from
# ``qk_norm_full_projection`` in the record.
FAMILY = Family(name="olmoe", model_types=("olmoe",), read=read,
                megatron_settings=qwen3_megatron_settings, units=qwen3_units)
