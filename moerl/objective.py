"""The RL objective: one algorithm preset's registry entries composed into a loss and advantages.

This is the glue between the pure math of ``moerl.algos`` and the trainer. It sees scalars only
(an :class:`Objective`, unpacked once from the config) and tensors from a ``RolloutBatch``.

Order of the per-token terms for one micro-batch (every weight and mask is detached):

    loss_t = w_t * M_i * policy_loss_t + beta * kl_t - c_H * H_t

with ``w_t`` the rollout correction (``moerl.algos.rollout_correction``: pi_old vs pi_rollout,
computed once per rollout on the whole batch), ``M_it`` the off-policy sequence mask
(DeepSeek-V3.2), then aggregated with global denominators so the sum over micro-batches and
data-parallel ranks is the full mini-batch loss. Which pi_old each term uses: the policy ratio
and the unbiased KL use ``old_logprobs`` (the trainer's recompute, the usual PPO choice, which
under keep-routing/keep-mask matches the rollout's routing and support; in bypass mode they *are*
the rollout's log-probs); OPSM and the rollout corrections use ``rollout_logprobs``, as their
papers specify.

Every algorithmic choice is a registry lookup with that registry's one call signature; this
module never branches on an entry's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moerl.algos import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    entropy_bonus_loss,
    kl_penalized_rewards,
    off_policy_sequence_mask,
    outcome_token_rewards,
    overlong_filter,
    soft_overlong_punishment,
)
from moerl.algos._masked import masked_mean
from moerl.batch import RolloutBatch


@dataclass(frozen=True)
class Objective:
    """The scalars of one algorithm (see ``moerl.config.AlgorithmConfig`` for each field)."""

    advantage: str
    policy_loss: str
    clip_eps_low: float | None
    clip_eps_high: float
    dual_clip_c: float
    aggregation: str
    kl_estimator: str
    kl_coef: float
    kl_in_reward: bool
    entropy_coef: float
    opsm_delta: float
    rollout_correction: str
    rollout_correction_low: float | None
    rollout_correction_high: float | None
    rollout_correction_self_normalize: bool
    bypass_old_logprobs: bool
    overlong_filter: bool
    overlong_buffer: int
    overlong_penalty: float
    gamma: float
    lam: float
    max_response_len: int

    @classmethod
    def from_config(cls, algorithm, rollout) -> "Objective":
        names = [f for f in cls.__dataclass_fields__ if f != "max_response_len"]
        return cls(**{n: getattr(algorithm, n) for n in names},
                   max_response_len=rollout.max_new_tokens)

    @property
    def uses_ref(self) -> bool:
        return self.kl_estimator in KL_ESTIMATORS and self.kl_coef > 0

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0


def loss_mask(batch: RolloutBatch, obj: Objective) -> torch.Tensor:
    """Response tokens that count in the loss (DAPO overlong filtering removes truncated rows)."""
    if obj.overlong_filter:
        return overlong_filter(batch.response_mask_BT, batch.truncated_B)
    return batch.response_mask_BT


def shaped_rewards(batch: RolloutBatch, obj: Objective) -> torch.Tensor:
    """Task scores plus DAPO's soft overlong punishment ``[B]``."""
    rewards_B = batch.scores_B.float()
    if obj.overlong_buffer > 0:
        rewards_B = rewards_B + obj.overlong_penalty * soft_overlong_punishment(
            batch.response_lengths_B, max_response_len=obj.max_response_len,
            cache_len=obj.overlong_buffer).float()
    return rewards_B


@torch.no_grad()
def compute_advantages(batch: RolloutBatch, obj: Objective) -> None:
    """Fill ``rewards_B``, ``token_rewards_BT``, ``advantages_BT`` (and ``returns_BT`` for GAE)
    on the whole rollout batch (group baselines and batch whitening need all of it)."""
    mask = batch.response_mask_BT  # advantages use the unfiltered mask (see overlong_filter)
    batch.rewards_B = shaped_rewards(batch, obj)
    token_rewards = outcome_token_rewards(batch.rewards_B, mask)
    if obj.kl_in_reward and obj.uses_ref:
        token_rewards = kl_penalized_rewards(token_rewards, batch.old_logprobs_BT,
                                             batch.ref_logprobs_BT, mask, beta=obj.kl_coef,
                                             estimator=obj.kl_estimator)
    batch.token_rewards_BT = token_rewards
    batch.advantages_BT, batch.returns_BT = ADVANTAGE_ESTIMATORS[obj.advantage](
        token_rewards, mask, batch.group_ids_B, batch.values_BT, gamma=obj.gamma, lam=obj.lam)


@torch.no_grad()
def compute_rollout_weights(batch: RolloutBatch, obj: Objective) -> dict[str, float]:
    """Fill ``rollout_is_weights_BT`` (the rollout correction) on the whole rollout batch and
    return its metrics. pi_old and pi_rollout are fixed for the rollout, so the weights are
    computed once; every data-parallel rank holds the whole batch, so a self-normalised weight's
    denominator is the global one whatever the micro-batch and DP split."""
    weights_BT, metrics = ROLLOUT_CORRECTIONS[obj.rollout_correction](
        batch.old_logprobs_BT, batch.rollout_logprobs_BT, loss_mask(batch, obj),
        low=obj.rollout_correction_low, high=obj.rollout_correction_high,
        self_normalize=obj.rollout_correction_self_normalize)
    batch.rollout_is_weights_BT = weights_BT
    return {f"rollout_correction/{k}": v.item() for k, v in metrics.items()}


def policy_loss(mb: RolloutBatch, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor | None,
                obj: Objective, *, global_num_tokens: torch.Tensor,
                global_num_seqs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mini-batch loss, and detached metrics."""
    mask = loss_mask(mb, obj)
    assert mb.rollout_is_weights_BT is not None, "compute_rollout_weights runs before the update"
    loss_BT, metrics = POLICY_LOSSES[obj.policy_loss](
        logprobs_BT, mb.old_logprobs_BT, mb.advantages_BT, mask, eps_low=obj.clip_eps_low,
        eps_high=obj.clip_eps_high, dual_clip_c=obj.dual_clip_c)
    loss_BT = loss_BT * mb.rollout_is_weights_BT
    if obj.opsm_delta >= 0:
        keep_BT, extra = off_policy_sequence_mask(logprobs_BT, mb.rollout_logprobs_BT,
                                                  mb.advantages_BT, mask, delta=obj.opsm_delta)
        loss_BT, metrics = loss_BT * keep_BT, metrics | extra
    if obj.uses_ref and not obj.kl_in_reward:
        kl_BT = KL_ESTIMATORS[obj.kl_estimator](logprobs_BT, mb.ref_logprobs_BT, mask,
                                                old_logprobs_BT=mb.old_logprobs_BT)
        loss_BT = loss_BT + obj.kl_coef * kl_BT
        metrics["kl_ref"] = masked_mean(kl_BT.detach(), mask.bool())
    if obj.needs_entropy_grad:
        loss_BT = loss_BT + entropy_bonus_loss(entropy_BT, mask, coef=obj.entropy_coef)
    loss = AGGREGATIONS[obj.aggregation](loss_BT, mask, global_num_tokens=global_num_tokens,
                                         global_num_seqs=global_num_seqs,
                                         max_response_len=obj.max_response_len)
    return loss, metrics

