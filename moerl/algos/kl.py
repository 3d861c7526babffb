"""KL(pi_theta || pi_ref) estimators, as a loss term or folded into the reward.

Shape-suffix legend:
  B  samples    T  padded per-token length (column t = the token predicted at t)

Per-token estimators from Schulman, "Approximating KL Divergence" (2020), for samples y ~ pi_theta
with ``x = log pi_ref(y) - log pi_theta(y)``:
  ``k1 = -x``                   unbiased, high variance, can be negative
  ``k2 = x^2 / 2``              biased, low variance (its gradient is that of the reverse KL)
  ``k3 = exp(x) - x - 1``       unbiased, >= 0, low variance (GRPO, DeepSeekMath eq. 4)
  ``k3_unbiased``               DeepSeek-V3.2 (2025, sec. "Scaling GRPO", eq. 7):
                                ``(pi_theta / pi_old) * k3`` with the ratio *not* detached.
The tokens are sampled from pi_old (the rollout policy), not pi_theta; once pi_theta has moved
(several mini-batch steps per rollout), plain k3 is biased and its gradient is not the KL's. The
importance ratio corrects both: E_{pi_old}[(pi_theta/pi_old) k3] = KL(pi_theta || pi_ref), and
because the ratio is differentiated, the gradient is that of the true KL.

Every entry of ``KL_ESTIMATORS``:
    fn(logprobs_BT, ref_logprobs_BT, mask_BT, *, old_logprobs_BT=None) -> kl_BT
``old_logprobs_BT`` (pi_old, the sampling policy) is required by ``k3_unbiased`` and not used by
the others. ``kl_BT`` is 0 at masked columns; use it as a loss term ``+ beta * kl_BT`` and reduce
with the policy loss's aggregation. The reference log-probs never get a gradient.

Numerics: wherever a log-ratio is exponentiated it is clamped to [-20, 20] first, as verl's
``low_var_kl`` does; the outputs themselves are not clamped (verl also caps k3 at 10, which
silently zeroes the gradient of the tokens that are furthest from the reference; we do not).
"""

from __future__ import annotations

import torch

from moerl.algos._masked import bool_mask, zero_masked

LOG_RATIO_CLAMP = 20.0


def _ref_log_ratio(
    logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask and ``x = log pi_ref - log pi_theta`` (0 at masked columns)."""
    mask = bool_mask(mask_BT, logprobs_BT=logprobs_BT, ref_logprobs_BT=ref_logprobs_BT)
    return mask, zero_masked(ref_logprobs_BT.detach() - logprobs_BT, mask)


def kl_k1(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``k1 = log pi_theta - log pi_ref``."""
    _, x_BT = _ref_log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT)
    return -x_BT


def kl_k2(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``k2 = (log pi_theta - log pi_ref)^2 / 2``."""
    _, x_BT = _ref_log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT)
    return 0.5 * x_BT**2


def kl_k3(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``k3 = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1`` (0 at masked columns)."""
    mask, x_BT = _ref_log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT)
    x_BT = x_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # expm1(x) - x instead of exp(x) - 1 - x: no cancellation when pi_theta ~ pi_ref.
    return zero_masked(torch.expm1(x_BT) - x_BT, mask)


def kl_k3_unbiased(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3.2's unbiased KL: ``(pi_theta / pi_old) * k3``, gradient through the ratio.

    pi_old is the policy the tokens were sampled from (``old_logprobs_BT``, detached).
    """
    if old_logprobs_BT is None:
        raise ValueError("k3_unbiased needs old_logprobs_BT (the sampling policy's log-probs)")
    mask = bool_mask(mask_BT, old_logprobs_BT=old_logprobs_BT)
    log_ratio_BT = zero_masked(logprobs_BT - old_logprobs_BT.detach(), mask)
    ratio_BT = log_ratio_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    return ratio_BT * kl_k3(logprobs_BT, ref_logprobs_BT, mask_BT)


KL_ESTIMATORS = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3_unbiased": kl_k3_unbiased,
}


@torch.no_grad()
def kl_penalized_rewards(
    token_rewards_BT: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """KL folded into the reward, PPO style (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

    ``r_t <- r_t - beta * kl_t`` on every counted token, with ``kl_t`` from ``estimator`` (k1 as
    in InstructGPT/OpenRLHF, or k2/k3). ``logprobs_BT`` here are the rollout policy's own
    log-probs (``old_logprobs``): the penalty is a fixed part of the return, computed once per
    rollout, and gets no gradient. The per-token penalty (rather than a sum placed on the last
    token) lets GAE and REINFORCE++ credit it to the token that incurred it; for outcome
    estimators that sum the return, the two are the same.
    """
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"estimator for a reward penalty must be k1, k2 or k3, got {estimator!r}")
    mask = bool_mask(mask_BT, token_rewards_BT=token_rewards_BT)
    kl_BT = KL_ESTIMATORS[estimator](logprobs_BT, ref_logprobs_BT, mask)
    return zero_masked(token_rewards_BT, mask) - beta * kl_BT
