"""Model families: one module each over one Megatron-free architecture record (:mod:`.base`).

:data:`FAMILIES` maps a family name to its :class:`~moerl.families.base.Family`;
:func:`architecture_from_hf` picks the family by the HF config's ``model_type``.
"""

from __future__ import annotations

from typing import Any

from moerl.families import deepseek_v3, glm4_moe, mixtral, olmoe, qwen2_moe, qwen3_moe
from moerl.families.base import Family, MoEArchitecture, RouterRule, Unit

__all__ = ["FAMILIES", "Family", "MoEArchitecture", "RouterRule", "Unit", "architecture_from_hf",
           "family_of"]

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen3_moe.FAMILY, mixtral.FAMILY,
                                                   qwen2_moe.FAMILY, glm4_moe.FAMILY,
                                                   deepseek_v3.FAMILY, olmoe.FAMILY)}


def family_of(arch: MoEArchitecture) -> Family:
    return FAMILIES[arch.family]


def architecture_from_hf(hf_config: Any) -> MoEArchitecture:
    """Read an HF config (``transformers`` config object or its dict) into :class:`MoEArchitecture`."""
    cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = cfg.get("model_type")
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {supported}")
    return family.read(cfg)
