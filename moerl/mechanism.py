"""The mechanism behind routing replay, measured every step: mismatch and gradient split by routing.

The R3 paper's argument (Ma et al. 2025, arXiv:2510.11370) is that tokens the engine and the
trainer route to different experts carry most of the train/inference mismatch, and that the
mismatch compounds with the number of MoE layers. These functions measure exactly that from what
a step already has, with a token's routing being the top-k expert set of every MoE layer at the
position that predicts it (the column convention of ``RolloutBatch``):

- :func:`mismatch_split_counts` / :func:`mismatch_split_metrics`: the distribution of
  ``|old_logprobs - rollout_logprobs|`` (trainer pi_old vs engine) for tokens routed identically
  vs tokens whose experts differ in at least one layer, and the k3 KL per number of differing
  layers;
- :func:`grad_split_sums` / :func:`grad_split_metrics`: how the policy-gradient weight
  ``|dL/d logp_t|`` and the clip fraction split between the two groups in the update.

Counts and sums are additive over disjoint tokens, so data-parallel ranks (and micro-batches) add
theirs before the ratios are taken. Shape suffixes: B batch, T positions, L MoE layers, K top-k.
"""

from __future__ import annotations

import math

import torch

from moerl.batch import RolloutBatch
from moerl.objective import AGGREGATIONS, POLICY_LOSSES, Objective, loss_mask

# Upper edges of the |log ratio| histogram bins (the last bin is open): log-spaced from 1e-4,
# where bf16 rounding lives, to 1, a ratio of e.
LOGRATIO_EDGES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
NUM_BINS = len(LOGRATIO_EDGES) + 1
GROUPS = ("same", "rerouted")


def route_diff_layers(routes_a_BTLK: torch.Tensor, routes_b_BTLK: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, T]``: in how many MoE layers the two routings pick different expert sets
    (order-insensitive, as :func:`moerl.trainer.routing_replay.routing_agreement`)."""
    if routes_a_BTLK.shape != routes_b_BTLK.shape or routes_a_BTLK.dim() != 4:
        raise ValueError(f"routes must both be [B, T, L, K], got {tuple(routes_a_BTLK.shape)} "
                         f"and {tuple(routes_b_BTLK.shape)}")
    same_BTL = (routes_a_BTLK.sort(dim=-1).values == routes_b_BTLK.sort(dim=-1).values).all(-1)
    return (~same_BTL).sum(-1, dtype=torch.int64)


def mismatch_split_counts(logratio_BT: torch.Tensor, diff_layers_BT: torch.Tensor,
                          mask_BT: torch.Tensor, *, num_layers: int) -> torch.Tensor:
    """float64 sums behind :func:`mismatch_split_metrics`, additive over disjoint tokens.

    ``logratio_BT`` is ``old_logprobs - rollout_logprobs``; ``diff_layers_BT`` from
    :func:`route_diff_layers`; only ``mask_BT`` positions count. Layout: per group (same,
    rerouted) the token count, the sum of ``|log ratio|`` and the ``NUM_BINS`` histogram; then per
    number of differing layers ``d = 0..num_layers`` the token count and the sum of k3.
    """
    mask = mask_BT.bool()
    x_N = logratio_BT[mask].double()
    d_N = diff_layers_BT[mask].long()
    if d_N.numel() and int(d_N.max()) > num_layers:
        raise ValueError(f"a token differs in {int(d_N.max())} layers but num_layers={num_layers}")
    bins_N = torch.bucketize(x_N.abs(), torch.tensor(LOGRATIO_EDGES, dtype=torch.float64))
    parts = []
    for rerouted in (False, True):
        pick = (d_N > 0) == rerouted
        parts += [pick.sum().double()[None], x_N.abs()[pick].sum()[None],
                  torch.bincount(bins_N[pick], minlength=NUM_BINS).double()]
    clamped = x_N.clamp(-20.0, 20.0)
    k3_N = torch.expm1(clamped) - clamped  # k3 of KL(rollout || old) on rollout samples
    parts += [torch.bincount(d_N, minlength=num_layers + 1).double(),
              torch.bincount(d_N, weights=k3_N, minlength=num_layers + 1).double()]
    return torch.cat(parts)


def mismatch_split_metrics(counts: torch.Tensor, *, num_layers: int) -> dict[str, float]:
    """Scalar metrics from :func:`mismatch_split_counts` (after summing over ranks):
    ``mech/tokens_{group}``, ``mech/abs_logratio_{group}`` (mean, NaN for an empty group),
    ``mech/hist_{group}_b{i}`` (token counts per bin of ``LOGRATIO_EDGES``),
    ``mech/tokens_dlayers{d}`` and ``mech/k3_dlayers{d}`` (mean k3 of tokens whose routing differs
    in exactly d layers; NaN when there are none)."""
    out: dict[str, float] = {}
    per_group = 2 + NUM_BINS
    for g, name in enumerate(GROUPS):
        block = counts[g * per_group:(g + 1) * per_group].tolist()
        out[f"mech/tokens_{name}"] = block[0]
        out[f"mech/abs_logratio_{name}"] = block[1] / block[0] if block[0] else math.nan
        out.update({f"mech/hist_{name}_b{i}": v for i, v in enumerate(block[2:])})
    rest = counts[2 * per_group:]
    tokens, k3 = rest[:num_layers + 1].tolist(), rest[num_layers + 1:].tolist()
    for d in range(num_layers + 1):
        out[f"mech/tokens_dlayers{d}"] = tokens[d]
        out[f"mech/k3_dlayers{d}"] = k3[d] / tokens[d] if tokens[d] else math.nan
    return out


def grad_split_sums(grad_BT: torch.Tensor, advantages_BT: torch.Tensor, mask_BT: torch.Tensor,
                    rerouted_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group, sums over the loss tokens: ``tokens``, ``|grad|`` (the policy-gradient weight
    ``|dL/d logp_t|`` of each token: what multiplies ``grad logp_t`` in the parameter gradient),
    ``active`` (tokens with a nonzero advantage) and ``clipped`` (active tokens whose weight is
    exactly zero: the ratio clip, or a rollout correction, removed their gradient). 0-dim float
    tensors keyed ``mech_sum/{quantity}_{group}``."""
    mask = mask_BT.bool()
    active_BT = mask & (advantages_BT != 0)
    zero_BT = grad_BT.detach() == 0
    out = {}
    for name, pick_BT in zip(GROUPS, (~rerouted_BT.bool(), rerouted_BT.bool())):
        out[f"mech_sum/tokens_{name}"] = (mask & pick_BT).sum().float()
        out[f"mech_sum/grad_{name}"] = grad_BT.detach().abs()[mask & pick_BT].sum().float()
        out[f"mech_sum/active_{name}"] = (active_BT & pick_BT).sum().float()
        out[f"mech_sum/clipped_{name}"] = (active_BT & pick_BT & zero_BT).sum().float()
    return out


