"""Tiny random-weight HF checkpoints of the families beyond Qwen3-MoE, for the family tests.

Each keeps what makes its family different: GLM-4.5 (sigmoid router with a non-zero
``e_score_correction_bias``, 4 groups with top-2 groups, routed scaling factor, shared expert, q/k/v
bias, partial rotary, QK-norm, a dense first layer), Qwen2-MoE (softmax without renormalisation,
gated shared expert, q/k/v bias, a dense middle layer). Vocabularies are odd, so the Megatron side
runs with vocabulary padding at every TP. Router weights are spread (N(0, 1/8)) so the top-k has no
near-ties; biases are non-zero so a wrong map cannot hide behind zeros.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN = 64


def _spread_and_save(model, out: Path, *, bias_std: float = 0.02) -> Path:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.normal_(0.0, 1.0 / 8.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, bias_std)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return out


def make_glm4_moe(out: Path, *, seed: int = 0, vocab_size: int = 61) -> Path:
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
        max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return _spread_and_save(Glm4MoeForCausalLM(config).float(), out)


def make_qwen2_moe(out: Path, *, seed: int = 0, vocab_size: int = 67,
                   mlp_only_layers: tuple[int, ...] = (1,)) -> Path:
    """``mlp_only_layers=()`` makes every layer MoE, the only Qwen2-MoE SGLang 0.5.23 serves."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        mlp_only_layers=list(mlp_only_layers), decoder_sparse_step=1, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-6, qkv_bias=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return _spread_and_save(Qwen2MoeForCausalLM(config).float(), out)


MAKERS = {"glm4_moe": make_glm4_moe, "qwen2_moe": make_qwen2_moe}


def make_deepseek_v3(out: Path, *, seed: int = 0, vocab_size: int = 59, yarn: bool = True,
                     q_lora_rank: int | None = 24) -> Path:
    """MLA (query LoRA, rope/nope dims), YaRN RoPE, a dense first layer, a shared expert and the
    sigmoid router with bias, 4 groups top-2 and scaling factor 2.5."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale": 1.0, "mscale_all_dim": 1.0}
    config = DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, rope_parameters=rope, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    torch.manual_seed(seed)
    return _spread_and_save(DeepseekV3ForCausalLM(config).float(), out)


MAKERS["deepseek_v3"] = make_deepseek_v3


def make_olmoe(out: Path, *, seed: int = 0, vocab_size: int = 53, kv_heads: int = 2,
               rms_norm_eps: float = 1e-6) -> Path:
    """QK-norm over the full q/k projections (GQA by default: the key norm spans 2 heads), softmax
    top-4 of 8 without renormalisation, every layer MoE, no shared expert. SGLang 0.5.23 serves
    only ``kv_heads=4`` (no GQA) with ``rms_norm_eps=1e-5``, as OLMoE-1B-7B ships."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=False, max_position_embeddings=128, tie_word_embeddings=False,
        rms_norm_eps=rms_norm_eps, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(config).float()
    with torch.no_grad():  # non-trivial norm weights: a wrong slice per TP rank cannot hide
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    return _spread_and_save(model, out)


MAKERS["olmoe"] = make_olmoe
