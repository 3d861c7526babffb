"""DeepSeek-V3 / V3.1 / Kimi-K2 / Moonlight (``deepseek_v3``): multi-head latent attention (optional
query LoRA, rope/nope head dims, interleaved RoPE on the rope part), YaRN RoPE as the checkpoints
ship it, ``first_k_dense_replace`` dense layers, ``n_shared_experts`` shared experts, and the
sigmoid router with ``e_score_correction_bias``, ``n_group``/``topk_group`` and
``routed_scaling_factor``.

Not supported: the MTP layer (``num_nextn_predict_layers``) is not part of the policy and its
weights are skipped on load; DeepSeek-V3.2's sparse attention (DSA indexer) is refused.
"""

from __future__ import annotations

from typing import Any

from moerl.families.base import (
    Family, MLAShape, MoEArchitecture, Unit, Yarn, common_fields, decoder_units,
    routed_expert_units, router_units, shared_expert_units, sigmoid_router_rule)


def _yarn(cfg: dict[str, Any]) -> Yarn | None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"deepseek_v3: rope_type {kind!r} is not supported ('default' or 'yarn')")
    return Yarn(factor=float(rope["factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                beta_fast=float(rope.get("beta_fast", 32.0)),
                beta_slow=float(rope.get("beta_slow", 1.0)),
                mscale=float(rope.get("mscale", 1.0)),
                mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))


def read(cfg: dict[str, Any]) -> MoEArchitecture:
    if cfg.get("index_topk") or cfg.get("index_n_heads"):
        raise ValueError("deepseek_v3: DeepSeek-V3.2 sparse attention (DSA indexer) is not "
                         "supported")
    if cfg.get("attention_bias"):
        raise ValueError("deepseek_v3: attention_bias=true is not supported")
    if cfg.get("rope_interleave") is False:
        raise ValueError("deepseek_v3: rope_interleave=false is not supported (Megatron's MLA "
                         "RoPE de-interleaves the rope dims as the released checkpoints need)")
    mla = MLAShape(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
                   qk_nope_head_dim=cfg["qk_nope_head_dim"],
                   qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"])
    fields = common_fields(cfg, family="deepseek_v3")
    fields["head_dim"] = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    fields["num_kv_heads"] = fields["num_heads"]  # MLA: every head has its own key and value
    return MoEArchitecture(
        **fields, expert_ffn=cfg["moe_intermediate_size"], num_experts=cfg["n_routed_experts"],
        router=sigmoid_router_rule(cfg, "deepseek_v3"),
        shared_expert_ffn=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0), mla=mla, yarn=_yarn(cfg))


def megatron_settings(arch: MoEArchitecture) -> dict[str, Any]:
    """``MLATransformerConfig`` keywords (the model builder picks that class when ``arch.mla``)."""
    mla = arch.mla
    settings: dict[str, Any] = dict(
        multi_latent_attention=True, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_nope_head_dim, qk_pos_emb_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim, rotary_base=arch.rope_theta,
        # The local spec builds the q/kv LoRA norms only with qk_layernorm.
        qk_layernorm=True)
    if arch.yarn is None:
        settings.update(rope_type="rope", rotary_scaling_factor=1.0, mscale_all_dim=0.0)
    else:
        y = arch.yarn
        settings.update(rope_type="yarn", rotary_scaling_factor=y.factor,
                        original_max_position_embeddings=y.original_max_position_embeddings,
                        beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
                        mscale_all_dim=y.mscale_all_dim)
    if arch.shared_expert_ffn:
        settings["moe_shared_expert_intermediate_size"] = arch.shared_expert_ffn
    return settings


def mla_units(arch: MoEArchitecture, meg: str, attn: str) -> list[Unit]:
    """MLA: Megatron's ``linear_q_down_proj``/``q_layernorm``/``linear_q_up_proj`` (or
    ``linear_q_proj``), ``linear_kv_down_proj``/``kv_layernorm``/``linear_kv_up_proj``,
    ``linear_proj``; per-head layouts ([nope; rope] for queries, [nope; v] for kv_b) are the same
    on both sides, so the up projections split by heads as plain rows."""
    mla, h, heads = arch.mla, arch.hidden_size, arch.num_heads
    q_out = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    sa = f"{meg}.self_attention"
    if mla.q_lora_rank is None:
        units = [Unit(f"{sa}.linear_q_proj.weight", ((f"{attn}.q_proj.weight", (q_out, h)),),
                      "rows")]
    else:
        r = mla.q_lora_rank
        units = [Unit(f"{sa}.linear_q_down_proj.weight", ((f"{attn}.q_a_proj.weight", (r, h)),),
                      "down"),
                 Unit(f"{sa}.q_layernorm.weight", ((f"{attn}.q_a_layernorm.weight", (r,)),),
                      "none"),
                 Unit(f"{sa}.linear_q_up_proj.weight", ((f"{attn}.q_b_proj.weight", (q_out, r)),),
                      "rows")]
    kv = mla.kv_lora_rank
    units += [
        Unit(f"{sa}.linear_kv_down_proj.weight",
             ((f"{attn}.kv_a_proj_with_mqa.weight", (kv + mla.qk_rope_head_dim, h)),), "down"),
        Unit(f"{sa}.kv_layernorm.weight", ((f"{attn}.kv_a_layernorm.weight", (kv,)),), "none"),
        Unit(f"{sa}.linear_kv_up_proj.weight",
             ((f"{attn}.kv_b_proj.weight", (heads * (mla.qk_nope_head_dim + mla.v_head_dim), kv)),),
             "rows"),
        Unit(f"{sa}.linear_proj.weight", ((f"{attn}.o_proj.weight", (h, heads * mla.v_head_dim)),),
             "cols")]
    return units


def units(arch: MoEArchitecture) -> list[Unit]:
    def moe(meg: str, hf: str) -> list[Unit]:
        shared = (shared_expert_units(arch, meg, f"{hf}.shared_experts")
                  if arch.shared_expert_ffn else [])
        return router_units(arch, meg, f"{hf}.gate") + routed_expert_units(arch, meg, hf) + shared

    return decoder_units(arch, attention=lambda meg, attn: mla_units(arch, meg, attn),
                         moe_block=moe)


FAMILY = Family(name="deepseek_v3", model_types=("deepseek_v3",), read=read,
                megatron_settings=megatron_settings, units=units)
