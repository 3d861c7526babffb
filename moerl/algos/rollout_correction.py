"""Rollout corrections: importance weights for the train/inference mismatch.

Shape-suffix legend:
  B  samples    T  padded per-token length (column t = the token predicted at t)

The rollout engine samples from pi_rollout; the trainer's recompute of the same policy is pi_old
(``old_logprobs``). They differ (kernels, precision, MoE routing), so the samples are slightly
off-policy even before any update. Every correction here is built from the per-token log-ratio
``log r_t = log pi_old(y_t) - log pi_rollout(y_t)`` over the counted tokens, at one **level**:

  ``token``      ``w_t = r_t``                                   the unit is a token
  ``seq``        ``w_i = prod_t r_t``  (sum of log-ratios)        the unit is a sequence
  ``geo``        ``w_i = (prod_t r_t)^(1/|o_i|)`` (mean log-ratio) the unit is a sequence

and one **mode** with two-sided bounds ``[low, high]`` (``0 <= low <= 1 <= high < inf``;
``low = 0`` is no lower bound):

  ``truncate``   ``w <- clip(w, low, high)``                      (TIS)
  ``mask``       ``w <- w`` inside the bounds, ``0`` outside       (MIS, IcePop)
  ``reject``     every token of a sequence gets 0 if *any* of its units is outside the bounds;
                 kept sequences keep their weights. At ``seq``/``geo`` level the unit is the
                 sequence, so ``reject`` and ``mask`` coincide by definition.

Sequence weights are written on every counted token of the sequence. The weight multiplies the
per-token policy loss (detached), as verl's "decoupled" rollout correction does: pi_old stays the
PPO anchor, ``w`` corrects pi_rollout -> pi_old.

Self-normalised weights (``self_normalize=True``) are divided by their mean over the units of the
batch passed in (tokens at ``token`` level, non-empty sequences otherwise), so that they average
to exactly 1 (Owen 2013, ch. 9.2; verl's ``rollout_is_batch_normalize``). Call it on the **whole
rollout batch**: every data-parallel rank holds the whole batch (log-probs are all-gathered), so
the normaliser is the global one and micro-batching or DP splits cannot change it.

Metrics (detached 0-dim tensors over the batch passed in, before self-normalisation unless said):
  ``weight_mean``     mean weight over counted tokens (after self-normalisation)
  ``truncated_frac``  fraction of units whose weight was clipped to a bound (truncate)
  ``masked_frac``     fraction of counted tokens whose weight is 0 because of the bounds
  ``rejected_frac``   fraction of non-empty sequences all of whose tokens got weight 0
  ``ess``             normalised effective sample size ``(sum w)^2 / (n sum w^2)`` over the units
                      (1: uniform weights; 1/n: one unit carries everything; 0 if all are 0)

Every entry of ``ROLLOUT_CORRECTIONS`` has the one signature

    fn(old_logprobs_BT, rollout_logprobs_BT, mask_BT, *, low=None, high=None,
       self_normalize=False) -> (weights_BT, metrics)

where ``low``/``high`` None take the entry's default bounds (its source's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moerl.algos._masked import bool_mask, masked_mean, nonempty_rows, zero_masked

LEVELS = ("token", "seq", "geo")
MODES = ("truncate", "mask", "reject")


def _check_bounds(low: float, high: float) -> None:
    if not (0.0 <= low <= 1.0 <= high < math.inf):
        raise ValueError(f"rollout-correction bounds need 0 <= low <= 1 <= high < inf, got "
                         f"low={low}, high={high} (low=0 means no lower bound)")


def _unit_log_weights(log_r_BT: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Log-weight of each token's unit, broadcast to ``[B, T]`` (0 at masked columns)."""
    if level == "token":
        return log_r_BT
    total_B = log_r_BT.sum(-1)
    if level == "geo":
        total_B = total_B / mask.sum(-1).clamp(min=1).to(total_B.dtype)
    return zero_masked(total_B[:, None].expand(mask.shape), mask)


