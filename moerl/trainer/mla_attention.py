"""Core attention for multi-head latent attention with Megatron's local (non-TE) layer spec.

Megatron-core 0.16 and 0.19 build MLA with ``k_channels``/``v_channels`` (query/key head dim
``nope + rope`` differs from the value head dim) and hand its core attention query ``[sq, b, np,
dq]``, key ``[sk, b, np, dq]``, value ``[sk, b, np, dv]``; their local ``DotProductAttention``
accepts neither the keywords nor unequal head dims, so MLA needs Transformer Engine upstream.
:class:`LocalMLACoreAttention` is the plain causal attention MLA needs on CPU (and on a GPU without
TE), in fp32 softmax, with MLA's own softmax scale (YaRN's ``mscale^2 / sqrt(dq)``). It is put in
the layer spec by :func:`use_local_mla_core_attention`, not patched into Megatron.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.module import MegatronModule


class LocalMLACoreAttention(MegatronModule):
    """Causal softmax attention ``[sq, b, np, dq] x [sk, b, np, dq] x [sk, b, np, dv] ->
    [sq, b, np * dv]`` (no dropout: moerl trains with attention dropout 0)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, **_unused):
        super().__init__(config=config)
        if config.attention_dropout:
            raise ValueError("LocalMLACoreAttention has no attention dropout; set it to 0")
        if config.context_parallel_size != 1:
            raise ValueError("LocalMLACoreAttention does not support context parallelism")
        # Attention.__init__ builds a core attention before MLA replaces it with one that gets
        # MLA's scale; the first never runs.
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise ValueError("LocalMLACoreAttention does not support packed sequences")
        sq, b, heads, _ = query.shape
        q_BHSD, k_BHSD, v_BHSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scores_BHSS = torch.matmul(q_BHSD.float(), k_BHSD.float().transpose(-1, -2))
        scale = self.softmax_scale if self.softmax_scale is not None else query.shape[-1] ** -0.5
        scores_BHSS = scores_BHSS * scale
        causal = torch.ones(sq, key.shape[0], dtype=torch.bool, device=query.device).triu(1)
        scores_BHSS = scores_BHSS.masked_fill(causal, float("-inf"))
        probs_BHSS = torch.softmax(scores_BHSS, dim=-1).to(value.dtype)
        out_BHSD = torch.matmul(probs_BHSS, v_BHSD)
        return out_BHSD.permute(2, 0, 1, 3).reshape(sq, b, heads * value.shape[-1])


def use_local_mla_core_attention(block_spec) -> None:
    """Make every MLA layer of a local decoder block spec trainable on CPU (in place): the core
    attention above, and replicated down projections.

    The local spec makes ``linear_q_down_proj``/``linear_kv_down_proj`` column-parallel; MLA then
    all-gathers their output across TP, whose backward only keeps this rank's slice of a gradient
    that every rank's heads contributed to: the latent projections and everything below them get
    wrong gradients at TP > 1 (measured: 2.5e-3 relative on the embedding). With Transformer Engine
    they are duplicated instead; megatron-core's replicated ``Linear`` does the same here and marks
    its weight ``sequence_parallel`` so ``finalize_model_grads`` all-reduces it over TP.
    """
    from megatron.core.post_training.modelopt.layers import Linear

    for layer_spec in block_spec.layer_specs:
        attention = layer_spec.submodules.self_attention
        if hasattr(attention.submodules, "linear_kv_down_proj"):
            attention.submodules.core_attention = LocalMLACoreAttention
            attention.submodules.linear_kv_down_proj = Linear
            if attention.submodules.linear_q_down_proj is not None:
                attention.submodules.linear_q_down_proj = Linear
