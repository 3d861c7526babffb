"""Off-policy masks, mismatch telemetry and DAPO's sample filters (the importance-weight
corrections of the train/rollout mismatch are ``moerl.algos.rollout_correction``).

Shape-suffix legend:
  B  samples    T  padded per-token length (column t = the token predicted at t)

Three log-prob sources meet here (STYLE rule 4): ``logprobs`` (pi_theta, being trained),
``old_logprobs`` (the trainer's recompute of pi_old) and ``rollout_logprobs`` (what the rollout
engine sampled with: under keep-sampling-mask, the truncated renormalised distribution).

How each result is applied (all weights and masks are detached):
* ``off_policy_sequence_mask`` -> bool ``[B, T]``: multiply the *loss* (``loss_BT * keep_BT``)
  so dropped tokens still count in the aggregation denominators, as in DeepSeek-V3.2's
  objective where M_it sits inside ``1/G sum_i 1/|o_i| sum_t``.
* ``overlong_filter`` -> a new loss mask: DAPO excludes truncated samples from the loss and from
  its token count.
* ``soft_overlong_punishment`` -> ``[B]`` added to the rewards before advantages.
* ``dynamic_sampling_keep`` -> bool ``[B]``: which samples to keep (whole groups).
"""

from __future__ import annotations

import math

import torch

from moerl.algos._masked import (
    bool_mask,
    check_per_sample,
    group_inverse,
    masked_mean,
    nonempty_rows,
    seq_mean,
    zero_masked,
)


@torch.no_grad()
def off_policy_sequence_mask(
    logprobs_BT: torch.Tensor,
    rollout_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    delta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Off-policy sequence masking (DeepSeek-V3.2, 2025, "Scaling GRPO", eq. 9).

    ``M_it = 0`` iff ``A_it < 0`` and ``(1/|o_i|) sum_t log(pi_old(o_t) / pi_theta(o_t)) > delta``,
    else 1: the drift test is per sequence, the sign test per token, exactly as the paper writes
    it with ``A_{i,t}``. For outcome advantages (constant over a response) this drops whole
    negative sequences; with per-token advantages (GAE) only the negative tokens of a drifted
    sequence are dropped. Positive tokens never are. As the paper specifies, pi_old is the
    probability *returned by the inference engine* (``rollout_logprobs``), so the test sees both
    the train/inference mismatch and the staleness from earlier mini-batch steps. pi_theta enters
    detached: the mask is a decision, not a differentiable term.

    Returns (keep_BT bool, metrics): ``opsm_masked_frac`` (fraction of counted tokens dropped),
    ``opsm_masked_seq_frac`` (fraction of non-empty sequences with a dropped token) and
    ``opsm_seq_kl`` (mean per-sequence log-ratio statistic).
    """
    mask = bool_mask(
        mask_BT,
        logprobs_BT=logprobs_BT,
        rollout_logprobs_BT=rollout_logprobs_BT,
        advantages_BT=advantages_BT,
    )
    seq_kl_B = seq_mean(rollout_logprobs_BT - logprobs_BT.detach(), mask)
    negative_BT = zero_masked(advantages_BT, mask) < 0
    drop_BT = negative_BT & (seq_kl_B > delta)[:, None] & mask
    rows_B = nonempty_rows(mask)
    metrics = {
        "opsm_masked_frac": masked_mean(drop_BT.float(), mask),
        "opsm_masked_seq_frac": masked_mean(drop_BT.any(-1).float(), rows_B),
        "opsm_seq_kl": masked_mean(seq_kl_B, rows_B),
    }
    return ~drop_BT, metrics


@torch.no_grad()
def mismatch_metrics(
    old_logprobs_BT: torch.Tensor, rollout_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Train/rollout mismatch telemetry (DESIGN.md): ``mismatch_abs_mean`` / ``mismatch_abs_max``
    of ``|old - rollout|`` log-probs, ``mismatch_k3`` (k3 estimate of KL(rollout || old), the
    tokens being rollout samples) and ``mismatch_extreme_frac`` (ratio outside [1/2, 2])."""
    mask = bool_mask(
        mask_BT, old_logprobs_BT=old_logprobs_BT, rollout_logprobs_BT=rollout_logprobs_BT
    )
    diff_BT = zero_masked(old_logprobs_BT - rollout_logprobs_BT, mask)
    x_BT = diff_BT.clamp(-20.0, 20.0)
    return {
        "mismatch_abs_mean": masked_mean(diff_BT.abs(), mask),
        "mismatch_abs_max": diff_BT.abs().amax() if diff_BT.numel() else diff_BT.sum(),
        "mismatch_k3": masked_mean(torch.expm1(x_BT) - x_BT, mask),
        "mismatch_extreme_frac": masked_mean((diff_BT.abs() > math.log(2.0)).float(), mask),
    }


def overlong_filter(mask_BT: torch.Tensor, truncated_B: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering (Yu et al. 2025, sec. 3.4): truncated samples leave the loss.

    Returns the loss mask with the rows of truncated samples (finish_reason "length") cleared, so
    they contribute neither loss nor tokens to the denominators. Same dtype as ``mask_BT``.
    Compute advantages with the unfiltered mask: a truncated sample still belongs to its group's
    baseline (with its reward), it only stops receiving gradient.
    """
    check_per_sample(mask_BT, truncated_B=truncated_B)
    keep_B1 = ~truncated_B.bool()[:, None]
    return mask_BT * keep_B1 if mask_BT.dtype != torch.bool else mask_BT & keep_B1


def soft_overlong_punishment(
    response_lengths_B: torch.Tensor, *, max_response_len: int, cache_len: int
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), a reward term ``[B]``.

    ``0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` in the interval up
    to ``L_max`` (linear from 0 to -1); ``-1`` beyond ``L_max``. DAPO uses L_max = 20480,
    L_cache = 4096. Add it to the task reward.
    """
    if not 0 < cache_len <= max_response_len:
        raise ValueError(
            f"need 0 < cache_len <= max_response_len, got {cache_len}, {max_response_len}"
        )
    lengths_B = response_lengths_B.to(torch.get_default_dtype())
    expected = max_response_len - cache_len
    linear_B = (expected - lengths_B) / cache_len
    return torch.where(
        lengths_B <= expected,
        torch.zeros_like(lengths_B),
        torch.where(lengths_B <= max_response_len, linear_B, -torch.ones_like(lengths_B)),
    )


def dynamic_sampling_keep(rewards_B: torch.Tensor, group_ids_B: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, eq. 11): keep groups whose rewards are not all equal.

    A group with identical rewards has zero group-normalised advantage everywhere and contributes
    no gradient. Equality is exact (max == min), not ``std > eps``: a float mean of identical
    values can differ from them in the last bit. Returns bool ``[B]``, constant within a group.
    """
    if rewards_B.shape != group_ids_B.shape:
        raise ValueError(
            f"rewards_B {tuple(rewards_B.shape)} and group_ids_B {tuple(group_ids_B.shape)} differ"
        )
    inverse_B, num_groups = group_inverse(group_ids_B)
    empty_G = torch.empty(num_groups, dtype=rewards_B.dtype, device=rewards_B.device)
    max_G = empty_G.scatter_reduce(0, inverse_B, rewards_B, reduce="amax", include_self=False)
    min_G = empty_G.scatter_reduce(0, inverse_B, rewards_B, reduce="amin", include_self=False)
    return (max_G > min_G)[inverse_B]
