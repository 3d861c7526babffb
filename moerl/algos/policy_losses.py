"""Policy-gradient losses: PPO-clip (clip-higher, dual-clip), GSPO, GSPO-token, CISPO.

Shape-suffix legend:
  B  samples in a micro-batch    T  padded per-token length (column t = the token predicted at t)

Every entry of ``POLICY_LOSSES`` has the one signature

    fn(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, *, eps_low, eps_high, dual_clip_c)
        -> (loss_BT, metrics)

``eps_low`` may be None (no lower bound) only for CISPO; ``dual_clip_c`` is read by
``dual_clip`` alone and ignored by the others (as ``max_response_len`` is by most aggregations).

``logprobs`` carry the gradient, ``old_logprobs`` are pi_old (the trainer's recompute, or the
rollout engine's when the caller chooses so). ``loss_BT`` is the per-token loss to *minimise*
(the negated objective), exactly 0 at masked columns; reduce it with ``moerl.algos.aggregation``.
``metrics`` are detached 0-dim tensors over the local micro-batch (no host sync):
  ``clipfrac_low`` / ``clipfrac_high``  fraction of counted tokens whose clip is *active* (the
      clipped branch was selected, so the token's gradient is zero): ratio < 1 - eps_low with
      A < 0, resp. ratio > 1 + eps_high with A > 0. For CISPO: weight truncated (any sign of A).
  ``clipfrac``       their sum.
  ``seq_clipfrac``   fraction of (non-empty) sequences with at least one clipped token; for
      GSPO the fraction of sequences whose sequence ratio is clipped.
  ``ppo_kl``         mean of ``old_logprobs - logprobs`` over counted tokens (k1 estimate of
      KL(pi_old || pi_theta)).
  ``clipfrac_dual``  (dual-clip only) fraction of tokens bounded by ``-c * A``.

Numerics: the log-ratio is computed only at counted columns (``torch.where`` first) and clamped
to [-20, 20] before ``exp`` as verl does, so a ratio never overflows; the clamp only changes
tokens whose ratio is beyond e^20, which the clip has already cut (or, for A < 0 without
dual-clip, whose gradient it stops instead of letting it explode).
"""

from __future__ import annotations

import torch

from moerl.algos._masked import bool_mask, masked_mean, nonempty_rows, seq_mean, zero_masked

LOG_RATIO_CLAMP = 20.0


def _check_eps(eps_low: float | None, eps_high: float, *, low_bound_optional: bool = False) -> None:
    if eps_low is None and not low_bound_optional:
        raise ValueError("eps_low=None (no lower bound) is only valid for CISPO's weight "
                         "truncation; a clipped surrogate needs a lower clip such as 0.2")
    if eps_low is not None and not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must lie in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")


def _prepare(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bool mask, garbage-free advantages and the clamped log-ratio (0 at masked columns)."""
    mask = bool_mask(
        mask_BT,
        logprobs_BT=logprobs_BT,
        old_logprobs_BT=old_logprobs_BT,
        advantages_BT=advantages_BT,
    )
    log_ratio_BT = zero_masked(logprobs_BT - old_logprobs_BT.detach(), mask)
    advantages_BT = zero_masked(advantages_BT.detach(), mask)
    return mask, advantages_BT, log_ratio_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, *, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` and where
    its clip is active, i.e. the gradient is cut: (loss, clipped_low, clipped_high). Any shape;
    token ratios for PPO and GSPO-token, sequence ratios for GSPO."""
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))
    return loss, (adv < 0) & (ratio < 1.0 - eps_low), (adv > 0) & (ratio > 1.0 + eps_high)


@torch.no_grad()
def _clip_metrics(
    clipped_low_BT: torch.Tensor,
    clipped_high_BT: torch.Tensor,
    log_ratio_BT: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    clipped_low_BT = clipped_low_BT & mask
    clipped_high_BT = clipped_high_BT & mask
    low = masked_mean(clipped_low_BT.float(), mask)
    high = masked_mean(clipped_high_BT.float(), mask)
    seq_clipped_B = (clipped_low_BT | clipped_high_BT).any(-1).float()
    return {
        "clipfrac_low": low,
        "clipfrac_high": high,
        "clipfrac": low + high,
        "seq_clipfrac": masked_mean(seq_clipped_B, nonempty_rows(mask)),
        "ppo_kl": masked_mean(-log_ratio_BT.detach(), mask),
    }


def ppo_clip_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with decoupled bounds.

    ``l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)``, ``r_t = pi_theta / pi_old``.
    eps_low == eps_high is PPO/GRPO; eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025,
    eq. 10: 0.2 / 0.28). With ``clip_ratio_c`` (> 1) it is dual-clip PPO (Ye et al. 2020, eq. 6):
    for A < 0 the loss is additionally capped at ``-c * A``, so a token whose ratio exploded above
    c cannot dominate the update; for A >= 0 nothing changes.
    """
    _check_eps(eps_low, eps_high)
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    mask, adv_BT, log_ratio_BT = _prepare(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT)
    loss_BT, low_BT, high_BT = _clipped_surrogate(
        log_ratio_BT.exp(), adv_BT, eps_low=eps_low, eps_high=eps_high
    )
    metrics = _clip_metrics(low_BT, high_BT, log_ratio_BT, mask)
    if clip_ratio_c is not None:
        bound_BT = -adv_BT * clip_ratio_c
        dual_BT = (adv_BT < 0) & (loss_BT > bound_BT)
        loss_BT = torch.where(dual_BT, bound_BT, loss_BT)
        metrics["clipfrac_dual"] = masked_mean(dual_BT.float(), mask).detach()
    return zero_masked(loss_BT, mask), metrics


def gspo_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. 5-7).

    ``s_i = exp(mean_t log(pi_theta / pi_old))`` over the counted tokens of response i (the
    length-normalised sequence ratio), clipped at the sequence level to
    ``[1 - eps_low, 1 + eps_high]`` (the paper uses 3e-4 / 4e-4). The sequence advantage ``A_i``
    is the mean of ``advantages_BT`` over the response (they are constant per response for
    GRPO-style estimators). The sequence loss ``-min(s_i A_i, clip(s_i) A_i)`` is written on
    every counted token, so ``seq_mean_token_mean`` aggregation gives the paper's
    ``(1/G) sum_i`` objective; ``token_mean`` would weight sequences by their length.
    """
    _check_eps(eps_low, eps_high)
    mask, adv_BT, log_ratio_BT = _prepare(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT)
    log_seq_ratio_B = seq_mean(log_ratio_BT, mask)
    seq_loss_B, low_B, high_B = _clipped_surrogate(
        log_seq_ratio_B.exp(), seq_mean(adv_BT, mask), eps_low=eps_low, eps_high=eps_high
    )
    loss_BT = zero_masked(seq_loss_B[:, None].expand(mask.shape), mask)
    metrics = _clip_metrics(
        low_B[:, None].expand(mask.shape), high_B[:, None].expand(mask.shape), log_ratio_BT, mask
    )
    return loss_BT, metrics