def grad_split_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Ratios from :func:`grad_split_sums`' sums (any common scale: averaged over micro-batches
    and ranks alike): ``mech/grad_share_rerouted`` (fraction of the total gradient weight on
    rerouted tokens), ``mech/grad_per_token_{group}`` and ``mech/clipfrac_{group}``."""
    def ratio(a, b):
        return a / b if b else math.nan

    total = sum(sums[f"mech_sum/grad_{g}"] for g in GROUPS)
    out = {"mech/grad_share_rerouted": ratio(sums["mech_sum/grad_rerouted"], total)}
    for g in GROUPS:
        out[f"mech/grad_per_token_{g}"] = ratio(sums[f"mech_sum/grad_{g}"],
                                                sums[f"mech_sum/tokens_{g}"])
        out[f"mech/clipfrac_{g}"] = ratio(sums[f"mech_sum/clipped_{g}"],
                                          sums[f"mech_sum/active_{g}"])
    return out


def policy_grad_weights(mb: RolloutBatch, logprobs_BT: torch.Tensor, obj: Objective, *,
                        global_num_tokens: torch.Tensor,
                        global_num_seqs: torch.Tensor) -> torch.Tensor:
    """``dL_pg/d logprobs_BT`` of the policy-gradient term alone (rollout correction included;
    the KL and entropy terms and OPSM's sequence mask left out, so a clipped token's weight is
    exactly zero), aggregated as the objective aggregates it. Differentiates the loss math only, not the model."""
    mask = loss_mask(mb, obj)
    loss_BT, _ = POLICY_LOSSES[obj.policy_loss](
        logprobs_BT, mb.old_logprobs_BT, mb.advantages_BT, mask, eps_low=obj.clip_eps_low,
        eps_high=obj.clip_eps_high, dual_clip_c=obj.dual_clip_c)
    loss = AGGREGATIONS[obj.aggregation](loss_BT * mb.rollout_is_weights_BT, mask,
                                         global_num_tokens=global_num_tokens,
                                         global_num_seqs=global_num_seqs,
                                         max_response_len=obj.max_response_len)
    (grad_BT,) = torch.autograd.grad(loss, logprobs_BT, retain_graph=True)
    return grad_BT


def update_sums(mb: RolloutBatch, logprobs_BT: torch.Tensor, obj: Objective, *,
                global_num_tokens: torch.Tensor,
                global_num_seqs: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`grad_split_sums` of one micro-batch, rerouted meaning that the engine's routes and
    the trainer's natural routes differ in at least one MoE layer; empty when the batch has no
    routes (an engine that does not return them) or the log-probs carry no gradient."""
    if mb.routes_BTLK is None or mb.trainer_routes_BTLK is None or not logprobs_BT.requires_grad:
        return {}
    grad_BT = policy_grad_weights(mb, logprobs_BT, obj, global_num_tokens=global_num_tokens,
                                  global_num_seqs=global_num_seqs)
    rerouted_BT = route_diff_layers(mb.routes_BTLK, mb.trainer_routes_BTLK) > 0
    return grad_split_sums(grad_BT, mb.advantages_BT, loss_mask(mb, obj),
                           rerouted_BT.to(grad_BT.device))
