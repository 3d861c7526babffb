"""Direct Preference Optimization on offline preference pairs.

Shape-suffix legend:
  B  samples (or preference pairs)    T  padded per-token length
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moerl.algos._masked import bool_mask, zero_masked


def sequence_logprobs(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``log pi(y | x) = sum_t log pi(y_t | ...)`` over the response's counted tokens ``[B]``."""
    mask = bool_mask(mask_BT, logprobs_BT=logprobs_BT)
    return zero_masked(logprobs_BT, mask).sum(-1)


def dpo_loss(
    chosen_logprobs_B: torch.Tensor,
    rejected_logprobs_B: torch.Tensor,
    ref_chosen_logprobs_B: torch.Tensor,
    ref_rejected_logprobs_B: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO sigmoid loss (Rafailov et al. 2023, eq. 7), per pair ``[B]``.

    ``l = -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))``
    with sequence log-probs (``sequence_logprobs``). Returned per pair so the caller can divide by a
    global pair count. Metrics (detached, means over the pairs): ``reward_accuracy`` (implicit
    reward ``beta * (log pi - log pi_ref)`` of the chosen strictly above the rejected),
    ``reward_margin``, ``chosen_reward``, ``rejected_reward``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {
        t.shape
        for t in (
            chosen_logprobs_B, rejected_logprobs_B, ref_chosen_logprobs_B, ref_rejected_logprobs_B
        )
    }
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        found = [tuple(s) for s in shapes]
        raise ValueError(f"DPO inputs must be 1-D [B] tensors of one shape, got {found}")
    chosen_B = beta * (chosen_logprobs_B - ref_chosen_logprobs_B.detach())
    rejected_B = beta * (rejected_logprobs_B - ref_rejected_logprobs_B.detach())
    margin_B = chosen_B - rejected_B
    loss_B = -F.logsigmoid(margin_B)
    with torch.no_grad():
        metrics = {
            "reward_accuracy": (margin_B > 0).float().mean(),
            "reward_margin": margin_B.mean(),
            "chosen_reward": chosen_B.mean(),
            "rejected_reward": rejected_B.mean(),
        }
    return loss_B, metrics