def gspo_token_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token (Zheng et al. 2025, eqs. 13-14): per-token advantages, sequence-level ratio.

    ``s_it = sg(s_i) * pi_theta(y_t) / sg(pi_theta(y_t))``: numerically ``s_i`` on every token,
    with the gradient of ``log pi_theta(y_t)`` alone, so each token can carry its own advantage.
    ``l_t = -min(s_it A_t, clip(s_it) A_t)``. With a constant advantage per response and
    ``seq_mean_token_mean`` aggregation it equals GSPO in value and gradient.
    """
    _check_eps(eps_low, eps_high)
    mask, adv_BT, log_ratio_BT = _prepare(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT)
    log_seq_ratio_B = seq_mean(log_ratio_BT, mask).detach()
    token_logprobs_BT = zero_masked(logprobs_BT, mask)
    ratio_BT = (log_seq_ratio_B[:, None] + token_logprobs_BT - token_logprobs_BT.detach()).exp()
    loss_BT, low_BT, high_BT = _clipped_surrogate(
        ratio_BT, adv_BT, eps_low=eps_low, eps_high=eps_high
    )
    metrics = _clip_metrics(low_BT, high_BT, log_ratio_BT, mask)
    return zero_masked(loss_BT, mask), metrics


def cispo_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float | None = None,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, 2025, eq. 4): clip the importance weight, never the gradient.

    ``l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi_theta(y_t)``. Every token
    keeps its gradient ``-w_t A_t grad log pi``; only the weight is truncated. ``eps_low=None``
    means no lower bound, the setting MiniMax-M1 reports using. The loss *value* contains
    ``log pi`` (as in verl's CISPO), so it is not comparable to a PPO surrogate; the gradient is.
    """
    _check_eps(eps_low, eps_high, low_bound_optional=True)
    mask, adv_BT, log_ratio_BT = _prepare(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT)
    ratio_BT = log_ratio_BT.detach().exp()
    low = None if eps_low is None else 1.0 - eps_low
    weight_BT = ratio_BT.clamp(min=low, max=1.0 + eps_high)
    loss_BT = -weight_BT * adv_BT * zero_masked(logprobs_BT, mask)
    below_BT = ratio_BT < low if low is not None else torch.zeros_like(mask)
    metrics = _clip_metrics(below_BT, ratio_BT > 1.0 + eps_high, log_ratio_BT, mask)
    return zero_masked(loss_BT, mask), metrics


def ppo_clip(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Registry entry ``ppo_clip``: :func:`ppo_clip_loss` without dual-clip (GRPO: equal bounds;
    DAPO: 0.2 / 0.28). ``dual_clip_c`` is not used."""
    return ppo_clip_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT,
                         eps_low=eps_low, eps_high=eps_high)


def dual_clip(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Registry entry ``dual_clip``: :func:`ppo_clip_loss` with ``clip_ratio_c = dual_clip_c``
    (Ye et al. 2020 use c = 3)."""
    if dual_clip_c is None:
        raise ValueError("dual_clip needs dual_clip_c > 1 (Ye et al. 2020 use 3)")
    return ppo_clip_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT,
                         eps_low=eps_low, eps_high=eps_high, clip_ratio_c=dual_clip_c)


# One signature (see the module docstring). Bounds the papers use:
#   ppo_clip: eps 0.2 (GRPO), 0.2 / 0.28 (DAPO) | dual_clip: + c = 3 | gspo, gspo_token: 3e-4 / 4e-4
#   cispo: eps_low None (no lower bound), eps_high tuned
POLICY_LOSSES = {
    "ppo_clip": ppo_clip,
    "dual_clip": dual_clip,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "cispo": cispo_loss,
}
