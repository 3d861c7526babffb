"""Query/key RMSNorm over the whole projection (OLMoE), correct under tensor parallelism.

OLMoE normalises each token's full query projection (``num_heads * head_dim`` values) with one
RMSNorm, and its full key projection (``num_kv_heads * head_dim``) with another, where Qwen3-MoE
and Megatron's ``qk_layernorm`` normalise each head on its own. Under tensor parallelism a rank
holds only its heads, so the root mean square spans values on every TP rank: a norm over the local
shard would be wrong. :class:`FullQueryNorm` / :class:`FullKeyNorm` all-reduce the per-token sum of
squares over the TP group; forward and backward both sum (every rank's output depends on every
rank's input through that sum), so gradients equal the TP=1 ones.

The weight is held whole on every rank (``num_heads * head_dim`` values: tiny) and each rank
scales its heads by its slice of it. This fits what Megatron's ``finalize_model_grads`` does with
``qk_layernorm`` on (0.16.1 and 0.19.2): it sums the gradient of every parameter whose name
contains ``q_layernorm``/``k_layernorm`` over the TP group (meant for per-head norms). A rank's
gradient is non-zero only in its own slice, so that sum is the full gradient, the same on every
rank, and the replicas stay equal; the HF bridge maps the weight as replicated (``none``).

Megatron builds ``q_layernorm``/``k_layernorm`` from the layer spec with ``(hidden_size=head_dim,
config, eps)`` only and calls them on ``[sq, b, heads_on_this_rank, head_dim]`` after the QKV
split; :func:`use_full_projection_qk_norm` puts these classes in the spec, and the TP group comes
from Megatron's model-parallel state (the one the spec's attention layers use).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.transformer.module import MegatronModule


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is an all-reduce (sum) too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _FullProjectionNorm(MegatronModule):
    """RMSNorm over all heads of a token, ``[sq, b, n_local, d] -> [sq, b, n_local, d]``."""

    heads_attr = ""  # the TransformerConfig field giving the number of heads normalised together

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(config=config)
        from megatron.core import parallel_state

        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = dist.get_world_size(self.group) if dist.is_initialized() else 1
        self.tp_rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        heads = getattr(config, self.heads_attr)
        if heads % self.tp_size:
            raise ValueError(f"{self.heads_attr}={heads} is not divisible by tensor parallelism "
                             f"{self.tp_size}")
        self.head_dim, self.local_heads = hidden_size, heads // self.tp_size
        self.width = heads * hidden_size  # values the RMS spans (all ranks)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.width, dtype=config.params_dtype))

    def forward(self, x_SBND: torch.Tensor) -> torch.Tensor:
        assert x_SBND.shape[-2:] == (self.local_heads, self.head_dim), x_SBND.shape
        x32_SBND = x_SBND.float()
        sumsq_SB11 = x32_SBND.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_size > 1:
            sumsq_SB11 = _SumOverGroup.apply(sumsq_SB11, self.group)
        normed_SBND = x32_SBND * torch.rsqrt(sumsq_SB11 / self.width + self.eps)
        start = self.tp_rank * self.local_heads * self.head_dim
        w_ND = self.weight[start:start + self.local_heads * self.head_dim].view(
            self.local_heads, self.head_dim)
        # As transformers: normalise in fp32, cast back, then scale.
        return w_ND * normed_SBND.to(x_SBND.dtype)


class FullQueryNorm(_FullProjectionNorm):
    """RMSNorm over the full query projection (``num_attention_heads * head_dim``)."""

    heads_attr = "num_attention_heads"


class FullKeyNorm(_FullProjectionNorm):
    """RMSNorm over the full key projection (``num_query_groups * head_dim``)."""

    heads_attr = "num_query_groups"


def use_full_projection_qk_norm(block_spec) -> None:
    """Replace every layer's per-head ``q_layernorm``/``k_layernorm`` by the full-projection norms
    above (in place; the config must have ``qk_layernorm=True`` so that Megatron builds them)."""
    for layer_spec in block_spec.layer_specs:
        attention = layer_spec.submodules.self_attention.submodules
        attention.q_layernorm = FullQueryNorm
        attention.k_layernorm = FullKeyNorm
