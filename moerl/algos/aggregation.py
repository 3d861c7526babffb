"""Loss aggregation: how per-token losses ``[B, T]`` become one scalar.

Shape-suffix legend:
  B  samples in a (micro-)batch    T  padded per-token length

Three modes (verl's names with underscores), each a different weighting of tokens:
  ``token_mean``               sum_i sum_t l_it / sum_i |o_i|     (DAPO, Yu et al. 2025, eq. 8)
  ``seq_mean_token_mean``      (1/G) sum_i (1/|o_i|) sum_t l_it    (GRPO, Shao et al. 2024, eq. 3)
  ``seq_mean_token_sum_norm``  (1/G) sum_i sum_t l_it / L_max      (Dr.GRPO, Liu et al. 2025)
with ``G`` the number of sequences and ``L_max`` the generation budget (a constant, so that the
per-token weight depends on neither the response's own length nor the batch's padded length).

Split invariance. Each function divides the *local* sum by a denominator. Without
``global_num_tokens`` / ``global_num_seqs`` the denominator is the local count, which is the
usual per-micro-batch mean and depends on how the batch was cut. With them (counts over the whole
optimizer step: every micro-batch on every data-parallel rank, as returned by
``local_denominators`` and summed/all-reduced by the caller), summing the results over all
micro-batches and ranks gives exactly the full-batch loss. Note that data-parallel gradient
all-reduce that *averages* (Megatron's default) then needs a factor of the DP size.

Sequences are never split across micro-batches here: a row is a whole response. Rows without a
single counted token are padding rows and are not counted as sequences. A sequence dropped by a
per-sequence weight (OPSM) must be applied by multiplying the loss, not the mask, so that it still
counts in the denominator as in DeepSeek-V3.2's objective.
"""

from __future__ import annotations

import torch

from moerl.algos._masked import bool_mask, nonempty_rows, zero_masked

Denominator = int | float | torch.Tensor | None


def local_denominators(mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``(num_tokens, num_seqs)`` of one micro-batch, as 0-dim float tensors.

    Sum them over the micro-batches of an optimizer step and all-reduce over data-parallel ranks
    to get the ``global_num_tokens`` / ``global_num_seqs`` the aggregations accept.
    """
    mask = bool_mask(mask_BT)
    return mask.sum().float(), nonempty_rows(mask).sum().float()


def _divide(
    total: torch.Tensor, denominator: Denominator, local_count: torch.Tensor
) -> torch.Tensor:
    if denominator is None:
        # A local batch of padding rows only contributes 0, not 0/0.
        return total / local_count.clamp(min=1).to(total.dtype)
    if not isinstance(denominator, torch.Tensor) and denominator <= 0:
        raise ValueError(f"global denominator must be positive, got {denominator}")
    return total / denominator


def token_mean(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    global_num_tokens: Denominator = None,
    global_num_seqs: Denominator = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """Every counted token weighs the same: ``sum(l) / num_tokens`` (DAPO's token-level loss).

    ``global_num_seqs`` and ``max_response_len`` are accepted so all modes share one call; this
    mode does not use them.
    """
    mask = bool_mask(mask_BT, loss_BT=loss_BT)
    return _divide(zero_masked(loss_BT, mask).sum(), global_num_tokens, mask.sum())


def seq_mean_token_mean(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    global_num_tokens: Denominator = None,
    global_num_seqs: Denominator = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """Mean over tokens within each sequence, then mean over sequences (GRPO's 1/G 1/|o_i|)."""
    mask = bool_mask(mask_BT, loss_BT=loss_BT)
    per_seq_B = zero_masked(loss_BT, mask).sum(-1) / mask.sum(-1).clamp(min=1).to(loss_BT.dtype)
    return _divide(per_seq_B.sum(), global_num_seqs, nonempty_rows(mask).sum())


def seq_mean_token_sum_norm(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    global_num_tokens: Denominator = None,
    global_num_seqs: Denominator = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """Token sum per sequence divided by the constant ``max_response_len``, mean over sequences.

    Dr.GRPO removes GRPO's 1/|o_i| (its length bias) and divides by a constant instead; we use the
    generation budget as verl does (``loss_scale_factor``). It is required here, not defaulted to
    the padded width ``T``, because ``T`` changes from micro-batch to micro-batch.
    """
    if max_response_len is None or max_response_len <= 0:
        raise ValueError(
            "seq_mean_token_sum_norm needs max_response_len > 0 (the generation budget)"
        )
    mask = bool_mask(mask_BT, loss_BT=loss_BT)
    total = zero_masked(loss_BT, mask).sum() / max_response_len
    return _divide(total, global_num_seqs, nonempty_rows(mask).sum())


# Every entry: fn(loss_BT, mask_BT, *, global_num_tokens=None, global_num_seqs=None,
#                 max_response_len=None) -> 0-dim tensor.
AGGREGATIONS = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}