def _units(x_BT: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """The per-unit values: counted tokens at token level, one per non-empty sequence else."""
    if level == "token":
        return x_BT[mask]
    rows_B = nonempty_rows(mask)
    first_B1 = mask.float().argmax(-1, keepdim=True)  # every counted token holds the unit's value
    return x_BT.gather(-1, first_B1).squeeze(-1)[rows_B]


def _ess(w_U: torch.Tensor) -> torch.Tensor:
    sq = (w_U**2).sum()
    if w_U.numel() == 0 or sq == 0:
        return torch.zeros((), dtype=w_U.dtype)
    return w_U.sum() ** 2 / (w_U.numel() * sq)


@torch.no_grad()
def importance_weights(
    old_logprobs_BT: torch.Tensor,
    rollout_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    level: str,
    mode: str,
    low: float,
    high: float,
    self_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights pi_old / pi_rollout at ``level`` with ``mode`` (module docstring).

    Returns ``(weights_BT, metrics)``; weights are 0 at masked columns. Computed in log space:
    a sequence's product of ratios never overflows before it is bounded.
    """
    if level not in LEVELS or mode not in MODES:
        raise ValueError(f"level must be one of {LEVELS} and mode one of {MODES}, got "
                         f"{level!r}, {mode!r}")
    _check_bounds(low, high)
    mask = bool_mask(
        mask_BT, old_logprobs_BT=old_logprobs_BT, rollout_logprobs_BT=rollout_logprobs_BT
    )
    log_r_BT = zero_masked(old_logprobs_BT.float() - rollout_logprobs_BT.float(), mask)
    log_w_BT = _unit_log_weights(log_r_BT, mask, level)
    log_low = math.log(low) if low > 0 else -math.inf
    inside_BT = (log_w_BT >= log_low) & (log_w_BT <= math.log(high))
    if mode == "truncate":
        weights_BT = log_w_BT.clamp(log_low, math.log(high)).exp()
        keep_BT = mask
    else:
        keep_BT = mask & inside_BT
        if mode == "reject":
            keep_BT = mask & (inside_BT | ~mask).all(-1, keepdim=True)
        weights_BT = zero_masked(log_w_BT, keep_BT).exp()
    weights_BT = zero_masked(weights_BT, keep_BT)
    metrics = _metrics(weights_BT, mask, keep_BT, inside_BT, level=level, mode=mode)
    if self_normalize:
        normaliser = _units(weights_BT, mask, level).mean() if mask.any() else None
        if normaliser is not None and normaliser > 0:
            weights_BT = weights_BT / normaliser
        metrics["weight_mean"] = masked_mean(weights_BT, mask)
    return weights_BT, metrics


def _metrics(weights_BT, mask, keep_BT, inside_BT, *, level: str, mode: str):
    rows_B = nonempty_rows(mask)
    outside_U = ~_units(inside_BT, mask, level)
    zero = torch.zeros((), dtype=weights_BT.dtype)
    return {
        "weight_mean": masked_mean(weights_BT, mask),
        "truncated_frac": outside_U.float().mean() if mode == "truncate" and outside_U.numel()
        else zero,
        "masked_frac": masked_mean((mask & ~keep_BT).float(), mask),
        "rejected_frac": masked_mean((rows_B & ~keep_BT.any(-1)).float(), rows_B),
        "ess": _ess(_units(weights_BT, mask, level)),
    }


@dataclass(frozen=True)
class RolloutCorrection:
    """A registry entry: a level, a mode and the default bounds of its source."""

    level: str
    mode: str
    low: float
    high: float
    source: str

    def __call__(self, old_logprobs_BT, rollout_logprobs_BT, mask_BT, *, low=None, high=None,
                 self_normalize=False):
        return importance_weights(
            old_logprobs_BT, rollout_logprobs_BT, mask_BT, level=self.level, mode=self.mode,
            low=self.low if low is None else low, high=self.high if high is None else high,
            self_normalize=self_normalize)


@torch.no_grad()
def no_correction(old_logprobs_BT, rollout_logprobs_BT, mask_BT, *, low=None, high=None,
                  self_normalize=False):
    """Registry entry ``none``: weight 1 on every counted token, no metrics."""
    mask = bool_mask(
        mask_BT, old_logprobs_BT=old_logprobs_BT, rollout_logprobs_BT=rollout_logprobs_BT
    )
    return mask.float(), {}


_TIS = ("Yao et al. 2025, 'Your Efficient RL Framework Secretly Brings You Off-Policy RL "
        "Training' (TIS, C = 2)")
_MIS = ("Liu et al. 2025, 'When Speed Kills Stability: Demystifying RL Collapse from the "
        "Training-Inference Mismatch' (token/sequence MIS, C = 2)")
_VERL = "verl's and miles' rollout-correction docs"
ROLLOUT_CORRECTIONS = {
    "none": no_correction,
    "tis": RolloutCorrection("token", "truncate", 0.0, 2.0, _TIS),
    "icepop": RolloutCorrection("token", "mask", 0.5, 5.0,
                                "Ling team 2025, IcePop (Ring-1T, arXiv:2510.18855): "
                                "alpha = 0.5, beta = 5"),
    "token_truncate": RolloutCorrection("token", "truncate", 0.0, 2.0, _TIS),
    "token_mask": RolloutCorrection("token", "mask", 0.0, 2.0, _MIS),
    "token_reject": RolloutCorrection("token", "reject", 0.5, 2.0,
                                      f"{_VERL}: a sequence with an extreme token is vetoed"),
    "seq_truncate": RolloutCorrection("seq", "truncate", 0.0, 2.0,
                                      f"{_VERL} (sequence-level TIS)"),
    "seq_mask": RolloutCorrection("seq", "mask", 0.0, 2.0, _MIS),
    "seq_reject": RolloutCorrection("seq", "reject", 0.0, 2.0, _MIS),
    "geo_truncate": RolloutCorrection("geo", "truncate", 0.0, 2.0,
                                      f"{_VERL} (geometric-mean ratio)"),
    "geo_mask": RolloutCorrection("geo", "mask", 0.999, 1.001,
                                  f"{_VERL} (geometric rejection sampling, [0.999, 1.001])"),
    "geo_reject": RolloutCorrection("geo", "reject", 0.999, 1.001,
                                    f"{_VERL} (geometric rejection sampling, [0.999, 1.001])"),
}
