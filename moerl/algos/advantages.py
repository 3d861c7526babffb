"""Advantage estimators: outcome baselines (GRPO, Dr.GRPO, RLOO, REINFORCE++) and GAE.

Shape-suffix legend:
  B  samples in the rollout batch    T  padded per-token length    G  prompt groups

Inputs are token-level rewards ``token_rewards_BT`` (verl's ``token_level_rewards``): the outcome
reward sits on the last counted token of each response (``outcome_token_rewards``) and a PPO-style
KL penalty, if any, is already folded in per token (``moerl.algos.kl.kl_penalized_rewards``).
Group estimators use the sequence return ``R_i = sum_t r_it`` (undiscounted).

Column t of every ``[B, T]`` tensor is the token the model predicts at position t. Masked columns
are skipped: a mask hole (e.g. a tool observation inside a multi-turn response) is not a step of
the return, the next counted token is. Outputs are 0 at masked columns.

Conventions the papers leave open:
* GRPO's std is the *sample* (Bessel-corrected, unbiased) std over the group, ``torch.std``'s
  default, as in verl's ``compute_grpo_outcome_advantage`` and TRL's GRPOTrainer; DeepSeekMath
  (Shao et al. 2024, sec. 4.1.2) writes ``std(r)`` without saying which. eps = 1e-6 (verl) is added
  to the std, not under the square root.
* A group of one sample has no baseline; its advantage is 0 (it carries no learning signal),
  rather than verl's choice of passing the raw reward through.
* REINFORCE++ normalises over every counted token of the batch passed in (OpenRLHF / verl
  ``masked_whiten``), with the same sample std + eps convention. Call it on the whole rollout
  batch, before it is split into micro-batches.

Advantages are targets: everything here runs without autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moerl.algos._masked import (
    bool_mask,
    check_per_sample,
    group_inverse,
    group_sum,
    masked_mean,
    zero_masked,
)

GRPO_EPS = 1e-6


def outcome_token_rewards(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Place each scalar reward on its response's last counted token; 0 elsewhere ``[B, T]``.

    A row without counted tokens gets no reward.
    """
    mask = bool_mask(mask_BT)
    check_per_sample(mask, rewards_B=rewards_B)
    positions_T = torch.arange(mask.shape[1], device=mask.device)
    last_B = torch.where(mask, positions_T, -1).amax(-1)
    dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.get_default_dtype()
    out_BT = torch.zeros(mask.shape, dtype=dtype, device=rewards_B.device)
    rows_B = torch.nonzero(last_B >= 0).squeeze(-1)
    out_BT[rows_B, last_B[rows_B]] = rewards_B[rows_B].to(dtype)
    return out_BT


