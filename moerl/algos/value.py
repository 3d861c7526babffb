"""Critic loss and auxiliary per-token terms: clipped value loss, entropy bonus, PPO-ptx.

Shape-suffix legend:
  B  samples    T  padded per-token length (column t = the token predicted at t)

Every function returns a per-token loss ``[B, T]`` (to minimise, 0 at masked columns) that is
reduced with ``moerl.algos.aggregation`` like the policy loss.
"""

from __future__ import annotations

import torch

from moerl.algos._masked import bool_mask, masked_mean, zero_masked


def clipped_value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_eps: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO value loss with value clipping (as in OpenAI baselines' ppo2 and OpenRLHF).

    ``l_t = max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) / 2``: the critic cannot
    gain by moving further than ``eps`` from its rollout-time prediction ``V_old``.
    ``clip_eps=None`` gives the plain ``(V - R)^2 / 2``. Metrics: ``vf_clipfrac`` (fraction of
    counted tokens where the clipped branch is the larger one, i.e. its gradient is zero).
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    mask = bool_mask(
        mask_BT, values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT
    )
    values_BT = zero_masked(values_BT, mask)
    returns_BT = zero_masked(returns_BT.detach(), mask)
    unclipped_BT = (values_BT - returns_BT) ** 2
    if clip_eps is None:
        no_clip = torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)
        return zero_masked(0.5 * unclipped_BT, mask), {"vf_clipfrac": no_clip}
    old_values_BT = zero_masked(old_values_BT.detach(), mask)
    clipped_values_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip_eps, clip_eps)
    clipped_BT = (clipped_values_BT - returns_BT) ** 2
    loss_BT = 0.5 * torch.maximum(unclipped_BT, clipped_BT)
    vf_clipfrac = masked_mean((clipped_BT > unclipped_BT).float(), mask).detach()
    return zero_masked(loss_BT, mask), {"vf_clipfrac": vf_clipfrac}


def entropy_bonus_loss(
    entropy_BT: torch.Tensor, mask_BT: torch.Tensor, *, coef: float
) -> torch.Tensor:
    """Entropy bonus as a loss term: ``-coef * H_t`` (maximising entropy, Mnih et al. 2016).

    ``entropy_BT`` is the per-position entropy of pi_theta over the full vocabulary, with grad.
    """
    mask = bool_mask(mask_BT, entropy_BT=entropy_BT)
    return -coef * zero_masked(entropy_BT, mask)


def ptx_loss(
    ptx_logprobs_BT: torch.Tensor, ptx_mask_BT: torch.Tensor, *, coef: float
) -> torch.Tensor:
    """PPO-ptx language-model term (InstructGPT, Ouyang et al. 2022, eq. 2).

    The objective adds ``gamma * E_{x ~ D_pretrain}[log pi(x)]``; as a loss that is
    ``-coef * log pi(x_t)`` on the pretraining batch's tokens. InstructGPT averages it per token,
    so reduce it with ``token_mean`` over the pretraining batch's own token count.
    """
    mask = bool_mask(ptx_mask_BT, ptx_logprobs_BT=ptx_logprobs_BT)
    return -coef * zero_masked(ptx_logprobs_BT, mask)