def _sequence_returns(token_rewards_BT: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return zero_masked(token_rewards_BT, mask).sum(-1)


def _group_centred(
    scores_B: torch.Tensor, group_ids_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: ``R_i - mean_g R``, the group's sample std (0 for groups of one), group size.

    The mean is taken of the shifts ``d_i = R_i - R_ref`` from one member of the group (its
    minimum), not of the raw scores: a float mean of N equal, non-dyadic values (sixteen 0.7s in
    float32) is one rounding step off them, which GRPO's ``/ (std + eps)`` blew up to |A| ~ 0.1-0.9
    on a group that carries no signal. With the shift an all-equal group has ``d = 0`` exactly,
    so its centred scores, its std and its advantages are exactly 0 in any dtype; for other
    groups it is the classic shifted-data algorithm (less cancellation for large scores).
    """
    inverse_B, num_groups = group_inverse(group_ids_B)
    count_G = group_sum(torch.ones_like(scores_B), inverse_B, num_groups)
    ref_G = torch.full((num_groups,), float("inf"), dtype=scores_B.dtype, device=scores_B.device)
    ref_G = ref_G.scatter_reduce(0, inverse_B, scores_B, reduce="amin")
    shift_B = scores_B - ref_G[inverse_B]
    centred_B = shift_B - (group_sum(shift_B, inverse_B, num_groups) / count_G)[inverse_B]
    var_G = group_sum(centred_B**2, inverse_B, num_groups) / (count_G - 1).clamp(min=1)
    return centred_B, var_G.sqrt()[inverse_B], count_G[inverse_B]


def _broadcast(adv_B: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return zero_masked(adv_B[:, None].expand(mask.shape), mask)


@torch.no_grad()
def grpo_advantages(
    token_rewards_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    group_ids_B: torch.Tensor,
    *,
    eps: float = GRPO_EPS,
) -> torch.Tensor:
    """GRPO outcome supervision (DeepSeekMath, Shao et al. 2024, sec. 4.1.2).

    ``A_i = (R_i - mean_g R) / (std_g R + eps)`` broadcast to every counted token of response i;
    sample std (see the module docstring).
    """
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT)
    check_per_sample(mask, group_ids_B=group_ids_B)
    scores_B = _sequence_returns(token_rewards_BT, mask)
    centred_B, std_B, count_B = _group_centred(scores_B, group_ids_B)
    adv_B = torch.where(count_B > 1, centred_B / (std_B + eps), 0.0)
    return _broadcast(adv_B, mask)


@torch.no_grad()
def dr_grpo_advantages(
    token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor, group_ids_B: torch.Tensor
) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = R_i - mean_g R``.

    Dropping GRPO's std removes its question-difficulty bias; pair it with
    ``seq_mean_token_sum_norm`` aggregation to also remove the length bias.
    """
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT)
    check_per_sample(mask, group_ids_B=group_ids_B)
    scores_B = _sequence_returns(token_rewards_BT, mask)
    centred_B, _, _ = _group_centred(scores_B, group_ids_B)
    return _broadcast(centred_B, mask)


@torch.no_grad()
def rloo_advantages(
    token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor, group_ids_B: torch.Tensor
) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): leave-one-out mean baseline.

    ``A_i = R_i - (sum_g R - R_i) / (N - 1) = N / (N - 1) * (R_i - mean_g R)``; 0 for groups of one.
    """
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT)
    check_per_sample(mask, group_ids_B=group_ids_B)
    scores_B = _sequence_returns(token_rewards_BT, mask)
    centred_B, _, count_B = _group_centred(scores_B, group_ids_B)
    scale_B = count_B / (count_B - 1).clamp(min=1)
    adv_B = torch.where(count_B > 1, scale_B * centred_B, 0.0)
    return _broadcast(adv_B, mask)


def _reverse_discounted_sum(
    x_BT: torch.Tensor, mask: torch.Tensor, discount: float
) -> torch.Tensor:
    """``y_t = x_t + discount * y_next`` over the counted columns of each row, right to left.

    ``y_next`` is the value at the next *counted* column (0 after the last one). Vectorised over
    the batch; discount == 1 is a reversed cumsum, otherwise one step per column.
    """
    x_BT = zero_masked(x_BT, mask)
    if discount == 1.0:
        return zero_masked(x_BT.flip(-1).cumsum(-1).flip(-1), mask)
    out_BT = torch.zeros_like(x_BT)
    carry_B = torch.zeros_like(x_BT[:, 0])
    for t in range(x_BT.shape[1] - 1, -1, -1):
        carry_B = torch.where(mask[:, t], x_BT[:, t] + discount * carry_B, carry_B)
        out_BT[:, t] = carry_B
    return zero_masked(out_BT, mask)


def _whiten(x_BT: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    mean = masked_mean(x_BT, mask)
    num = mask.sum()
    var = zero_masked((x_BT - mean) ** 2, mask).sum() / (num - 1).clamp(min=1)
    return zero_masked((x_BT - mean) / (var.sqrt() + eps), mask)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    group_ids_B: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    eps: float = GRPO_EPS,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): batch-normalised discounted returns.

    ``G_t = sum_{s >= t} gamma^(s-t) r_s`` (KL penalty already in ``r``), then
    ``A_t = (G_t - mean) / (std + eps)`` over every counted token of the batch. ``group_ids_B`` is
    not used: REINFORCE++'s baseline is the batch, not the group.
    """
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT)
    return _whiten(_reverse_discounted_sum(token_rewards_BT, mask, gamma), mask, eps)


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    token_rewards_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    group_ids_B: torch.Tensor,
    *,
    gamma: float = 1.0,
    eps: float = GRPO_EPS,
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025, v2): subtract the group mean return, then REINFORCE++.

    The group mean of ``R_i`` is subtracted on the last counted token (where the outcome reward
    sits), then returns are accumulated and normalised over the batch as in REINFORCE++.
    """
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT)
    check_per_sample(mask, group_ids_B=group_ids_B)
    scores_B = _sequence_returns(token_rewards_BT, mask)
    mean_B = scores_B - _group_centred(scores_B, group_ids_B)[0]
    centred_BT = zero_masked(token_rewards_BT, mask) - outcome_token_rewards(mean_B, mask)
    return _whiten(_reverse_discounted_sum(centred_BT, mask, gamma), mask, eps)


@torch.no_grad()
def gae(
    token_rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16) and critic returns.

    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = sum_k (gamma*lam)^k delta_{t+k}`` over the
    counted tokens of each row, with ``V_next`` the value at the next counted column. The state
    after the last counted token is terminal (``V = 0``): responses cut by the length limit are
    not bootstrapped, as in verl and OpenRLHF. Returns ``(advantages_BT, returns_BT)`` with
    ``returns = A + V`` (the critic's lambda-return target); both 0 at masked columns.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT, values_BT=values_BT)
    values_BT = zero_masked(values_BT, mask)
    num_cols = mask.shape[1]
    # First counted column >= t (num_cols if none) via a reversed running minimum; shifted by one
    # it is the next counted column after t. Column num_cols of the padded values is the terminal 0.
    positions_BT = torch.where(mask, torch.arange(num_cols, device=mask.device), num_cols)
    first_at_or_after_BT = positions_BT.flip(-1).cummin(-1).values.flip(-1)
    terminal_B1 = torch.full_like(first_at_or_after_BT[:, :1], num_cols)
    next_BT = torch.cat([first_at_or_after_BT[:, 1:], terminal_B1], dim=-1)
    padded_values_BT1 = torch.cat([values_BT, torch.zeros_like(values_BT[:, :1])], dim=-1)
    next_values_BT = padded_values_BT1.gather(-1, next_BT)
    deltas_BT = zero_masked(token_rewards_BT, mask) + gamma * next_values_BT - values_BT
    advantages_BT = _reverse_discounted_sum(deltas_BT, mask, gamma * lam)
    return advantages_BT, zero_masked(advantages_BT + values_BT, mask)


class AdvantageResult(NamedTuple):
    """What every advantage estimator returns."""

    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor | None  # the critic's regression targets (GAE); None without a critic


def _outcome_entry(estimator, *, discounted: bool):
    """A registry entry for an estimator without a critic. The group estimators use the
    undiscounted return ``R_i`` (``gamma`` and ``lam`` are not read); REINFORCE++ reads
    ``gamma``."""

    def entry(token_rewards_BT, mask_BT, group_ids_B, values_BT=None, *, gamma, lam):
        kwargs = {"gamma": gamma} if discounted else {}
        return AdvantageResult(estimator(token_rewards_BT, mask_BT, group_ids_B, **kwargs), None)

    entry.__name__ = entry.__qualname__ = estimator.__name__.removesuffix("_advantages")
    entry.__doc__ = estimator.__doc__
    return entry


def gae_entry(token_rewards_BT, mask_BT, group_ids_B, values_BT=None, *, gamma, lam):
    """Registry entry ``gae``: :func:`gae` with the critic's ``values_BT``; ``group_ids_B`` is
    not used. Returns the critic's lambda-return targets too."""
    if values_BT is None:
        raise ValueError("advantage estimator gae needs the critic's values_BT")
    return AdvantageResult(*gae(token_rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam))


# Every entry has the one signature
#   fn(token_rewards_BT, mask_BT, group_ids_B, values_BT=None, *, gamma, lam) -> AdvantageResult
# (group estimators ignore values_BT/gamma/lam; REINFORCE++ reads gamma; GAE reads all of them).
ADVANTAGE_ESTIMATORS = {
    "grpo": _outcome_entry(grpo_advantages, discounted=False),
    "dr_grpo": _outcome_entry(dr_grpo_advantages, discounted=False),
    "rloo": _outcome_entry(rloo_advantages, discounted=False),
    "reinforce_pp": _outcome_entry(reinforce_pp_advantages, discounted=True),
    "reinforce_pp_baseline": _outcome_entry(reinforce_pp_baseline_advantages, discounted=True),
    "gae": gae_entry,
}
# Estimators that need a critic's values (the trainer builds a value model for them).
CRITIC_ESTIMATORS = frozenset({"gae"})
